"""`herald enrol`: a fresh machine joins the fleet with one command.

It pins the server's SSH host key (shown as a fingerprint for the person to compare, or given),
makes the host's SSH key if there is none (printing the line to add to fleet.toml), and writes
an agent.toml that protocol.settings accepts. The caller then runs one check, which fetches the
host's release and switches to it; from then on the host's own configuration keeps it enrolled.
"""

import asyncio
import json
import os
import tomllib
from pathlib import Path

import asyncssh

from protocol.errors import ConfigError, UnreachableError
from protocol.settings import AgentConfig, check_ssh_public_key, convert


async def server_host_key(address: str, port: int) -> str:
    """The server's SSH host key as 'type base64', fetched without logging in."""
    try:
        async with asyncio.timeout(15):
            key = await asyncssh.get_server_host_key(address, port, config=None)
    except (OSError, asyncssh.Error, TimeoutError) as exc:
        raise UnreachableError(f"SFTP server {address}:{port}: {exc or exc.__class__.__name__}") from exc
    if key is None:
        raise UnreachableError(f"SFTP server {address}:{port} sent no host key")
    return check_ssh_public_key(key.export_public_key("openssh").decode())


def fingerprint(host_key: str) -> str:
    return asyncssh.import_public_key(host_key).get_fingerprint("sha256")


def described(host_key: str) -> str:
    """The key as `herald serve` and `herald enrol` both show it: the key, which agent.toml's
    server.host_key and --host-key take, and its SHA256 fingerprint, which ssh-keygen -l shows."""
    return f"{host_key} ({fingerprint(host_key)})"


def ensure_ssh_key(path: Path, host: str) -> tuple[str, bool]:
    """The public key line for `path`, creating the key (0600) if missing; and whether it is new."""
    if path.exists():
        try:
            key = asyncssh.read_private_key(str(path))
        except (OSError, asyncssh.KeyImportError, ValueError) as exc:
            raise ConfigError(f"{path}: cannot read the SSH key: {exc}") from exc
        return key.export_public_key().decode().strip(), False
    path.parent.mkdir(parents=True, exist_ok=True)
    key = asyncssh.generate_private_key("ssh-ed25519", comment=f"herald:{host}")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(key.export_private_key())
    return key.export_public_key().decode().strip(), True


def agent_toml(
    *, host: str, ssh_key: Path, address: str, port: int, host_key: str, broker: str | None, state_dir: str
) -> str:
    """agent.toml for these settings, checked by the same decoder the agent uses."""
    quote = json.dumps  # TOML basic strings take JSON's escapes
    lines = [
        "# Written by `herald enrol`. The NixOS module (services.herald.agent) renders this file",
        "# from its options once the host's own configuration imports it.",
        f"host = {quote(host)}",
        f"ssh_key = {quote(str(ssh_key))}",
        f"state_dir = {quote(state_dir)}",
        "",
        "[server]",
        f"address = {quote(address)}",
        f"port = {port}",
        f"host_key = {quote(host_key)}",
    ]
    if broker:
        lines += ["", "[broker]", f"url = {quote(broker)}"]
    text = "\n".join(lines) + "\n"
    convert(tomllib.loads(text), AgentConfig, source="the agent.toml herald enrol writes")
    return text


def rotate_ssh_key(config: AgentConfig) -> list[str]:
    """`herald enrol --rotate`: a new SSH key beside the host's (`<ssh_key>.next`, made if
    missing); what to tell the person. The agent logs in with it once the server takes it, and
    with the old key until then (client.link), so the host is never locked out."""
    current = Path(config.ssh_key)
    upcoming = Path(f"{config.ssh_key}.next")
    public, created = ensure_ssh_key(upcoming, config.host)
    made = f"made {upcoming}" if created else f"{upcoming} is there already"
    return [
        f"{made}; put it in fleet.toml in place of the old key, then publish:",
        f'  [hosts.{config.host}]\n  ssh_key = "{public}"',
        (
            f"until the server takes it the agent logs in with {current}; then the new key becomes "
            f"{current} (the old one is kept as {current}.old)"
        ),
    ]
