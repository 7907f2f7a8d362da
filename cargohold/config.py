"""One typed settings object, from file + environment + flags (flags win, then env, then file)."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import socket
import secrets
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from cargohold.units import parse_duration, parse_rate, parse_size, parse_window

ENV_PREFIX = "CARGOHOLD_"


@dataclass
class Settings:
    listen: str = "127.0.0.1:5000"
    data_dir: Path = Path("./data")
    etcd: list[str] = field(default_factory=list)     # empty: start a private etcd
    etcd_ca: str | None = None
    etcd_cert: str | None = None
    etcd_key: str | None = None
    cluster: str = "default"
    node_id: str | None = None                          # default: generated once, kept in the data dir
    site: str = "default"
    grpc_listen: str = "127.0.0.1:0"                    # port 0: any free port (advertised in etcd)
    grpc_advertise: str | None = None                   # the address peers dial; default: the bound one
    advertise_url: str | None = None
    runtime: str = "asyncio"                            # asyncio (uvicorn) or trio (hypercorn)
    min_copies: int = 1
    sync_sites: int = 0
    replicas_per_site: int = 2
    per_peer_streams: int = 4                           # concurrent transfers from one peer
    site_bandwidth: dict | None = None                  # inbound limit per source site, e.g. {eu: 50M} (bytes/s)
    storage_limit: str | None = None                    # refuse copies beyond this many bytes, e.g. 500G
    grpc_tls_cert: str | None = None                    # node-to-node gRPC over mutual TLS
    grpc_tls_key: str | None = None
    grpc_tls_ca: str | None = None
    grpc_insecure: bool = False                         # DANGEROUS: serve gRPC without checking the peer credential
    down_after: float = 300.0                           # a dead node's blobs are re-replicated after this
    replication_workers: int = 8
    tls_cert: str | None = None
    tls_key: str | None = None
    log_level: str = "info"
    log_format: str = "plain"                           # plain or json
    access_log: bool = True
    upload_expiry: float = 24 * 3600.0                  # upload sessions idle this long are removed (seconds)
    max_uploads_per_account: int = 1000                 # open upload sessions per account and node (0: no cap)
    max_blob_size: str = "32G"                          # larger uploads are refused with 413 (0: no limit)
    body_timeout: float = 60.0                          # a client silent this long mid-body is cut off (408)
    # -- slow and idle clients (issue 12; README "Security")
    min_body_rate: str = "1K"                           # bytes/s a body must average after body_timeout (0: off)
    header_timeout: float = 20.0                        # seconds for a request head to arrive (408, closed)
    keep_alive_timeout: float = 30.0                    # an idle keep-alive connection is closed after this
    max_header_size: str = "64K"                        # request line + headers; larger: 431, closed
    max_connections: int = 1000                         # open client connections; more: 503, closed
    # -- access control (issue 6; README "Access control")
    auth: str = "auto"                                  # auto, on or off
    insecure_open: bool = False                         # let a node without access control listen on a public address
    htpasswd: str | None = None                         # more users, from an htpasswd file (bcrypt only)
    # The first administrator, created at start while the cluster has no account (README "Deploy");
    # from the environment or a file only, never a flag (no `ps`, no shell history); never logged.
    admin_user: str = "admin"
    admin_password: str | None = field(default=None, repr=False)
    admin_password_file: str | None = None
    token_ttl: float = 300.0                            # lifetime of the tokens /token issues, seconds
    auth_service: str | None = None                     # the tokens' audience; default cargohold-<cluster>
    auth_realm: str | None = None                       # the token URL in challenges; default: from the Host header
    audit_log: str | None = None                        # audit log file, or "-" for stdout
    audit_failures: str = "20/60"                       # failure lines per class and client address: N/SECONDS
    login_rate: str = "10/300"                          # failed logins allowed per account: N/SECONDS
    login_rate_client: str = "30/60"                    # failed logins allowed per client address: N/SECONDS
    trusted_proxies: list[str] = field(default_factory=list)   # CIDRs whose X-Forwarded-For names the client
    gc_grace: str = "1h"                                # blobs younger than this are never swept
    consistent_tag_reads: bool = True                   # a read by tag sees every tag push acknowledged before it
    untagged_after: str | None = None                   # delete untagged manifests older than this (off)
    gc_interval: str | None = None                      # scheduled collections every ... (off)
    gc_window: str | None = None                        # only start scheduled runs in "HH:MM-HH:MM" (UTC)
    gc_workers: int = 16                                # sweep transactions in flight at once
    gc_batch: int = 64                                  # dead blobs tombstoned per transaction
    gc_busy_rate: float = 100.0                         # dead blobs/s swept and released while serving clients (0: no limit)
    # -- pull-through cache usage (issue 14; README "Remote repositories")
    pull_record_interval: float = 30.0                  # seconds between two batched writes of last-pulled times
    eviction_interval: float = 3600.0                   # seconds between two eviction passes (on the GC leader)
    upstream_connect_timeout: float = 5.0               # seconds to connect to a remote repository's upstream
    upstream_read_timeout: float = 30.0                 # seconds an upstream may stay silent mid-answer

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]") or "0.0.0.0", int(port)

    @property
    def grpc_host(self) -> str:
        """The host part of `grpc_listen` ("" for all addresses)."""
        return self.grpc_listen.rpartition(":")[0].strip("[]")


class ConfigError(ValueError):
    pass


def _coerce(name: str, kind: Any, value: Any) -> Any:
    text = str(kind)
    if value is None:
        return None
    if "dict" in text:
        if isinstance(value, str):      # from the environment: "eu=50M,us=20M"
            return dict(part.split("=", 1) for part in value.split(",") if "=" in part)
        return dict(value)
    if "list" in text:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return list(value)
    if "Path" in text:
        return Path(value)
    if "bool" in text:
        if isinstance(value, bool):
            return value
        return str(value).lower() in ("1", "true", "yes", "on")
    if "int" in text and "str" not in text:
        return int(value)
    if "float" in text:
        return float(value)
    return str(value)


def _apply(settings: Settings, values: Mapping[str, Any], origin: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    for key, value in values.items():
        name = key.replace("-", "_").lower()
        if name not in fields:
            raise ConfigError(f"unknown setting {key!r} in {origin}")
        try:
            setattr(settings, name, _coerce(name, fields[name].type, value))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"bad value for {key!r} in {origin}: {exc}") from None


def read_file(path: Path) -> dict[str, Any]:
    text = path.read_text()
    if path.suffix in (".toml",):
        return tomllib.loads(text)
    loaded = yaml.safe_load(text)
    return loaded or {}


def from_environment(environ: Mapping[str, str]) -> dict[str, Any]:
    """CARGOHOLD_<SETTING> variables (nested keys joined by __) as flat settings."""
    found: dict[str, Any] = {}
    names = {f.name for f in dataclasses.fields(Settings)}
    maps = _map_settings()
    for key, value in environ.items():
        if key.startswith(ENV_PREFIX):
            name = key[len(ENV_PREFIX):].lower()
            setting, _, entry = name.partition("__")
            if name in names:
                found[name] = value
            elif setting in maps and entry:          # CARGOHOLD_SITE_BANDWIDTH__EU=50M
                found.setdefault(setting, {})[key[len(ENV_PREFIX) + len(setting) + 2:]] = value
    return found


def load(config_file: Path | None, flags: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Settings:
    settings = Settings()
    environ = os.environ if environ is None else environ
    config_file = config_file or (Path(environ["CARGOHOLD_CONFIG"]) if "CARGOHOLD_CONFIG" in environ else None)
    if config_file is not None:
        _apply(settings, _flatten(read_file(config_file)), str(config_file))
    _apply(settings, from_environment(environ), "environment")
    _apply(settings, {k: v for k, v in flags.items() if v is not None}, "command line")
    validate(settings)
    return settings


def _map_settings() -> set[str]:
    return {f.name for f in dataclasses.fields(Settings) if "dict" in str(f.type)}


def _flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}__{key}" if prefix else str(key)
        if isinstance(value, Mapping) and name not in _map_settings():
            flat.update(_flatten(value, name))
        else:
            flat[name] = value
    return flat


def validate(settings: Settings) -> None:
    if settings.runtime not in ("asyncio", "trio"):
        raise ConfigError("runtime must be asyncio or trio")
    if settings.log_format not in ("plain", "json"):
        raise ConfigError("log_format must be plain or json")
    try:
        settings.host_port
    except ValueError:
        raise ConfigError(f"listen must be HOST:PORT, not {settings.listen!r}") from None
    if settings.node_id is not None and not _valid_id(settings.node_id):
        raise ConfigError("node_id may use letters, digits, '.', '_' and '-' only")
    if not _valid_id(settings.cluster) or not _valid_id(settings.site):
        raise ConfigError("cluster and site names may use letters, digits, '.', '_' and '-' only")
    for name in ("gc_grace", "untagged_after", "gc_interval"):
        value = getattr(settings, name)
        if value is not None:
            try:
                parse_duration(value)
            except ValueError as exc:
                raise ConfigError(f"{name}: {exc}") from None
    for site, rate in (settings.site_bandwidth or {}).items():
        try:
            parse_size(rate)
        except ValueError:
            raise ConfigError(f"site_bandwidth for {site!r}: {rate!r} is not a byte rate like 50M") from None
    _validate_limits(settings)
    if settings.storage_limit is not None:
        try:
            parse_size(settings.storage_limit)
        except ValueError:
            raise ConfigError(f"storage_limit {settings.storage_limit!r} is not a size like 500G") from None
    _validate_peer_port(settings)
    if settings.gc_window is not None:
        try:
            parse_window(settings.gc_window)
        except ValueError:
            raise ConfigError("gc_window must look like 01:00-05:00 (UTC)") from None
    if bool(settings.tls_cert) != bool(settings.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together")
    _validate_access(settings)


def _validate_limits(settings: Settings) -> None:
    for name in ("min_body_rate", "max_header_size", "max_blob_size"):
        try:
            parse_size(getattr(settings, name))
        except ValueError:
            raise ConfigError(f"{name} {getattr(settings, name)!r} is not a size like 64K") from None
    if parse_size(settings.max_header_size) < 1024:
        raise ConfigError("max_header_size must be at least 1K")
    for name in ("body_timeout", "header_timeout", "keep_alive_timeout", "upload_expiry", "pull_record_interval",
                 "eviction_interval", "upstream_connect_timeout", "upstream_read_timeout"):
        if not getattr(settings, name) > 0:
            raise ConfigError(f"{name} must be more than 0 seconds")
    if settings.max_uploads_per_account < 0:
        raise ConfigError("max_uploads_per_account must be 0 (no cap) or more")
    if settings.max_connections < 1:
        raise ConfigError("max_connections must be at least 1")


def _validate_access(settings: Settings) -> None:
    if settings.auth not in ("auto", "on", "off"):
        raise ConfigError("auth must be auto, on or off")
    for name in ("login_rate", "login_rate_client", "audit_failures"):
        try:
            parse_rate(getattr(settings, name))
        except ValueError as exc:
            raise ConfigError(f"{name}: {exc}") from None
    if not 10 <= settings.token_ttl <= 86400:
        raise ConfigError("token_ttl must be between 10 and 86400 seconds")
    for network in settings.trusted_proxies:
        try:
            ipaddress.ip_network(network.strip(), strict=False)
        except ValueError:
            raise ConfigError(f"trusted_proxies: {network[:80]!r} is not an address or CIDR") from None
    if settings.admin_password is not None and settings.admin_password_file is not None:
        raise ConfigError("give admin_password or admin_password_file, not both")
    if settings.admin_password is not None and len(settings.admin_password) < 8:
        raise ConfigError("admin_password must have at least 8 characters")
    if settings.auth == "off" and not settings.insecure_open and not is_loopback(settings.host_port[0]):
        raise ConfigError(f"auth is off and {settings.listen} is not a loopback address: anybody could push and "
                          "delete. Configure access control, or pass --insecure-open if that is what you want")


def _validate_peer_port(settings: Settings) -> None:
    """Every gRPC call between nodes is authenticated (the cluster's peer secret). Turning that
    off is allowed only where something else keeps strangers out: a loopback address, or mutual
    TLS. Unlike an open HTTP registry (a public mirror is a use), an open replication port has
    none: every node has the credential, so the only new caller it admits is a stranger."""
    tls = [settings.grpc_tls_cert, settings.grpc_tls_key, settings.grpc_tls_ca]
    if any(tls) and not all(tls):
        raise ConfigError("--grpc-tls-cert, --grpc-tls-key and --grpc-tls-ca go together")
    if settings.grpc_insecure and not all(tls) and not is_loopback(settings.grpc_host):
        raise ConfigError(f"grpc_insecure is set and {settings.grpc_listen} is not a loopback address: anybody who "
                          "reaches it could read every blob of every repository. Drop --grpc-insecure (nodes "
                          "authenticate each other by themselves), use a loopback address, or add mutual TLS "
                          "(--grpc-tls-cert/--grpc-tls-key/--grpc-tls-ca)")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _valid_id(value: str) -> bool:
    return bool(value) and len(value) <= 128 and all(c.isalnum() or c in "._-" for c in value)


def resolve_node_id(settings: Settings) -> str:
    """The node id: given, or generated once and kept in the data dir so a restart keeps it."""
    if settings.node_id:
        return settings.node_id
    path = settings.data_dir / "node-id"
    if path.exists():
        return path.read_text().strip()
    node_id = f"{socket.gethostname().split('.')[0]}-{secrets.token_hex(3)}"
    node_id = "".join(c if c.isalnum() or c in "._-" else "-" for c in node_id)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(node_id + "\n")
    return node_id
