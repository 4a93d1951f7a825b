"""Listening sockets: a port that cannot be bound is one line naming it and the setting."""

import errno
import socket

from protocol.errors import ConfigError


def cannot_listen(what: str, host: str, port: int, setting: str, exc: OSError) -> ConfigError:
    """The error for a listener of `what` that could not bind `host:port`, set by `setting`."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    reason = {
        errno.EADDRINUSE: "the port is in use (another herald serve, or another program?)",
        errno.EACCES: "permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)",
        errno.EADDRNOTAVAIL: "no such address on this machine",
    }.get(exc.errno or 0, exc.strerror or str(exc))
    return ConfigError(f"cannot listen on {where} for {what} ({setting}): {reason}")


def check_bindable(what: str, host: str, port: int, setting: str) -> None:
    """Raise `cannot_listen` now if `host:port` cannot be bound (as a server binds it, with
    SO_REUSEADDR), for libraries that bury the error in their own (amqtt). Port 0 always binds."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"cannot listen on {host}:{port} for {what} ({setting}): {exc.strerror}") from exc
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                raise cannot_listen(what, host, port, setting, exc) from exc
