"""Hosts that never evaluate (`deliver = "closure"`): the publisher builds each system, the
signed MANIFEST names it and its closure, and the agent imports over its own chroot only what
its store lacks, then switches to exactly the signed path.

Real Nix throughout (Debian's nix-bin, no nixpkgs): systems are plain derivations built with
nix-build as root into the machine's store, which is the server's; each agent's store is a
chroot store at its own root (`store = root` in agent.toml, `nix-store --store ROOT`), so the two
stores are really separate and a path the host runs is one it imported. Each system's
bin/switch-to-configuration records its argument and the path it ran from.
"""

import hashlib
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import msgspec
import pytest
import zstandard
from helpers import (
    HERALD,
    Agent,
    Fleet,
    Proc,
    Serve,
    current_generation,
    delete_from_fleet,
    herald,
    make_agent,
    need,
    need_root,
    read_release,
    wait_until,
    write_release,
)
from test_lifecycle import NIX_OPTIONS

from protocol.errors import ConfigError, ReleaseError
from protocol.nixstore import parse_dump_db
from protocol.release import Content, StorePath, System, check_content, import_order
from protocol.settings import AgentConfig, Deliver, load
from publisher.signing import Signer

PACKAGES = 12  # store paths of each system besides itself and its host's own

# A host's system: PACKAGES packages shared by every host, one of its own (`private`, as a
# secret baked into a system would be), and the system, whose switch-to-configuration records
# "<operation> <the path it ran from>" and, for switch and test, points ROOT/run/current-system
# at itself, as NixOS's does.
SYSTEM_NIX = r"""
let
  root = "@ROOT@";
  package = name: text: derivation {
    inherit name text;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    PATH = "/usr/bin:/bin";
    args = [ "-c" ''
      mkdir -p $out
      echo "$text" > $out/data
      head -c 20000 /dev/zero | tr '\0' x >> $out/data
    '' ];
  };
  text = index: if index == @CHANGED@ then "changed" else "@VERSION@${toString index}";
  packages = builtins.genList (index: package "package-${toString index}" (text index)) @COUNT@;
  noise = derivation {  # bytes zstd cannot shrink: an object as large as a real package's
    name = "@NOISENAME@";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    PATH = "/usr/bin:/bin";
    args = [ "-c" "mkdir -p $out; head -c @NOISE@ /dev/urandom > $out/data" ];
  };
  private = package "@HOST@-private" "a secret of @HOST@";
in derivation {
  name = "system-@HOST@";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  PATH = "/usr/bin:/bin";
  refs = packages ++ [ private noise ];
  args = [ "-c" ''
    mkdir -p $out/bin
    echo $refs > $out/refs
    cat > $out/bin/switch-to-configuration <<EOF
    #!/bin/sh
    set -e
    echo "\$1 \$0" >> ${root}/switched
    case "\$1" in
      switch|test)
        mkdir -p ${root}/run
        ln -sfn $out ${root}/run/.current-system.new
        mv -T ${root}/run/.current-system.new ${root}/run/current-system;;
    esac
    EOF
    chmod +x $out/bin/switch-to-configuration
  '' ];
}
"""


def system_nix(
    host: str,
    root: Path,
    version: str = "v1-",
    count: int = PACKAGES,
    changed: int = -1,
    noise: int = 1000,
    noise_name: str = "noise",
) -> str:
    """The system.nix of `host`: `version` in every package, but package `changed`; a path of
    `noise` random bytes (another build of it, other bytes)."""
    text = SYSTEM_NIX.replace("@ROOT@", str(root)).replace("@HOST@", host).replace("@COUNT@", str(count))
    text = text.replace("@VERSION@", version).replace("@CHANGED@", str(changed))
    return text.replace("@NOISE@", str(noise)).replace("@NOISENAME@", noise_name)


def closure_fleet(fleet: Fleet, tmp_path: Path, hosts: list[str]) -> dict[str, Path]:
    """`hosts` added to the fleet with `deliver = "closure"` and a system.nix each; [publish]
    builds it with nix-build. Their agents' roots, by host."""
    need_root()
    need("nix-build")
    roots = {}
    for host in hosts:
        fleet.add_host(host, tmp_path)
        with (fleet.root / "fleet.toml").open("a") as toml:
            toml.write('deliver = "closure"\n')
        roots[host] = tmp_path / "agents" / host / "root"
        fleet.edit(host, "system.nix", system_nix(host, roots[host]))
    command = ["nix-build", "{release}/system.nix", "--no-out-link", *NIX_OPTIONS]
    with (fleet.root / "fleet.toml").open("a") as toml:
        toml.write(f"\n[publish]\nsystem = {json.dumps(command)}\ncheck = []\n")
    return roots


def closure_agent(fleet: Fleet, host: str, serve: Serve, tmp_path: Path) -> Agent:
    """An agent whose Nix store is its own (a chroot store at its root), switching with nix-env
    and switch-to-configuration as on a host: no rebuild.rollback stand-in."""
    agent = make_agent(fleet, host, serve, tmp_path, confirm="5s")
    text = re.sub(r"\nrollback = .*\n", "\n", agent.config.read_text())
    root = agent.home / "root"
    agent.config.write_text(text.replace(f'root = "{root}"\n', f'root = "{root}"\nstore = "{root}"\n'))
    return agent


def publish(fleet: Fleet, state: Path, serve: Serve) -> subprocess.CompletedProcess[str]:
    done = herald(
        "publish", "--fleet", str(fleet.root), "--state", str(state), "--broker", serve.mqtt, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def manifest(state: Path, host: str, generation: int | None = None) -> dict:
    return json.loads(read_release(state, host, generation or current_generation(state, host))[0])


def host_store(root: Path) -> set[str]:
    """The store paths the host's own store holds (valid), as /nix/store/... names."""
    store = root / "nix" / "store"
    if not store.is_dir():
        return set()
    names = [f"/nix/store/{name}" for name in os.listdir(store) if not name.startswith(".")]
    if not names:
        return set()
    done = subprocess.run(
        ["nix-store", "--store", str(root), "--check-validity", "--print-invalid", *names],
        capture_output=True,
        text=True,
        check=True,
    )
    return set(names) - set(done.stdout.split())


def links(root: Path) -> tuple[str, str]:
    """Where the agent root's system profile and /run/current-system point (store paths)."""

    def resolve(path: Path) -> str:
        while not str(target := path.readlink()).startswith("/nix/store/"):
            path = path.parent / target
        return str(target)

    return resolve(root / "nix/var/nix/profiles/system"), resolve(root / "run/current-system")


def closure_of(state: Path, host: str, generation: int | None = None) -> dict[str, list]:
    return {entry[0]: entry for entry in manifest(state, host, generation)["content"]["system"]["closure"]}


def objects(state: Path, host: str) -> dict[str, int]:
    """objects/ of a host's chroot: name -> inode."""
    directory = state / "chroot" / host / "objects"
    return {name: (directory / name).stat().st_ino for name in os.listdir(directory)}


def test_a_cold_host_imports_its_closure_and_a_change_moves_only_what_changed(
    fleet: Fleet, serve: Serve, state: Path, tmp_path: Path
):
    roots = closure_fleet(fleet, tmp_path, ["omega", "sigma"])
    omega, sigma = (closure_agent(fleet, host, serve, tmp_path) for host in ("omega", "sigma"))
    publish(fleet, state, serve)
    signed = manifest(state, "omega")
    assert signed["format"] == 3
    system = signed["content"]["system"]["path"]
    closure = closure_of(state, "omega")
    assert len(closure) == PACKAGES + 3

    done = omega.once()
    assert done.returncode == 0, done.stdout + done.stderr
    assert host_store(roots["omega"]) == set(closure)  # exactly the closure: nothing else came
    assert links(roots["omega"]) == (system, system)
    # the imported system is a root of the host's collector from its import on, not only once switched
    assert str((omega.home / "state" / "closure.root").readlink()) == system
    # run from the host's own store, the signed path; no rebuild command (no evaluation) ran
    assert (roots["omega"] / "switched").read_text().splitlines() == [
        f"switch {roots['omega']}{system}/bin/switch-to-configuration"
    ]
    assert omega.rebuilds() == []
    log = (omega.home / "state" / "logs").glob("*-applied.log")
    text = "".join(path.read_text() for path in log)
    assert f"system {system}: {PACKAGES + 3} of {PACKAGES + 3} store path(s) missing" in text

    # Shared on disk, each host's own kept to it: the packages both systems hold are one inode in
    # both chroots; omega's private path has its NAR in omega's chroot only.
    others = closure_of(state, "sigma")
    shared = [path for path in closure if path in others]
    assert len(shared) == PACKAGES + 1  # and the noise
    omega_objects, sigma_objects = objects(state, "omega"), objects(state, "sigma")
    for path in shared:
        name = closure[path][4]
        assert omega_objects[name] == sigma_objects[name] == (state / "objects" / name).stat().st_ino
    (private,) = [path for path in closure if path.endswith("-omega-private")]
    assert closure[private][4] in omega_objects
    assert closure[private][4] not in sigma_objects
    assert not [path for path in others if "omega" in path]  # sigma's MANIFEST names none of omega's

    # One package changes: the host fetches that NAR and the system's (which refers to it), no other.
    fleet.edit("omega", "system.nix", system_nix("omega", roots["omega"], changed=3))
    publish(fleet, state, serve)
    after = closure_of(state, "omega")
    new = set(after) - set(closure)
    assert len(new) == 2, new
    assert any(path.endswith("-package-3") for path in new), new
    before = host_store(roots["omega"])
    done = omega.once()
    assert done.returncode == 0, done.stdout + done.stderr
    assert host_store(roots["omega"]) - before == new
    moved = sum(after[path][5] for path in new)
    logs = sorted((omega.home / "state" / "logs").glob("*-applied.log"))
    assert (
        f"2 of {PACKAGES + 3} store path(s) missing, imported from the chroot ({moved} bytes downloaded)"
        in (logs[-1].read_text())
    )
    new_system = manifest(state, "omega")["content"]["system"]["path"]
    assert links(roots["omega"]) == (new_system, new_system)

    # The other host, cold, gets its own closure; a publish that changes nothing builds nothing new.
    assert sigma.once().returncode == 0
    assert host_store(roots["sigma"]) == set(others)
    generation = current_generation(state, "omega")
    again = publish(fleet, state, serve)
    assert current_generation(state, "omega") == generation
    assert "NAR(s) stored" not in again.stderr + again.stdout


def test_a_wrong_nar_or_hash_is_refused_and_nothing_switched(
    fleet: Fleet, serve: Serve, state: Path, tmp_path: Path
):
    roots = closure_fleet(fleet, tmp_path, ["omega", "sigma"])
    omega = closure_agent(fleet, "omega", serve, tmp_path)
    publish(fleet, state, serve)
    assert omega.once().returncode == 0
    first = links(roots["omega"])
    held = host_store(roots["omega"])

    fleet.edit("omega", "system.nix", system_nix("omega", roots["omega"], version="v2-"))
    publish(fleet, state, serve)
    closure = closure_of(state, "omega")
    package = next(path for path in closure if path.endswith("-package-5"))
    chroot_objects = state / "chroot" / "omega" / "objects"

    # 1. Another host's NAR served under the name of one of omega's: it does not hash to the name.
    victim = chroot_objects / closure[package][4]
    original = victim.read_bytes()
    sigma_private = next(path for path in closure_of(state, "sigma") if path.endswith("-sigma-private"))
    victim.unlink()  # a hard link to the pool: replaced, not written through
    victim.write_bytes((state / "objects" / closure_of(state, "sigma")[sigma_private][4]).read_bytes())
    done = omega.once()
    assert done.returncode == 1
    assert f"release refused: {package}: content does not match its sha256 in MANIFEST" in done.stdout
    assert links(roots["omega"]) == first
    assert host_store(roots["omega"]) == held
    victim.unlink()
    victim.write_bytes(original)

    # 2. A MANIFEST, signed by the publisher's key, whose NAR hash for a path is not its NAR's.
    generation = current_generation(state, "omega")
    data, _ = read_release(state, "omega", generation)
    signed = json.loads(data)
    for entry in signed["content"]["system"]["closure"]:
        if entry[0] == package:
            entry[1] = hashlib.sha256(b"another NAR").hexdigest()
    content = json.dumps(signed["content"], separators=(",", ":")).encode()
    signed.update(generation=generation + 1, version=hashlib.sha256(content).hexdigest())
    data = json.dumps(signed, separators=(",", ":")).encode()
    write_release(
        state,
        "omega",
        generation + 1,
        data,
        Signer.load(state / "publisher" / "private" / "signing.key").sign(data),
    )
    (state / "chroot" / "omega" / "current").write_text(
        f"{generation + 1} {signed['version']} format=3 keys=0\n"
    )
    done = omega.once()
    assert done.returncode == 1
    assert f"release refused: {package}: NAR does not match its sha256 in MANIFEST" in done.stdout
    assert links(roots["omega"]) == first
    assert host_store(roots["omega"]) == held
    assert not (roots["omega"] / "switched").read_text().splitlines()[1:]  # switched once, at the start


def test_an_agent_killed_during_the_import_keeps_its_system_and_converges(
    fleet: Fleet, serve: Serve, state: Path, tmp_path: Path
):
    roots = closure_fleet(fleet, tmp_path, ["omega"])
    omega = closure_agent(fleet, "omega", serve, tmp_path)
    publish(fleet, state, serve)
    assert omega.once().returncode == 0
    first, held = links(roots["omega"]), host_store(roots["omega"])

    fleet.edit("omega", "system.nix", system_nix("omega", roots["omega"], version="v2-"))
    publish(fleet, state, serve)
    closure = closure_of(state, "omega")
    marker = tmp_path / "paused"
    env = {**os.environ, "HERALD_TEST_PAUSE": "import:1", "HERALD_TEST_PAUSE_FILE": str(marker)}
    proc = Proc(
        "agent-paused", [*HERALD, "agent", "--config", str(omega.config), "--once"], tmp_path / "a.log", env
    )
    wait_until(lambda: marker.exists() or not proc.alive(), "the agent in the middle of its import", 120)
    assert proc.alive(), proc.output()[-3000:]
    proc.stop(sig=signal.SIGKILL)
    partly = host_store(roots["omega"])
    assert links(roots["omega"]) == first  # the system it ran, untouched
    imported = partly - held
    assert imported, "nothing imported before the kill"
    assert imported < set(closure)  # whole paths of the closure, not all of them

    done = omega.once()
    assert done.returncode == 0, done.stdout + done.stderr
    system = manifest(state, "omega")["content"]["system"]["path"]
    assert set(closure) <= host_store(roots["omega"])
    assert links(roots["omega"]) == (system, system)


def test_a_host_whose_system_fails_to_build_is_not_published(
    fleet: Fleet, serve: Serve, state: Path, tmp_path: Path
):
    roots = closure_fleet(fleet, tmp_path, ["omega", "sigma"])
    publish(fleet, state, serve)
    generations = {host: current_generation(state, host) for host in ("omega", "sigma")}
    fleet.edit("sigma", "system.nix", "derivation { name = 1; }\n")
    fleet.edit("omega", "system.nix", system_nix("omega", roots["omega"], version="v2-"))
    done = herald("publish", "--fleet", str(fleet.root), "--state", str(state), "--json", timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    hosts = {host["host"]: host for host in json.loads(done.stdout)["hosts"]}
    assert hosts["sigma"]["result"] == "failed"
    assert hosts["sigma"]["message"].startswith("build failed: "), hosts["sigma"]
    assert hosts["omega"]["result"] == "changed"
    assert current_generation(state, "sigma") == generations["sigma"]
    assert current_generation(state, "omega") == generations["omega"] + 1


def test_every_kept_release_keeps_its_system_in_the_servers_store(
    fleet: Fleet, serve: Serve, state: Path, tmp_path: Path
):
    roots = closure_fleet(fleet, tmp_path, ["omega"])
    systems, nars = [], []
    for index in range(5):  # [publish] keep is 3
        fleet.edit("omega", "system.nix", system_nix("omega", roots["omega"], version=f"v{index}-", count=2))
        publish(fleet, state, serve)
        systems.append(manifest(state, "omega")["content"]["system"]["path"])
        nars.append({entry[4] for entry in closure_of(state, "omega").values()})
    kept = sorted(int(name) for name in os.listdir(state / "chroot" / "omega" / "releases"))
    assert len(kept) == 3
    gcroots = state / "publisher" / "roots"
    assert sorted(os.listdir(gcroots)) == sorted(f"omega-{generation}" for generation in kept)
    assert [str((gcroots / f"omega-{generation}").readlink()) for generation in kept] == systems[-3:]
    # Nix's collector sees the roots: the kept systems are live, the pruned ones dead
    dead = subprocess.run(["nix-store", "--gc", "--print-dead"], capture_output=True, text=True, check=True)
    assert not set(systems[-3:]) & set(dead.stdout.split())
    assert set(systems[:2]) <= set(dead.stdout.split())
    # the chroot keeps the NARs of the releases it keeps, and drops those of the pruned ones
    names = set(os.listdir(state / "chroot" / "omega" / "objects"))
    assert set().union(*nars[-3:]) <= names
    assert not (set().union(*nars[:2]) - set().union(*nars[-3:])) & names

    # A host removed takes its roots and its NARs with it.
    delete_from_fleet(fleet, "omega")
    done = herald("host", "remove", "omega", "--state", str(state), "--fleet", str(fleet.root))
    assert done.returncode == 0, done.stdout + done.stderr
    assert os.listdir(gcroots) == []
    assert not set().union(*nars) & set(os.listdir(state / "objects"))


def test_an_unconfirmed_switch_returns_to_the_exact_system_before(
    fleet: Fleet, serve: Serve, state: Path, tmp_path: Path
):
    """Confirm and exact rollback as for any release: the system before, from the host's store."""
    roots = closure_fleet(fleet, tmp_path, ["omega"])
    omega = closure_agent(fleet, "omega", serve, tmp_path)
    publish(fleet, state, serve)
    assert omega.once().returncode == 0
    first = links(roots["omega"])
    omega.config.write_text(
        omega.config.read_text().replace("[confirm]\n", '[confirm]\nhealth = ["false"]\n')
    )

    fleet.edit("omega", "system.nix", system_nix("omega", roots["omega"], changed=0))
    publish(fleet, state, serve)
    second = manifest(state, "omega")["content"]["system"]["path"]
    done = omega.once()
    assert done.returncode == 1
    assert "rolled back" in done.stdout, done.stdout
    assert links(roots["omega"]) == first
    assert (roots["omega"] / "switched").read_text().splitlines()[-2:] == [
        f"switch {roots['omega']}{second}/bin/switch-to-configuration",
        f"switch {roots['omega']}{first[0]}/bin/switch-to-configuration",
    ]


def test_a_host_that_takes_closures_only_never_evaluates_a_source_release(
    fleet: Fleet, serve: Serve, state: Path, tmp_path: Path
):
    """agent.toml's `deliver = "closure"`: a release without a system (fleet.toml forgot the
    host's deliver) is refused, no rebuild run; once fleet.toml says closure, it converges."""
    need_root()
    need("nix-build")
    fleet.add_host("omega", tmp_path)
    omega = closure_agent(fleet, "omega", serve, tmp_path)
    omega.config.write_text(
        omega.config.read_text().replace('poll = "1h"\n', 'poll = "1h"\ndeliver = "closure"\n')
    )
    publish(fleet, state, serve)
    done = omega.once()
    assert done.returncode == 1
    assert "this host takes closure releases only (agent.toml: deliver = 'closure')" in done.stdout, (
        done.stdout
    )
    assert omega.rebuilds() == []

    root = omega.home / "root"
    fleet.edit("omega", "system.nix", system_nix("omega", root))
    text = (fleet.root / "fleet.toml").read_text()
    command = ["nix-build", "{release}/system.nix", "--no-out-link", *NIX_OPTIONS]
    text = text.replace("[hosts.omega]\n", '[hosts.omega]\ndeliver = "closure"\n')
    (fleet.root / "fleet.toml").write_text(
        text + f"\n[publish]\nsystem = {json.dumps(command)}\ncheck = []\n"
    )
    publish(fleet, state, serve)
    done = omega.once()
    assert done.returncode == 0, done.stdout + done.stderr
    system = manifest(state, "omega")["content"]["system"]["path"]
    assert links(root) == (system, system)
    assert omega.rebuilds() == []


def test_a_substituter_serves_the_closure_and_the_signature_still_decides_the_path(
    fleet: Fleet, serve: Serve, state: Path, tmp_path: Path
):
    """With [publish] substituter, `push` fills a binary cache (signed with its own key, which
    the host trusts in its nix.conf) before the release is published; the chroot holds no NAR."""
    roots = closure_fleet(fleet, tmp_path, ["omega"])
    cache, secret, public = tmp_path / "cache", tmp_path / "cache.sk", tmp_path / "cache.pk"
    subprocess.run(
        ["nix-store", "--generate-binary-cache-key", "herald-test", str(secret), str(public)],
        check=True,
        capture_output=True,
    )
    push = ["nix", "--extra-experimental-features", "nix-command", "copy", "--to"]
    push += [f"file://{cache}?secret-key={secret}", "{system}"]
    text = (fleet.root / "fleet.toml").read_text()
    text = text.replace(
        "[publish]\n", f'[publish]\nsubstituter = "file://{cache}"\npush = {json.dumps(push)}\n'
    )
    (fleet.root / "fleet.toml").write_text(text)
    omega = closure_agent(fleet, "omega", serve, tmp_path)
    publish(fleet, state, serve)
    signed = manifest(state, "omega")["content"]["system"]
    assert signed["substituter"] == f"file://{cache}"
    assert all(entry[4] == "" for entry in signed["closure"])
    assert not any(
        len(name) == 64 and name not in files_of(state, "omega") for name in objects(state, "omega")
    )

    env = {**os.environ, "NIX_CONFIG": f"trusted-public-keys = {public.read_text().strip()}"}
    once = [*HERALD, "agent", "--config", str(omega.config), "--once"]
    done = subprocess.run(once, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert host_store(roots["omega"]) == {entry[0] for entry in signed["closure"]}
    assert links(roots["omega"]) == (signed["path"], signed["path"])

    # A cache that lacks a path: the fetch fails and is tried again later; nothing refused or switched.
    fleet.edit("omega", "system.nix", system_nix("omega", roots["omega"], changed=1))
    publish(fleet, state, serve)
    new = manifest(state, "omega")["content"]["system"]["path"]
    (cache / f"{new.removeprefix('/nix/store/').split('-')[0]}.narinfo").unlink()
    done = subprocess.run(once, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1
    assert f"cannot fetch {new} from file://{cache}" in done.stdout + done.stderr, done.stdout
    assert not (omega.home / "state" / "failed.json").exists()
    assert links(roots["omega"]) == (signed["path"], signed["path"])

    # A cache serving another build of a path (the same name, other bytes, signed by the cache's
    # key): substituted, found not to be the MANIFEST's, deleted again, the release refused.
    nix = roots["omega"].parent.parent.parent / "fleet" / "hosts" / "omega" / "system.nix"
    other = f"noise-{os.urandom(4).hex()}"  # a path no earlier run left with referrers in this store
    fleet.edit("omega", "system.nix", system_nix("omega", roots["omega"], changed=2, noise_name=other))
    noise_expr = f"builtins.elemAt (import {nix}).refs {PACKAGES + 1}"
    built = subprocess.run(
        ["nix-build", "-E", noise_expr, "--no-out-link", *NIX_OPTIONS],
        capture_output=True,
        text=True,
        check=True,
    )
    noise = built.stdout.split()[-1]
    subprocess.run([*push[:-1], noise], check=True, capture_output=True)  # that build, in the cache
    subprocess.run(["nix-store", "--delete", noise], check=True, capture_output=True)
    publish(fleet, state, serve)  # builds the noise again: other random bytes; push skips what the cache has
    third = manifest(state, "omega")["content"]["system"]
    assert noise in {entry[0] for entry in third["closure"]}
    done = subprocess.run(once, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1
    assert "the substituter's NAR or references do not match the MANIFEST" in done.stdout, done.stdout
    assert noise not in host_store(roots["omega"])  # deleted: never trusted by a later release
    assert links(roots["omega"]) == (signed["path"], signed["path"])


def files_of(state: Path, host: str) -> set[str]:
    """The objects the current release's files/ and sources name."""
    return {entry[3] for entry in manifest(state, host)["content"]["files"]}


def test_a_decompression_bomb_in_the_chroot_is_refused_with_bounded_memory(
    fleet: Fleet, serve: Serve, state: Path, tmp_path: Path
):
    """Whoever writes the chroot (not the key) puts, under the name of a 2 MB object, 2 MB of zstd
    that would decompress to 64 GB. The agent decompresses before it can check the object's hash
    (at its end): it stops at the NAR's size, refuses the release, and stays small."""
    roots = closure_fleet(fleet, tmp_path, ["omega"])
    fleet.edit("omega", "system.nix", system_nix("omega", roots["omega"], noise=2_000_000))
    omega = closure_agent(fleet, "omega", serve, tmp_path)
    publish(fleet, state, serve)
    closure = closure_of(state, "omega")
    noise = next(path for path in closure if path.endswith("-noise"))
    name, size = closure[noise][4], closure[noise][5]
    assert size > 1_900_000
    compressor = zstandard.ZstdCompressor(level=1).compressobj()
    zeros = b"\0" * (1 << 24)
    frame = b"".join(compressor.compress(zeros) for _ in range(256)) + compressor.flush()  # 4 GiB of zeros
    bomb = (frame * (size // len(frame) + 1))[:size]
    victim = state / "chroot" / "omega" / "objects" / name
    victim.unlink()
    victim.write_bytes(bomb)

    agent = subprocess.Popen(
        [*HERALD, "agent", "--config", str(omega.config), "--once"], stdout=subprocess.PIPE, text=True
    )
    _, status, usage = os.wait4(agent.pid, 0)
    output = agent.stdout.read() if agent.stdout else ""
    assert os.waitstatus_to_exitcode(status) == 1, output
    assert f"release refused: {noise}: NAR does not match its sha256 in MANIFEST" in output
    assert usage.ru_maxrss < 400_000, usage.ru_maxrss  # kB: the agent as it always is
    assert host_store(roots["omega"]) == set()


FAKE_NIXOS = r"""
# <nixpkgs/nixos> as far as herald's default build uses it: -A system of <nixos-config>.
{ configuration ? import <nixos-config> }:
let settings = configuration { }; in {
  system = derivation {
    name = "nixos-system-${settings.networking.hostName}-@CHANNEL@";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    PATH = "/usr/bin:/bin";
    args = [ "-c" ''
      mkdir -p $out/bin
      printf '#!/bin/sh\nexit 0\n' > $out/bin/switch-to-configuration
      chmod +x $out/bin/switch-to-configuration
    '' ];
  };
}
"""


def test_the_default_build_of_a_classic_host_follows_the_servers_nixpkgs_channel(
    fleet: Fleet, state: Path, tmp_path: Path
):
    """No [publish] system: `nix-build '<nixpkgs/nixos>' -A system` of the host's
    configuration.nix, with the server's <nixpkgs> (here a stand-in channel). A channel update
    changes nothing in the fleet repository, and still builds the host again."""
    need_root()
    need("nix-build")
    fleet.add_host("omega", tmp_path)
    with (fleet.root / "fleet.toml").open("a") as toml:
        toml.write('deliver = "closure"\n\n[publish]\ncheck = []\n')
    channels = []
    for name in ("24.11.1", "24.11.2"):
        channel = tmp_path / f"channel-{name}"
        (channel / "nixos").mkdir(parents=True)
        (channel / "nixos" / "default.nix").write_text(FAKE_NIXOS.replace("@CHANNEL@", name))
        channels.append(channel)
    nix_config = "sandbox = false\nbuild-users-group =\nsubstituters =\n"
    state.mkdir()
    past = time.time() - 3600  # files older than the hash cache's racy window: remembered by key
    for path in fleet.root.rglob("*"):
        os.utime(path, (past, past), follow_symlinks=False)
    for index, channel in enumerate(channels):
        env = {**os.environ, "NIX_PATH": f"nixpkgs={channel}", "NIX_CONFIG": nix_config}
        argv = [*HERALD, "publish", "--fleet", str(fleet.root), "--state", str(state)]
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        assert current_generation(state, "omega") == index + 1
        path = manifest(state, "omega")["content"]["system"]["path"]
        assert path.endswith(f"-nixos-system-omega-{channel.name.removeprefix('channel-')}")
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0
    assert current_generation(state, "omega") == 2  # the same channel again: nothing to build


# ---------------------------------------------------------------- the contract, without servers

PATH_A = "/nix/store/" + "a" * 32 + "-a"
PATH_B = "/nix/store/" + "b" * 32 + "-b"
PATH_C = "/nix/store/" + "c" * 32 + "-c"


def entry(path: str, *references: str) -> StorePath:
    return StorePath(path, "0" * 64, 8, list(references), "1" * 64, 4)


@pytest.mark.parametrize(
    ("closure", "system", "problem"),
    [
        ([entry(PATH_B), entry(PATH_A)], PATH_A, "closure not sorted by path"),
        ([entry(PATH_A), entry(PATH_A)], PATH_A, "duplicate store path"),
        ([entry(PATH_A, PATH_C)], PATH_A, "which the closure does not hold"),
        ([entry(PATH_A)], PATH_B, "does not hold its system"),
        ([StorePath(PATH_A, "0" * 64, 8, [])], PATH_A, "names no object"),
    ],
)
def test_a_closure_that_is_not_whole_and_closed_is_refused(
    closure: list[StorePath], system: str, problem: str
):
    content = Content(operation="switch", files=[], system=System(path=system, closure=closure))
    with pytest.raises(ReleaseError, match=problem):
        check_content(content)


def test_paths_are_imported_after_what_they_refer_to():
    closure = [entry(PATH_A, PATH_A, PATH_C), entry(PATH_B, PATH_A), entry(PATH_C)]
    assert [item.path for item in import_order(closure)] == [PATH_C, PATH_A, PATH_B]


def test_the_registrations_nix_prints_are_read_whole():
    text = f"{PATH_A}\n{'ab' * 32}\n120\n\n2\n{PATH_A}\n{PATH_B}\n"
    text += f"{PATH_B}\n{'cd' * 32}\n8\n/nix/store/x.drv\n0\n"
    assert parse_dump_db(text) == {PATH_A: ("ab" * 32, 120, [PATH_A, PATH_B]), PATH_B: ("cd" * 32, 8, [])}


@pytest.mark.parametrize(
    "fields",
    [
        [PATH_A + "\n", "0" * 64, 8, [], "1" * 64, 4],  # a name that would add a narinfo line
        [PATH_A, "0" * 64 + "\n", 8, [], "1" * 64, 4],
        [PATH_A, "0" * 64, 8, [PATH_B + "\n"], "1" * 64, 4],
        ["/nix/store/" + "e" * 32 + "-a", "0" * 64, 8, [], "1" * 64, 4],  # not Nix's base32
        [PATH_A, "0" * 64, 8, [], "1" * 64 + "\n", 4],
        ["/nix/store/../../etc/passwd", "0" * 64, 8, [], "1" * 64, 4],
    ],
)
def test_a_store_path_entry_nix_would_read_otherwise_is_refused(fields: list):
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert(fields, StorePath)


def test_agent_toml_takes_closures_into_an_absolute_store_only(tmp_path: Path):
    config = tmp_path / "agent.toml"
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKw6pDRxgkA1qDnC0c7RLuTFrxVeDlUFHdA2fHHmSjVh"
    body = (
        f'host = "alpha"\nssh_key = "k"\nstore = "var/store"\n[server]\naddress = "a"\nhost_key = "{key}"\n'
    )
    config.write_text(body)
    with pytest.raises(ConfigError, match=r"store: 'var/store': the root directory of a Nix store"):
        load(config, AgentConfig)
    config.write_text(body.replace('store = "var/store"', 'deliver = "closure"'))
    assert load(config, AgentConfig).deliver is Deliver.CLOSURE
