"""The node's access control (issue 6): what `RegistryAPI` calls before routing a request,
and the `/token` endpoint.

`AccessControl` applies the protocol of `cargohold.auth` (scopes, credentials, rules, tokens,
passwords) with the node's state: accounts, rules and signing keys come from the node's
in-memory copy of `auth/` (coordinator/accounts.py), so no request costs an etcd round trip;
the htpasswd file is re-read when it changes; logins are rate-limited and recorded in the
audit log.

Protocol: the Docker token specification. A request without acceptable credentials gets
`401` with `WWW-Authenticate: Bearer realm="<node>/token",service="...",scope="..."`; the
client fetches a short-lived JWT from `/token` (Basic credentials, or the OAuth2 password form
POST) and sends it as `Authorization: Bearer`. Basic credentials directly on `/v2/...` work too.
Tokens are HS256 JWTs signed with a per-cluster secret from etcd (see docs/architecture.md).
"""

from __future__ import annotations

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

from cargohold.auth.audit import AuditLog
from cargohold.auth.credentials import challenge, parse_authorization
from cargohold.auth.passwords import DUMMY_HASH, check_password, parse_htpasswd
from cargohold.auth.ratelimit import FailureLimiter
from cargohold.auth.rules import DEFAULT_POLICY, OpenPolicy, Policy, RulesError, grant
from cargohold.auth.scopes import REGISTRY_RESOURCES, Need, ScopeError, parse_scopes, required
from cargohold.auth.subjects import ANONYMOUS, ROBOT_PREFIX, Subject
from cargohold.auth.tokens import (
    TOKEN_LEEWAY, TokenError, access_map, decode_token, encode_token, token_allows, token_claims, token_key_id,
)
from cargohold.config import ConfigError, Settings, is_loopback
from cargohold.coordinator.accounts import AccountStore
from cargohold.coordinator.etcd import EtcdClient
from cargohold.node.http import Request, Response, json_response
from cargohold.oci import errors
from cargohold.oci.reference import is_digest

log = logging.getLogger("cargohold.auth")


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


# A Host header that may be echoed into the challenge's realm (anything else: the default realm).
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
        need = required(request.method, kind, request.path, params, request.query)
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
            by_token = grants is None or token_allows(grants, need.repo, need.what)
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
        if need.mount_from:
            detail.append({"Type": "repository", "Name": need.mount_from, "Action": "pull"})
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
        return identity.grants is None or token_allows(identity.grants, repo, action)

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
                token_key_id(token))
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
        ok = await anyio.to_thread.run_sync(check_password, password, stored or DUMMY_HASH,
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


def _first(form: dict[str, list[str]], name: str) -> str | None:
    values = form.get(name)
    return values[0] if values else None


def _unauthorized(message: str, header: str, detail: object = None) -> errors.RegistryError:
    return errors.RegistryError("UNAUTHORIZED", message, 401, detail, headers={"WWW-Authenticate": header})


def _too_many(retry_after: float) -> errors.RegistryError:
    seconds = max(1, int(retry_after + 0.999))
    return errors.RegistryError("TOOMANYREQUESTS", "too many failed logins; retry later", 429,
                                headers={"Retry-After": str(seconds)})
