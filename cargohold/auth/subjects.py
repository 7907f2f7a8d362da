"""Who is asking: a subject (user, robot or anonymous) and the rules for account names.

The coordinator's account records (coordinator/accounts.py) use these names; the protocol
modules here need them too, and may not import the coordinator, so they live at this layer."""

from __future__ import annotations

from dataclasses import dataclass

ROBOT_PREFIX = "robot$"        # a robot logs in as robot$<name> (as in Harbor); '$' is never in a user name


def valid_account_name(name: str) -> bool:
    """Lower-case letters, digits, '.', '_' and '-', starting with a letter or digit, <= 64 chars."""
    return (0 < len(name) <= 64 and name[0].isascii() and name[0].isalnum()
            and all(c.isascii() and (c.islower() or c.isdigit() or c in "._-") for c in name))


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
