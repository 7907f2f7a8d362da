"""The first administrator from the environment: how one `docker run` gives a protected registry.

A node on a public address refuses to start while the cluster has no account (secure by
default; README "Access control"). In a container it always listens on 0.0.0.0, so
`CARGOHOLD_ADMIN_PASSWORD` (or `CARGOHOLD_ADMIN_PASSWORD_FILE`, e.g. a mounted secret) creates
the user `admin_user`, an administrator, when the node starts and the cluster has no account
yet. It is written once, with the same create-only transaction as `cargohold user add`, so two
nodes starting together create one; once any account exists the setting is ignored (changing
the variable later changes no password). The password is never logged.
"""

from __future__ import annotations

import logging
import time

import anyio

from cargohold.auth.passwords import DEFAULT_COST, hash_password
from cargohold.auth.subjects import valid_account_name
from cargohold.config import ConfigError, Settings
from cargohold.coordinator.accounts import Account, AccountStore

log = logging.getLogger("cargohold.bootstrap")


def admin_password(settings: Settings) -> str | None:
    """The password the settings give for the first administrator, if any."""
    if settings.admin_password_file is None:
        return settings.admin_password
    try:
        with open(settings.admin_password_file) as f:
            password = f.readline().rstrip("\r\n")
    except OSError as exc:
        raise ConfigError(f"admin_password_file: {exc.strerror}") from None
    if len(password) < 8:
        raise ConfigError("admin_password_file: the password must have at least 8 characters")
    return password


async def bootstrap_admin(accounts: AccountStore, settings: Settings) -> bool:
    """Create the first administrator if the settings give a password and the cluster has no
    account. True if this node created it."""
    password = admin_password(settings)
    if password is None:
        return False
    if not valid_account_name(settings.admin_user):
        raise ConfigError(f"admin_user {settings.admin_user!r}: lower-case letters, digits, '.', '_' and '-'")
    await accounts.load()
    if accounts.has_accounts():
        log.info("the cluster has accounts already: admin_password is ignored (change a password with "
                 "`cargohold user passwd`)")
        return False
    hashed = await anyio.to_thread.run_sync(hash_password, password, DEFAULT_COST)
    account = Account("user", settings.admin_user, hashed, admin=True, created=time.time(),
                      updated_by="admin_password")
    created = await accounts.put_account(account, create=True)
    if created:
        log.warning("created the administrator %r from admin_password (the cluster had no account)",
                    settings.admin_user)
    return created
