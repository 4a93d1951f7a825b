"""The agent's install into the root, against a real server and a temporary root: what was there
before herald comes back, a path that cannot be written never stops the agent, and herald's
temporary files never take a name a release or an admin uses.

The last test drives the install code itself (client.install.converge) against a temporary
root: nothing is mocked, only the release is made by hand.
"""

import hashlib
import json
import stat
from pathlib import Path

import pytest
from helpers import Agent, Fleet, Serve, herald, make_agent

from client.converge import converge
from client.install import InstalledFile, InstallRecord, known_of


@pytest.fixture
def alpha(fleet: Fleet, serve: Serve, tmp_path: Path) -> Agent:
    return make_agent(fleet, "alpha", serve, tmp_path)


def publish(fleet: Fleet, state: Path) -> None:
    done = herald("publish", "--fleet", str(fleet.root), "--state", str(state))
    assert done.returncode == 0, done.stdout + done.stderr


def entry(path: Path) -> tuple[str, int, str]:
    """What is at `path`: ('link', 0, its target) or ('file', mode, content)."""
    info = path.lstat()
    if stat.S_ISLNK(info.st_mode):
        return ("link", 0, str(path.readlink()))
    return ("file", stat.S_IMODE(info.st_mode), path.read_text())


@pytest.mark.parametrize("kind", ["file", "link"])
def test_what_was_there_before_herald_comes_back_after_a_failed_first_apply_and_when_no_longer_released(
    alpha: Agent, fleet: Fleet, state: Path, kind: str
):
    """The admin's /etc/motd (a file, or a link as NixOS makes /etc files), then a first
    generation that releases /etc/motd and fails to rebuild: the admin's /etc/motd is there
    after it, as it was. Once a generation that releases it is applied, and a later one no
    longer releases it, the admin's comes back too. (It was deleted: the undo removed the file
    herald had written, and nothing kept what it had replaced.)"""
    motd = alpha.home / "root" / "etc" / "motd"
    motd.parent.mkdir(parents=True)
    if kind == "link":
        motd.symlink_to("/etc/static/motd")
    else:
        motd.write_text("the admin's own banner\n")
        motd.chmod(0o640)
    before = entry(motd)
    (alpha.control / "fail").touch()
    failed = alpha.once()
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "rebuild failed" in failed.stdout
    assert entry(motd) == before
    assert not (alpha.home / "state" / "journal.json").exists()

    (alpha.control / "fail").unlink()
    fleet.edit("alpha", "configuration.nix", "{ ... }: { second = true; }\n")
    publish(fleet, state)
    assert alpha.once().returncode == 0
    assert motd.read_bytes() == (fleet.root / "hosts/alpha/files/etc/motd").read_bytes()
    installed = json.loads((alpha.home / "state" / "installed.json").read_text())
    assert [d[0] for d in installed["displaced"]] == ["etc/motd"]

    (fleet.root / "hosts/alpha/files/etc/motd").unlink()
    publish(fleet, state)
    assert alpha.once().returncode == 0
    assert entry(motd) == before
    assert not list((alpha.home / "state" / "displaced").iterdir())  # nothing kept that no record names


def test_a_path_that_cannot_be_written_is_reported_and_never_stops_the_agent(
    alpha: Agent, fleet: Fleet, state: Path
):
    """herald created /etc/app for /etc/app/conf; the admin replaced the directory with a file.
    The next generation changes both /etc/app/conf and /etc/motd: it is applied, /etc/motd
    written, /etc/app/conf reported, and the generations after it apply too. (The install
    raised NotADirectoryError, the undo raised it again in its error handler, the journal stayed,
    and every later run failed in its recovery: the agent was stopped for good.)"""
    fleet.edit("alpha", "files/etc/app/conf", "one\n")
    publish(fleet, state)
    assert alpha.once().returncode == 0
    root = alpha.home / "root"
    (root / "etc" / "app" / "conf").unlink()
    (root / "etc" / "app").rmdir()
    (root / "etc" / "app").write_text("the admin's file where herald's directory was\n")

    fleet.edit("alpha", "files/etc/app/conf", "two\n")
    fleet.edit("alpha", "files/etc/motd", "generation three\n")
    publish(fleet, state)
    done = alpha.once()
    assert done.returncode == 0, done.stdout + done.stderr
    assert "alpha: idle (deployed generation 3)" in done.stdout
    assert "not written: /etc/app/conf (/etc/app is not a directory)" in done.stdout
    assert (root / "etc" / "motd").read_text() == "generation three\n"
    assert (root / "etc" / "app").read_text() == "the admin's file where herald's directory was\n"
    assert not (alpha.home / "state" / "journal.json").exists()

    fleet.edit("alpha", "files/etc/motd", "generation four\n")
    publish(fleet, state)
    later = alpha.once()
    assert later.returncode == 0, later.stdout + later.stderr
    assert alpha.deployed() == 4
    assert (root / "etc" / "motd").read_text() == "generation four\n"


def release(where: Path, files: dict[str, str], generation: int = 1) -> tuple[InstallRecord, Path]:
    """A release's files/ as the agent's fetched tree holds it, and its install record."""
    source = where / f"tree-{generation}" / "files"
    entries = []
    for path, text in files.items():
        (source / path).parent.mkdir(parents=True, exist_ok=True)
        (source / path).write_text(text)
        entries.append(InstalledFile(path, 0o644, hashlib.sha256(text.encode()).hexdigest()))
    return InstallRecord(generation=generation, root=str(where / "root"), files=entries), source


def on_disk(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): path.read_text() for path in sorted(root.rglob("*")) if path.is_file()
    }


def test_herald_temporary_files_take_no_name_a_release_or_an_admin_uses(tmp_path: Path):
    """herald wrote `x` through `.x.herald` beside it, and removed that name first: a release
    naming both `etc/conf` and `etc/.conf.herald` lost the second (the record listed a file not
    on disk), and the admin's `etc/.motd.herald` was deleted by the install of `etc/motd`. Its
    temporary name now holds a backslash, which no MANIFEST path may."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / ".motd.herald").write_text("the admin's\n")
    files = {"etc/.conf.herald": "released too\n", "etc/conf": "conf\n", "etc/motd": "motd\n"}
    target, source = release(tmp_path, files)
    done = converge(root, target, source, known_of())
    assert on_disk(root) == {**files, "etc/.motd.herald": "the admin's\n"}
    assert done.record.files == target.files
    for installed in done.record.files:
        assert hashlib.sha256((root / installed.path).read_bytes()).hexdigest() == installed.sha256
