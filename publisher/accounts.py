"""The system accounts `herald server provision` creates for hosts served by OpenSSH."""

import os
import pwd
from typing import Final

MARK: Final = "herald host"  # the account's comment (GECOS): an account without it is never touched


def host_account(host: str) -> tuple[int, int] | None:
    """(uid, gid) of the host's herald account when running as root; None in embedded mode."""
    if os.geteuid() != 0:
        return None
    try:
        account = pwd.getpwnam(host)
    except KeyError:
        return None
    return (account.pw_uid, account.pw_gid) if account.pw_gecos == MARK else None
