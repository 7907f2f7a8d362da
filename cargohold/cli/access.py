"""`cargohold user|robot|access|audit ...` (issue 6): accounts, access rules and the audit log.

Commands that change the cluster write to etcd directly, like `cargohold node ...`: holding the
etcd credentials is what makes an operator an administrator (docs/architecture.md). Every node
sees the change through its watch on `auth/` at once and records it in its audit log, with the
`updated_by` (login@host) the command stores.
"""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import json
import secrets
import socket
import sys
import time

import yaml

from cargohold.auth import audit
from cargohold.auth.passwords import DEFAULT_COST, hash_password
from cargohold.auth.rules import DEFAULT_RULES, Policy, RulesError
from cargohold.auth.subjects import valid_account_name
from cargohold.cli.options import cluster_command, etcd_client, fail, print_table, read_rules_file, report
from cargohold.coordinator.accounts import Account, AccountStore
from cargohold.coordinator.peersecret import PeerSecretStore


def register(sub) -> None:
    """Add the user, robot, access and audit commands to the top-level subparsers."""
    _user_commands(sub)
    _robot_commands(sub)
    _access_commands(sub)
    _audit_commands(sub)


def _command(actions, name: str, help: str, handler) -> argparse.ArgumentParser:
    return cluster_command(actions.add_parser(name, help=help), handler)


def _user_commands(sub) -> None:
    users = sub.add_parser("user", help="user accounts: add, remove, list, passwd, groups, unlock")
    actions = users.add_subparsers(dest="action", required=True)
    p = _command(actions, "add", "add a user (the password is read from the terminal or --password-stdin)", user_add)
    p.add_argument("name")
    p.add_argument("--group", action="append", default=[], help="a group the user belongs to (repeatable)")
    p.add_argument("--admin", action="store_true", help="all actions on every repository, and the admin API")
    _password_options(p)
    p = _command(actions, "remove", "remove a user", account_remove)
    p.add_argument("name")
    p.set_defaults(kind="user")
    _command(actions, "list", "list users", account_list).set_defaults(kind="user")
    p = _command(actions, "passwd", "set a user's password", user_passwd)
    p.add_argument("name")
    _password_options(p)
    p = _command(actions, "groups", "set a user's groups", user_groups)
    p.add_argument("name")
    p.add_argument("groups", nargs="*")
    _unlock_command(actions, "user")


def _robot_commands(sub) -> None:
    robots = sub.add_parser("robot", help="robot accounts (for CI and machines): add, remove, list, unlock")
    actions = robots.add_subparsers(dest="action", required=True)
    p = _command(actions, "add", "add a robot; its generated secret is printed once", robot_add)
    p.add_argument("name")
    p.add_argument("--group", action="append", default=[], help="a group the robot belongs to (repeatable)")
    p.add_argument("--description", default="")
    p.add_argument("--bcrypt-cost", type=int, default=DEFAULT_COST, help=argparse.SUPPRESS)
    p = _command(actions, "remove", "remove a robot", account_remove)
    p.add_argument("name")
    p.set_defaults(kind="robot")
    _command(actions, "list", "list robots", account_list).set_defaults(kind="robot")
    _unlock_command(actions, "robot")


def _unlock_command(actions, kind: str) -> None:
    p = _command(actions, "unlock", f"lift the failed-login lock of a {kind} on every node", account_unlock)
    p.add_argument("name")
    p.set_defaults(kind=kind)


def _access_commands(sub) -> None:
    access = sub.add_parser("access", help="access rules, token signing keys and the nodes' peer secret")
    what = access.add_subparsers(dest="what", required=True)
    rules = what.add_parser("rules", help="who may do what: set FILE, list").add_subparsers(dest="action", required=True)
    p = _command(rules, "set", "validate and store an access rules file (YAML or JSON)", rules_set)
    p.add_argument("file")
    _command(rules, "list", "show the access rules in force", rules_list)
    p = _command(what, "rotate-key", "sign tokens with a new key from now on", rotate_key)
    p.add_argument("--drop-old", action="store_true",
                   help="also invalidate every token signed with the older keys (a leaked key)")
    p = _command(what, "rotate-peer-secret", "nodes sign their gRPC calls to each other with a new secret",
                 rotate_peer_secret)
    p.add_argument("--drop-old", action="store_true",
                   help="also refuse calls signed with the previous secret at once (a leaked secret)")


def _audit_commands(sub) -> None:
    audits = sub.add_parser("audit", help="the audit log")
    actions = audits.add_subparsers(dest="action", required=True)
    p = actions.add_parser("verify", help="check an audit log's hash chain")
    p.set_defaults(handler=audit_verify)
    p.add_argument("file")
    p.add_argument("--json", action="store_true")


def _password_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    p.add_argument("--bcrypt-cost", type=int, default=DEFAULT_COST, help="bcrypt work factor (default 10)")


def _store(args) -> tuple[AccountStore, object]:
    client = etcd_client(args)
    return AccountStore(client, args.cluster), client


def _actor() -> str:
    try:
        return f"{getpass.getuser()}@{socket.gethostname()}"
    except (OSError, KeyError):
        return "unknown"


def _read_password(args) -> str | None:
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    if not sys.stdin.isatty():
        return None
    first = getpass.getpass("password: ")
    if getpass.getpass("again: ") != first:
        print("cargohold: the passwords differ", file=sys.stderr)
        return None
    return first


def _password_hash(args) -> str | int:
    """The bcrypt hash of the password the operator gives, or an exit code."""
    password = _read_password(args)
    if password is None:
        return fail("no password: type it on a terminal, or pipe it with --password-stdin", 2)
    if len(password) < 8:
        return fail("the password must have at least 8 characters", 2)
    if not 4 <= args.bcrypt_cost <= 16:
        return fail("--bcrypt-cost must be between 4 and 16", 2)
    try:
        return hash_password(password, args.bcrypt_cost)
    except ValueError as exc:
        return fail(str(exc), 2)


def _check_names(name: str, groups: list[str]) -> int | None:
    for value in [name, *groups]:
        if not valid_account_name(value):
            return fail(f"invalid name {value!r}: lower-case letters, digits, '.', '_' and '-' (at most 64)", 2)
    return None


async def user_add(args) -> int:
    if (bad := _check_names(args.name, args.group)) is not None:
        return bad
    hashed = _password_hash(args)
    if isinstance(hashed, int):
        return hashed
    store, client = _store(args)
    async with client:
        account = Account("user", args.name, hashed, tuple(dict.fromkeys(args.group)), args.admin,
                          created=time.time(), updated_by=_actor())
        if not await store.put_account(account, create=True):
            return fail(f"user {args.name!r} exists (use `cargohold user passwd`)")
    report(args, account.public(), f"user {args.name} added" + (" (admin)" if args.admin else ""))
    return 0


async def _update(args, kind: str, change) -> int:
    store, client = _store(args)
    async with client:
        for _ in range(5):
            account = await store.get_account(kind, args.name)
            if account is None:
                return fail(f"no {kind} {args.name!r}")
            updated = change(account)
            if await store.put_account(updated, create=False):
                return 0
    return fail(f"{kind} {args.name!r} kept changing")


async def user_passwd(args) -> int:
    hashed = _password_hash(args)
    if isinstance(hashed, int):
        return hashed
    code = await _update(args, "user", lambda a: _replace(a, password_hash=hashed))
    if code == 0:
        report(args, {"name": args.name, "changed": "password"}, f"password of {args.name} changed")
    return code


async def user_groups(args) -> int:
    if (bad := _check_names(args.name, args.groups)) is not None:
        return bad
    groups = tuple(dict.fromkeys(args.groups))
    code = await _update(args, "user", lambda a: _replace(a, groups=groups))
    if code == 0:
        report(args, {"name": args.name, "groups": list(groups)},
               f"{args.name} is in {', '.join(groups) if groups else 'no group'}")
    return code


def _replace(account: Account, **changes) -> Account:
    return dataclasses.replace(account, updated_by=_actor(), **changes)


async def robot_add(args) -> int:
    if (bad := _check_names(args.name, args.group)) is not None:
        return bad
    secret = secrets.token_urlsafe(32)
    store, client = _store(args)
    async with client:
        account = Account("robot", args.name, hash_password(secret, args.bcrypt_cost),
                          tuple(dict.fromkeys(args.group)),
                          description=args.description, created=time.time(), updated_by=_actor())
        if not await store.put_account(account, create=True):
            return fail(f"robot {args.name!r} exists")
    report(args, {"name": account.login, "secret": secret},
           f"robot {args.name} added. Log in as {account.login} with this secret (shown only once):\n{secret}")
    return 0


async def account_remove(args) -> int:
    store, client = _store(args)
    async with client:
        if not await store.remove_account(args.kind, args.name):
            return fail(f"no {args.kind} {args.name!r}")
    report(args, {"name": args.name, "removed": True}, f"{args.kind} {args.name} removed")
    return 0


async def account_unlock(args) -> int:
    if (bad := _check_names(args.name, [])) is not None:
        return bad
    store, client = _store(args)
    async with client:
        if not await store.unlock(args.kind, args.name, _actor()):
            return fail(f"no {args.kind} {args.name!r}")
    report(args, {"name": args.name, "unlocked": True},
           f"{args.kind} {args.name} unlocked: every node forgets its failed logins")
    return 0


async def account_list(args) -> int:
    store, client = _store(args)
    async with client:
        await store.load()
    rows = [account.public() for account in store.accounts(args.kind)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = [("NAME", "GROUPS", "ADMIN", "UPDATED BY", "CREATED")] + [
        (r["name"], ",".join(r["groups"]) or "-", "yes" if r["admin"] else "no", r["updated_by"] or "-",
         time.strftime("%Y-%m-%d %H:%M", time.gmtime(r["created"]))) for r in rows]
    print_table(table)
    return 0


async def rules_set(args) -> int:
    document = read_rules_file(args.file, lambda d: (Policy.parse(d), d)[1], (RulesError,))
    if document is None:
        return 2
    store, client = _store(args)
    async with client:
        await store.set_rules({k: document[k] for k in ("rules", "protected_tags") if k in document}, _actor())
    report(args, {"rules": len(document.get("rules") or []), "protected_tags": len(document.get("protected_tags") or [])},
           f"stored {len(document.get('rules') or [])} rules and "
           f"{len(document.get('protected_tags') or [])} tag protections")
    return 0


async def rules_list(args) -> int:
    store, client = _store(args)
    async with client:
        await store.load()
    document = store.rules
    if args.json:
        print(json.dumps(document if document is not None else {"default": True, **DEFAULT_RULES}, indent=2))
        return 0
    if document is None:
        print("# no rules stored: the default applies (admins: everything; any account: pull, push, delete)")
        document = DEFAULT_RULES
    print(yaml.safe_dump(document, sort_keys=False).rstrip())
    return 0


async def rotate_key(args) -> int:
    store, client = _store(args)
    async with client:
        await store.load()
        key = await store.rotate_signing_key(drop_all_old=args.drop_old)
    report(args, {"key_id": key.key_id, "dropped_old": args.drop_old},
           f"tokens are signed with key {key.key_id} from now on"
           + ("; every older token is invalid" if args.drop_old else "; the previous key stays valid for its tokens"))
    return 0


async def rotate_peer_secret(args) -> int:
    client = etcd_client(args)
    async with client:
        await PeerSecretStore(client, args.cluster).rotate(drop_old=args.drop_old)
    report(args, {"rotated": True, "dropped_old": args.drop_old},
           "nodes sign gRPC calls with a new peer secret from now on"
           + ("; the previous one is refused" if args.drop_old else "; the previous one stays accepted"))
    return 0


def audit_verify(args) -> int:
    try:
        result = audit.verify(args.file)
    except OSError as exc:
        return fail(str(exc), 2)
    if args.json:
        print(json.dumps({"ok": result.ok, "lines": result.lines, "last_hash": result.last_hash,
                          "problems": result.problems}, indent=2))
    elif result.ok:
        print(f"{args.file}: {result.lines} lines, chain intact; last hash {result.last_hash}")
    else:
        for problem in result.problems:
            print(f"{args.file}: {problem}")
    return 0 if result.ok else 1
