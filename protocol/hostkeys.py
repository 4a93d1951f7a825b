"""The server's SSH host keys over time: what the server announces, what an agent answers.

    <chroot>/server-keys               the statement (`ServerKeys`): the host keys the server
                                       presents or is about to, and those it retired
    <chroot>/logs/.trusted-server-keys the agent's answer (`TrustedKeys`): the keys it trusts now

An agent reads the statement over an SFTP session whose server proved a key the agent already
trusts (agent.toml's server.host_key, or one learned so before): that is the only way a key is
ever learned. A key the statement retires is no longer trusted, unless it is the very key of the
connection that said so. The answer lets `herald server host-key status` tell when every host
has taken a successor, so that the server can switch to it without locking anyone out.

Both are JSON with a format number; a reader ignores fields it does not know (a later herald may
add some) and checks every key it reads.
"""

from typing import Final

import msgspec

from protocol.settings import check_ssh_public_key

STATEMENT: Final = "server-keys"
ANSWER: Final = ".trusted-server-keys"  # in logs/: sorts before the run logs, which start with a date
FORMAT: Final = 1
MAX_SIZE: Final = 64 * 1024
MAX_KEYS: Final = 16


class ServerKeys(msgspec.Struct, frozen=True, kw_only=True):
    format: int = FORMAT
    keys: list[str] = []  # 'ssh-ed25519 AAAA...': trust these (the current key and its successors)
    retired: list[str] = []  # trust these no more


class TrustedKeys(msgspec.Struct, frozen=True, kw_only=True):
    format: int = FORMAT
    trusted: list[str] = []


def _keys(found: list[str], what: str) -> list[str]:
    if len(found) > MAX_KEYS:
        raise ValueError(f"{what}: more than {MAX_KEYS} keys")
    return [check_ssh_public_key(key) for key in found]


def decode_statement(data: bytes) -> ServerKeys:
    """ValueError if `data` is not a statement this herald can read."""
    if len(data) > MAX_SIZE:
        raise ValueError(f"{STATEMENT}: larger than {MAX_SIZE} bytes")
    try:
        statement = msgspec.json.decode(data, type=ServerKeys)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ValueError(f"{STATEMENT}: {exc}") from None
    return ServerKeys(
        format=statement.format,
        keys=_keys(statement.keys, "keys"),
        retired=_keys(statement.retired, "retired"),
    )


def encode_statement(statement: ServerKeys) -> bytes:
    return msgspec.json.encode(statement) + b"\n"


def decode_answer(data: bytes) -> TrustedKeys:
    if len(data) > MAX_SIZE:
        raise ValueError(f"{ANSWER}: larger than {MAX_SIZE} bytes")
    try:
        answer = msgspec.json.decode(data, type=TrustedKeys)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ValueError(f"{ANSWER}: {exc}") from None
    return TrustedKeys(format=answer.format, trusted=_keys(answer.trusted, "trusted"))


def encode_answer(trusted: list[str]) -> bytes:
    return msgspec.json.encode(TrustedKeys(trusted=sorted(trusted))) + b"\n"
