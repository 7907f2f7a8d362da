"""Retention and immutable-tag rules: parsing and evaluation, free of I/O.

Rules file (YAML or JSON), stored in etcd by `cargohold retention rules set FILE`:

    retention:
      - repositories: "team/*"          # glob over repository names ('*' also crosses '/')
        keep_last: 10                   # keep the 10 most recently pushed tags
        keep_tags: "^v[0-9]+[.][0-9]+"  # regex: tags that are always kept
        delete_older_than: 30d          # of the rest, delete those pushed longer ago
    immutable:
      - repositories: "prod/*"
        tags: "v*"                      # glob over tag names: once pushed, never overwritten or deleted
"""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import asdict, dataclass

from cargohold.units import parse_duration

class PolicyError(ValueError):
    pass


@dataclass(frozen=True)
class RetentionRule:
    repositories: str
    keep_last: int | None = None
    keep_tags: str | None = None
    delete_older_than: float | None = None

    def matches(self, repo: str) -> bool:
        return fnmatch.fnmatchcase(repo, self.repositories)

    def describe(self) -> str:
        parts = [f"repositories={self.repositories}"]
        if self.keep_last is not None:
            parts.append(f"keep_last={self.keep_last}")
        if self.keep_tags:
            parts.append(f"keep_tags={self.keep_tags}")
        if self.delete_older_than is not None:
            parts.append(f"delete_older_than={self.delete_older_than:.0f}s")
        return "retention rule (" + ", ".join(parts) + ")"


@dataclass(frozen=True)
class ImmutableRule:
    repositories: str
    tags: str

    def matches(self, repo: str, tag: str) -> bool:
        return fnmatch.fnmatchcase(repo, self.repositories) and fnmatch.fnmatchcase(tag, self.tags)

    def describe(self) -> str:
        return f"immutable tag rule (repositories={self.repositories}, tags={self.tags})"


@dataclass(frozen=True)
class Policies:
    retention: tuple[RetentionRule, ...] = ()
    immutable: tuple[ImmutableRule, ...] = ()

    def immutable_rule(self, repo: str, tag: str) -> ImmutableRule | None:
        return next((rule for rule in self.immutable if rule.matches(repo, tag)), None)

    def encode(self) -> bytes:
        return json.dumps({"retention": [asdict(r) for r in self.retention],
                           "immutable": [asdict(r) for r in self.immutable]}).encode()

    @classmethod
    def decode(cls, raw: bytes) -> "Policies":
        return parse(json.loads(raw))


def parse(document: object) -> Policies:
    if document is None:
        return Policies()
    if not isinstance(document, dict) or set(document) - {"retention", "immutable"}:
        raise PolicyError("the rules file has two lists: retention and immutable")
    retention = tuple(_retention_rule(r, i) for i, r in enumerate(document.get("retention") or []))
    immutable = tuple(_immutable_rule(r, i) for i, r in enumerate(document.get("immutable") or []))
    return Policies(retention, immutable)


def _retention_rule(raw: object, index: int) -> RetentionRule:
    where = f"retention[{index}]"
    if not isinstance(raw, dict) or not isinstance(raw.get("repositories"), str):
        raise PolicyError(f"{where} needs 'repositories' (a glob)")
    unknown = set(raw) - {"repositories", "keep_last", "keep_tags", "delete_older_than"}
    if unknown:
        raise PolicyError(f"{where}: unknown fields {sorted(unknown)}")
    keep_last = raw.get("keep_last")
    if keep_last is not None and (not isinstance(keep_last, int) or keep_last < 0):
        raise PolicyError(f"{where}.keep_last must be a non-negative integer")
    keep_tags = raw.get("keep_tags")
    if keep_tags is not None:
        try:
            re.compile(keep_tags)
        except (re.error, TypeError) as exc:
            raise PolicyError(f"{where}.keep_tags is not a regular expression: {exc}") from None
    older = raw.get("delete_older_than")
    try:
        older = parse_duration(older) if older is not None else None
    except ValueError as exc:
        raise PolicyError(str(exc)) from None
    if keep_last is None and older is None:
        raise PolicyError(f"{where} deletes nothing: give keep_last and/or delete_older_than")
    return RetentionRule(raw["repositories"], keep_last, keep_tags, older)


def _immutable_rule(raw: object, index: int) -> ImmutableRule:
    if not isinstance(raw, dict) or not isinstance(raw.get("repositories"), str) or not isinstance(raw.get("tags"), str):
        raise PolicyError(f"immutable[{index}] needs 'repositories' and 'tags' (globs)")
    if set(raw) - {"repositories", "tags"}:
        raise PolicyError(f"immutable[{index}]: unknown fields {sorted(set(raw) - {'repositories', 'tags'})}")
    return ImmutableRule(raw["repositories"], raw["tags"])


def retention_deletions(policies: Policies, repo: str, tags: dict[str, tuple[str, float]],
                        now: float) -> list[tuple[str, RetentionRule]]:
    """Tags of `repo` the first matching retention rule deletes. `tags`: tag -> (digest, pushed).

    Kept: tags matching keep_tags, immutable tags, and the keep_last most recently pushed of
    the rest; of what is left, delete_older_than (if given) limits deletion to older tags.
    """
    rule = next((r for r in policies.retention if r.matches(repo)), None)
    if rule is None:
        return []
    keep = re.compile(rule.keep_tags) if rule.keep_tags else None
    candidates = [t for t in tags if not (keep and keep.search(t)) and policies.immutable_rule(repo, t) is None]
    candidates.sort(key=lambda t: (tags[t][1], t), reverse=True)   # newest first; name breaks ties
    if rule.keep_last is not None:
        candidates = candidates[rule.keep_last:]
    if rule.delete_older_than is not None:
        cutoff = now - rule.delete_older_than
        candidates = [t for t in candidates if tags[t][1] < cutoff]
    return [(t, rule) for t in sorted(candidates)]


# ---------------------------------------------------------------------- replication rules
#
#     replication:
#       - repositories: "eu/*"      # glob over repository names
#         sites: [eu]               # the sites that keep copies ("*": every site)
#       - repositories: "*"
#         sites: ["*"]
#
# The first rule that matches a repository decides; a repository no rule matches goes to
# every site (the design's default). A blob goes to the union of the sites of the
# repositories it is linked into.

ALL_SITES = "*"


@dataclass(frozen=True)
class ReplicationRule:
    repositories: str
    sites: tuple[str, ...]

    def matches(self, repo: str) -> bool:
        return fnmatch.fnmatchcase(repo, self.repositories)

    def describe(self) -> str:
        return f"{self.repositories} -> {', '.join(self.sites)}"


@dataclass(frozen=True)
class ReplicationRules:
    rules: tuple[ReplicationRule, ...] = ()

    def rule_for(self, repo: str) -> ReplicationRule | None:
        return next((rule for rule in self.rules if rule.matches(repo)), None)

    def sites_for(self, repos, known_sites: set[str]) -> set[str]:
        """The sites that must hold a blob linked into `repos` (every site when unconstrained)."""
        sites: set[str] = set()
        for repo in repos:
            rule = self.rule_for(repo)
            if rule is None or ALL_SITES in rule.sites:
                return set(known_sites)
            sites.update(rule.sites)
        return sites & known_sites if repos else set(known_sites)

    def encode(self) -> bytes:
        return json.dumps({"replication": [{"repositories": r.repositories, "sites": list(r.sites)}
                                           for r in self.rules]}).encode()

    @classmethod
    def decode(cls, raw: bytes) -> "ReplicationRules":
        return parse_replication(json.loads(raw))


def parse_replication(document: object) -> ReplicationRules:
    if document is None:
        return ReplicationRules()
    if not isinstance(document, dict) or set(document) != {"replication"} or not isinstance(document["replication"], list):
        raise PolicyError("the replication rules file has one list: replication")
    rules = []
    for i, raw in enumerate(document["replication"]):
        if not isinstance(raw, dict) or not isinstance(raw.get("repositories"), str):
            raise PolicyError(f"replication[{i}] needs 'repositories' (a glob)")
        sites = raw.get("sites")
        if not isinstance(sites, list) or not sites or not all(isinstance(s, str) and s for s in sites):
            raise PolicyError(f"replication[{i}].sites must be a non-empty list of site names (or \"*\")")
        if set(raw) - {"repositories", "sites"}:
            raise PolicyError(f"replication[{i}]: unknown fields {sorted(set(raw) - {'repositories', 'sites'})}")
        rules.append(ReplicationRule(raw["repositories"], tuple(sites)))
    return ReplicationRules(tuple(rules))
