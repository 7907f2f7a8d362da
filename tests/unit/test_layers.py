"""The package layering (docs/architecture.md, "Map") is a rule the suite checks, not a hope.

import-linter enforces the layers and the forbidden imports declared in pyproject.toml; the
AST checks below catch what import rules cannot see: raw etcd operations and the read model
used outside the coordinator.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "cargohold"
# What other packages may take from the etcd adapter: a client handle to pass on, and the
# errors that mean "etcd is unavailable". Transactions (Put, Delete, Compare, ...) stay inside.
ETCD_PUBLIC = {"EtcdClient", "EtcdError", "EtcdUnavailable"}


def _modules_outside_coordinator():
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if relative.parts[0] in ("coordinator",) or "_pb2" in path.name:
            continue
        yield path, ast.parse(path.read_text(), str(path))


def test_import_contracts_hold():
    importlinter = pytest.importorskip("importlinter.cli")
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        assert importlinter.lint_imports(config_filename=str(ROOT / "pyproject.toml")) == 0, \
            "an import contract is broken: run `lint-imports` for the details"
    finally:
        os.chdir(cwd)


def test_only_the_coordinator_writes_etcd():
    offenders = []
    for path, tree in _modules_outside_coordinator():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "cargohold.coordinator.etcd":
                offenders += [f"{path.relative_to(ROOT)}:{node.lineno} {a.name}"
                              for a in node.names if a.name not in ETCD_PUBLIC]
    assert offenders == []


def test_no_package_reaches_behind_cluster_metadata():
    """Its read model, its key layout and its etcd client are the coordinator's business."""
    offenders = []
    for path, tree in _modules_outside_coordinator():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in ("model", "_model", "keys", "client"):
                owner = node.value
                name = owner.id if isinstance(owner, ast.Name) else getattr(owner, "attr", "")
                if "metadata" in name:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


def test_every_package_says_what_it_owns_and_may_import():
    for init in sorted(PACKAGE.glob("*/__init__.py")):
        if init.parent.name == "v1":
            continue
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "May import" in doc, f"{init.relative_to(ROOT)} has no layering docstring"
