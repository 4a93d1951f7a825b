"""JSON schemas of agent.toml and server.toml, for the NixOS modules (nix/schema/*.json).

    python -m protocol.schema nix/schema

The modules check their settings against these (nix/lib.nix unknownKeys); a test keeps the
files equal to what the decoders accept, so module options and decoders cannot drift apart.
"""

import sys
from pathlib import Path

import msgspec

from protocol.settings import AgentConfig, ServerConfig

SCHEMAS = {"agent.json": AgentConfig, "server.json": ServerConfig}


def rendered() -> dict[str, bytes]:
    return {
        name: msgspec.json.format(msgspec.json.encode(msgspec.json.schema(kind)), indent=2) + b"\n"
        for name, kind in SCHEMAS.items()
    }


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "nix/schema")
    target.mkdir(parents=True, exist_ok=True)
    for name, data in rendered().items():
        (target / name).write_bytes(data)
