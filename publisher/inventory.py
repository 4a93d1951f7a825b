"""The fleet repository as the publisher sees it: fleet.toml checked against hosts/.

fleet.toml
hosts/<name>/configuration.nix  or  hosts/<name>/flake.nix
hosts/<name>/common -> ../../common      (shared modules, through symlinks)
hosts/<name>/files/...                   (installed into the host's /)
"""

import os
from dataclasses import dataclass
from pathlib import Path

from protocol.errors import ConfigError
from protocol.settings import FleetConfig, HostEntry, load_fleet

ENTRY_POINTS = ("flake.nix", "configuration.nix")


@dataclass(frozen=True, slots=True)
class Host:
    name: str
    entry: HostEntry
    directory: Path
    flake: str | None  # the flake attribute the agent builds; None for a classic configuration.nix


@dataclass(frozen=True, slots=True)
class Inventory:
    root: Path
    config: FleetConfig
    hosts: tuple[Host, ...]

    def host(self, name: str) -> Host:
        for host in self.hosts:
            if host.name == name:
                return host
        raise KeyError(name)


def load_inventory(root: Path) -> Inventory:
    """Read fleet.toml and check it against hosts/; any mismatch is a ConfigError naming it."""
    root = root.resolve()
    if not root.is_dir():
        raise ConfigError(f"{root}: fleet repository not found")
    fleet_toml = root / "fleet.toml"
    if not fleet_toml.is_file():
        raise ConfigError(f"{fleet_toml}: not found (a fleet repository needs fleet.toml and hosts/)")
    config = load_fleet(fleet_toml)
    hosts_dir = root / "hosts"
    if not hosts_dir.is_dir():
        raise ConfigError(f"{hosts_dir}: not found (one directory per host is expected there)")

    with os.scandir(hosts_dir) as listing:
        on_disk = {entry.name for entry in listing if entry.is_dir() and not entry.name.startswith(".")}
    if unlisted := sorted(on_disk - config.hosts.keys()):
        name = unlisted[0]
        raise ConfigError(
            f"{fleet_toml}: hosts.{name}: hosts/{name}/ exists but fleet.toml has no entry for it"
        )
    if missing := sorted(config.hosts.keys() - on_disk):
        name = missing[0]
        raise ConfigError(f"{fleet_toml}: hosts.{name}: no directory hosts/{name}/")

    hosts = []
    for name in sorted(config.hosts):
        directory = hosts_dir / name
        flake, classic = (os.path.lexists(f"{directory}/{point}") for point in ENTRY_POINTS)
        if not flake and not classic:
            raise ConfigError(f"hosts/{name}: no configuration.nix or flake.nix")
        entry = config.hosts[name]
        hosts.append(Host(name, entry, directory, (entry.flake or name) if flake else None))
    return Inventory(root, config, tuple(hosts))
