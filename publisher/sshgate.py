"""Who may hold a connection to the embedded SFTP server, and how many.

Every connection is a descriptor of the one process that also runs the broker and serves every
host, so both kinds are capped (OpenSSH's MaxStartups and MaxSessions play this part for sshd):

- **Not logged in yet** (anyone who can reach the port): at most PENDING at once, PER_PEER of
  them from one address (an IPv6 /64 counts as one). A login takes a few round trips, and an
  agent retries with backoff, so a new connection over a cap is dropped at once unless the oldest
  one in its way has waited LOGIN_GRACE seconds: that one, which no agent would be, is dropped
  instead. Connections that never log in so hold nothing for long, and what has not logged in
  after LOGIN_TIMEOUT is closed anyway. PER_PEER is half of PENDING: a site behind one NAT can
  log 64 agents in at the same moment, and one address can never take every place.
- **Logged in**: at most PER_HOST per host. An agent holds one, its confirmation after a switch
  opens a second, `herald agent --once` or a backup run a third, and a connection the network
  dropped can linger on the server until keepalive notices (3 minutes); 8 leaves room for all of
  that and keeps a compromised host from holding the server's descriptors.
"""

import ipaddress
import time
from typing import Final

import asyncssh
from loguru import logger

from protocol.layout import StateDir
from protocol.settings import authorized_key, check_ssh_public_key
from protocol.topics import is_host_name

PENDING: Final = 128
PER_PEER: Final = 64
LOGIN_GRACE: Final = 2.0  # seconds
LOGIN_TIMEOUT: Final = 10  # seconds: asyncssh's default was 30
PER_HOST: Final = 8
_WARN_EVERY: Final = 60.0  # seconds between two warnings about dropped connections

Conn = asyncssh.SSHServerConnection


def peer_of(conn: Conn) -> str:
    """The address a connection counts against: an IPv4 address, or an IPv6 /64."""
    peer = conn.get_extra_info("peername")
    try:
        address = ipaddress.ip_address(peer[0].partition("%")[0])  # without a link-local scope
    except (TypeError, IndexError, ValueError):
        return str(peer)
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class Admission:
    """The embedded server's connections, shared by every connection's Gate."""

    def __init__(self) -> None:
        self.pending: dict[Conn, tuple[float, str]] = {}  # oldest first: when each came, from where
        self.peers: dict[str, dict[Conn, tuple[float, str]]] = {}
        self.hosts: dict[str, set[Conn]] = {}
        self._warned = -_WARN_EVERY

    def arrived(self, conn: Conn, peer: str) -> None:
        """Admit a new connection, or drop it (or the oldest in its way) at once."""
        now = time.monotonic()
        for group, cap in ((self.peers.get(peer, {}), PER_PEER), (self.pending, PENDING)):
            if len(group) >= cap and not self._make_room(group, now):
                held = len(self.peers.get(peer, {}))
                self._warn(
                    f"dropped new SSH connections from {peer}: {held} from there and "
                    f"{len(self.pending)} in all have not logged in yet"
                )
                conn.abort()
                return
        self.pending[conn] = self.peers.setdefault(peer, {})[conn] = (now, peer)

    def _make_room(self, group: dict[Conn, tuple[float, str]], now: float) -> bool:
        oldest, (since, peer) = next(iter(group.items()))
        if now - since < LOGIN_GRACE:
            return False
        self._warn(f"dropped SSH connections from {peer} that had not logged in for {LOGIN_GRACE:g}s")
        self._forget(oldest)
        oldest.abort()
        return True

    def full(self, host: str) -> bool:
        """Whether `host` holds PER_HOST connections already (and a log line saying so)."""
        held = len(self.hosts.get(host, ()))
        if held < PER_HOST:
            return False
        logger.bind(host=host).warning("refused an SSH connection: {} are open for this host, its cap", held)
        return True

    def logged_in(self, conn: Conn, host: str) -> bool:
        """Count a connection that logged in as `host`; False past PER_HOST."""
        self._forget(conn)
        if self.full(host):
            return False
        self.hosts.setdefault(host, set()).add(conn)
        return True

    def left(self, conn: Conn, host: str | None) -> None:
        self._forget(conn)
        held = self.hosts.get(host or "")
        if held is not None:
            held.discard(conn)
            if not held:
                del self.hosts[host or ""]

    def _forget(self, conn: Conn) -> None:
        """`conn` no longer waits to log in."""
        entry = self.pending.pop(conn, None)
        if entry is not None:
            same = self.peers[entry[1]]
            del same[conn]
            if not same:
                del self.peers[entry[1]]

    def _warn(self, text: str) -> None:
        """At most one line a minute: whoever fills the caps must not fill the log too."""
        now = time.monotonic()
        if now - self._warned >= _WARN_EVERY:
            self._warned = now
            logger.warning("{} (shown at most once a minute)", text)


class Gate(asyncssh.SSHServer):
    """One connection: public-key authentication against the keys the publisher wrote for each
    host, and its place under the caps."""

    def __init__(self, state: StateDir, admission: Admission) -> None:
        self._state = state
        self._admission = admission
        self._conn: Conn | None = None
        self._counted: str | None = None  # the host this connection counts for, once logged in

    def connection_made(self, conn: Conn) -> None:
        self._conn = conn
        self._admission.arrived(conn, peer_of(conn))

    def connection_lost(self, exc: Exception | None) -> None:  # noqa: ARG002 - asyncssh's signature
        if self._conn is not None:
            self._admission.left(self._conn, self._counted)

    def begin_auth(self, username: str) -> bool:
        if self._conn is not None and self._admission.full(username):
            self._refuse(username)  # before the login: the client is told why
        return True

    def auth_completed(self) -> None:
        if self._conn is None:
            return
        host = self._conn.get_extra_info("username")
        if self._admission.logged_in(self._conn, host):  # logins that began together
            self._counted = host
        else:
            self._refuse(host)

    def _refuse(self, host: str) -> None:
        if self._conn is not None:
            self._conn.disconnect(
                asyncssh.DISC_TOO_MANY_CONNECTIONS,
                f"{host} has {PER_HOST} connections open, its cap: close one first",
            )

    def password_auth_supported(self) -> bool:
        return False

    def kbdint_auth_supported(self) -> bool:
        return False

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        if not is_host_name(username) or not self._state.chroot(username).is_dir():
            return False
        try:
            lines = self._state.authorized_keys(username).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            return False
        offered = check_ssh_public_key(key.export_public_key("openssh").decode())
        if any(authorized_key(line) == offered for line in lines):
            return True
        logger.bind(host=username).warning("SSH key refused: not the key published for this host")
        return False
