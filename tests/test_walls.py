"""The walls between the wings (docs/architecture.md), as `make lint` checks them with
import-linter: each contract holds on the tree, and fails, naming the offending import, when a
module that breaks it is added to a copy of the packages (never to the tree itself)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
CONTRACTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"][
    "contracts"]

# A module that breaks each contract: (where it goes, what it imports).
VIOLATIONS = {
    "layers": ("relay/broker/violation.py", "import relay.agent.agent"),
    "the libvirt wing knows nothing of how changes travel": ("relay/libvirt/violation.py",
                                                             "import relay.wire"),
    "the console wing never loads libvirt": ("relay/console/violation.py", "import libvirt"),
    "the agent wing never imports the console wing": ("relay/agent/violation.py",
                                                      "import relay.console.fleet"),
    "the broker wing imports no other wing": ("relay/broker/violation.py",
                                              "import relay.libvirt.objects"),
    "the root below the application layer imports no wing": ("relay/wire.py",
                                                              "import relay.broker.codec"),
    "the journal imports nothing of relay but its errors": ("journal/violation.py",
                                                            "import relay.wire"),
    "nothing in the product imports the tests, benchmarks or harnesses": (
        "relay/violation.py", "import harness.agent"),
}


def lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300, check=False)


def contract(prefix: str) -> dict:
    return next(c for c in CONTRACTS if c["name"].startswith(prefix))


def test_every_contract_has_a_violation_here():
    assert {c["name"] for c in CONTRACTS} == {contract(p)["name"] for p in VIOLATIONS}


def test_the_root_contract_names_every_root_module():
    """A new module under relay/ (not a wing) must join the root's contract."""
    root = {f"relay.{p.stem}" for p in (ROOT / "relay").glob("*.py")
            if p.stem not in ("__init__", "__main__")}
    assert set(contract("the root")["source_modules"]) == root


def test_the_tree_keeps_every_contract():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert f"Contracts: {len(CONTRACTS)} kept, 0 broken." in result.stdout


@pytest.mark.parametrize("name", list(VIOLATIONS))
def test_a_broken_contract_fails_and_names_the_import(tmp_path, name):
    for package in ("relay", "journal", "tests", "harness", "chaos"):
        shutil.copytree(ROOT / package, tmp_path / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    where, statement = VIOLATIONS[name]
    target = tmp_path / where
    before = target.read_text() if target.exists() else '"""Breaks a wall, for the test."""\n'
    target.write_text(f"{before}\n{statement}\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0, result.stdout[-3000:]
    text = " ".join(result.stdout.split())  # import-linter wraps long contract names
    assert f"{contract(name)['name']} BROKEN" in text, result.stdout[-3000:]
    module = where.removesuffix(".py").replace("/", ".")
    assert f"{module} -> " in text, result.stdout[-3000:]


def test_a_console_only_process_never_loads_libvirt():
    code = ("import sys, relay.console, relay.console.console, relay.app.cli; print(sorted("
            "m for m in sys.modules if m == 'libvirt' or m.startswith('relay.libvirt')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=60, check=True)
    assert result.stdout.strip() == "[]", result.stdout


def test_the_fleet_model_loads_neither_proton_nor_the_journal():
    code = ("import sys, relay.console.fleet; "
            "print([m for m in ('proton', 'journal', 'sqlite_utils', 'libvirt') "
            "if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=60, check=True)
    assert result.stdout.strip() == "[]", result.stdout


def test_the_wheel_holds_every_subpackage(tmp_path):
    """An editable install hides a subpackage the build would leave out."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps",
                    "-q", "-w", str(tmp_path)], cwd=ROOT, check=True, timeout=300,
                   capture_output=True)
    wheel = next(tmp_path.glob("virt_relay-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = {str(init.parent.relative_to(ROOT)) for base in ("relay", "journal")
                for init in (ROOT / base).rglob("__init__.py")}
    assert packages >= {"relay", "relay/libvirt", "relay/broker", "relay/agent",
                        "relay/console", "relay/app", "journal"}
    for package in packages:
        assert f"{package}/__init__.py" in names, f"{package} is missing from the wheel"
    modules = {str(p.relative_to(ROOT)) for base in ("relay", "journal")
               for p in (ROOT / base).rglob("*.py")}
    assert modules <= names, sorted(modules - names)
