"""Host names that are system users or groups: a host's name becomes a user and a group on the
server, and one of these would merge with the system's (on NixOS `users.groups.wheel = { }`
adds nothing, and the host's user joins wheel; `herald server provision` would find the account
taken). The list is protocol/reserved-names.txt, which nix/lib.nix reads too."""

from pathlib import Path
from typing import Final


def _words() -> list[str]:
    text = (Path(__file__).parent / "reserved-names.txt").read_text(encoding="utf-8")
    return [word for line in text.splitlines() if not line.startswith("#") for word in line.split()]


NAMES: Final = frozenset(word for word in _words() if not word.endswith("*"))
PREFIXES: Final = tuple(word.removesuffix("*") for word in _words() if word.endswith("*"))


def is_reserved(name: str) -> bool:
    return name in NAMES or name.startswith(PREFIXES)
