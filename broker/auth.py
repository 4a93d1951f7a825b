"""amqtt plugins: password check against STATE/broker/passwd, and the ACL of broker.acl.

The password file is re-read when it changes, so a publish that adds a host lets it in without
a restart. Verification costs ~0.1 ms (protocol.credentials), so it runs on the event loop.
"""

import os
from dataclasses import dataclass
from pathlib import Path

from amqtt.contexts import Action, BaseContext
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session
from loguru import logger

from broker.acl import may_publish, may_receive, may_subscribe, owns_client_id
from protocol.credentials import parse_passwd, verify_secret
from protocol.topics import DEFAULT_PREFIX, Topics


class PasswordPlugin(BaseAuthPlugin):
    """Admit a client only if its user name is in the password file, its secret matches, and
    its client id is one of that user's (broker.acl.owns_client_id): no login, however valid,
    can take over another user's session."""

    @dataclass
    class Config:
        password_file: str = ""

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        self._path = Path(self.config.password_file)
        self._stamp: tuple[int, int, int] | None = None
        self._users: dict[str, str] = {}

    def _reload(self) -> None:
        try:
            info = os.stat(self._path)  # noqa: PTH116
        except FileNotFoundError:
            self._users, self._stamp = {}, None
            return
        stamp = (info.st_mtime_ns, info.st_ino, info.st_size)
        if stamp != self._stamp:
            self._users = parse_passwd(self._path.read_text(encoding="utf-8"))
            self._stamp = stamp

    async def authenticate(self, *, session: Session) -> bool:
        self._reload()
        user = session.username or ""
        hashed = self._users.get(user)
        if hashed is None or not verify_secret(session.password or "", hashed):
            return False
        if not owns_client_id(user, session.client_id or "", self._users):
            logger.warning("user {} refused: client id {!r} is not one of its own", user, session.client_id)
            return False
        return True


class AclPlugin(BaseTopicPlugin):
    """broker.acl for SUBSCRIBE, PUBLISH and delivery (RECEIVE)."""

    @dataclass
    class Config:
        prefix: str = DEFAULT_PREFIX

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        self._topics = Topics(self.config.prefix)

    async def topic_filtering(
        self, *, session: Session | None = None, topic: str | None = None, action: Action | None = None
    ) -> bool:
        user = session.username if session is not None else None
        if not user or not topic:
            return False
        if action is Action.SUBSCRIBE:
            return may_subscribe(user, topic, self._topics)
        if action is Action.PUBLISH:
            return may_publish(user, topic, self._topics)
        if action is Action.RECEIVE:
            return may_receive(user, topic, self._topics)
        return False
