"""herald's wire contract: every payload, config file and release format, shared by all parts.

This package imports nothing else of herald. Everything the publisher, the broker and the agent
exchange is declared here once, as strict msgspec Structs.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("herald")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"
