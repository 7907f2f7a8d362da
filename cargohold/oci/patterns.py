"""Globs over repository names and tags, as access rules and repository definitions write them:
`?` one character, `*` any run of characters (not '/' in repository patterns), `**` anything
including '/'. Pure."""

from __future__ import annotations

import re
from functools import lru_cache

_REPO_PATTERN = re.compile(r"[a-z0-9._/*?-]{1,300}")
_TAG_PATTERN = re.compile(r"[A-Za-z0-9._*?-]{1,200}")


class InvalidPattern(ValueError):
    pass


@lru_cache(maxsize=1024)
def compile_glob(pattern: str, *, path: bool) -> re.Pattern:
    """The glob as a regex (use `fullmatch`); InvalidPattern when it is not one."""
    if not (_REPO_PATTERN if path else _TAG_PATTERN).fullmatch(pattern) or (
            path and any(part in ("", ".", "..") for part in pattern.split("/"))):
        raise InvalidPattern(f"invalid {'repository' if path else 'tag'} pattern {pattern[:80]!r}")
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
