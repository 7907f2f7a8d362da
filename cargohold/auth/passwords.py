"""Passwords, no I/O: bcrypt hashing and checking (CPU-heavy: callers on an event loop run them
in a thread), and parsing an htpasswd file's text."""

from __future__ import annotations

import logging

import bcrypt

from cargohold.auth.subjects import valid_account_name

log = logging.getLogger("cargohold.auth")

# A real hash to check unknown names against, so that they take as long as known ones.
DUMMY_HASH = "$2b$10$" + "C" * 53


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
