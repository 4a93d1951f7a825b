"""`herald rollout abort [--rollback]`: end a rollout, and send the hosts it gave a new generation
back to the content they ran before.

Agents refuse a `current` older than what they deployed, so going back is going forward: each
host the rollout gave its release gets a new generation holding its previous release's content
(its files, signed again). That reaches a host that is offline now when it returns, as any release
does. The content the rollout held back, and the content it gave and took back, are not released
again until the host's content changes (publisher.holdback): the fleet repository still holds them.
"""

import msgspec
from loguru import logger

from protocol.errors import ReleaseError
from protocol.files import Flusher
from protocol.layout import StateDir
from protocol.messages import now
from protocol.release import (
    Current,
    Manifest,
    decode_manifest,
    encode_manifest,
    signature_bytes,
    signed_by,
    split_release,
)
from publisher.chroot import Chroot
from publisher.keyring import load_keys, trusted
from publisher.publish import publish_lock, read_floors, write_floors
from publisher.rollout import abort, locked, read_book, write_book


def abort_rollout(state: StateDir, *, rollback: bool) -> str:
    """Abort the running rollout; with `rollback`, re-release each given host's previous content."""
    if not rollback:
        with locked(state):
            return abort(state)[0]
    with publish_lock(state.publisher / "lock"), locked(state):  # it writes releases and generations
        line, rollout = abort(state)
        keys = load_keys(state)
        keys_trusted = trusted(state).trusted
        generations_file = state.publisher / "generations.json"
        generations = read_floors(generations_file)
        book = read_book(state)
        flusher = Flusher(state.root)
        back: list[str] = []
        kept: list[str] = []
        for host, target in sorted(rollout.hosts.items()):
            chroot = Chroot(state.chroot(host), flusher)
            current = chroot.current()
            previous = _verified(chroot, host, target.previous, keys_trusted) if target.previous else None
            if current is None or current.version != target.version or previous is None:
                kept.append(host)  # never given it, given something since, or nothing to go back to
                continue
            generation = max(generations.get(host, 0), current.generation) + 1
            manifest = Manifest(
                format=target.format,
                host=host,
                generation=generation,
                version=previous.version,
                published_at=now(),
                source_rev=previous.source_rev,
                content=previous.content,
            )
            data = encode_manifest(manifest)
            chroot.write_release(manifest, data, keys.signer.sign(data))
            flusher.flush()  # the release is on disk before `current` names it
            counted = keys.count if target.format >= 2 else None
            chroot.set_current(Current(generation, previous.version, target.format, counted))
            generations[host] = generation
            book.aborted[host] = target.version
            back.append(host)
        flusher.flush()
        write_floors(generations_file, generations)
        write_book(state, book)
    line += f"; {len(back)} host(s) sent back to their previous content"
    if kept:
        line += f", {len(kept)} kept what they run ({', '.join(kept[:10])})"
    return line


def _verified(chroot: Chroot, host: str, generation: int, keys: list[str]) -> Manifest | None:
    """The host's release `generation` as its agent would take it: signed by a key the publisher
    trusts, for this host and generation, its content checked. Whoever can write a chroot but
    holds no key (a compromised `herald serve`, a mirror) must not get content of its own choice,
    or an older release's, signed again here; None (and a warning) for anything else."""
    path = chroot.releases / str(generation)
    try:
        manifest, signature = split_release(path.read_bytes())
        key = signed_by(manifest, signature_bytes(signature), keys)
        decoded = (
            decode_manifest(manifest, host=host, current=Current(generation, _version(manifest)))
            if key is not None
            else None
        )
    except (OSError, ReleaseError) as exc:
        logger.bind(host=host).warning("{}: not sent back to it: {}", path, exc)
        return None
    if decoded is None:
        logger.bind(host=host).warning(
            "{}: not sent back to it: its signature verifies against no key the publisher trusts", path
        )
    return decoded


class _Version(msgspec.Struct):
    version: str


def _version(manifest: bytes) -> str:
    """The version a MANIFEST claims (decode_manifest then checks it against its content)."""
    try:
        return msgspec.json.decode(manifest, type=_Version).version
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ReleaseError(f"malformed MANIFEST: {exc}") from exc
