"""A synthetic fleet: N hosts x 20 own files, plus 20 shared files reached through a symlink."""

import base64
import hashlib
from pathlib import Path

OWN_FILES = 20
SHARED_FILES = 20


def host_name(index: int) -> str:
    return f"host{index:04d}"


def host_key(name: str) -> str:
    """A well-formed ed25519 public key of the host's own (fleet.toml refuses a key shared by
    two hosts); nobody holds its private half, the publish benchmarks need none."""
    kind = b"ssh-ed25519"
    blob = (
        len(kind).to_bytes(4, "big") + kind + (32).to_bytes(4, "big") + hashlib.sha256(name.encode()).digest()
    )
    return f"ssh-ed25519 {base64.b64encode(blob).decode()} bench-{name}"


def make_fleet(root: Path, hosts: int) -> list[str]:
    """Write the fleet under `root`; return the host names."""
    (root / "common").mkdir(parents=True)
    for index in range(SHARED_FILES):
        options = "".join(f"  shared.m{index}.option{n} = {n};\n" for n in range(20))
        (root / "common" / f"module{index:02d}.nix").write_text(f"{{ ... }}:\n{{\n{options}}}\n")
    names = [host_name(i) for i in range(hosts)]
    with (root / "fleet.toml").open("w") as toml:
        for name in names:
            toml.write(f'[hosts.{name}]\nssh_key = "{host_key(name)}"\n\n')
    for name in names:
        home = root / "hosts" / name
        (home / "files" / "etc").mkdir(parents=True)
        (home / "configuration.nix").write_text(
            f'{{ ... }}: {{ imports = [ ./common/module00.nix ]; networking.hostName = "{name}"; }}\n'
        )
        for index in range(OWN_FILES - 1):
            where = home / ("files/etc" if index % 4 == 0 else ".")
            lines = "".join(f"  {name}.part{index}.line{n} = {n};\n" for n in range(30))
            (where / f"part{index:02d}.nix").write_text(f"# {name} part {index}\n{{ ... }}:\n{{\n{lines}}}\n")
        (home / "common").symlink_to("../../common")
    return names
