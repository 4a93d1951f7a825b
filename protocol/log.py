"""Logging: loguru for herald, with the libraries' stdlib logging routed into it.

Library code logs with `logger.bind(host=...)`; only entry points call `setup()`.
"""

import logging
import sys
from typing import TYPE_CHECKING, Final, TextIO

from loguru import logger

if TYPE_CHECKING:
    from loguru import Record

# Chatty at INFO: connection lines for every client, every SFTP request.
_QUIET: Final = ("amqtt", "asyncssh", "paho", "aiomqtt", "transitions", "websockets", "mqtt")


class _Intercept(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        logger.opt(depth=6, exception=record.exc_info).log(level, "{}: {}", record.name, record.getMessage())


def _format(record: "Record") -> str:
    host = record["extra"].get("host")
    where = f"[{host}] " if host else ""
    return (
        "{time:HH:mm:ss.SSS} {level: <7} "
        + where.replace("{", "{{").replace("}", "}}")
        + "{message}\n{exception}"
    )


def setup(level: str = "INFO", *, stream: TextIO | None = None, libraries: str = "WARNING") -> None:
    """Send herald's log and the libraries' to `stream` (stderr), one line per event."""
    logger.remove()
    logger.add(stream or sys.stderr, level=level, format=_format, colorize=None, backtrace=False)
    logging.basicConfig(handlers=[_Intercept()], level=0, force=True)
    for name in _QUIET:
        logging.getLogger(name).setLevel(libraries)
