"""Broker secrets: generated per host, stored hashed, never printed.

Hashes use Mosquitto 2's `$7$` format (PBKDF2-HMAC-SHA512, 101 rounds), so the broker's
password file can be handed to Mosquitto unchanged. The secrets are 256 random bits, not
passwords people chose: a slow hash would add nothing but a stalled broker (FINDINGS.md:
Argon2 on the event loop costs ~107 ms per CONNECT; this costs ~0.1 ms).
"""

import base64
import hashlib
import hmac
import secrets
from pathlib import Path
from typing import Final

from protocol.errors import ConfigError

_ROUNDS: Final = 101
_SALT_BYTES: Final = 12


class Secret:
    """A secret string whose str() and repr() are masked."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and hmac.compare_digest(self._value, other._value)

    def __hash__(self) -> int:
        return hash(self._value)


def new_secret() -> Secret:
    return Secret(secrets.token_urlsafe(32))


def read_secret(path: Path) -> Secret:
    try:
        value = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: not found") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read secret: {exc.__class__.__name__}") from exc
    if not value:
        raise ConfigError(f"{path}: secret file is empty")
    return Secret(value)


def hash_secret(secret: Secret, *, salt: bytes | None = None) -> str:
    salt = salt if salt is not None else secrets.token_bytes(_SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", secret.reveal().encode(), salt, _ROUNDS)
    return f"$7${_ROUNDS}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_secret(secret: str, hashed: str) -> bool:
    """True if `secret` matches a `$7$` hash. Never raises on malformed input."""
    try:
        _, kind, rounds, salt, digest = hashed.split("$")
        if kind != "7" or not 1 <= int(rounds) <= 100_000:
            return False
        expected = base64.b64decode(digest, validate=True)
        actual = hashlib.pbkdf2_hmac(
            "sha512", secret.encode(), base64.b64decode(salt, validate=True), int(rounds)
        )
    except (ValueError, UnicodeEncodeError):
        return False
    return hmac.compare_digest(expected, actual)


def parse_passwd(text: str) -> dict[str, str]:
    """user -> hash from a Mosquitto-style password file; malformed lines are skipped."""
    users: dict[str, str] = {}
    for line in text.splitlines():
        user, sep, hashed = line.strip().partition(":")
        if sep and user and not user.startswith("#"):
            users[user] = hashed
    return users


def format_passwd(users: dict[str, str]) -> str:
    return "".join(f"{user}:{hashed}\n" for user, hashed in sorted(users.items()))
