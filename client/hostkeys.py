"""The server host keys this agent trusts: agent.toml's server.host_key, and its announced successors.

STATE_DIR/server-keys.json keeps what the agent learned: each key with the key of the
connection it was learned over, and the keys retired. A key is learned only from the statement
in the chroot (protocol.hostkeys), read over an SFTP session whose server proved, during the
SSH key exchange, a key already trusted here; a statement that retires the key of the very
connection it came over is ignored for that key (the agent would lock itself out). agent.toml's
key is the root: trusted unless a trusted statement retired it.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Final

import asyncssh
import msgspec
from loguru import logger

from protocol.files import write_atomic
from protocol.hostkeys import ServerKeys, encode_answer
from protocol.messages import now
from protocol.settings import check_ssh_public_key

FILE: Final = "server-keys.json"


class _Learned(msgspec.Struct, frozen=True):
    key: str
    over: str  # the key of the connection the statement came over
    at: str


class _Saved(msgspec.Struct, frozen=True, kw_only=True):
    format: int = 1
    learned: list[_Learned] = []
    retired: list[str] = []
    answered: list[str] = []  # the trusted keys the last answer uploaded named


def fingerprint(key: str) -> str:
    return asyncssh.import_public_key(key).get_fingerprint("sha256")


@dataclass(slots=True)
class Trust:
    path: Path
    root: str  # agent.toml's server.host_key
    saved: _Saved

    @classmethod
    def load(cls, state_dir: Path, root: str) -> "Trust":
        path = state_dir / FILE
        try:
            saved = msgspec.json.decode(path.read_bytes(), type=_Saved)
        except FileNotFoundError:
            saved = _Saved()
        except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            logger.warning("{}: unreadable ({}); trusting agent.toml's server.host_key only", path, exc)
            saved = _Saved()
        return cls(path, check_ssh_public_key(root), saved)

    def keys(self) -> list[str]:
        """Every key trusted now, agent.toml's first."""
        retired = set(self.saved.retired)
        found = [] if self.root in retired else [self.root]
        found += [
            item.key for item in self.saved.learned if item.key not in retired and item.key not in found
        ]
        return found

    def ssh_keys(self) -> list[asyncssh.SSHKey]:
        return [asyncssh.import_public_key(key) for key in self.keys()]

    def learn(self, statement: ServerKeys, *, over: str) -> list[str]:
        """Take a statement read over a connection whose server proved `over`; what changed, as
        lines to log. `over` must be trusted already (asyncssh refused the connection otherwise)."""
        if over not in self.keys():
            return [f"ignored a statement over {fingerprint(over)}, a key not trusted here"]
        said: list[str] = []
        learned, retired = list(self.saved.learned), list(self.saved.retired)
        for key in statement.retired:
            if key == over:
                continue  # never the key of the connection the statement came over (client.link reconnects)
            if key not in retired:
                retired.append(key)
                said.append(f"no longer trusts {fingerprint(key)}: retired by the server")
        known = {item.key for item in learned} | {self.root}
        for key in statement.keys:
            if key in retired and key != over:
                continue
            if key not in known:
                learned.append(_Learned(key, over, now().isoformat()))
                known.add(key)
                said.append(f"trusts {fingerprint(key)} too: announced over {fingerprint(over)}")
        if said:
            self._save(_Saved(learned=learned, retired=retired[-16:], answered=self.saved.answered))
        return said

    def answer(self) -> bytes | None:
        """What to upload to logs/ when the trusted keys changed since the last answer, else None."""
        return encode_answer(self.keys()) if sorted(self.keys()) != sorted(self.saved.answered) else None

    def answered(self) -> None:
        saved = self.saved
        self._save(_Saved(learned=saved.learned, retired=saved.retired, answered=sorted(self.keys())))

    def _save(self, saved: _Saved) -> None:
        write_atomic(self.path, msgspec.json.encode(saved), mode=0o600)
        self.saved = saved
