"""Which publisher keys an agent trusts, and the signed statements that change that set.

    credentials/publisher.keys   one statement per line: "<signature, base64> <statement JSON>"

Statement n (`seq`) names the hash of the line before it (`prev`) and is signed by a key trusted
once statements 1 to n-1 are followed (`by`); it adds keys, retires keys, or both. `herald key
rotate` writes one signed by the old key that adds the new one, so agents follow a rotation with
nobody touching a host; `herald key retire` one signed by a trusted key that retires the old.

An agent's trust starts from its root: agent.toml's `publisher_key`, else the key it found in
credentials/publisher.pub on first contact. It follows the chain from the statement that added
its root (from the first, when its root signed it), one statement after the other: a statement
out of order, one that does not name the one before it, one signed by a key it does not trust,
or one that would leave no key is refused, and nothing after it is followed. A key once retired
is never trusted again, and a release it signs is refused.
"""

import base64
import hashlib
from typing import Annotated, Final

import msgspec
from cryptography.exceptions import InvalidSignature

from protocol import formats
from protocol.errors import NotYetError, ReleaseError
from protocol.messages import Timestamp
from protocol.release import Sha256, decode_public_key

MAX_KEYS: Final = 256 * 1024  # a statement is about 300 bytes
FROM_AGENT_TOML: Final = "agent.toml"
FROM_FIRST_USE: Final = "first use"
KeyText = Annotated[str, msgspec.Meta(pattern=r"^ed25519:[A-Za-z0-9+/]{43}=$")]


class Statement(msgspec.Struct, frozen=True, kw_only=True):
    """One link of the chain. Later compatible formats may add fields; readers ignore them."""

    format: Annotated[int, msgspec.Meta(ge=1)] = 1
    seq: Annotated[int, msgspec.Meta(ge=1)]
    prev: Sha256 | None = None  # the sha256 of statement seq-1's line; None for the first
    by: KeyText  # the key that signs this statement
    add: list[KeyText] = []
    retire: list[KeyText] = []
    at: Timestamp


class Link(msgspec.Struct, frozen=True):
    """A statement of a chain file, with the line it came from and its signature."""

    statement: Statement
    line: bytes
    signature: bytes

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.line).hexdigest()


class Trusted(msgspec.Struct, frozen=True):
    key: str
    source: str  # "agent.toml", "first use", "statement 3"


class Trust(msgspec.Struct, frozen=True, kw_only=True):
    """What an agent trusts (STATE/trust.json): its root, the keys, where it is in the chain."""

    root: str
    origin: str  # where the root came from: "agent.toml" or "first use"
    keys: list[Trusted]
    retired: list[Trusted] = []  # retired keys: what a release they sign is refused for
    seq: int | None = None  # the last statement followed; None: not placed in a chain yet
    head: Sha256 | None = None  # the sha256 of that statement's line

    @classmethod
    def rooted(cls, key: str, source: str) -> "Trust":
        return cls(root=key, origin=source, keys=[Trusted(key, source)])

    @property
    def trusted(self) -> list[str]:
        return [entry.key for entry in self.keys]

    def retired_by(self, key: str) -> str | None:
        return next((entry.source for entry in self.retired if entry.key == key), None)


_STATEMENT = msgspec.json.Decoder(Statement)


def encode_link(statement: Statement, signature: bytes) -> bytes:
    """A chain file line: the signature (base64) of the statement's JSON, then that JSON."""
    return signature.strip() + b" " + msgspec.json.encode(statement) + b"\n"


def parse(data: bytes) -> list[Link]:
    """The statements of a chain file, in order; nothing is trusted yet. NotYetError for a
    file this agent cannot follow (malformed, out of order, a newer format)."""
    if len(data) > MAX_KEYS:
        raise NotYetError(f"key statements refused: {len(data)} bytes, more than {MAX_KEYS}")
    links: list[Link] = []
    for number, line in enumerate(data.splitlines(), 1):
        signature, space, body = line.partition(b" ")
        if not space:
            raise NotYetError(f"key statement {number} refused: malformed line")
        try:
            found = msgspec.json.decode(body, type=_FormatOnly).format
            if found > formats.KEYS:
                raise NotYetError(
                    f"key statement format {found} is newer than this agent ({formats.KEYS}): "
                    "upgrade herald on this host"
                )
            statement = _STATEMENT.decode(body)
        except (msgspec.DecodeError, UnicodeDecodeError, ValueError) as exc:
            raise NotYetError(f"key statement {number} refused: malformed: {exc}") from None
        if statement.seq != number:
            raise NotYetError(f"key statement {number} refused: it says it is statement {statement.seq}")
        links.append(Link(statement, body, signature))
    return links


class _FormatOnly(msgspec.Struct, frozen=True):
    format: int = 1


def _verified(link: Link) -> bool:
    try:
        raw = base64.b64decode(link.signature, validate=True)
        decode_public_key(link.statement.by).verify(raw, link.line)
    except (InvalidSignature, ValueError, ReleaseError):
        return False
    return True


def _start(trust: Trust, links: list[Link]) -> Trust:
    """Place a trust not placed yet: after the statement that added its root, else before the
    first (which its root must then have signed)."""
    for link in links:
        if trust.root in link.statement.add:
            return msgspec.structs.replace(trust, seq=link.statement.seq, head=link.digest)
    return msgspec.structs.replace(trust, seq=0, head=None)


def follow(trust: Trust, links: list[Link]) -> tuple[Trust, list[str]]:
    """Follow `links` from where `trust` is: the new trust and what changed, one line each.
    NotYetError for a statement refused (what was followed before it is not kept either: the
    caller keeps its trust and tries the whole file again later)."""
    if not links:
        return trust, []
    placed = trust if trust.seq is not None else _start(trust, links)
    seq, head = placed.seq or 0, placed.head
    if len(links) < seq:
        return placed, [f"the server holds {len(links)} key statement(s); this agent has followed {seq}"]
    if seq and links[seq - 1].digest != head:
        raise NotYetError(
            f"key statements refused: the server's statement {seq} is not the one this agent followed"
        )
    keys, retired = list(placed.keys), list(placed.retired)
    changes: list[str] = []
    for link in links[seq:]:
        statement, number = link.statement, link.statement.seq
        trusted = [entry.key for entry in keys]
        if statement.prev != head:
            raise NotYetError(f"key statement {number} refused: it does not follow statement {number - 1}")
        if statement.by not in trusted or not _verified(link):
            raise NotYetError(
                f"key statement {number} refused: not signed by a key this agent trusts "
                f"(it names {statement.by})"
            )
        again = [key for key in statement.add if any(key == entry.key for entry in retired)]
        if again:
            raise NotYetError(f"key statement {number} refused: it trusts again retired key {again[0]}")
        source = f"statement {number}"
        keys = [entry for entry in keys if entry.key not in statement.retire]
        keys += [Trusted(key, source) for key in statement.add if key not in trusted]
        if not keys:
            raise NotYetError(f"key statement {number} refused: it would leave no trusted key")
        retired += [Trusted(key, source) for key in statement.retire if key not in {e.key for e in retired}]
        changes += [f"trusts publisher key {key} ({source}, by {statement.by})" for key in statement.add]
        changes += [f"retired publisher key {key} ({source}, by {statement.by})" for key in statement.retire]
        head = link.digest
    followed = msgspec.structs.replace(placed, keys=keys, retired=retired, seq=len(links), head=head)
    return followed, changes
