"""`herald rollout abort [--rollback]`: end a rollout, and send the hosts it gave a new generation
back to the content they ran before.

Agents refuse a `current` older than what they deployed, so going back is going forward: each
host the rollout gave its release gets a new generation holding its previous release's content
(its files, signed again). That reaches a host that is offline now when it returns, as any release
does. The content the rollout held back, and the content it gave and took back, are not released
again until the host's content changes (publisher.holdback): the fleet repository still holds them.
"""

from protocol.files import Flusher
from protocol.layout import StateDir
from protocol.messages import now
from protocol.release import Current, Manifest, encode_manifest
from publisher.chroot import Chroot
from publisher.keyring import load_keys
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
        generations_file = state.publisher / "generations.json"
        generations = read_floors(generations_file)
        book = read_book(state)
        flusher = Flusher(state.root)
        back: list[str] = []
        kept: list[str] = []
        for host, target in sorted(rollout.hosts.items()):
            chroot = Chroot(state.chroot(host), flusher)
            current = chroot.current()
            previous = chroot.manifest(target.previous) if target.previous else None
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
