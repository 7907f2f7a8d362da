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
`/token` takes a password, never a token: a token cannot be traded for a fresh or wider one, so
every token traces back to a password check at most `token_ttl` ago. A token also carries a
stamp of its account's password hash and stops working when the password changes.
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
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterable
from urllib.parse import parse_qs

import anyio

from cargohold.auth.audit import AuditLog, FloodGate
from cargohold.auth.clients import TrustedProxies
from cargohold.auth.credentials import challenge, parse_authorization
from cargohold.auth.passwords import DEFAULT_COST, check_password, dummy_hash, hash_cost, parse_htpasswd
from cargohold.auth.ratelimit import FailureLimiter, RecentLogins
from cargohold.auth.rules import DEFAULT_POLICY, OpenPolicy, Policy, RulesError, grant
from cargohold.auth.scopes import REGISTRY_RESOURCES, Need, ScopeError, parse_scopes, required
from cargohold.auth.subjects import ANONYMOUS, ROBOT_PREFIX, Subject
from cargohold.auth.tokens import (
    STAMP_CLAIM, TOKEN_LEEWAY, TokenError, access_map, credential_stamp, decode_token, encode_token, token_allows,
    token_claims, token_key_id,
)
from cargohold.config import ConfigError, Settings, is_loopback
from cargohold.coordinator.accounts import AccountStore
from cargohold.coordinator.etcd import EtcdClient
from cargohold.node.http import Request, Response, json_response
from cargohold.oci import errors
from cargohold.oci.reference import is_digest
from cargohold.units import parse_rate

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
    stamp: str                         # the password stamp it was issued with
    identity: Identity | None = None   # None: refused, for `refusal`
    refusal: str = ""
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
                 insecure_open: bool = False, trusted_proxies: TrustedProxies | None = None):
        """`enforce`: "on"; "off" (only the audit log); or "auto": enforced once the cluster has any
        account or rules, or the htpasswd file has users. `tags_of(repo, digest)` names the tags
        pointing at a manifest (for tag protection of deletes by digest). `trusted_proxies`: whose
        `X-Forwarded-For` names the client."""
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
        self.trusted_proxies = trusted_proxies or TrustedProxies()
        self.recent_logins = RecentLogins()
        self._unlocked: dict[str, float] = {}           # login -> the last `user unlock` stamp acted on
        self._typical_cost: tuple[int, int] = (-1, DEFAULT_COST)    # (accounts version, bcrypt cost)
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
        self._unlocked = {a.login: a.unlocked_at for kind in ("user", "robot") for a in self.accounts.accounts(kind)}
        await anyio.to_thread.run_sync(dummy_hash, self._bcrypt_cost())   # the first unknown name waits no longer
        if self.mode != "auto" or self.loopback or self.insecure_open:
            return
        if not self.enforced:
            raise ConfigError("this cluster has no accounts, access rules or htpasswd users, and the node would "
                              "listen on a non-loopback address: anybody could push and delete. Add an admin "
                              "first (`cargohold user add NAME --admin`, against the cluster's etcd or a "
                              "loopback node's data dir), set CARGOHOLD_ADMIN_PASSWORD (or _FILE) to create the user "
                              "admin at start, give --htpasswd FILE, or pass --insecure-open")
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

    async def run(self) -> None:
        """Follow auth/ in etcd, and write the audit log's flood summaries as their windows close."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.accounts.run)
            if self.audit.enabled:
                tg.start_soon(self._summarize_floods)

    async def _summarize_floods(self) -> None:
        try:
            while True:
                await anyio.sleep(self.audit.flush() or self.audit.gate.window)
        finally:
            self.audit.flush(all_open=True)

    def _config_changed(self, change) -> None:
        if change.section != "key":
            self.audit.record("config", section=change.section, name=change.name, change=change.change,
                              by=change.by)
        if change.section in ("user", "robot") and change.change == "put":
            self._honour_unlock(change.name if change.section == "user" else ROBOT_PREFIX + change.name)

    def _honour_unlock(self, login: str) -> None:
        """`cargohold user unlock` stamps the account; every node clears its failed-login count."""
        account = self.accounts.account(login)
        if account is not None and account.unlocked_at > self._unlocked.get(login, 0.0):
            self._unlocked[login] = account.unlocked_at
            self.account_limiter.clear(login)
            self.audit.record("unlocked", account=login, by=account.updated_by)

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
        if self.trusted_proxies:
            self._find_client(request)
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
        identity = identity or await self._authenticate(request, need=need)
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
            if self._token_lacks_mount_source(identity, need):
                raise self._deny(request, need, by_rules=True)
            if kind == "manifest" and need.what in ("push", "delete"):
                self._check_tags(request, subject, need, params.get("reference", ""))
            # Never an upload POST: the same route may carry a mount whose `from` needs its own check.
            elif identity.allowed is not None and need.what != "admin" and kind != "uploads" \
                    and len(identity.allowed) < 256:
                identity.allowed.add((request.method, kind, params.get("name")))
            if need.what == "admin":
                self.audit.record("admin", request, method=request.method, path=request.path[:300])
            return subject
        raise self._deny(request, need, by_rules=by_rules)

    def _token_lacks_mount_source(self, identity: Identity, need: Need) -> bool:
        """A mount's `from` that the rules let the subject pull but its token does not name: the
        client is asked for a wider token (401 insufficient_scope naming both repositories), as
        Distribution does, instead of silently getting a plain upload. Clients that cache a token
        per repository (the OCI conformance program) reuse the one of their last push there, which
        never names the `from`. A subject the rules refuse still gets the plain upload, which
        reveals nothing."""
        return (bool(need.mount_from) and identity.grants is not None
                and "pull" in self._actions(identity.subject, need.mount_from)
                and not token_allows(identity.grants, need.mount_from, "pull"))

    def _check_tags(self, request: Request, subject: Subject, need: Need, reference: str) -> None:
        policy = self.policy
        if not policy.protected:
            return
        if is_digest(reference):     # a push by digest sets the tags of its `tag` parameters
            tags = list(self.tags_of(need.repo, reference)) if need.what == "delete" else request.query_all("tag")
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

    def require(self, request: Request, repo: str, action: str) -> None:
        """After `check`: the caller must also be allowed `action` on `repo` (the canonical name
        of a request routed to a remote repository); raises 401 or 403 like `check`."""
        if not self.may(request, repo, action):
            by_rules = action in self._actions(request.auth.subject, repo)
            raise self._deny(request, Need(action, repo), by_rules=by_rules)

    def may(self, request: Request, repo: str, action: str) -> bool:
        """May the caller do `action` on another repository (the `from` of a cross-repo mount)?"""
        identity = request.auth
        if identity is None or not self.enforced:
            return True
        if action not in self._actions(identity.subject, repo):
            return False
        return identity.grants is None or token_allows(identity.grants, repo, action)

    # ------------------------------------------------------------------ members of virtual repositories
    def member_may(self, request: Request, repo: str, action: str) -> bool:
        """After `check` on a virtual name: may the caller do `action` on its member `repo`?
        By the rules alone: the client's token names the virtual repository it asked for, never
        the members behind it (its grant on the virtual name was checked already)."""
        identity = request.auth
        if identity is None or not self.enforced:
            return True
        return action in self._actions(identity.subject, repo)

    def audit_member_denial(self, request: Request, name: str, member: str, action: str) -> None:
        self.audit.record("denied", request, repository=name, member=member, action=action, status=403,
                          method=request.method, path=request.path[:300])

    def require_member(self, request: Request, name: str, member: str, action: str,
                       reference: str | None = None) -> None:
        """`member_may`, or 403 DENIED naming the member (audited); a push of a tag also obeys the
        member's tag protection."""
        if not self.member_may(request, member, action):
            self.audit_member_denial(request, name, member, action)
            raise errors.denied(f"{action} on {member} (behind {name}) is not allowed",
                                detail=[{"Type": "repository", "Name": member, "Action": action}])
        if reference and request.auth is not None and self.enforced:
            self._check_tags(request, request.auth.subject, Need(action, member), reference)

    def visible(self, request: Request) -> Callable[[str], bool] | None:
        """A filter for `_catalog`: the repositories the caller may pull (None: no filter)."""
        identity = request.auth
        if identity is None or not self.enforced:
            return None
        subject = identity.subject
        return lambda repo: "pull" in self._actions(subject, repo)

    # ------------------------------------------------------------------ authentication
    def _find_client(self, request: Request) -> None:
        """Behind a trusted proxy the client is named by `X-Forwarded-For`: put it where the audit
        log and the login limits look (as uvicorn's proxy middleware would, for our proxies only)."""
        forwarded = [v.decode("latin-1") for k, v in request.scope["headers"] if k == b"x-forwarded-for"]
        if forwarded:
            peer = request.client
            client = self.trusted_proxies.client(peer, forwarded)
            if client != peer:
                request.scope["client"] = (client, 0)

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

    async def _authenticate(self, request: Request, record: bool = True, need: Need | None = None) -> Identity:
        """`need`: what the request needs, whose scope the challenge of a refused token (an expired
        one included) names, so that the client's next token is one that works."""
        header = request.header("authorization")
        if not header:
            return Identity(ANONYMOUS)
        try:
            credentials = parse_authorization(header)
        except ValueError as exc:
            self.audit.record("auth_failed", request, reason="malformed authorization", status=401)
            raise _unauthorized(str(exc), challenge(self._realm(request), self.service, error="invalid_request"))
        if credentials.scheme == "bearer":
            return self._verify(request, credentials.token, need)
        return Identity(await self._login(request, credentials.username, credentials.password, record))

    def _verify(self, request: Request, token: str, need: Need | None = None) -> Identity:
        """A Bearer token: verified once, then cached (by its string) until it expires. After any
        change under auth/ a cached token is checked again for its signing key, its account and
        that account's password."""
        now = time.time()
        cached = self._tokens.get(token)
        if cached is None or cached.expires <= now:
            try:
                claims = decode_token(token, self.accounts.signing_key, self.service)
            except TokenError as exc:
                self._tokens.pop(token, None)
                raise self._invalid_token(request, f"invalid token: {exc}", exc.reason, need) from None
            if len(self._tokens) > 50_000:
                self._tokens = {t: e for t, e in self._tokens.items() if e.expires > now}
                if len(self._tokens) > 50_000:
                    self._tokens.clear()
            cached = self._tokens[token] = _VerifiedToken(
                float(claims["exp"]) + TOKEN_LEEWAY, str(claims["sub"]), access_map(claims),
                token_key_id(token), str(claims.get(STAMP_CLAIM, "")))
        version = self.accounts.version
        if cached.version != version:
            if self.accounts.signing_key(cached.key_id) is None:
                del self._tokens[token]
                raise self._invalid_token(request, "the token's signing key was withdrawn", "key withdrawn", need)
            self._recheck(cached)
            cached.version = version
        if cached.identity is None:
            raise self._invalid_token(request, cached.refusal, cached.refusal, need)
        return cached.identity

    def _recheck(self, cached: _VerifiedToken) -> None:
        """A token's account as it is now: gone, or its password changed since the token was issued."""
        subject = self.subject_for(cached.login)
        cached.identity, cached.refusal = None, ""
        if subject is None:
            cached.refusal = "the token's account no longer exists"
        elif not subject.anonymous and cached.stamp != self._stamp(cached.login):
            cached.refusal = "the account's password changed since the token was issued"
        else:
            cached.identity = Identity(subject, cached.grants, set())

    def _stamp(self, login: str) -> str:
        stored = self._stored_hash(login)
        return credential_stamp(stored) if stored else ""

    def _invalid_token(self, request: Request, message: str, reason: str,
                       need: Need | None = None) -> errors.RegistryError:
        self.audit.record("auth_failed", request, reason=f"token: {reason}", status=401)
        scope = need.scope if need is not None else None       # formatted only when refusing
        return _unauthorized(message, challenge(self._realm(request), self.service, scope, "invalid_token"))

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
        # The login's own key for the recent-address exemption: name and password stamp, so a
        # changed password starts afresh.
        known_as = f"{username}\0{credential_stamp(stored)}" if stored else ""
        wait = self.client_limiter.retry_after(client) or 0
        if not (known_as and self.recent_logins.knows(known_as, client)):
            wait = max(wait, self.account_limiter.retry_after(username) or 0)
        if wait:
            self.audit.record("login_failed", request, account=username[:128], reason="rate limited")
            raise _too_many(wait)
        if self._bcrypt_limiter is None:
            self._bcrypt_limiter = anyio.CapacityLimiter(4)
        cost = self._bcrypt_cost()
        # Unknown names are checked against a real hash of the accounts' usual cost: same time.
        ok = await anyio.to_thread.run_sync(lambda: check_password(password, stored or dummy_hash(cost)),
                                            limiter=self._bcrypt_limiter)
        subject = self.subject_for(username) if ok and stored else None
        if subject is None:
            self.client_limiter.failed(client)
            self.account_limiter.failed(username)
            self.audit.record("login_failed", request, account=username[:128])
            raise _unauthorized("invalid username or password", challenge(self._realm(request), self.service))
        self.recent_logins.succeeded(known_as, client)
        if len(self._logins) > 10_000:
            self._logins.clear()
        self._logins[key] = (time.monotonic() + min(self.token_ttl, 300.0), stored, subject, self.accounts.version)
        if record:
            self.audit.record("login", request, subject=subject.label)
        return subject

    def _bcrypt_cost(self) -> int:
        """The work factor most accounts use (the dummy hash for unknown names must cost the same)."""
        version, cost = self._typical_cost
        if version != self.accounts.version:
            hashes = [a.password_hash for kind in ("user", "robot") for a in self.accounts.accounts(kind)]
            hashes += self.htpasswd.users.values() if self.htpasswd else []
            costs = Counter(hash_cost(h) for h in hashes)
            costs.pop(None, None)
            cost = costs.most_common(1)[0][0] if costs else DEFAULT_COST
            self._typical_cost = (self.accounts.version, cost)
        return cost

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
            self._refuse_bearer(request)
            subject = (await self._authenticate(request, record=False)).subject
        access = grant(self.policy, subject, scopes)
        if not subject.anonymous:
            self.audit.record("login", request, subject=subject.label, via="token",
                              scope=" ".join(str(s) for s in scopes)[:1000] or None)
        key = await self.accounts.ensure_signing_key()
        now = time.time()
        stamp = "" if subject.anonymous else self._stamp(subject.login)
        token = encode_token(token_claims(subject, access, self.service, self.token_ttl, now, stamp), key)
        issued = datetime.datetime.fromtimestamp(now, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        document = {"token": token, "access_token": token, "expires_in": int(self.token_ttl), "issued_at": issued}
        return json_response(200, json.dumps(document).encode())

    def _refuse_bearer(self, request: Request) -> None:
        """A token is never a credential for another one: it could be renewed forever, past a
        password change, and widened to whatever the account may do. (No client needs it: docker,
        podman, skopeo and containerd keep the password and send it again.)"""
        header = request.header("authorization") or ""
        if header.strip().lower().startswith("bearer"):
            self.audit.record("auth_failed", request, reason="token offered to /token", status=401)
            raise _unauthorized("/token takes a username and password (Basic), or nothing for anonymous access; "
                                "a token cannot be exchanged for another", f'Basic realm="{self.service}"')


def access_control(settings: Settings, client: EtcdClient, metadata, node_id: str,
                   url: str) -> AccessControl | None:
    """The node's access control from its settings; None when auth is off and there is no audit log."""
    if settings.auth == "off" and not settings.audit_log:
        return None

    try:
        burst, window = parse_rate(settings.audit_failures)
        audit = AuditLog(settings.audit_log, node_id, FloodGate(burst, window)) if settings.audit_log else None
    except OSError as exc:
        raise ConfigError(f"audit_log {settings.audit_log}: {exc}") from None
    return AccessControl(
        AccountStore(client, settings.cluster), service=settings.auth_service or f"cargohold-{settings.cluster}",
        enforce=settings.auth, realm=settings.auth_realm, default_realm=f"{url}/token",
        token_ttl=settings.token_ttl, htpasswd=settings.htpasswd,
        audit=audit,
        account_limiter=FailureLimiter.from_rate(settings.login_rate),
        client_limiter=FailureLimiter.from_rate(settings.login_rate_client), tags_of=metadata.cached_tags_of,
        loopback=is_loopback(settings.host_port[0]), insecure_open=settings.insecure_open,
        trusted_proxies=TrustedProxies(settings.trusted_proxies))


def _first(form: dict[str, list[str]], name: str) -> str | None:
    values = form.get(name)
    return values[0] if values else None


def _unauthorized(message: str, header: str, detail: object = None) -> errors.RegistryError:
    return errors.RegistryError("UNAUTHORIZED", message, 401, detail, headers={"WWW-Authenticate": header})


def _too_many(retry_after: float) -> errors.RegistryError:
    seconds = max(1, int(retry_after + 0.999))
    return errors.RegistryError("TOOMANYREQUESTS", "too many failed logins; retry later", 429,
                                headers={"Retry-After": str(seconds)})
