"""The mode each file of a release is published with.

git keeps one bit of a file's mode, whether it is executable: a secret chmod 0600 in the
sysadmin's checkout is 0644 in the clone the publisher reads. So for `files/` (what the agent
installs into the host's /) the checkout gives only that bit, and fleet.toml the rest:

- a file is private, 0600, unless a `files` table declares its mode: `[files]` for every host,
  `[hosts.<name>.files]` for one (its entries replace the fleet-wide ones with the same key);
- a key is a path below files/ ('etc/motd') or a directory ending in '/' ('etc/ssl/', everything
  below it); the most specific key that covers a file decides (the file, then its closest
  directory);
- a file executable in the checkout gets x wherever its mode gives r (0600 -> 0700, 0644 -> 0755).

Files outside files/ (the Nix configuration, which only the rebuild reads) keep their checkout
mode. What is decided here is what the signed MANIFEST carries and what the agent installs; the
server stores content that is not world-readable readable only by its host (publisher.chroot).
"""

import os
from typing import Final

import msgspec

from protocol.errors import ConfigError
from protocol.settings import FleetConfig, declared_modes
from publisher.inventory import Inventory
from publisher.materialise import Source

FILES: Final = "files/"
PRIVATE: Final = 0o600

Rule = tuple[str, int]  # the declaring key, and its mode


class FileModes:
    """One host's declarations, merged and compiled. Hosts without their own table share one
    instance, so that what it learns about a directory is learnt once per run."""

    def __init__(self, declared: dict[str, int], own: frozenset[str] = frozenset()) -> None:
        self.key = tuple(sorted(declared.items()))  # what the host's version depends on (hash cache)
        self.own = own  # the keys of the host's own table: each must match one of its files
        self._files = {key: mode for key, mode in declared.items() if not key.endswith("/")}
        # declared directories, and every directory looked up since, with the rule covering it
        self._dirs: dict[str, Rule | None] = {
            key: (key, mode) for key, mode in declared.items() if key.endswith("/")
        }

    def rule(self, path: str) -> Rule | None:
        """The declaration covering `path` (relative to files/), if any."""
        mode = self._files.get(path)
        if mode is not None:
            return path, mode
        cut = path.rfind("/")
        return self._directory(path[: cut + 1]) if cut > 0 else None

    def _directory(self, directory: str) -> Rule | None:
        """The declaration covering `directory` ('etc/ssl/'); remembered per directory."""
        try:
            return self._dirs[directory]
        except KeyError:
            pass
        cut = directory.rfind("/", 0, len(directory) - 1)
        found = self._directory(directory[: cut + 1]) if cut > 0 else None
        self._dirs[directory] = found
        return found


def fleet_modes(config: FleetConfig) -> dict[str, FileModes]:
    """Every host's FileModes: the fleet-wide table, under the host's own."""
    fleet = declared_modes(config.files)
    shared = FileModes(fleet)
    return {
        name: FileModes(fleet | declared_modes(entry.files), frozenset(entry.files))
        if entry.files
        else shared
        for name, entry in config.hosts.items()
    }


def decide(sources: list[Source], modes: FileModes) -> tuple[list[int], set[str], list[str]]:
    """The mode each source is released with; the keys that covered a file; and the files/ paths
    private by default although the checkout has them world-readable (worth telling once)."""
    decided: list[int] = []
    matched: set[str] = set()
    defaulted: list[str] = []
    rule = modes.rule
    start = len(FILES)
    for source in sources:
        path = source.path
        if not path.startswith(FILES):
            decided.append(source.mode)
            continue
        found = rule(path[start:])
        if found is None:
            mode = PRIVATE
            if source.mode & 0o004:
                defaulted.append(path)
        else:
            matched.add(found[0])
            mode = found[1]
        if source.mode & 0o100:  # what git records as executable
            mode |= (mode & 0o444) >> 2
        decided.append(mode)
    return decided, matched, defaulted


Listed = tuple[str, int, int, str]  # a file of the previous release: path, mode, size, sha256


def _quoted(key: str) -> str:
    return msgspec.json.encode(key).decode()


class Declarations:
    """fleet.toml's `files` tables over one publish run: each host's FileModes (`of`), the keys
    that matched no file, and the files turning private that a person should hear about once."""

    def __init__(self, inventory: Inventory) -> None:
        self._inventory = inventory
        self.of = fleet_modes(inventory.config)
        self._matched: set[str] = set()
        self._unmatched: list[str] = []
        self._turned: dict[str, list[str]] = {}  # files/ path -> hosts where it turns private

    def decide(self, host: str, sources: list[Source]) -> tuple[list[int], list[str]] | None:
        """The modes of a host whose version is computed, and its files private by default though
        world-readable in the checkout; None if one of its own keys covers none of its files."""
        modes = self.of[host]
        decided, matched, defaulted = decide(sources, modes)
        self._matched |= matched
        if missing := sorted(modes.own - matched):
            self._unmatched.append(
                f"hosts.{host}.files: {_quoted(missing[0])} matches no file in hosts/{host}/files/"
            )
            return None
        return decided, defaulted

    def released(self, host: str, defaulted: list[str], previous: list[Listed]) -> None:
        """Note the files of a changed host that turn private now: new, or public until now."""
        if not defaulted:
            return
        before = {path: mode for path, mode, _, _ in previous}
        for path in defaulted:
            if before.get(path, 0o004) & 0o004:
                self._turned.setdefault(path, []).append(host)

    def check(self) -> None:
        """ConfigError naming the first declaration that matched no file. A host whose version came
        from the hash cache was not matched file by file (its own keys matched when it was stored:
        they and its paths are the key); a fleet-wide key that nothing matched this run is looked
        for in each host's files/ directly, one `stat` per host until one has it."""
        for key in sorted(self._inventory.config.files.keys() - self._matched):
            probe = os.path.isdir if key.endswith("/") else os.path.isfile
            if not any(probe(f"{host.directory}/{FILES}{key}") for host in self._inventory.hosts):
                self._unmatched.append(
                    f"files: {_quoted(key)} matches no file of any host (keys are paths below files/)"
                )
        if self._unmatched:
            more = f" (and {len(self._unmatched) - 1} more)" if len(self._unmatched) > 1 else ""
            raise ConfigError(f"{self._inventory.root / 'fleet.toml'}: {self._unmatched[0]}{more}")

    def warning(self) -> str | None:
        """One line naming the files that turn private because nothing declares them public."""
        if not self._turned:
            return None
        count = sum(len(hosts) for hosts in self._turned.values())
        paths = sorted(self._turned)
        shown = []
        for path in paths[:5]:
            hosts = self._turned[path]
            names = ", ".join(hosts[:3]) + (f" and {len(hosts) - 3} more hosts" if len(hosts) > 3 else "")
            shown.append(f"{path.removeprefix(FILES)} ({names})")
        more = f" and {len(paths) - 5} more paths" if len(paths) > 5 else ""
        return (
            f"{count} files of files/ that the checkout has world-readable turn private (0600, 0700 "
            f"if executable) because fleet.toml declares no mode for them: {', '.join(shown)}{more}; "
            f'declare the public ones, e.g. [files] {_quoted(paths[0].removeprefix(FILES))} = "0644" '
            "(README: modes of files/)"
        )
