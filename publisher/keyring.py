"""The publisher's keys over a fleet's life: the signing key, and the statements agents follow.

STATE/publisher/private/signing.key  the key releases are signed with now (0600)
STATE/publisher/keys              the key statements (protocol.keychain), as every chroot's
                                  credentials/publisher.keys holds them
STATE/publisher/private/signing.key.new  a key being rotated in: the next `herald key rotate` finishes a
                                  rotation interrupted after its statement was written, or
                                  starts again from one interrupted before

`rotate` makes a new key and a statement, signed by the current key, that adds it; from then on
releases are signed by the new key, and the old private key is gone. `retire` adds a statement,
signed by the current key, that retires others: agents refuse what those sign once they have
followed it. Both place the statements in every chroot at once (and count them in the `current`
of format-2 releases, so that agents look at their next check); every publish places them too.
The caller holds the publish lock.
"""

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import msgspec

from protocol.errors import ConfigError, NotYetError
from protocol.files import Flusher, fsync_dir, write_atomic
from protocol.keychain import Link, Statement, Trust, encode_link, follow, parse
from protocol.layout import StateDir
from protocol.messages import now
from protocol.release import decode_public_key, encode_public_key
from protocol.topics import is_host_name
from publisher.accounts import host_accounts
from publisher.chroot import Chroot
from publisher.signing import Signer, settle_key

GENESIS: Final = "the first signing key"


@dataclass(frozen=True, slots=True)
class Keys:
    """The signing key and the statements, as one publish run uses them."""

    signer: Signer
    chain: bytes

    @property
    def count(self) -> int:
        return self.chain.count(b"\n")

    @property
    def mark(self) -> str:
        """What STATE/publisher/distributed.pub holds once every chroot has this key and chain."""
        if not self.chain:
            return self.signer.public
        return f"{self.signer.public} {hashlib.sha256(self.chain).hexdigest()}"


def chain_path(state: StateDir) -> Path:
    return state.publisher / "keys"


def mark_path(state: StateDir) -> Path:
    return state.publisher / "distributed.pub"


def read_chain(state: StateDir) -> bytes:
    """The statements (empty before the first rotation)."""
    try:
        return chain_path(state).read_bytes()
    except FileNotFoundError:
        return b""


def load_keys(state: StateDir) -> Keys:
    """The signing key (made on first use: never again once releases were signed here, as agents
    pinned that key) and the statements."""
    settle_key(state)
    if not state.signing_key.exists() and (mark_path(state).exists() or chain_path(state).exists()):
        raise ConfigError(
            f"{state.signing_key}: no signing key, but this state has signed releases: restore the key "
            "(or the state's backup); a new one would be refused by every agent"
        )
    return Keys(Signer.load_or_create(state.signing_key), read_chain(state))


def links(state: StateDir) -> list[Link]:
    try:
        return parse(read_chain(state))
    except NotYetError as exc:
        raise ConfigError(f"{chain_path(state)}: {exc}") from None


def trusted(state: StateDir) -> Trust:
    """What an agent that followed every statement from the first signing key trusts."""
    found = links(state)
    genesis = found[0].statement.by if found else _signer(state).public
    try:
        trust, _ = follow(Trust.rooted(genesis, GENESIS), found)
    except NotYetError as exc:
        raise ConfigError(f"{chain_path(state)}: {exc}") from None
    return trust


def rotate(state: StateDir, *, retire_old: bool = False) -> list[str]:
    """A new signing key, added by a statement the current one signs; what was done, one line each."""
    old = _signer(state)
    pending = state.pending_key
    found = links(state)
    done: list[str] = []
    if pending.exists():
        new = Signer.load(pending)
        last = found[-1].statement if found else None
        if last is None or new.public not in last.add or last.by != old.public:
            pending.unlink()  # interrupted before its statement: no agent can know that key
            new = Signer.create(pending)
            statement = _append(state, old, add=[new.public])
        else:
            statement = last
            done.append(f"finishing the rotation interrupted after statement {statement.seq}")
    else:
        new = Signer.create(pending)
        statement = _append(state, old, add=[new.public])
    pending.replace(state.signing_key)
    fsync_dir(state.private)
    done.append(
        f"statement {statement.seq}: {old.public} adds {new.public}; releases are signed by it from now on"
    )
    if retire_old:
        done += _retire(state, new, [old.public])
    done.append(distribute(state))
    return done


def retire(state: StateDir, keys: list[str]) -> list[str]:
    """A statement, signed by the current key, that retires `keys` (all but the current one if
    empty); what was done, one line each."""
    signer = _signer(state)
    done = _retire(state, signer, keys)
    done.append(distribute(state))
    return done


def _retire(state: StateDir, signer: Signer, keys: list[str]) -> list[str]:
    trust = trusted(state)
    try:
        named = [encode_public_key(decode_public_key(key)) for key in keys]
    except Exception as exc:  # noqa: BLE001 - ReleaseError or a base64 error: one line either way
        raise ConfigError(f"not a publisher key: {exc}") from None
    wanted = named or [key for key in trust.trusted if key != signer.public]
    if not wanted:
        raise ConfigError(
            "nothing to retire: the only trusted publisher key is the one releases are signed with"
        )
    for key in wanted:
        if key == signer.public:
            raise ConfigError(f"{key} signs the releases: rotate first (herald key rotate), then retire it")
        if key not in trust.trusted:
            raise ConfigError(f"{key} is not a trusted publisher key (herald key show lists them)")
    statement = _append(state, signer, retire=wanted)
    return [f"statement {statement.seq}: {signer.public} retires {key}" for key in wanted]


def distribute(state: StateDir) -> str:
    """The key and its statements into every chroot, then a format-2 `current` counting them."""
    keys = load_keys(state)
    flusher = Flusher(state.root)
    accounts = host_accounts()
    try:
        names = sorted(name for name in os.listdir(state.chroots) if is_host_name(name))
    except FileNotFoundError:
        names = []
    chroots = [Chroot(state.chroot(name), flusher, accounts.get(name)) for name in names]
    for chroot in chroots:
        if (chroot.path / "credentials").is_dir():
            chroot.ensure_credentials(keys.signer.public, key_changed=True, chain=keys.chain)
    flusher.flush()  # the statements are on disk before any `current` counts them
    counted = 0
    for chroot in chroots:
        counted += recount(chroot, keys.count)
    write_atomic(mark_path(state), keys.mark.encode(), mode=0o600)
    flusher.flush()
    return f"placed in {len(chroots)} chroot(s); {counted} `current` file(s) count {keys.count} statement(s)"


def recount(chroot: Chroot, count: int) -> int:
    """Rewrite a format-2 `current` that counts other than `count` statements; 1 if it did."""
    current = chroot.current()
    if current is None or current.format < 2 or current.keys == count:
        return 0
    chroot.set_current(msgspec.structs.replace(current, keys=count))
    return 1


def _signer(state: StateDir) -> Signer:
    settle_key(state)
    if not state.signing_key.exists():
        raise ConfigError(f"{state.signing_key}: no signing key here (is this the server's --state?)")
    return Signer.load(state.signing_key)


def _append(
    state: StateDir, signer: Signer, *, add: tuple[str, ...] | list[str] = (), retire: list[str] | None = None
) -> Statement:
    found = links(state)
    statement = Statement(
        seq=len(found) + 1,
        prev=found[-1].digest if found else None,
        by=signer.public,
        add=list(add),
        retire=list(retire or []),
        at=now(),
    )
    line = encode_link(statement, signer.sign(msgspec.json.encode(statement)))
    write_atomic(chain_path(state), read_chain(state) + line, mode=0o600)
    return statement
