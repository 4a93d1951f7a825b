"""A synthetic fleet: N hosts x 20 own files, plus 20 shared files reached through a symlink."""

from pathlib import Path

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKw6pDRxgkA1qDnC0c7RLuTFrxVeDlUFHdA2fHHmSjVh bench"
OWN_FILES = 20
SHARED_FILES = 20


def host_name(index: int) -> str:
    return f"host{index:04d}"


def make_fleet(root: Path, hosts: int) -> list[str]:
    """Write the fleet under `root`; return the host names."""
    (root / "common").mkdir(parents=True)
    for index in range(SHARED_FILES):
        options = "".join(f"  shared.m{index}.option{n} = {n};\n" for n in range(20))
        (root / "common" / f"module{index:02d}.nix").write_text(f"{{ ... }}:\n{{\n{options}}}\n")
    names = [host_name(i) for i in range(hosts)]
    with (root / "fleet.toml").open("w") as toml:
        for name in names:
            toml.write(f'[hosts.{name}]\nssh_key = "{KEY}"\n\n')
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
