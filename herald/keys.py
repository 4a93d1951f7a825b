"""`herald key show | rotate | retire`: the publisher key over a fleet's life (publisher.keyring)."""

import argparse
import os

from herald.output import console
from protocol.errors import ConfigError
from protocol.layout import StateDir
from publisher.keyring import links, retire, rotate, trusted
from publisher.publish import publish_lock
from publisher.signing import Signer, settle_key


def key_command(args: argparse.Namespace) -> int:
    state = StateDir(args.state)
    if not state.signing_key.exists() and not (state.publisher / "signing.key").exists():
        raise ConfigError(f"--state {args.state}: no publisher key there (is this the server's state?)")
    if args.action == "show":
        if os.path.lexists(state.publisher / "signing.key"):  # herald 0.1's place: moved first
            with publish_lock(state.publisher / "lock"):
                settle_key(state)
        return _show(state)
    with publish_lock(state.publisher / "lock"):  # no publish signs, places or moves keys meanwhile
        settle_key(state)
        done = rotate(state, retire_old=args.retire) if args.action == "rotate" else retire(state, args.keys)
    for line in done:
        console.print(line, markup=False, soft_wrap=True)
    if args.action == "rotate":
        console.print(
            "agents follow it when they meet a release it signs (herald 0.1 agents cannot: "
            "upgrade them first); retire the old key once they have (herald key retire)",
            markup=False,
            soft_wrap=True,
        )
    return 0


def _show(state: StateDir) -> int:
    signer = Signer.load(state.signing_key)
    trust = trusted(state)
    console.print(f"signing key: {signer.public}", markup=False, soft_wrap=True)
    for entry in trust.keys:
        console.print(f"trusted: {entry.key} (from {entry.source})", markup=False, soft_wrap=True)
    for entry in trust.retired:
        console.print(f"retired: {entry.key} (by {entry.source})", markup=False, soft_wrap=True)
    for link in links(state):
        statement = link.statement
        what = [f"adds {key}" for key in statement.add] + [f"retires {key}" for key in statement.retire]
        when = f"{statement.at:%Y-%m-%d %H:%M}Z"
        console.print(
            f"statement {statement.seq} ({when}, by {statement.by}): {', '.join(what)}",
            markup=False,
            soft_wrap=True,
        )
    return 0
