"""Passwords, no I/O: bcrypt hashing and checking (CPU-heavy: callers on an event loop run them
in a thread), and parsing an htpasswd file's text."""

from __future__ import annotations

import functools
import logging
import re
import secrets

import bcrypt

from cargohold.auth.subjects import valid_account_name

log = logging.getLogger("cargohold.auth")

DEFAULT_COST = 10                   # bcrypt work factor of `user add` and `robot add`
_BCRYPT = re.compile(r"\$2[aby]\$(\d\d)\$[./A-Za-z0-9]{53}")


def hash_cost(hashed: str) -> int | None:
    """The work factor of a bcrypt hash, or None if it is not one."""
    match = _BCRYPT.fullmatch(hashed)
    return int(match.group(1)) if match else None


@functools.lru_cache(maxsize=4)
def dummy_hash(cost: int = DEFAULT_COST) -> str:
    """A real bcrypt hash of a random password, to check unknown account names against: checking
    it costs what checking a real account's hash of that cost does, so a login's timing does not
    tell whether the name exists. (A malformed dummy fails at once: 33 ms against 94 ms.)"""
    return hash_password(secrets.token_urlsafe(24), cost)


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
