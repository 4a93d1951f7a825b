"""README is exactly true: every command's synopsis names the flags its parser has (and no
other), every TOML example decodes, also with its commented-out settings turned on, and every
`herald` command line in a shell example parses."""

import argparse
import re
import shlex
import tomllib

import msgspec
import pytest
from helpers import REPO

from herald.cli import parser
from protocol.settings import AgentConfig, FleetConfig, ServerConfig, convert

README = (REPO / "README.md").read_text(encoding="utf-8")


def subcommands() -> dict[str, argparse.ArgumentParser]:
    """'publish', 'broker export', ... -> its parser."""
    found: dict[str, argparse.ArgumentParser] = {}

    def walk(prefix: str, cmd: argparse.ArgumentParser) -> None:
        for action in cmd._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(f"{prefix} {name}".strip(), sub)
                return
        found[prefix] = cmd

    walk("", parser())
    return found


def synopses() -> dict[str, str]:
    """'publish' -> the `herald publish ...` synopsis line of README's Commands section."""
    lines = re.findall(r"^`herald ([a-z -]+?)((?: [\[\(<-].*)?)`$", README, flags=re.MULTILINE)
    return dict(lines)


def flags_of(cmd: argparse.ArgumentParser) -> set[str]:
    return {
        option
        for action in cmd._actions
        for option in action.option_strings
        if option.startswith("--") and option != "--help"
    }


COMMANDS = sorted(subcommands())


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_has_a_synopsis_naming_exactly_its_flags(name: str):
    written = synopses()
    assert name in written, f"README has no synopsis line `herald {name} ...`"
    in_readme = set(re.findall(r"--[a-z][a-z-]*", written[name]))
    assert in_readme == flags_of(subcommands()[name])


def test_the_synopses_name_no_command_that_does_not_exist():
    assert set(synopses()) <= set(COMMANDS)


def toml_blocks() -> list[str]:
    return re.findall(r"^ *```toml\n(.*?)^ *```", README, flags=re.MULTILINE | re.DOTALL)


def _uncommented(block: str) -> str:
    """The block with every commented-out setting (`# key = value`, `# [table]`) turned on."""
    lines = []
    for line in block.splitlines():
        stripped = line.lstrip()
        setting = re.match(r"# ?(\[[a-z.]+\](?= *(?:#|$))|[a-z_]+ = .*)", stripped)
        lines.append(setting[1] if setting else line)
    return "\n".join(lines) + "\n"


def _kind(data: dict[str, object]) -> type[msgspec.Struct] | None:
    if "host" in data and "server" in data:
        return AgentConfig
    if "hosts" in data:
        return FleetConfig
    if "fleet" in data and "state" in data:
        return ServerConfig
    return None


def test_every_toml_example_decodes_also_with_its_commented_settings_on():
    blocks = toml_blocks()
    assert len(blocks) >= 6
    decoded = set()
    for block in blocks:
        for text in (block, _uncommented(block)):
            data = tomllib.loads(text)  # a TOML error names the block's line
            kind = _kind(data)
            if kind is None and set(data) <= {"publish", "files", "rollout"}:  # fleet.toml fragments
                data = {"hosts": {"alpha": {"ssh_key": SSH_KEY}}} | data
                kind = FleetConfig
            if kind is FleetConfig:  # README abbreviates keys ("AAAA..."), or leaves them out
                for index, host in enumerate(data["hosts"].values()):  # type: ignore[union-attr]
                    host["ssh_key"] = _key(index)
            assert kind is not None, f"a TOML example of no known file:\n{text}"
            if kind is AgentConfig:
                data["ssh_key"] = str(data["ssh_key"])
                data["server"]["host_key"] = SSH_KEY  # type: ignore[index]
            convert(data, kind, source="README")
            decoded.add(kind)
    assert decoded == {AgentConfig, FleetConfig, ServerConfig}


SSH_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKw6pDRxgkA1qDnC0c7RLuTFrxVeDlUFHdA2fHHmSjVh readme"


def _key(index: int) -> str:
    from bench.fleetgen import host_key  # noqa: PLC0415

    return host_key(f"readme{index}")


def shell_lines() -> list[str]:
    blocks = re.findall(r"^```sh\n(.*?)^```", README, flags=re.MULTILINE | re.DOTALL)
    return [line.split("#")[0].strip() for block in blocks for line in block.splitlines()]


def test_every_herald_command_line_in_the_examples_parses():
    lines = [line for line in shell_lines() if line.startswith("herald ")]
    lines += [line.split("-- ", 1)[1] for line in shell_lines() if "nix run" in line and "-- " in line]
    assert len(lines) >= 6
    for line in lines:
        words = shlex.split(line.replace("herald ", "", 1) if line.startswith("herald ") else line)
        try:
            parser().parse_args(words)
        except SystemExit as exc:
            pytest.fail(f"README's `{line}` does not parse (exit {exc.code})")
