"""The system accounts `herald server provision` creates for hosts served by OpenSSH."""

import os
import pwd
from typing import Final

MARK: Final = "herald host"  # the account's comment (GECOS): an account without it is never touched


def host_accounts() -> dict[str, tuple[int, int]]:
    """host -> (uid, gid) of every herald host account, when running as root; else empty
    (embedded mode). One pass over the password database: a lookup per host costs a scan of
    it each, most of a no-change publish of a thousand hosts."""
    if os.geteuid() != 0:
        return {}
    return {entry.pw_name: (entry.pw_uid, entry.pw_gid) for entry in pwd.getpwall() if entry.pw_gecos == MARK}
