"""Accounts and access configuration in etcd (issue 6): users, robots, access rules and the
token signing keys, all under `<prefix>auth/`.

Every node keeps an in-memory copy, loaded from one snapshot of `auth/` and kept current by its
own watch on that sub-prefix, so authenticating a request, verifying a token and evaluating
rules never costs an etcd round trip. The CLI uses the same class to read (`load`) and write.

Values are small JSON documents. Password hashes are bcrypt; the token signing keys are
random secrets readable by whoever can read this prefix (the nodes, and the operators who hold
etcd credentials), which is why etcd access is the cluster's root credential.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Callable

import anyio

from cargohold.auth.subjects import ROBOT_PREFIX, valid_account_name
from cargohold.coordinator.etcd import Compare, Delete, EtcdClient, EtcdCompacted, Put
from cargohold.coordinator.keys import Keys

log = logging.getLogger("cargohold.accounts")

KINDS = ("user", "robot")
_SECTIONS = {"users": "user", "robots": "robot"}


@dataclass(frozen=True)
class Account:
    kind: str                       # "user" or "robot"
    name: str
    password_hash: str              # bcrypt
    groups: tuple[str, ...] = ()
    admin: bool = False             # all actions on every repository, and the admin API
    description: str = ""
    created: float = 0.0
    updated_by: str = ""
    unlocked_at: float = 0.0        # `cargohold user unlock`: a newer stamp clears its failed logins on every node

    @property
    def login(self) -> str:
        return self.name if self.kind == "user" else ROBOT_PREFIX + self.name

    def encode(self) -> bytes:
        return json.dumps({"hash": self.password_hash, "groups": list(self.groups), "admin": self.admin,
                           "description": self.description, "created": self.created,
                           "updated_by": self.updated_by, "unlocked_at": self.unlocked_at}).encode()

    @classmethod
    def decode(cls, kind: str, name: str, raw: bytes) -> "Account":
        d = json.loads(raw)
        return cls(kind, name, d.get("hash", ""), tuple(d.get("groups", ())), bool(d.get("admin", False)),
                   d.get("description", ""), float(d.get("created", 0.0)), d.get("updated_by", ""),
                   float(d.get("unlocked_at", 0.0)))

    def public(self) -> dict:
        """What `user list` / `robot list` show: never the hash."""
        return {"name": self.login, "kind": self.kind, "groups": list(self.groups), "admin": self.admin,
                "description": self.description, "created": self.created, "updated_by": self.updated_by}


@dataclass(frozen=True)
class SigningKey:
    key_id: str
    secret: bytes
    created: float

    def encode(self) -> bytes:
        return json.dumps({"secret": base64.b64encode(self.secret).decode(), "created": self.created}).encode()

    @classmethod
    def decode(cls, key_id: str, raw: bytes) -> "SigningKey":
        d = json.loads(raw)
        return cls(key_id, base64.b64decode(d["secret"]), float(d.get("created", 0.0)))

    @classmethod
    def generate(cls) -> "SigningKey":
        return cls(secrets.token_hex(8), secrets.token_bytes(32), time.time())


@dataclass(frozen=True)
class ConfigChange:
    """One change seen through the watch, for the audit log (never carries secrets)."""
    section: str                   # "user", "robot", "rules", "key"
    name: str
    change: str                    # "put" or "delete"
    by: str = ""


@dataclass
class _State:
    users: dict[str, Account] = field(default_factory=dict)
    robots: dict[str, Account] = field(default_factory=dict)
    rules: dict | None = None                 # the raw rules document; None: never set
    rules_by: str = ""
    keys: dict[str, SigningKey] = field(default_factory=dict)


class AccountStore:
    def __init__(self, client: EtcdClient, cluster: str):
        self.client = client
        self.keys = Keys(cluster)
        self._state = _State()
        self.version = 0            # changes whenever anything under auth/ changes
        self.loaded = False
        self.revision = 0
        self._listeners: list[Callable[[ConfigChange], None]] = []

    def subscribe(self, listener: Callable[[ConfigChange], None]) -> None:
        self._listeners.append(listener)

    # ------------------------------------------------------------------ reading (no I/O)
    def account(self, login: str) -> Account | None:
        if login.startswith(ROBOT_PREFIX):
            return self._state.robots.get(login[len(ROBOT_PREFIX):])
        return self._state.users.get(login)

    def accounts(self, kind: str) -> list[Account]:
        found = self._state.users if kind == "user" else self._state.robots
        return [found[name] for name in sorted(found)]

    def has_accounts(self) -> bool:
        return bool(self._state.users or self._state.robots)

    @property
    def rules(self) -> dict | None:
        return self._state.rules

    def signing_key(self, key_id: str) -> SigningKey | None:
        return self._state.keys.get(key_id)

    def current_signing_key(self) -> SigningKey | None:
        keys = self._state.keys.values()
        return max(keys, key=lambda k: (k.created, k.key_id)) if keys else None

    # ------------------------------------------------------------------ following etcd
    async def load(self) -> int:
        """Load one snapshot of auth/ (commands that only read use this alone)."""
        revision = await self.client.current_revision()
        state = _State()
        async for kvs in self.client.iter_prefix(self.keys.auth_prefix(), revision=revision):
            for kv in kvs:
                _apply(self.keys, state, kv.key, kv.value)
        self._state = state
        self.version += 1
        self.loaded = True
        self.revision = revision
        return revision

    async def run(self, *, task_status=anyio.TASK_STATUS_IGNORED) -> None:
        """Load a snapshot (unless one is loaded), report started, then follow this node's own watch on auth/."""
        revision = self.revision if self.loaded else await self.load()
        task_status.started()
        while True:
            try:
                async with self.client.watch_prefix(self.keys.auth_prefix(), start_revision=revision + 1) as watch:
                    async for batch in watch:
                        for event in batch.events:
                            change = _apply(self.keys, self._state, event.key,
                                            event.value if event.type == "put" else None)
                            if change is not None:
                                for listener in list(self._listeners):
                                    listener(change)
                        self.version += 1
                        revision = batch.revision
            except EtcdCompacted:
                log.warning("accounts watch compacted: reloading auth/")
                revision = await self.load()

    # ------------------------------------------------------------------ writing (CLI, node start)
    async def put_account(self, account: Account, *, create: bool) -> bool:
        """Write an account; with create=True only if it does not exist yet. False if refused."""
        key = self._account_key(account.kind, account.name)
        compare = [Compare.missing(key)] if create else [Compare.exists(key)]
        result = await self.client.txn(compare, [Put(key, account.encode())])
        return result.succeeded

    async def get_account(self, kind: str, name: str) -> Account | None:
        kv = await self.client.get(self._account_key(kind, name))
        return Account.decode(kind, name, kv.value) if kv is not None else None

    async def unlock(self, kind: str, name: str, updated_by: str) -> bool:
        """Stamp the account `unlocked_at` now; each node, seeing the change through its watch,
        forgets the account's failed logins (the limits are per node, in memory). False if there
        is no such account."""
        key = self._account_key(kind, name)
        while True:
            kv = await self.client.get(key)
            if kv is None:
                return False
            account = dataclasses.replace(Account.decode(kind, name, kv.value), unlocked_at=time.time(),
                                          updated_by=updated_by)
            result = await self.client.txn([Compare.mod_revision_equals(key, kv.mod_revision)],
                                           [Put(key, account.encode())])
            if result.succeeded:
                return True

    async def remove_account(self, kind: str, name: str) -> bool:
        key = self._account_key(kind, name)
        result = await self.client.txn([Compare.exists(key)], [Delete(key)])
        return result.succeeded

    async def set_rules(self, document: dict, updated_by: str) -> None:
        body = dict(document)
        body["updated_by"] = updated_by
        body["updated"] = time.time()
        await self.client.put(self.keys.access_rules(), json.dumps(body).encode())

    async def ensure_signing_key(self) -> SigningKey:
        """The newest signing key, creating the cluster's first one if there is none.

        Two nodes starting together may both create one; both keys are valid, tokens name
        theirs in `kid`, and every node signs with the newest.
        """
        current = self.current_signing_key()
        if current is not None:
            return current
        key = SigningKey.generate()
        await self.client.put(self.keys.signing_key(key.key_id), key.encode())
        self._state.keys.setdefault(key.key_id, key)   # usable at once; the watch brings the same
        self.version += 1
        return key

    async def rotate_signing_key(self, *, drop_all_old: bool = False) -> SigningKey:
        """Add a new signing key (nodes sign with it from now on). The previous key stays valid for
        verification unless drop_all_old; any older ones are removed. One transaction."""
        existing = sorted(self._state.keys.values(), key=lambda k: (k.created, k.key_id))
        keep = [] if drop_all_old else existing[-1:]
        key = SigningKey.generate()
        drops = [Delete(self.keys.signing_key(k.key_id)) for k in existing if k not in keep]
        await self.client.txn([], [Put(self.keys.signing_key(key.key_id), key.encode()), *drops])
        return key

    def _account_key(self, kind: str, name: str) -> str:
        if kind not in KINDS or not valid_account_name(name):
            raise ValueError(f"invalid {kind} name {name!r}")
        return self.keys.user(name) if kind == "user" else self.keys.robot(name)


def _apply(keys: Keys, state: _State, key: str, value: bytes | None) -> ConfigChange | None:
    """Apply one put (value) or delete (None) to the state; returns what changed, for the audit."""
    section, name = keys.parse_auth(key)
    change = "put" if value is not None else "delete"
    try:
        if section in _SECTIONS:
            kind = _SECTIONS[section]
            target = state.users if kind == "user" else state.robots
            if not valid_account_name(name):
                return None
            if value is None:
                gone = target.pop(name, None)
                return ConfigChange(kind, name, change, gone.updated_by if gone else "")
            account = Account.decode(kind, name, value)
            target[name] = account
            return ConfigChange(kind, name, change, account.updated_by)
        if section == "rules" and not name:
            if value is None:
                state.rules, state.rules_by = None, ""
            else:
                state.rules = json.loads(value)
                state.rules_by = str(state.rules.get("updated_by", ""))
            return ConfigChange("rules", "", change, state.rules_by)
        if section == "keys" and name:
            if value is None:
                state.keys.pop(name, None)
            else:
                state.keys[name] = SigningKey.decode(name, value)
            return ConfigChange("key", name, change)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("ignoring malformed %s: %s", key, exc)
    return None
