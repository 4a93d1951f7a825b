"""Closure delivery (`deliver = "closure"`) against `nix copy --from file://` of the same closure.

A synthetic closure: PATHS store paths of about MEGABYTES in all (base64 of random bytes, which
compresses about as much as binaries do), built with nix-build as root, shared by HOSTS systems,
each with a few small paths of its own. Measured in one run:

- the server's disk for every host's chroot (objects counted once per inode, as `du` does),
  against one binary cache of the union of their closures (`nix copy --to file://`, zstd, as
  herald compresses);
- a cold host: `herald agent --once` against `herald serve` (connect, verify, fetch, import,
  switch), the host's store a chroot store of its own; against `nix copy --from file://` of the
  same closure into an empty chroot store (copy only);
- one shared package changed: the same two, the host's store holding the previous closure.

Bytes: herald's are the loopback's (/proc/net/dev, both directions, TCP and SSH framing
included: nothing else runs on it) and the payload (objects, release file); nix copy's are the
files it reads from the cache.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import asyncssh

from publisher.publish import Status, publish

NIX_OPTIONS = [
    "--option",
    "sandbox",
    "false",
    "--option",
    "build-users-group",
    "",
    "--option",
    "substituters",
    "",
]
NIX = ["nix", "--extra-experimental-features", "nix-command"]
OWN = 4  # paths of each host's own, besides its system
HERALD = [sys.executable, "-m", "herald"]
SERVE_FLAGS = ["--mqtt", "off", "--sftp", "127.0.0.1:0", "--http", "off"]

SYSTEM_NIX = r"""
let
  package = name: bytes: derivation {
    inherit name bytes;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    PATH = "/usr/bin:/bin";
    args = [ "-c" "mkdir -p $out; head -c $bytes /dev/urandom | base64 > $out/data" ];
  };
  name = index: "shared-${toString index}${if index == 7 then "@CHANGE@" else ""}";
  shared = builtins.genList (index: package (name index) @BYTES@) @SHARED@;
  own = builtins.genList (index: package "@HOST@-own-${toString index}" 4096) @OWN@;
in derivation {
  name = "system-@HOST@";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  PATH = "/usr/bin:/bin";
  refs = shared ++ own;
  args = [ "-c" ''
    mkdir -p $out/bin
    echo $refs > $out/refs
    printf '#!/bin/sh\nexit 0\n' > $out/bin/switch-to-configuration
    chmod +x $out/bin/switch-to-configuration
  '' ];
}
"""


@dataclass(frozen=True)
class Transfer:
    seconds: float  # herald: the whole `agent --once`; nix copy: the copy
    wire: int  # loopback bytes (herald) or bytes read from the cache (nix copy)
    payload: int  # objects downloaded (herald); the same as wire for nix copy
    transfer: float  # herald: asking the store, fetching, verifying, importing (its log); nix copy: seconds
    importing: float = 0.0  # herald: of which the import (nix copy from the NARs it verified)


@dataclass(frozen=True)
class Figures:
    hosts: int
    paths: int
    closure_bytes: int  # NAR bytes of one host's closure
    publish_seconds: float
    herald_disk: int
    cache_disk: int
    cold: Transfer
    cold_copy: Transfer
    change: Transfer
    change_copy: Transfer
    change_floor: int  # the changed paths' objects and the release file


def _write_fleet(root: Path, hosts: list[str], shared: int, size: int, change: str) -> dict[str, Path]:
    keys: dict[str, Path] = {}
    (root / "keys").mkdir(exist_ok=True)
    command = ["nix-build", "{release}/system.nix", "--no-out-link", *NIX_OPTIONS]
    lines = ["[publish]", "check = []", f"system = {json.dumps(command)}", ""]
    for name in hosts:
        key_path = root / "keys" / name
        if not key_path.exists():
            asyncssh.generate_private_key("ssh-ed25519").write_private_key(str(key_path))
        keys[name] = key_path
        public = asyncssh.read_private_key(str(key_path)).export_public_key().decode().strip()
        lines += [f"[hosts.{name}]", f'ssh_key = "{public}"', 'deliver = "closure"', ""]
        home = root / "fleet" / "hosts" / name
        home.mkdir(parents=True, exist_ok=True)
        text = SYSTEM_NIX.replace("@HOST@", name).replace("@SHARED@", str(shared)).replace("@OWN@", str(OWN))
        (home / "system.nix").write_text(text.replace("@BYTES@", str(size)).replace("@CHANGE@", change))
        (home / "configuration.nix").write_text(f'{{ ... }}: {{ networking.hostName = "{name}"; }}\n')
    (root / "fleet" / "fleet.toml").write_text("\n".join(lines))
    return keys


def _loopback_bytes() -> int:
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, counters = line.partition(":")
        if name.strip() == "lo":
            return int(counters.split()[0])
    return 0


def _unique_bytes(*directories: Path) -> int:
    seen: set[tuple[int, int]] = set()
    total = 0
    for directory in directories:
        for folder, _, files in os.walk(directory):
            for name in files:
                info = os.lstat(os.path.join(folder, name))  # noqa: PTH118
                if (info.st_dev, info.st_ino) not in seen:
                    seen.add((info.st_dev, info.st_ino))
                    total += info.st_size
    return total


def _release(state: Path, host: str) -> tuple[dict, int]:
    generation = (state / "chroot" / host / "current").read_text().split()[0]
    path = state / "chroot" / host / "releases" / generation
    data = path.read_bytes()
    return json.loads(data.partition(b"\n")[2]), len(data)


def _agent_config(root: Path, host: str, key: Path, info: dict[str, object]) -> Path:
    home = root / "agents" / host
    home.mkdir(parents=True, exist_ok=True)
    config = home / "agent.toml"
    config.write_text(
        f"""host = "{host}"
ssh_key = "{key}"
state_dir = "{home / "state"}"
root = "{home / "root"}"
store = "{home / "root"}"
poll = "1h"
trigger = "off"
[server]
address = "127.0.0.1"
port = {info["sftp_port"]}
host_key = "{info["sftp_host_key"]}"
[rebuild]
timeout = "10m"
"""
    )
    return config


def _run_agent(config: Path) -> Transfer:
    before, started = _loopback_bytes(), time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "herald", "agent", "--config", str(config), "--once"],
        capture_output=True,
        text=True,
        check=False,
    )
    seconds, wire = time.monotonic() - started, _loopback_bytes() - before
    if done.returncode != 0:
        raise RuntimeError(f"the agent failed:\n{done.stdout}\n{done.stderr}")
    logs = sorted((config.parent / "state" / "logs").glob("*-applied.log"))
    text = logs[-1].read_text()
    downloaded = int(text.split(" bytes downloaded)")[0].rsplit("(", 1)[1])
    transfer = float(text.split(" bytes downloaded) in ")[1].split("s", 1)[0])
    importing = float(text.split("(the import ")[1].split("s", 1)[0])
    return Transfer(seconds, wire, downloaded, transfer, importing)


def _copy(cache: Path, store: Path, system: str, paths: list[str]) -> Transfer:
    """`nix copy` of `system` from the cache into `store`; what it reads: the NAR files of
    `paths` (those the store lacked)."""
    started = time.monotonic()
    subprocess.run(
        [*NIX, "copy", "--no-check-sigs", "--from", f"file://{cache}", "--to", str(store), system],
        check=True,
        capture_output=True,
    )
    seconds = time.monotonic() - started
    read = 0
    for path in paths:
        narinfo = cache / f"{path.removeprefix('/nix/store/').split('-', 1)[0]}.narinfo"
        fields = dict(line.split(": ", 1) for line in narinfo.read_text().splitlines() if ": " in line)
        read += int(fields["FileSize"])
    return Transfer(seconds, read, read, seconds)


def measure(hosts: int, paths: int, megabytes: int) -> Figures:
    names = [f"host{index:03d}" for index in range(hosts)]
    shared = paths - OWN - 1
    size = megabytes * 1024 * 1024 * 3 // 4 // shared  # base64 makes 4 bytes of 3
    with tempfile.TemporaryDirectory(prefix="herald-bench-closure-", dir="/var/tmp") as tmp:
        root = Path(tmp)
        keys = _write_fleet(root, names, shared, size, "")
        state = root / "state"
        started = time.monotonic()
        report = publish(root / "fleet", state)
        publish_seconds = time.monotonic() - started
        if report.of(Status.FAILED):
            raise RuntimeError(f"publish failed: {report.of(Status.FAILED)[0].message}")
        manifest, _ = _release(state, names[0])
        closure = manifest["content"]["system"]["closure"]
        systems = [_release(state, name)[0]["content"]["system"]["path"] for name in names]

        cache = root / "cache"
        subprocess.run(
            [*NIX, "copy", "--to", f"file://{cache}?compression=zstd", *systems],
            check=True,
            capture_output=True,
        )
        herald_disk = _unique_bytes(state / "objects", state / "chroot")
        cache_disk = _unique_bytes(cache)

        server = subprocess.Popen(
            [*HERALD, "serve", "--fleet", str(root / "fleet"), "--state", str(state), *SERVE_FLAGS],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            run_file = state / "run" / "serve.json"
            deadline = time.monotonic() + 300
            while not run_file.exists():
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("herald serve did not start")
                time.sleep(0.1)
            info = json.loads(run_file.read_text())
            config = _agent_config(root, names[0], keys[names[0]], info)
            cold = _run_agent(config)
            baseline_store = root / "copy"
            cold_copy = _copy(cache, baseline_store, systems[0], [entry[0] for entry in closure])

            _write_fleet(root, names, shared, size, "-changed")
            report = publish(root / "fleet", state)
            new, new_size = _release(state, names[0])
            new_closure = {entry[0]: entry for entry in new["content"]["system"]["closure"]}
            changed = [path for path in new_closure if path not in {entry[0] for entry in closure}]
            floor = sum(new_closure[path][5] for path in changed) + new_size
            new_system = new["content"]["system"]["path"]
            subprocess.run(
                [*NIX, "copy", "--to", f"file://{cache}?compression=zstd", new_system],
                check=True,
                capture_output=True,
            )
            change = _run_agent(config)  # serve's SFTP serves the chroot as the publish left it
            change_copy = _copy(cache, baseline_store, new_system, changed)
        finally:
            server.terminate()
            server.wait(timeout=60)
        nar_bytes = sum(entry[2] for entry in closure)
        return Figures(
            hosts,
            len(closure),
            nar_bytes,
            publish_seconds,
            herald_disk,
            cache_disk,
            cold,
            cold_copy,
            change,
            change_copy,
            floor,
        )


def _mb(value: int) -> str:
    return f"{value / 1e6:.1f} MB"


def _yes(met: bool) -> str:
    return "yes" if met else "**no**"


def _row(name: str, herald: Transfer, copy: Transfer, target: str, met: bool) -> str:
    fetch = herald.transfer - herald.importing
    cells = [
        name,
        f"{herald.transfer:.2f} s = {fetch:.2f} + {herald.importing:.2f} ({herald.seconds:.2f} s)",
        f"{_mb(herald.payload)} ({_mb(herald.wire)})",
        f"{copy.seconds:.2f} s, {_mb(copy.wire)}",
        f"{herald.transfer / copy.seconds:.2f}",
        target,
        _yes(met),
    ]
    return "| " + " | ".join(cells) + " |"


def main(hosts: int = 50, paths: int = 300, megabytes: int = 200) -> str:
    f = measure(hosts, paths, megabytes)
    disk = f.herald_disk / f.cache_disk
    cold_target = f"transfer ≤ 1.5 x nix copy ({1.5 * f.cold_copy.seconds:.2f} s)"
    change_target = f"bytes ≤ 1.2 x the changed paths' objects + release ({_mb(f.change_floor)})"
    rows = [
        (
            "| scenario | herald: transfer = fetch + import (whole agent run) | herald: objects (wire) "
            "| nix copy --from file:// | transfer / nix copy | target | met |"
        ),
        "|---|---|---|---|---|---|---|",
        _row(
            f"cold host: {f.paths} paths, {_mb(f.closure_bytes)} of NARs",
            f.cold,
            f.cold_copy,
            cold_target,
            f.cold.transfer <= 1.5 * f.cold_copy.seconds,
        ),
        _row(
            "one shared package changed",
            f.change,
            f.change_copy,
            change_target,
            f.change.payload <= 1.2 * f.change_floor,
        ),
        (
            f"| server disk, {f.hosts} hosts | {_mb(f.herald_disk)} | - | {_mb(f.cache_disk)} (one cache "
            f"of the union) | {disk:.2f} | ≤ 1.1 x the union | {_yes(disk <= 1.1)} |"
        ),
    ]
    about = (
        f'`bench/closure.py`: {f.hosts} hosts with `deliver = "closure"`, each system\'s closure {f.paths} '
        f"store paths ({OWN} of its own, the rest shared by all; base64 of random bytes, of which zstd "
        "takes a quarter off: binaries shrink more), built by nix-build into the server's store; each "
        "host's store is a chroot store of its own. herald's transfer is what its run log times: asking "
        "the store what it lacks, fetching over SFTP from `herald serve` and verifying as the bytes "
        "arrive, then the import (`nix copy` from the NARs it verified); "
        "the whole `herald agent --once` (the interpreter's start, SSH connect, signature, the switch) "
        "beside it. nix copy's is the copy alone, from a zstd binary cache of the same closures into "
        "an empty store (the changed package: into the store holding the previous closure). herald's "
        "bytes are the objects it downloaded, and in brackets the loopback's count over the agent's "
        "run (both directions, SSH and TCP framing included); nix copy's, the NAR files it read. One "
        "run per row."
    )
    after = (
        f"Cold publish of the {f.hosts} systems (build, closure, zstd of every NAR once): "
        f"{f.publish_seconds:.1f} s. A changed package gives a host two new paths, the package and its "
        "system (which refers to it): their objects and the release file are the floor of the second row. "
        "The baseline reads a local directory; herald's fetch crosses SSH, with `herald serve` "
        "encrypting and the agent decrypting, decompressing and hashing, each in one Python process, "
        "both on this machine's two cores: the fetch is where herald's time goes, the import is "
        "nix copy's own."
    )
    lines = ["## Closure", "", about, "", *rows, "", after, ""]
    return "\n".join(lines)


if __name__ == "__main__":
    print(main(*(int(arg) for arg in sys.argv[1:])))
