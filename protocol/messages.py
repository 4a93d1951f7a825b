"""MQTT payloads: JSON encodings of strict Structs.

A payload that does not decode raises `PayloadError` with one line; callers log it and drop the
message. MQTT carries hints: nothing here is ever trusted as a release.

Formats (protocol.formats): every payload has a `format`, left out while it is 1 (as are the
other fields at their defaults), so that herald 0.1, which refuses unknown fields, reads what
this herald writes. Readers ignore fields they do not know (a newer agent's State is still
shown) and check the types of those they know; a payload of a newer format is refused in one
line that says so.
"""

from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Final, TypeVar, cast

import msgspec

from protocol import formats
from protocol.errors import PayloadError

MAX_PAYLOAD: Final = 64 * 1024

Generation = Annotated[int, msgspec.Meta(ge=0, le=2**53)]
Version = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]
ShortText = Annotated[str, msgspec.Meta(max_length=2000)]
Identifier = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9._:-]{1,64}$")]
Timestamp = Annotated[datetime, msgspec.Meta(tz=True)]


def now() -> datetime:
    return datetime.now(UTC)


class Phase(StrEnum):
    IDLE = "idle"
    CHECKING = "checking"
    FETCHING = "fetching"
    APPLYING = "applying"
    CONFIRMING = "confirming"
    POSTPONED = "postponed"  # a new generation waits: on battery or a metered link (message says)
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"
    STOPPED = "stopped"  # the agent stopped cleanly (its last state before online=false)


class Action(StrEnum):
    CHECK = "check"
    REBUILD = "rebuild"
    ROLLBACK = "rollback"


class _Payload(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    format: Annotated[int, msgspec.Meta(ge=1)] = 1


class Desired(_Payload, frozen=True, kw_only=True):
    """What the publisher wants a host to run."""

    generation: Annotated[int, msgspec.Meta(ge=1, le=2**53)]
    version: Version
    published_at: Timestamp
    source_rev: ShortText | None = None


class Command(_Payload, frozen=True, kw_only=True):
    """A request from the sysadmin, executed once per id, ignored once expired."""

    id: Identifier
    action: Action
    issued_at: Timestamp
    expires_at: Timestamp | None = None
    by: ShortText = ""


class State(_Payload, frozen=True, kw_only=True):
    """What a host runs and what it is doing."""

    phase: Phase
    deployed_generation: Generation = 0
    deployed_version: Version | None = None
    target_generation: Generation = 0
    since: Timestamp
    message: ShortText = ""
    log: ShortText | None = None
    agent_version: ShortText = ""
    needs_reboot: bool = False  # the next boot runs another kernel, initrd or kernel modules
    # The id of the last command this host took (executed, or ignored as expired): `herald status`
    # shows a retained command until the host names it here. Optional: older agents omit it.
    last_command: Identifier | None = None


class Online(_Payload, frozen=True, kw_only=True):
    online: bool
    at: Timestamp


Payload = Desired | Command | State | Online
P = TypeVar("P", Desired, Command, State, Online)

_encoder = msgspec.json.Encoder()
_decoders: dict[type, msgspec.json.Decoder[Payload]] = {
    kind: msgspec.json.Decoder(kind) for kind in (Desired, Command, State, Online)
}


def encode(payload: Payload) -> bytes:
    return _encoder.encode(payload)


def decode(data: bytes | bytearray, kind: type[P]) -> P:
    """Decode `data` strictly as `kind`, or raise PayloadError with one line."""
    if len(data) > MAX_PAYLOAD:
        raise PayloadError(f"{kind.__name__} payload too large ({len(data)} bytes)")
    try:
        payload = cast("P", _decoders[kind].decode(data))
    except (msgspec.DecodeError, UnicodeDecodeError, ValueError) as exc:
        found = _format_of(data)
        if found is not None and found > formats.MESSAGE:
            raise PayloadError(_newer(kind, found)) from exc
        raise PayloadError(f"invalid {kind.__name__} payload: {exc}") from exc
    if payload.format > formats.MESSAGE:
        raise PayloadError(_newer(kind, payload.format))
    return payload


class _Format(msgspec.Struct, frozen=True):
    format: int = 1


_format_decoder = msgspec.json.Decoder(_Format)


def _format_of(data: bytes | bytearray) -> int | None:
    try:
        return _format_decoder.decode(data).format
    except (msgspec.DecodeError, UnicodeDecodeError, ValueError):
        return None


def _newer(kind: type, found: int) -> str:
    own = formats.MESSAGE
    return f"{kind.__name__} format {found} is newer than this herald ({own}): upgrade herald here"
