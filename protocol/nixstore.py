"""What both ends read from a Nix store: `nix-store --dump-db`'s registrations, store path names."""

import re
from typing import Final

from protocol.errors import HeraldError

# /nix/store/<32 characters of Nix's base32>-<name> (Nix's own rules for a name)
STORE_PATH: Final = r"/nix/store/[0-9a-df-np-sv-z]{32}-[A-Za-z0-9+._?=-][A-Za-z0-9+._?=-]{0,210}"
STORE_PATH_RE: Final = re.compile(STORE_PATH)


def parse_dump_db(text: str) -> dict[str, tuple[str, int, list[str]]]:
    """`nix-store --dump-db PATHS`: per path, its NAR sha256 (hex), NAR size and references.
    Each registration is the path, its hash, size, deriver, the count of references, then them."""
    lines = text.split("\n")
    found: dict[str, tuple[str, int, list[str]]] = {}
    index = 0
    try:
        while index + 5 <= len(lines) and lines[index]:
            path, sha256, size, _deriver, count = lines[index : index + 5]
            references = lines[index + 5 : index + 5 + int(count)]
            found[path] = (sha256.removeprefix("sha256:"), int(size), references)
            index += 5 + int(count)
    except ValueError as exc:
        raise HeraldError(f"unexpected output of nix-store --dump-db: {exc}") from None
    return found
