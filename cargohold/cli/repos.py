"""`cargohold repo add|list|show|remove|status`: remote repositories (pull-through caches) and
virtual repositories (one name over ordered members).

Definitions are stored in etcd (`repos/<name>`, kind remote or virtual) and every node follows
them through its watch, without a restart. The upstream password is read from standard input only
(`--password-stdin`) and no command prints it: `list` and `show` print `public()`.
"""

from __future__ import annotations

import json
import sys

from cargohold.cli.options import cluster_command, etcd_client, fail, load_metadata, print_table, report
from cargohold.coordinator.cacheusage import CacheUsage
from cargohold.coordinator.metadata import ClusterMetadata, DefinitionConflict
from cargohold.repositories.definitions import InvalidDefinition, RemoteRepository
from cargohold.repositories.virtual import Member, VirtualRepository
from cargohold.units import parse_duration

# The figures each node publishes per remote repository (status/<node>, key "pullthrough").
STATUS_FIGURES = ("hits", "misses", "stale", "revalidations", "upstream_requests", "upstream_errors",
                  "bytes_from_upstream")


def register(sub) -> None:
    """Add `repo add|list|show|remove|status` to the top-level subparsers."""
    repo = sub.add_parser("repo", help="remote repositories (pull-through caches of other registries) and "
                                       "virtual repositories (one name over several)")
    actions = repo.add_subparsers(dest="action", required=True)
    p = actions.add_parser("add", help="declare a remote repository (a read-only cache of an upstream registry) "
                                       "or, with --virtual, a virtual repository")
    p.add_argument("name", help="the namespace it serves: NAME/library/alpine")
    kind = p.add_mutually_exclusive_group(required=True)
    kind.add_argument("--remote", metavar="URL", help="the upstream registry, e.g. https://registry-1.docker.io")
    kind.add_argument("--virtual", action="store_true",
                      help="one name over --members, read in order, pushed to --deploy-to")
    _virtual_flags(p)
    p.add_argument("--username", help="upstream account (the password comes from --password-stdin)")
    p.add_argument("--password-stdin", action="store_true", help="read the upstream password from standard input")
    p.add_argument("--ttl", help="serve a cached tag this long before asking the upstream again (default 10m)")
    p.add_argument("--include", action="append", default=[], metavar="GLOB",
                   help="only upstream names matching (repeatable; '*' within a segment, '**' across)")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB", help="never these upstream names")
    p.add_argument("--offline-period", help="after an upstream failure, assume it offline this long (default 30s)")
    p.add_argument("--evict-unused-after", help="release cached images not pulled for this long, e.g. 30d")
    p.add_argument("--mirror-for", action="append", default=[], metavar="HOST",
                   help="also answer registry-mirror requests (?ns=HOST) for this registry host")
    p.add_argument("--docker-mirror", action="store_true",
                   help="answer Docker's registry-mirrors requests (names without a namespace)")
    p.add_argument("--replace", action="store_true", help="change an existing definition")
    cluster_command(p, add)
    cluster_command(actions.add_parser("list", help="the remote and virtual repositories"), list_repos)
    p = actions.add_parser("show", help="one remote (never its password) or virtual repository's settings")
    p.add_argument("name")
    cluster_command(p, show)
    p = actions.add_parser("remove", help="delete a remote repository (its cached images are released for GC) "
                                          "or a virtual one (its members keep their content)")
    p.add_argument("name")
    p.add_argument("--keep-cache", action="store_true",
                   help="keep the cached images (they become ordinary repositories)")
    cluster_command(p, remove)
    p = actions.add_parser("status", help="cache figures per remote repository, summed over the live nodes")
    p.add_argument("name", nargs="?")
    cluster_command(p, status)


def _virtual_flags(p) -> None:
    p.add_argument("--members", metavar="NAME,NAME...",
                   help="(--virtual) local namespaces, remote or virtual repositories, read in this order")
    p.add_argument("--deploy-to", metavar="MEMBER",
                   help="(--virtual) the member pushes land in (a local namespace, or a virtual member with one)")
    p.add_argument("--member-include", action="append", default=[], metavar="MEMBER=GLOB",
                   help="(--virtual) read MEMBER only for names matching (repeatable; a remote member's "
                        "globs see its upstream name, e.g. hub='library/**')")
    p.add_argument("--member-exclude", action="append", default=[], metavar="MEMBER=GLOB",
                   help="(--virtual) never read MEMBER for names matching (repeatable)")


REMOTE_ONLY_FLAGS = ("username", "password_stdin", "ttl", "offline_period", "evict_unused_after")
VIRTUAL_ONLY_FLAGS = ("members", "deploy_to", "member_include", "member_exclude")


def _flags_given(args, names: tuple[str, ...]) -> list[str]:
    return ["--" + n.replace("_", "-") for n in names if getattr(args, n) not in (None, False, [])]


def virtual_from(args) -> VirtualRepository:
    """The virtual repository the `add --virtual` flags describe; raises InvalidDefinition."""
    misplaced = _flags_given(args, REMOTE_ONLY_FLAGS + ("include", "exclude", "mirror_for", "docker_mirror"))
    if misplaced:
        raise InvalidDefinition(f"{', '.join(misplaced)}: only for --remote (use --member-include/--member-exclude)")
    names = [n.strip() for n in (args.members or "").split(",") if n.strip()]
    if not names:
        raise InvalidDefinition("--virtual needs --members NAME[,NAME...]")
    include = _member_globs(args.member_include, "--member-include", names)
    exclude = _member_globs(args.member_exclude, "--member-exclude", names)
    members = tuple(Member(n, tuple(include.get(n, ())), tuple(exclude.get(n, ()))) for n in names)
    return VirtualRepository(args.name, members, args.deploy_to)


def _member_globs(values: list[str], flag: str, members: list[str]) -> dict[str, list[str]]:
    """MEMBER=GLOB flags -> member -> globs, refusing a member that is not listed."""
    globs: dict[str, list[str]] = {}
    for value in values:
        member, equals, glob = value.partition("=")
        if not equals or not glob:
            raise InvalidDefinition(f"{flag} takes MEMBER=GLOB, not {value!r}")
        if member not in members:
            raise InvalidDefinition(f"{flag} {value}: {member} is not one of the --members")
        globs.setdefault(member, []).append(glob)
    return globs


def definition_from(args) -> RemoteRepository:
    """The definition the `add` flags describe; raises InvalidDefinition (a bad duration too)
    with a message that says what is wrong. The password is one line of standard input."""
    misplaced = _flags_given(args, VIRTUAL_ONLY_FLAGS)
    if misplaced:
        raise InvalidDefinition(f"{', '.join(misplaced)}: only for --virtual")
    if args.password_stdin and not args.username:
        raise InvalidDefinition("--password-stdin needs --username")
    password = sys.stdin.readline().rstrip("\r\n") if args.password_stdin else None
    optional = {}
    for setting in ("ttl", "offline_period", "evict_unused_after"):     # flag and setting share a name
        value = getattr(args, setting)
        if value is not None:
            optional[setting] = _duration(value, "--" + setting.replace("_", "-"))
    return RemoteRepository(name=args.name, url=args.remote.rstrip("/"), username=args.username,
                            password=password, include=tuple(args.include), exclude=tuple(args.exclude),
                            mirror_for=tuple(args.mirror_for), docker_mirror=args.docker_mirror, **optional)


def _duration(value: str, flag: str) -> float:
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise InvalidDefinition(f"{flag}: {exc}") from None


async def add(args) -> int:
    try:
        definition = virtual_from(args) if args.virtual else definition_from(args)
    except InvalidDefinition as exc:
        return fail(str(exc), 2)
    async with etcd_client(args) as client:
        metadata = ClusterMetadata(client, args.cluster, node_id="cli")
        store = metadata.define_virtual if args.virtual else metadata.define_repository
        try:
            await store(definition, replace=args.replace)
        except DefinitionConflict as exc:
            return fail(str(exc))
    verb = "changed" if args.replace else "added"
    report(args, definition.public(), f"{verb} {definition.kind} repository {definition.name}{_summary(definition)}: "
                                      f"pull {definition.name}/<image> through any node")
    return 0


def _summary(definition: RemoteRepository | VirtualRepository) -> str:
    if isinstance(definition, RemoteRepository):
        return f" -> {definition.url}"
    target = f", pushes to {definition.deploy_to}" if definition.deploy_to else ", no pushes"
    return f" over {', '.join(m.name for m in definition.members)}{target}"


async def list_repos(args) -> int:
    definitions = await _definitions(args)
    rows = [definitions[name].public() for name in sorted(definitions)]
    if args.json:
        print(json.dumps(rows, indent=2))
    elif rows:
        print_table([("NAME", "KIND", "UPSTREAM / MEMBERS", "TTL", "EVICT AFTER", "CREDENTIALS", "DEPLOY TO")] +
                    [_row(r) for r in rows])
    return 0


def _row(document: dict) -> tuple[str, ...]:
    if document["kind"] == "remote":
        return (document["name"], "remote", document["url"], _seconds(document["ttl"]),
                _seconds(document["evict_unused_after"]), document["credentials"], "-")
    return (document["name"], "virtual", ",".join(_member_text(m) for m in document["members"]), "-", "-", "-",
            document["deploy_to"] or "-")


def _member_text(member: dict) -> str:
    """`hub[+library/**]`: a member and its globs, as list and show print them."""
    globs = [f"+{g}" for g in member["include"]] + [f"-{g}" for g in member["exclude"]]
    return member["name"] + (f"[{' '.join(globs)}]" if globs else "")


async def show(args) -> int:
    definition = (await _definitions(args)).get(args.name)
    if definition is None:
        return fail(_missing(args.name))
    document = definition.public()
    if args.json:
        print(json.dumps(document, indent=2))
        return 0
    for key, value in document.items():
        if key == "members":
            value = [_member_text(m) for m in value]
        shown = ", ".join(value) if isinstance(value, list) else value
        print(f"{key}: {shown if shown not in (None, '') else '-'}")
    return 0


def _missing(name: str) -> str:
    return f"no remote repository {name} (nor a virtual one)"


async def remove(args) -> int:
    async with etcd_client(args) as client:
        metadata = ClusterMetadata(client, args.cluster, node_id="cli")
        virtual = isinstance((await metadata.stored_definitions()).get(args.name), VirtualRepository)
        if not await metadata.remove_definition(args.name):
            return fail(_missing(args.name))
        if virtual:
            report(args, {"removed": args.name, "kind": "virtual"},
                   f"removed virtual repository {args.name}; its members keep their content")
            return 0
        released = [] if args.keep_cache else await CacheUsage(metadata).release_namespace(args.name)
    kept = [r.repository for r in released if not r.complete]
    document = {"removed": args.name, "released": [r.as_dict() for r in released], "kept_cache": args.keep_cache}
    text = f"removed remote repository {args.name}; " + (
        "its cached images stay as ordinary repositories" if args.keep_cache else
        f"released {len(released) - len(kept)} cached images for the next GC run")
    if kept:
        text += f" ({len(kept)} changed meanwhile and were kept: {', '.join(kept)})"
    report(args, document, text)
    return 0


async def status(args) -> int:
    metadata = await load_metadata(args)
    definitions = metadata.repository_definitions()
    if args.name and args.name not in definitions:
        return fail(f"no remote repository {args.name}")
    figures = cache_figures(metadata, [args.name] if args.name else sorted(definitions))
    if args.json:
        print(json.dumps(figures, indent=2))
    elif figures:
        print_table([("NAME", *(f.upper().replace("_", " ") for f in STATUS_FIGURES))] +
                    [(name, *(str(row[f]) for f in STATUS_FIGURES)) for name, row in figures.items()])
    return 0


def cache_figures(metadata: ClusterMetadata, names: list[str]) -> dict[str, dict[str, int]]:
    """name -> each figure summed over what the live nodes publish (a dead node's status goes
    with its lease; the alive check covers the moment before)."""
    alive = metadata.alive()
    totals = {name: dict.fromkeys(STATUS_FIGURES, 0) for name in names}
    for node, published in metadata.node_status().items():
        if node not in alive:
            continue
        for name, row in (published.get("pullthrough") or {}).items():
            if name in totals:
                for figure in STATUS_FIGURES:
                    totals[name][figure] += int(row.get(figure, 0) or 0)
    return totals


async def _definitions(args) -> dict[str, RemoteRepository | VirtualRepository]:
    async with etcd_client(args) as client:
        return await ClusterMetadata(client, args.cluster, node_id="cli").stored_definitions()


def _seconds(value: float | None) -> str:
    if value is None:
        return "never"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if value >= size and value % size == 0:
            return f"{int(value // size)}{unit}"
    return f"{value:g}s"
