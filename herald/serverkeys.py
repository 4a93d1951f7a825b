"""`herald server host-key rotate|status|switch|retire`: the steps of publisher.hostkeys, said."""

import argparse
import os
import signal
from pathlib import Path

import msgspec

from herald.output import console, warn
from protocol.errors import ConfigError
from protocol.layout import StateDir
from publisher import hostkeys
from publisher.publish import publish_lock


def _fingerprint(key: str) -> str:
    from client.enrol import fingerprint  # noqa: PLC0415 - asyncssh, only for these commands

    return fingerprint(key)


def _signal_serve(state: Path) -> str:
    """SIGHUP to the `herald serve` running on `state` (it takes the key on disk); what happened."""
    try:
        pid = int(msgspec.json.decode((state / "run" / "serve.json").read_bytes())["pid"])
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError, KeyError, TypeError, msgspec.DecodeError):
        return "no herald serve answered: start it (or send it SIGHUP) to present the new key"
    return f"told herald serve (pid {pid}): new connections get the new key"


def host_key_command(args: argparse.Namespace) -> int:
    state = StateDir(args.state)
    if not state.chroots.is_dir():
        raise ConfigError(f"--state {args.state}: not a herald state directory (no chroot/ there)")
    with publish_lock(state.publisher / "lock"):
        if args.action == "rotate":
            successor = hostkeys.rotate(state, args.key)
            console.print(f"announced the successor {successor} ({_fingerprint(successor)})", markup=False)
            console.print(
                f"written into {len(hostkeys.hosts(state))} chroot(s); agents take it at their next check. "
                "`herald server host-key status` says when every host has",
                markup=False,
            )
            return 0
        if args.action == "status":
            return _status(state)
        if args.action == "switch":
            new, old = hostkeys.switch(state, force=args.force)
            console.print(f"the embedded SFTP server's key is now {new} ({_fingerprint(new)})", markup=False)
            console.print(_signal_serve(args.state), markup=False)
            console.print(
                f"the old key ({_fingerprint(old)}) stays trusted until `herald server host-key retire`",
                markup=False,
            )
            return 0
        old = hostkeys.retire(state, args.key)
        console.print(f"retired {old} ({_fingerprint(old)}): agents stop trusting it at their next check")
        return 0


def _status(state: StateDir) -> int:
    statement = hostkeys.read_statement(state)
    if not statement.keys:
        console.print("no host-key rotation announced (herald server host-key rotate)")
        return 0
    for key in statement.keys:
        console.print(f"announced: {key} ({_fingerprint(key)})", markup=False)
    wanted = set(statement.keys)
    waiting = []
    for host, trusted in hostkeys.answers(state).items():
        if trusted is None:
            waiting.append(host)
            console.print(f"{host}: no answer yet", markup=False)
        elif not wanted <= trusted:
            waiting.append(host)
            console.print(f"{host}: not every announced key yet", markup=False)
        else:
            console.print(f"{host}: trusts them all", markup=False)
    if waiting:
        warn(f"{len(waiting)} host(s) do not trust every announced key yet: do not switch before they do")
        return 1
    console.print("every host trusts every announced key: the server may switch")
    return 0
