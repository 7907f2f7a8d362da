"""Access rules, no I/O: who may do what on which repositories, protected tags, the default
rules, and `grant`, which cuts a token request's scopes down to what the rules allow.

A rules document (deploy/access-rules.yaml) is validated and compiled by `Policy.parse`."""

from __future__ import annotations

import re
from dataclasses import dataclass

from cargohold.auth.scopes import REPO_ACTIONS, Scope
from cargohold.auth.subjects import Subject
from cargohold.oci.patterns import InvalidPattern, compile_glob

RULE_ACTIONS = REPO_ACTIONS + ("admin",)


class RulesError(ValueError):
    pass


_SUBJECT = re.compile(r"anonymous|authenticated|(user|robot|group):([a-z0-9][a-z0-9._-]{0,63})")


def compile_pattern(pattern: str, *, path: bool) -> re.Pattern:
    """A rule's repository (`path`) or tag glob (`oci.patterns`); RulesError when it is not one."""
    try:
        return compile_glob(pattern, path=path)
    except InvalidPattern as exc:
        raise RulesError(str(exc)) from None


def _matches_subject(spec: str, subject: Subject) -> bool:
    if spec == "anonymous":
        return subject.anonymous
    if spec == "authenticated":
        return not subject.anonymous
    kind, _, name = spec.partition(":")
    if kind == "group":
        return name in subject.groups
    return subject.kind == kind and subject.name == name


@dataclass(frozen=True)
class Rule:
    subjects: tuple[str, ...]
    repositories: tuple[str, ...]
    actions: frozenset
    patterns: tuple[re.Pattern, ...]

    def applies(self, subject: Subject, repo: str) -> bool:
        return (any(_matches_subject(s, subject) for s in self.subjects)
                and any(p.fullmatch(repo) for p in self.patterns))


@dataclass(frozen=True)
class TagRule:
    repositories: tuple[re.Pattern, ...]
    tags: tuple[re.Pattern, ...]
    subjects: tuple[str, ...]           # the only subjects that may push or delete these tags

    def protects(self, repo: str, tag: str) -> bool:
        return any(p.fullmatch(repo) for p in self.repositories) and any(t.fullmatch(tag) for t in self.tags)


def _string_list(entry: dict, key: str, where: str) -> list[str]:
    value = entry.get(key)
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise RulesError(f"{where}.{key} must be a non-empty list of strings")
    return value


def _subjects(entry: dict, where: str) -> tuple[str, ...]:
    subjects = _string_list(entry, "subjects", where)
    for s in subjects:
        if not _SUBJECT.fullmatch(s):
            raise RulesError(f"{where}: invalid subject {s[:80]!r} (anonymous, authenticated, user:NAME, "
                             "robot:NAME or group:NAME)")
    return tuple(subjects)


class Policy:
    """Compiled access rules. `actions(subject, repo)` is what the subject may do there."""

    def __init__(self, rules: list[Rule], protected: list[TagRule]):
        self.rules = rules
        self.protected = protected

    @classmethod
    def parse(cls, document: object) -> "Policy":
        """Validate and compile a rules document (see deploy/access-rules.yaml); RulesError if bad."""
        if not isinstance(document, dict):
            raise RulesError("the rules document must be a mapping with 'rules' (and 'protected_tags')")
        unknown = set(document) - {"rules", "protected_tags", "updated_by", "updated"}
        if unknown:
            raise RulesError(f"unknown keys in the rules document: {sorted(unknown)}")
        rules, protected = [], []
        raw_rules = document.get("rules") or []
        raw_tags = document.get("protected_tags") or []
        if not isinstance(raw_rules, list) or not isinstance(raw_tags, list):
            raise RulesError("'rules' and 'protected_tags' must be lists")
        for i, entry in enumerate(raw_rules):
            where = f"rules[{i}]"
            if not isinstance(entry, dict):
                raise RulesError(f"{where} must be a mapping")
            repos = _string_list(entry, "repositories", where)
            actions = _string_list(entry, "actions", where)
            bad = [a for a in actions if a not in RULE_ACTIONS]
            if bad:
                raise RulesError(f"{where}: unknown actions {bad} (pull, push, delete, admin)")
            rules.append(Rule(_subjects(entry, where), tuple(repos), frozenset(actions),
                              tuple(compile_pattern(r, path=True) for r in repos)))
        for i, entry in enumerate(raw_tags):
            where = f"protected_tags[{i}]"
            if not isinstance(entry, dict):
                raise RulesError(f"{where} must be a mapping")
            protected.append(TagRule(
                tuple(compile_pattern(r, path=True) for r in _string_list(entry, "repositories", where)),
                tuple(compile_pattern(t, path=False) for t in _string_list(entry, "tags", where)),
                _subjects(entry, where)))
        return cls(rules, protected)

    def actions(self, subject: Subject, repo: str) -> frozenset:
        if subject.admin:
            return frozenset(RULE_ACTIONS)
        found: set[str] = set()
        for rule in self.rules:
            if rule.applies(subject, repo):
                found |= rule.actions
        if "admin" in found:
            return frozenset(RULE_ACTIONS)
        return frozenset(found)

    def is_admin(self, subject: Subject) -> bool:
        """Admin of the whole registry: an admin account, or an admin rule on `**`."""
        return subject.admin or any("admin" in r.actions and "**" in r.repositories
                                    and any(_matches_subject(s, subject) for s in r.subjects) for r in self.rules)

    def may_touch_tag(self, subject: Subject, repo: str, tag: str) -> bool:
        """Tag protection: a protected tag is pushed or deleted only by the subjects its rule names."""
        for rule in self.protected:
            if rule.protects(repo, tag) and not any(_matches_subject(s, subject) for s in rule.subjects):
                return False
        return True


# Without stored rules: any authenticated account may pull, push and delete everywhere (as
# CNCF Distribution with htpasswd); anonymous may do nothing; admin accounts are admins.
DEFAULT_RULES = {"rules": [{"subjects": ["authenticated"], "repositories": ["**"],
                            "actions": ["pull", "push", "delete"]}]}
DEFAULT_POLICY = Policy.parse(DEFAULT_RULES)


class OpenPolicy(Policy):
    """No access control configured (loopback, or --insecure-open): everybody may do everything."""

    def __init__(self):
        super().__init__([], [])

    def actions(self, subject: Subject, repo: str) -> frozenset:
        return frozenset(RULE_ACTIONS)

    def is_admin(self, subject: Subject) -> bool:
        return True


def grant(policy: Policy, subject: Subject, scopes: list[Scope]) -> list[dict]:
    """The token's `access` claim: each requested scope cut down to what the subject may do."""
    granted: dict[tuple[str, str], set[str]] = {}
    for scope in scopes:
        if scope.type == "repository":
            allowed = policy.actions(subject, scope.name) & set(REPO_ACTIONS)
            wanted = set(REPO_ACTIONS) if "*" in scope.actions else set(scope.actions)
            actions = wanted & allowed
        elif scope.name == "catalog":
            actions = {"*"} if scope.actions else set()       # the listing is filtered per subject
        else:
            actions = {"*"} if scope.actions and policy.is_admin(subject) else set()
        granted.setdefault((scope.type, scope.name), set()).update(actions)
    return [{"type": t, "name": n, "actions": sorted(a)} for (t, n), a in granted.items()]
