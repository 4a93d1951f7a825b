"""The SSH key each host logs in with, as authorized_keys lines (OpenSSH and the embedded server)."""

from protocol.settings import check_ssh_public_key
from publisher.inventory import Host


def authorized_key_line(host: Host) -> str:
    """One line, restricted to what an SFTP client needs (OpenSSH reads the options; the embedded
    server allows nothing more anyway)."""
    key = check_ssh_public_key(host.entry.ssh_key)
    return f"restrict {key} herald:{host.name}\n"
