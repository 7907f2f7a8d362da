"""CNCF Distribution 2.8.2 (Debian's `docker-registry`) as a real process on a loopback port,
for tests that need another registry (an upstream for the pull-through cache) and for bench's
peer registry. Plain, or with htpasswd Basic auth; with its access log on, `requests()` counts
what clients asked it, from the registry's own log."""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import bcrypt
import httpx

from tests.support.accesslog import settled_log
from tests.support.node import NodeProcess

DISTRIBUTION_BIN = shutil.which("docker-registry") or "/usr/bin/docker-registry"
HTPASSWD_REALM = "cargohold-tests"

# Debian's shipped settings where they matter (the in-memory blob descriptor cache), delete on,
# upload purging off (a test must not see uploads vanish), loopback only.
_CONFIG = """\
version: 0.1
log: {{level: {log_level}, accesslog: {{disabled: {no_access_log}}}}}
storage:
  cache: {{blobdescriptor: inmemory}}
  filesystem: {{rootdirectory: {root}}}
  delete: {{enabled: true}}
  maintenance: {{uploadpurging: {{enabled: false}}}}
http:
  addr: 127.0.0.1:{port}
  headers: {{X-Content-Type-Options: [nosniff]}}
"""
_AUTH = """\
auth:
  htpasswd: {{realm: {realm}, path: {path}}}
"""
# The combined log format Distribution's access log writes: `"GET /v2/... HTTP/1.1" 200 123`.
_ACCESS_LINE = re.compile(r'"([A-Z]+) (\S+) HTTP/[\d.]+" (\d{3})')


def distribution_config(root: Path, port: int, *, htpasswd: Path | None = None, access_log: bool = False,
                        log_level: str = "warn") -> str:
    text = _CONFIG.format(root=root, port=port, log_level=log_level,
                          no_access_log="false" if access_log else "true")
    if htpasswd is not None:
        text += _AUTH.format(realm=HTPASSWD_REALM, path=htpasswd)
    return text


def htpasswd_text(users: dict[str, str]) -> str:
    """bcrypt entries as `htpasswd -B` writes them (cost 4: tests need speed, not strength)."""
    return "".join(f"{user}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(4)).decode()}\n"
                   for user, password in users.items())


@dataclass(frozen=True)
class LoggedRequest:
    method: str
    path: str
    status: int


class DistributionProcess(NodeProcess):
    """`docker-registry serve CONFIG` with a fresh storage dir under `data_dir`; `users` turns on
    htpasswd Basic auth. Output (and the access log, when on) goes to `data_dir/node.log`."""
    ready_path = "/v2/"

    def __init__(self, data_dir: Path, *, users: dict[str, str] | None = None, access_log: bool = True, **kw):
        super().__init__(data_dir, **kw)
        self.users = dict(users or {})
        self.access_log = access_log

    def command(self) -> list[str]:
        htpasswd = None
        if self.users:
            htpasswd = self.data_dir / "htpasswd"
            htpasswd.write_text(htpasswd_text(self.users))
        config = self.data_dir / "distribution.yml"
        config.write_text(distribution_config(self.data_dir / "data", self.port, htpasswd=htpasswd,
                                              access_log=self.access_log))
        return [DISTRIBUTION_BIN, "serve", str(config)]

    def ready_client(self) -> httpx.Client:
        auth = next(iter(self.users.items()), None)
        return httpx.Client(timeout=2.0, auth=auth)

    def requests(self, path_contains: str = "", method: str | None = None) -> list[LoggedRequest]:
        """The requests in the access log whose path contains `path_contains` (and of `method`)."""
        text = settled_log(self.url, self.log_path)
        found = [LoggedRequest(m, p, int(s)) for m, p, s in _ACCESS_LINE.findall(text)]
        return [r for r in found if path_contains in r.path and (method is None or r.method == method)]
