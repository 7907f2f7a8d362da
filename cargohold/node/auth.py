"""Who may do what (issue 6): authentication, authorization, the token endpoint, the challenge.

The first half of this module is protocol logic with no I/O, testable on its own: parsing
`Authorization` headers and token scopes, access rules and tag protection, the
`WWW-Authenticate` challenge, token claims. The second half, `AccessControl`, is what a node
plugs into `RegistryAPI`: it reads accounts, rules and signing keys from the node's in-memory
copy of `auth/` (coordinator/accounts.py), so no request costs an etcd round trip.

Protocol: the Docker token specification. A request without acceptable credentials gets
`401` with `WWW-Authenticate: Bearer realm="<node>/token",service="...",scope="..."`; the
client fetches a short-lived JWT from `/token` (Basic credentials, or the OAuth2 password form
POST) and sends it as `Authorization: Bearer`. Basic credentials directly on `/v2/...` work too.
Tokens are HS256 JWTs signed with a per-cluster secret from etcd (see docs/architecture.md).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass
from typing import Callable, Iterable
from urllib.parse import parse_qs

import anyio
import bcrypt
import jwt

from cargohold.auth.audit import AuditLog
from cargohold.config import ConfigError, Settings, is_loopback
from cargohold.coordinator.accounts import ROBOT_PREFIX, AccountStore, SigningKey, valid_account_name
from cargohold.coordinator.etcd import EtcdClient
from cargohold.oci import errors
from cargohold.node.http import Request, Response, json_response
from cargohold.auth.ratelimit import FailureLimiter
from cargohold.oci.reference import MAX_NAME_LENGTH, NAME_RE, is_digest

log = logging.getLogger("cargohold.auth")

REPO_ACTIONS = ("pull", "push", "delete")
RULE_ACTIONS = REPO_ACTIONS + ("admin",)
REGISTRY_RESOURCES = ("catalog", "admin")      # registry:catalog:*, registry:admin:*
TOKEN_LEEWAY = 5.0                             # seconds of clock skew tolerated between nodes
MAX_SCOPE_LENGTH = 512
MAX_TOKEN_LENGTH = 8192


# ====================================================================== protocol logic (no I/O)
class ScopeError(ValueError):
    pass


class RulesError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Scope:
    type: str                 # "repository" or "registry"
    name: str
    actions: tuple[str, ...]  # known actions only; "*" means all

    def __str__(self) -> str:
        return f"{self.type}:{self.name}:{','.join(self.actions)}"


_SCOPE_TYPE = re.compile(r"(repository|registry)(?:\([a-z0-9]{1,32}\))?")
_ACTION_WORD = re.compile(r"[a-z*][a-z-]{0,31}|\*")


def parse_scope(text: str) -> Scope:
    """`repository:library/alpine:pull,push` (the Docker token spec's scope). Unknown but
    well-formed actions are dropped (they grant nothing); anything malformed is a ScopeError."""
    if len(text) > MAX_SCOPE_LENGTH:
        raise ScopeError("scope too long")
    kind, sep, rest = text.partition(":")
    name, sep2, actions = rest.rpartition(":")
    if not sep or not sep2:
        raise ScopeError(f"malformed scope {text[:80]!r}")
    match = _SCOPE_TYPE.fullmatch(kind)
    if not match:
        raise ScopeError(f"unknown resource type in scope {text[:80]!r}")
    kind = match.group(1)
    if kind == "repository" and (len(name) > MAX_NAME_LENGTH or not NAME_RE.fullmatch(name)):
        raise ScopeError(f"invalid repository name in scope {text[:80]!r}")
    if kind == "registry" and name not in REGISTRY_RESOURCES:
        raise ScopeError(f"unknown registry resource in scope {text[:80]!r}")
    words = actions.split(",") if actions else []
    if any(not _ACTION_WORD.fullmatch(w) for w in words):
        raise ScopeError(f"malformed actions in scope {text[:80]!r}")
    known = REPO_ACTIONS + ("*",) if kind == "repository" else ("*",)
    return Scope(kind, name, tuple(dict.fromkeys(w for w in words if w in known)))


def parse_scopes(values: Iterable[str]) -> list[Scope]:
    """Every `scope` parameter; each may hold several scopes separated by spaces (OAuth2)."""
    return [parse_scope(part) for value in values for part in value.split(" ") if part]


@dataclass(frozen=True, slots=True)
class Subject:
    kind: str                          # "user", "robot" or "anonymous"
    name: str = ""
    groups: frozenset = frozenset()
    admin: bool = False

    @property
    def login(self) -> str:
        """The name it logs in with, and the token's `sub` ("" for anonymous)."""
        return ROBOT_PREFIX + self.name if self.kind == "robot" else self.name

    @property
    def label(self) -> str:
        return "anonymous" if self.kind == "anonymous" else f"{self.kind}:{self.name}"

    @property
    def anonymous(self) -> bool:
        return self.kind == "anonymous"


ANONYMOUS = Subject("anonymous")


@dataclass(frozen=True, slots=True)
class Credentials:
    scheme: str                        # "basic" or "bearer"
    username: str = ""
    password: str = ""
    token: str = ""


_TOKEN_CHARS = re.compile(r"[A-Za-z0-9._~+/=-]+")


def parse_authorization(header: str) -> Credentials:
    """An `Authorization` header; raises ValueError when it is not usable Basic or Bearer."""
    scheme, _, rest = header.strip().partition(" ")
    rest = rest.strip()
    if scheme.lower() == "bearer":
        if not rest or len(rest) > MAX_TOKEN_LENGTH or not _TOKEN_CHARS.fullmatch(rest):
            raise ValueError("malformed bearer token")
        return Credentials("bearer", token=rest)
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(rest, validate=True).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            raise ValueError("malformed basic credentials") from None
        username, sep, password = decoded.partition(":")
        if not sep or not username or len(username) > 128 or len(password) > 1024:
            raise ValueError("malformed basic credentials")
        return Credentials("basic", username=username, password=password)
    raise ValueError("unsupported authorization scheme")


def _quoted(value: str) -> str:
    """A quoted-string for a challenge, with anything that could break out of it removed."""
    return '"' + "".join(c for c in value if c.isprintable() and c not in '"\\') + '"'


def challenge(realm: str, service: str, scope: str | None = None, error: str | None = None) -> str:
    parts = [f"Bearer realm={_quoted(realm)}", f"service={_quoted(service)}"]
    if scope:
        parts.append(f"scope={_quoted(scope)}")
    if error:
        parts.append(f"error={_quoted(error)}")
    return ",".join(parts)


# -- rules
_REPO_PATTERN = re.compile(r"[a-z0-9._/*?-]{1,300}")
_TAG_PATTERN = re.compile(r"[A-Za-z0-9._*?-]{1,200}")
_SUBJECT = re.compile(r"anonymous|authenticated|(user|robot|group):([a-z0-9][a-z0-9._-]{0,63})")


def compile_pattern(pattern: str, *, path: bool) -> re.Pattern:
    """A glob: `?` one character, `*` any run of characters (not '/' in repository patterns),
    `**` anything including '/'."""
    if not (_REPO_PATTERN if path else _TAG_PATTERN).fullmatch(pattern) or (
            path and any(part in ("", ".", "..") for part in pattern.split("/"))):
        raise RulesError(f"invalid {'repository' if path else 'tag'} pattern {pattern[:80]!r}")
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        out.append(("[^/]*" if path else ".*") if c == "*" else ("[^/]" if path else ".") if c == "?"
                   else re.escape(c))
        i += 1
    return re.compile("".join(out))


def _matches_subject(spec: str, subject: Subject) -> bool:
    if spec == "anonymous":
        return subject.anonymous
    if spec == "authenticated":
        return not subject.anonymous
    kind, _, name = spec.partition(":")
    if kind == "group":
        return name in subject.groups
    return subject.kind == kind and subject.name == name


@dataclass(frozen=True)
class Rule:
    subjects: tuple[str, ...]
    repositories: tuple[str, ...]
    actions: frozenset
    patterns: tuple[re.Pattern, ...]

    def applies(self, subject: Subject, repo: str) -> bool:
        return (any(_matches_subject(s, subject) for s in self.subjects)
                and any(p.fullmatch(repo) for p in self.patterns))


@dataclass(frozen=True)
class TagRule:
    repositories: tuple[re.Pattern, ...]
    tags: tuple[re.Pattern, ...]
    subjects: tuple[str, ...]           # the only subjects that may push or delete these tags

    def protects(self, repo: str, tag: str) -> bool:
        return any(p.fullmatch(repo) for p in self.repositories) and any(t.fullmatch(tag) for t in self.tags)


def _string_list(entry: dict, key: str, where: str) -> list[str]:
    value = entry.get(key)
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise RulesError(f"{where}.{key} must be a non-empty list of strings")
    return value


def _subjects(entry: dict, where: str) -> tuple[str, ...]:
    subjects = _string_list(entry, "subjects", where)
    for s in subjects:
        if not _SUBJECT.fullmatch(s):
            raise RulesError(f"{where}: invalid subject {s[:80]!r} (anonymous, authenticated, user:NAME, "
                             "robot:NAME or group:NAME)")
    return tuple(subjects)


class Policy:
    """Compiled access rules. `actions(subject, repo)` is what the subject may do there."""

    def __init__(self, rules: list[Rule], protected: list[TagRule]):
        self.rules = rules
        self.protected = protected

    @classmethod
    def parse(cls, document: object) -> "Policy":
        """Validate and compile a rules document (see deploy/access-rules.yaml); RulesError if bad."""
        if not isinstance(document, dict):
            raise RulesError("the rules document must be a mapping with 'rules' (and 'protected_tags')")
        unknown = set(document) - {"rules", "protected_tags", "updated_by", "updated"}
        if unknown:
            raise RulesError(f"unknown keys in the rules document: {sorted(unknown)}")
        rules, protected = [], []
        raw_rules = document.get("rules") or []
        raw_tags = document.get("protected_tags") or []
        if not isinstance(raw_rules, list) or not isinstance(raw_tags, list):
            raise RulesError("'rules' and 'protected_tags' must be lists")
        for i, entry in enumerate(raw_rules):
            where = f"rules[{i}]"
            if not isinstance(entry, dict):
                raise RulesError(f"{where} must be a mapping")
            repos = _string_list(entry, "repositories", where)
            actions = _string_list(entry, "actions", where)
            bad = [a for a in actions if a not in RULE_ACTIONS]
            if bad:
                raise RulesError(f"{where}: unknown actions {bad} (pull, push, delete, admin)")
            rules.append(Rule(_subjects(entry, where), tuple(repos), frozenset(actions),
                              tuple(compile_pattern(r, path=True) for r in repos)))
        for i, entry in enumerate(raw_tags):
            where = f"protected_tags[{i}]"
            if not isinstance(entry, dict):
                raise RulesError(f"{where} must be a mapping")
            protected.append(TagRule(
                tuple(compile_pattern(r, path=True) for r in _string_list(entry, "repositories", where)),
                tuple(compile_pattern(t, path=False) for t in _string_list(entry, "tags", where)),
                _subjects(entry, where)))
        return cls(rules, protected)

    def actions(self, subject: Subject, repo: str) -> frozenset:
        if subject.admin:
            return frozenset(RULE_ACTIONS)
        found: set[str] = set()
        for rule in self.rules:
            if rule.applies(subject, repo):
                found |= rule.actions
        if "admin" in found:
            return frozenset(RULE_ACTIONS)
        return frozenset(found)

    def is_admin(self, subject: Subject) -> bool:
        """Admin of the whole registry: an admin account, or an admin rule on `**`."""
        return subject.admin or any("admin" in r.actions and "**" in r.repositories
                                    and any(_matches_subject(s, subject) for s in r.subjects) for r in self.rules)

    def may_touch_tag(self, subject: Subject, repo: str, tag: str) -> bool:
        """Tag protection: a protected tag is pushed or deleted only by the subjects its rule names."""
        for rule in self.protected:
            if rule.protects(repo, tag) and not any(_matches_subject(s, subject) for s in rule.subjects):
                return False
        return True


# Without stored rules: any authenticated account may pull, push and delete everywhere (as
# CNCF Distribution with htpasswd); anonymous may do nothing; admin accounts are admins.
DEFAULT_RULES = {"rules": [{"subjects": ["authenticated"], "repositories": ["**"],
                            "actions": ["pull", "push", "delete"]}]}
DEFAULT_POLICY = Policy.parse(DEFAULT_RULES)


class OpenPolicy(Policy):
    """No access control configured (loopback, or --insecure-open): everybody may do everything."""

    def __init__(self):
        super().__init__([], [])

    def actions(self, subject: Subject, repo: str) -> frozenset:
        return frozenset(RULE_ACTIONS)

    def is_admin(self, subject: Subject) -> bool:
        return True


def grant(policy: Policy, subject: Subject, scopes: list[Scope]) -> list[dict]:
    """The token's `access` claim: each requested scope cut down to what the subject may do."""
    granted: dict[tuple[str, str], set[str]] = {}
    for scope in scopes:
        if scope.type == "repository":
            allowed = policy.actions(subject, scope.name) & set(REPO_ACTIONS)
            wanted = set(REPO_ACTIONS) if "*" in scope.actions else set(scope.actions)
            actions = wanted & allowed
        elif scope.name == "catalog":
            actions = {"*"} if scope.actions else set()       # the listing is filtered per subject
        else:
            actions = {"*"} if scope.actions and policy.is_admin(subject) else set()
        granted.setdefault((scope.type, scope.name), set()).update(actions)
    return [{"type": t, "name": n, "actions": sorted(a)} for (t, n), a in granted.items()]


def token_claims(subject: Subject, access: list[dict], service: str, ttl: float, now: float) -> dict:
    return {"iss": service, "sub": subject.login, "aud": service, "iat": int(now), "nbf": int(now) - 1,
            "exp": int(now + ttl), "jti": secrets.token_hex(12), "access": access}


def encode_token(claims: dict, key: SigningKey) -> str:
    return jwt.encode(claims, key.secret, algorithm="HS256", headers={"kid": key.key_id})


class TokenError(ValueError):
    pass


def decode_token(token: str, key_for: Callable[[str], SigningKey | None], service: str) -> dict:
    """Verify signature, expiry, audience and issuer; TokenError otherwise."""
    try:
        header = jwt.get_unverified_header(token)
        key = key_for(str(header.get("kid", "")))
        if key is None or header.get("alg") != "HS256":
            raise TokenError("token signed with an unknown key")
        claims = jwt.decode(token, key.secret, algorithms=["HS256"], audience=service, issuer=service,
                            leeway=TOKEN_LEEWAY, options={"require": ["exp", "iat", "aud", "iss", "sub"]})
    except jwt.PyJWTError as exc:
        raise TokenError(str(exc)) from None
    if not isinstance(claims.get("access", []), list):
        raise TokenError("malformed access claim")
    return claims


def access_map(claims: dict) -> dict[tuple[str, str], frozenset]:
    found: dict[tuple[str, str], frozenset] = {}
    for entry in claims.get("access", []):
        if isinstance(entry, dict) and isinstance(entry.get("actions"), list):
            key = (str(entry.get("type")), str(entry.get("name")))
            found[key] = found.get(key, frozenset()) | frozenset(str(a) for a in entry["actions"])
    return found


@dataclass(frozen=True, slots=True)
class Need:
    """What a request needs: 'login' (any valid credentials), 'catalog', 'admin', or an action on a repository."""
    what: str
    repo: str = ""

    @property
    def scope(self) -> str | None:
        if self.what == "login":
            return None
        if self.what in REGISTRY_RESOURCES:
            return f"registry:{self.what}:*"
        return f"repository:{self.repo}:{_CHALLENGE_ACTIONS[self.what]}"


# A pusher also reads (docker HEADs blobs before pushing them), so its challenge asks for both.
_CHALLENGE_ACTIONS = {"pull": "pull", "push": "pull,push", "delete": "delete"}


def required(method: str, kind: str, path: str, params: dict) -> Need | None:
    """What the request needs, from its route and method; None for open service routes."""
    if kind == "service":
        return Need("admin") if path == "/admin" or path.startswith("/admin/") else None
    if kind == "base":
        return Need("login")
    if kind == "catalog":
        return Need("catalog")
    name = params.get("name", "")
    if method in ("GET", "HEAD") and kind != "upload":
        return Need("pull", name)
    if method == "DELETE" and kind in ("manifest", "blob"):
        return Need("delete", name)
    return Need("push", name)


def parse_htpasswd(text: str) -> dict[str, str]:
    """`user:bcrypt-hash` lines (htpasswd -B); other hash formats are not accepted."""
    users = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, hashed = line.partition(":")
        if sep and valid_account_name(name) and hashed.startswith(("$2a$", "$2b$", "$2y$")):
            users[name] = hashed
        else:
            log.warning("htpasswd: ignoring a line that is not name:bcrypt-hash")
    return users


def hash_password(password: str, cost: int = 10) -> str:
    if len(password.encode()) > 72:
        raise ValueError("passwords are limited to 72 bytes (bcrypt)")
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(cost)).decode()


def check_password(password: str, hashed: str) -> bool:
    raw = password.encode()
    if len(raw) > 72:
        return False
    try:
        return bcrypt.checkpw(raw, hashed.encode())
    except ValueError:
        return False


# A real hash to check unknown names against, so that they take as long as known ones.
_DUMMY_HASH = "$2b$10$" + "C" * 53


def _unauthorized(message: str, header: str, detail: object = None) -> errors.RegistryError:
    return errors.RegistryError("UNAUTHORIZED", message, 401, detail, headers={"WWW-Authenticate": header})


def _too_many(retry_after: float) -> errors.RegistryError:
    seconds = max(1, int(retry_after + 0.999))
    return errors.RegistryError("TOOMANYREQUESTS", "too many failed logins; retry later", 429,
                                headers={"Retry-After": str(seconds)})


# ====================================================================== the node's access control
@dataclass(slots=True)
class Identity:
    """Who made a request (set on `request.auth`), and the token's grants if it came with one."""
    subject: Subject
    grants: dict | None = None         # None: not a token (Basic or anonymous): rules alone decide
    allowed: set | None = None         # a cached token's (method, route, repository) already allowed


OPEN_IDENTITY = Identity(ANONYMOUS)


@dataclass(slots=True)
class _VerifiedToken:
    expires: float
    login: str
    grants: dict
    key_id: str
    identity: Identity | None = None   # None: the account is gone
    version: int = -1
_HOST = re.compile(r"[A-Za-z0-9.-]{1,253}(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]{2,45}\](:[0-9]{1,5})?")


class _Htpasswd:
    def __init__(self, path: str):
        self.path = path
        self.users: dict[str, str] = {}
        self._mtime = None
        self._checked = float("-inf")
        self.reload()

    def reload(self) -> None:
        try:
            mtime = os.stat(self.path).st_mtime_ns
            if mtime != self._mtime:
                with open(self.path) as f:
                    self.users = parse_htpasswd(f.read())
                self._mtime = mtime
        except OSError as exc:
            log.warning("htpasswd %s: %s", self.path, exc)
        self._checked = time.monotonic()

    def get(self, name: str) -> str | None:
        if time.monotonic() - self._checked > 2.0:
            self.reload()
        return self.users.get(name)


class AccessControl:
    def __init__(self, accounts: AccountStore, *, service: str, enforce: Callable[[], bool] | str = "auto",
                 realm: str | None = None, default_realm: str = "", token_ttl: float = 300.0,
                 htpasswd: str | None = None, audit: AuditLog | None = None,
                 account_limiter: FailureLimiter | None = None, client_limiter: FailureLimiter | None = None,
                 tags_of: Callable[[str, str], Iterable[str]] | None = None, loopback: bool = True,
                 insecure_open: bool = False):
        """`enforce`: "on"; "off" (only the audit log); or "auto": enforced once the cluster has any
        account or rules, or the htpasswd file has users. `tags_of(repo, digest)` names the tags
        pointing at a manifest (for tag protection of deletes by digest)."""
        self.accounts = accounts
        self.service = service
        self.mode = enforce
        self.loopback = loopback
        self.insecure_open = insecure_open
        self.realm = realm
        self.default_realm = default_realm
        self.token_ttl = token_ttl
        self.htpasswd = _Htpasswd(htpasswd) if htpasswd else None
        self.audit = audit or AuditLog(None)
        self.account_limiter = account_limiter or FailureLimiter(10, 300)
        self.client_limiter = client_limiter or FailureLimiter(30, 60)
        self.tags_of = tags_of or (lambda repo, digest: ())
        self._version: tuple | None = None
        self._policy: Policy = DEFAULT_POLICY
        self._decisions: dict[tuple[Subject, str], frozenset] = {}
        self._tokens: dict[str, _VerifiedToken] = {}
        self._logins: dict[bytes, tuple[float, str, Subject, int]] = {}
        self._salt = secrets.token_bytes(16)
        self._bcrypt_limiter: anyio.CapacityLimiter | None = None
        accounts.subscribe(self._config_changed)

    async def prepare(self) -> None:
        """Load accounts and rules before serving. Secure by default: in "auto" mode a node on a
        non-loopback address enforces access control from the start, and refuses to start when
        the cluster has nothing configured yet (unless insecure_open)."""
        await self.accounts.load()
        if self.mode != "auto" or self.loopback or self.insecure_open:
            return
        if not self.enforced:
            raise ConfigError("this cluster has no accounts, access rules or htpasswd users, and the node would "
                              "listen on a non-loopback address: anybody could push and delete. Add an admin "
                              "first (`cargohold user add NAME --admin`, against the cluster's etcd or a "
                              "loopback node's data dir), give --htpasswd FILE, or pass --insecure-open")
        self.mode = "on"

    # ------------------------------------------------------------------ state
    @property
    def enforced(self) -> bool:
        if self.mode != "auto":
            return self.mode == "on"
        return self.accounts.has_accounts() or self.accounts.rules is not None or bool(
            self.htpasswd and self.htpasswd.users)

    @property
    def policy(self) -> Policy:
        self._refresh()
        return self._policy

    def _refresh(self) -> None:
        enforced = self.enforced
        version = (self.accounts.version, enforced)
        if version == self._version:
            return
        if not enforced:
            policy: Policy = OpenPolicy()
        elif self.accounts.rules is None:
            policy = DEFAULT_POLICY
        else:
            try:
                policy = Policy.parse(self.accounts.rules)
            except RulesError as exc:     # `access rules set` validates; never fail open on a bad document
                log.error("stored access rules are invalid (%s): denying everything but admins", exc)
                policy = Policy([], [])
        self._policy, self._decisions, self._version = policy, {}, version

    def _actions(self, subject: Subject, repo: str) -> frozenset:
        self._refresh()
        key = (subject, repo)
        found = self._decisions.get(key)
        if found is None:
            if len(self._decisions) > 100_000:
                self._decisions.clear()
            found = self._decisions[key] = self._policy.actions(subject, repo)
        return found

    def _config_changed(self, change) -> None:
        if change.section != "key":
            self.audit.record("config", section=change.section, name=change.name, change=change.change,
                              by=change.by)

    def subject_for(self, login: str) -> Subject | None:
        """The current subject of a login name (a token's `sub`), or None if the account is gone."""
        if not login:
            return ANONYMOUS
        account = self.accounts.account(login)
        if account is not None:
            return Subject(account.kind, account.name, frozenset(account.groups), account.admin)
        if self.htpasswd is not None and not login.startswith(ROBOT_PREFIX) and self.htpasswd.get(login):
            return Subject("user", login)
        return None

    # ------------------------------------------------------------------ the one call from RegistryAPI.handle
    async def check(self, request: Request, kind: str, params: dict) -> Subject:
        """Authenticate and authorize a request before it is routed; raises 401, 403 or 429."""
        if not self.enforced:
            request.auth = OPEN_IDENTITY
            return ANONYMOUS
        identity = self._cached_identity(request)
        if identity is not None:   # the hot path: a known token, doing what it was allowed to a moment ago
            seen = (request.method, kind, params.get("name"))
            if seen in identity.allowed:
                request.auth = identity
                return identity.subject
        need = required(request.method, kind, request.path, params)
        if need is None:
            request.auth = OPEN_IDENTITY
            return ANONYMOUS
        identity = identity or await self._authenticate(request)
        request.auth = identity
        subject, grants = identity.subject, identity.grants
        if need.what in ("login", "catalog"):     # the catalog is filtered by what the subject may pull
            if subject.anonymous and grants is None:
                raise self._deny(request, need, by_rules=False)
            return subject
        if need.what == "admin":
            by_rules = self.policy.is_admin(subject)
            by_token = grants is None or "*" in grants.get(("registry", "admin"), ())
        else:
            by_rules = need.what in self._actions(subject, need.repo)
            by_token = grants is None or _token_allows(grants, need.repo, need.what)
        if by_rules and by_token:
            if kind == "manifest" and need.what in ("push", "delete"):
                self._check_tags(request, subject, need, params.get("reference", ""))
            elif identity.allowed is not None and need.what != "admin" and len(identity.allowed) < 256:
                identity.allowed.add((request.method, kind, params.get("name")))
            if need.what == "admin":
                self.audit.record("admin", request, method=request.method, path=request.path[:300])
            return subject
        raise self._deny(request, need, by_rules=by_rules)

    def _check_tags(self, request: Request, subject: Subject, need: Need, reference: str) -> None:
        policy = self.policy
        if not policy.protected:
            return
        if is_digest(reference):
            tags = list(self.tags_of(need.repo, reference)) if need.what == "delete" else []
        else:
            tags = [reference]
        for tag in tags:
            if not policy.may_touch_tag(subject, need.repo, tag):
                self.audit.record("denied", request, repository=need.repo, reference=tag, action=need.what,
                                  status=403, reason="protected tag")
                raise errors.denied(f"tag {tag!r} is protected", detail={"repository": need.repo, "tag": tag})

    def _deny(self, request: Request, need: Need, *, by_rules: bool) -> errors.RegistryError:
        identity = request.auth
        subject = identity.subject
        insufficient = by_rules and identity.grants is not None
        status = 401 if subject.anonymous or insufficient else 403
        self.audit.record("denied", request, repository=need.repo or None, action=need.what, status=status,
                          method=request.method, path=request.path[:300])
        detail = [{"Type": "registry" if need.what in REGISTRY_RESOURCES else "repository",
                   "Name": need.repo or need.what, "Action": need.what}]
        if status == 403:
            return errors.denied(detail=detail)
        header = challenge(self._realm(request), self.service, need.scope,
                           "insufficient_scope" if insufficient else None)
        return _unauthorized("authentication required", header, detail if need.scope else None)

    def may(self, request: Request, repo: str, action: str) -> bool:
        """May the caller do `action` on another repository (the `from` of a cross-repo mount)?"""
        identity = request.auth
        if identity is None or not self.enforced:
            return True
        if action not in self._actions(identity.subject, repo):
            return False
        return identity.grants is None or _token_allows(identity.grants, repo, action)

    def visible(self, request: Request) -> Callable[[str], bool] | None:
        """A filter for `_catalog`: the repositories the caller may pull (None: no filter)."""
        identity = request.auth
        if identity is None or not self.enforced:
            return None
        subject = identity.subject
        return lambda repo: "pull" in self._actions(subject, repo)

    # ------------------------------------------------------------------ authentication
    def _cached_identity(self, request: Request) -> Identity | None:
        """The hot path: a Bearer token verified before, and nothing changed under auth/ since."""
        for name, value in request.scope["headers"]:    # ASGI header names are lower case
            if name == b"authorization":
                break
        else:
            return None
        if not value.startswith(b"Bearer "):
            return None
        cached = self._tokens.get(value[7:].decode("latin-1"))
        if cached is None or cached.version != self.accounts.version or cached.expires <= time.time():
            return None
        return cached.identity

    async def _authenticate(self, request: Request, record: bool = True) -> Identity:
        header = request.header("authorization")
        if not header:
            return Identity(ANONYMOUS)
        try:
            credentials = parse_authorization(header)
        except ValueError as exc:
            raise _unauthorized(str(exc), challenge(self._realm(request), self.service, error="invalid_request"))
        if credentials.scheme == "bearer":
            return self._verify(request, credentials.token)
        return Identity(await self._login(request, credentials.username, credentials.password, record))

    def _verify(self, request: Request, token: str) -> Identity:
        """A Bearer token: verified once, then cached (by its string) until it expires. After any
        change under auth/ a cached token is checked again for its signing key and its account."""
        now = time.time()
        cached = self._tokens.get(token)
        if cached is None or cached.expires <= now:
            try:
                claims = decode_token(token, self.accounts.signing_key, self.service)
            except TokenError as exc:
                self._tokens.pop(token, None)
                raise self._invalid_token(request, f"invalid token: {exc}") from None
            if len(self._tokens) > 50_000:
                self._tokens = {t: e for t, e in self._tokens.items() if e.expires > now}
                if len(self._tokens) > 50_000:
                    self._tokens.clear()
            cached = self._tokens[token] = _VerifiedToken(
                float(claims["exp"]) + TOKEN_LEEWAY, str(claims["sub"]), access_map(claims),
                str(jwt.get_unverified_header(token)["kid"]))
        version = self.accounts.version
        if cached.version != version:
            if self.accounts.signing_key(cached.key_id) is None:
                del self._tokens[token]
                raise self._invalid_token(request, "the token's signing key was withdrawn")
            subject = self.subject_for(cached.login)
            cached.identity = Identity(subject, cached.grants, set()) if subject is not None else None
            cached.version = version
        if cached.identity is None:
            raise self._invalid_token(request, "the token's account no longer exists")
        return cached.identity

    def _invalid_token(self, request: Request, message: str) -> errors.RegistryError:
        return _unauthorized(message, challenge(self._realm(request), self.service, error="invalid_token"))

    async def _login(self, request: Request, username: str, password: str, record: bool = True) -> Subject:
        """Check Basic credentials: a recent success is remembered (keyed by a salted hash of the
        credentials, and only while the stored hash is unchanged); failures are rate-limited."""
        key = hashlib.blake2b(username.encode() + b"\0" + password.encode(), key=self._salt).digest()
        stored = self._stored_hash(username)
        remembered = self._logins.get(key)
        if remembered is not None and remembered[0] > time.monotonic() and remembered[1] == stored:
            subject = remembered[2] if remembered[3] == self.accounts.version else self.subject_for(username)
            if subject is not None:
                return subject
        client = request.client
        wait = max(self.client_limiter.retry_after(client) or 0, self.account_limiter.retry_after(username) or 0)
        if wait:
            self.audit.record("login_failed", request, account=username[:128], reason="rate limited")
            raise _too_many(wait)
        if self._bcrypt_limiter is None:
            self._bcrypt_limiter = anyio.CapacityLimiter(4)
        ok = await anyio.to_thread.run_sync(check_password, password, stored or _DUMMY_HASH,
                                            limiter=self._bcrypt_limiter)
        subject = self.subject_for(username) if ok and stored else None
        if subject is None:
            self.client_limiter.failed(client)
            self.account_limiter.failed(username)
            self.audit.record("login_failed", request, account=username[:128])
            raise _unauthorized("invalid username or password", challenge(self._realm(request), self.service))
        if len(self._logins) > 10_000:
            self._logins.clear()
        self._logins[key] = (time.monotonic() + min(self.token_ttl, 300.0), stored, subject, self.accounts.version)
        if record:
            self.audit.record("login", request, subject=subject.label)
        return subject

    def _stored_hash(self, login: str) -> str | None:
        account = self.accounts.account(login)
        if account is not None:
            return account.password_hash
        if self.htpasswd is not None and not login.startswith(ROBOT_PREFIX):
            return self.htpasswd.get(login)
        return None

    def _realm(self, request: Request) -> str:
        if self.realm:
            return self.realm
        host = request.header("host")
        if host and _HOST.fullmatch(host):
            return f"{request.scope.get('scheme', 'http')}://{host}/token"
        return self.default_realm

    # ------------------------------------------------------------------ /token
    async def token(self, request: Request) -> Response:
        """The Docker token endpoint: GET with Basic credentials (or none, for anonymous access),
        and the OAuth2 password-grant form POST that containerd uses."""
        if request.method == "GET":
            form = parse_qs(request.scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
            username = password = None
        elif request.method == "POST":
            body = await request.read_body(64 * 1024)
            form = parse_qs(body.decode("latin-1"), keep_blank_values=True)
            grant_type = _first(form, "grant_type")
            if grant_type != "password":
                raise errors.unsupported(f"unsupported grant_type {str(grant_type)[:40]!r} (password only)",
                                         status=400)
            username, password = _first(form, "username") or "", _first(form, "password") or ""
            if not username:
                raise errors.unsupported("username is required", status=400)
        else:
            raise errors.unsupported(f"method {request.method} is not allowed here")
        service = _first(form, "service")
        if service is not None and service != self.service:
            raise errors.unsupported(f"this registry's service is {self.service!r}", status=400)
        try:
            scopes = parse_scopes(form.get("scope", []))
        except ScopeError as exc:
            raise errors.unsupported(str(exc), status=400) from None
        if username is not None:
            subject = await self._login(request, username, password, record=False)
        else:
            subject = (await self._authenticate(request, record=False)).subject
        access = grant(self.policy, subject, scopes)
        if not subject.anonymous:
            self.audit.record("login", request, subject=subject.label, via="token",
                              scope=" ".join(str(s) for s in scopes)[:1000] or None)
        key = await self.accounts.ensure_signing_key()
        now = time.time()
        token = encode_token(token_claims(subject, access, self.service, self.token_ttl, now), key)
        issued = datetime.datetime.fromtimestamp(now, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        document = {"token": token, "access_token": token, "expires_in": int(self.token_ttl), "issued_at": issued}
        return json_response(200, json.dumps(document).encode())


def access_control(settings: Settings, client: EtcdClient, metadata, node_id: str,
                   url: str) -> AccessControl | None:
    """The node's access control from its settings; None when auth is off and there is no audit log."""
    if settings.auth == "off" and not settings.audit_log:
        return None

    try:
        audit = AuditLog(settings.audit_log, node_id) if settings.audit_log else None
    except OSError as exc:
        raise ConfigError(f"audit_log {settings.audit_log}: {exc}") from None
    return AccessControl(
        AccountStore(client, settings.cluster), service=settings.auth_service or f"cargohold-{settings.cluster}",
        enforce=settings.auth, realm=settings.auth_realm, default_realm=f"{url}/token",
        token_ttl=settings.token_ttl, htpasswd=settings.htpasswd,
        audit=audit,
        account_limiter=FailureLimiter.from_rate(settings.login_rate),
        client_limiter=FailureLimiter.from_rate(settings.login_rate_client), tags_of=metadata.cached_tags_of,
        loopback=is_loopback(settings.host_port[0]), insecure_open=settings.insecure_open)


def _token_allows(grants: dict, repo: str, action: str) -> bool:
    actions = grants.get(("repository", repo))
    return actions is not None and (action in actions or "*" in actions)


def _first(form: dict[str, list[str]], name: str) -> str | None:
    values = form.get(name)
    return values[0] if values else None
