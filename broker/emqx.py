"""herald's rules for EMQX 5: `herald broker export --format emqx`.

    OUTDIR/acl.conf     broker.acl as EMQX's file authorization (Erlang terms, first match wins)
    OUTDIR/users.json   the built-in database's users, to import (0600: it holds password hashes)
    OUTDIR/emqx.conf    the authentication and authorization blocks that use the two files

EMQX's built-in database takes a salt as a string and a hash in hex, so the `$7$` hashes (binary
salts) cannot be handed over: like the RabbitMQ export, this reads each user's secret (STATE is
root's) and writes EMQX's `sha256` hash with a prefixed salt, hex(sha256(salt + secret)).
"""

import hashlib
import json
import secrets
from pathlib import Path

from broker.acl import Access, host_rules, rules
from broker.export import GENERATED, broker_users, plain_secret
from protocol.credentials import Secret
from protocol.files import write_atomic
from protocol.topics import SERVICE_USERS, Topics

_ACTION = {Access.READ: "subscribe", Access.WRITE: "publish"}


def emqx_hash(secret: Secret, salt: str) -> str:
    """EMQX's `sha256` with `salt_position = prefix`."""
    return hashlib.sha256(salt.encode() + secret.reveal().encode()).hexdigest()


def _terms(who: str, access: Access, patterns: list[str]) -> str:
    quoted = ", ".join(json.dumps(pattern) for pattern in patterns)  # JSON strings are Erlang strings here
    return f"{{allow, {who}, {_ACTION[access]}, [{quoted}]}}."


def emqx_acl(topics: Topics) -> str:
    """The service users' rules first, each closed by a deny; then every other user (the hosts:
    the built-in database holds no one else) gets its own topics through `${username}`."""
    lines = [f"%% herald: {GENERATED}."]
    for user in SERVICE_USERS:
        who = f'{{username, "{user}"}}'
        for access in (Access.WRITE, Access.READ):
            patterns = [r.pattern.replace("%u", user) for r in rules(user, topics) if r.access is access]
            if patterns:
                lines.append(_terms(who, access, patterns))
        lines.append(f'{{deny, {who}, all, ["#"]}}.')
    for access in (Access.READ, Access.WRITE):
        patterns = [r.pattern.replace("%u", "${username}") for r in host_rules(topics) if r.access is access]
        lines.append(_terms("all", access, patterns))
    lines.append("{deny, all}.")
    return "\n".join(lines) + "\n"


def emqx_users(state: Path, hosts: list[str] | None = None) -> list[dict[str, object]]:
    made: list[dict[str, object]] = []
    for user in broker_users(state, hosts):
        salt = secrets.token_hex(16)
        made.append(
            {
                "user_id": user.name,
                "password_hash": emqx_hash(plain_secret(state, user), salt),
                "salt": salt,
                "is_superuser": False,
            }
        )
    return made


def emqx_conf(outdir: Path) -> str:
    return f"""\
# herald: {GENERATED}.
# Add to emqx.conf; then import users.json into the built-in database (dashboard: Authentication,
# Users, Import; or POST it to /api/v5/authentication/password_based:built_in_database/import_users).
authentication = [
  {{
    mechanism = password_based
    backend = built_in_database
    user_id_type = username
    password_hash_algorithm {{ name = sha256, salt_position = prefix }}
  }}
]
authorization {{
  no_match = deny
  deny_action = ignore
  cache {{ enable = false }}
  sources = [{{ type = file, enable = true, path = "{outdir / "acl.conf"}" }}]
}}
mqtt.max_packet_size = 256KB
"""


def export_emqx(state: Path, outdir: Path, topics: Topics, hosts: list[str] | None = None) -> list[Path]:
    users = emqx_users(state, hosts)
    outdir.mkdir(parents=True, exist_ok=True)
    written = [outdir / "acl.conf", outdir / "users.json", outdir / "emqx.conf"]
    write_atomic(written[0], emqx_acl(topics).encode(), mode=0o644)
    write_atomic(written[1], json.dumps(users, indent=2).encode() + b"\n", mode=0o600)
    write_atomic(written[2], emqx_conf(outdir.resolve()).encode(), mode=0o644)
    return written
