"""The repository keeps its shape: the fixed top level, a Django-free agent,
and console scripts that start."""

from __future__ import annotations

import ast
import importlib
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HOSTAGENT = REPO / "hostagent"


# --- (a) hostagent imports no Django -----------------------------------------------------


def is_django(module: str | None) -> bool:
    return module is not None and (module == "django" or module.startswith("django."))


def django_imports(tree: ast.AST) -> list[tuple[int, str]]:
    """Every import of Django in TREE, at any depth (functions, classes, try blocks)."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, f"import {a.name}") for a in node.names if is_django(a.name)]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and is_django(node.module):
                found.append((node.lineno, f"from {node.module} import ..."))
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            called = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
            first = node.args[0]
            if (
                called in {"__import__", "import_module"}
                and isinstance(first, ast.Constant)
                and isinstance(first.value, str)
                and is_django(first.value)
            ):
                found.append((node.lineno, f"{called}({first.value!r})"))
    return found


def test_django_import_finder_sees_nested_and_dynamic_imports() -> None:
    source = (
        "import os, django.conf\n"
        "def f():\n"
        "    from django.db import models\n"
        "    import importlib; importlib.import_module('django.apps')\n"
        "class C:\n"
        "    try:\n"
        "        __import__('django')\n"
        "    except ImportError:\n"
        "        pass\n"
        "from . import django\n"
        "import djangoish\n"
    )
    assert [line for line, _ in django_imports(ast.parse(source))] == [1, 3, 4, 7]


def test_hostagent_sources_never_import_django() -> None:
    files = sorted(HOSTAGENT.rglob("*.py"))
    assert files, f"no Python files under {HOSTAGENT}"
    offences = []
    for path in files:
        tree = ast.parse(path.read_bytes(), filename=str(path))
        offences += [
            f"{path.relative_to(REPO)}:{line}: {what}" for line, what in django_imports(tree)
        ]
    assert not offences, "hostagent must not import Django:\n" + "\n".join(offences)


# Run in a fresh interpreter: this one has Django loaded by pytest-django. Every
# hostagent module is imported in turn and whatever it raised is recorded, with
# whether Django appeared in sys.modules after it. The report goes to a file, so
# that a module printing on import cannot garble it.
IMPORT_ALL = r"""
import json, pkgutil, sys

def django_loaded():
    return sorted(m for m in sys.modules if m == "django" or m.startswith("django."))

report = {"preloaded": django_loaded(), "modules": []}

def try_import(name):
    entry = {"name": name, "error": None, "import_error": False, "missing": None, "django": False}
    had_django = bool(django_loaded())
    try:
        __import__(name)
    except BaseException as exc:  # SystemExit at import time is a failure too
        entry["error"] = f"{type(exc).__name__}: {exc}"
        entry["import_error"] = isinstance(exc, ImportError)
        entry["missing"] = getattr(exc, "name", None)
    entry["django"] = not had_django and bool(django_loaded())
    report["modules"].append(entry)
    return entry["error"] is None

if try_import("hostagent"):
    import hostagent
    # walk_packages yields a package before importing it to look inside, so
    # each module is imported (and judged) here first; its own retry of a
    # failed package is silenced by onerror.
    for info in pkgutil.walk_packages(hostagent.__path__, "hostagent.", onerror=lambda n: None):
        if info.name.rsplit(".", 1)[-1] == "__main__":
            continue  # running it would start a program, not import a library
        try_import(info.name)

report["django_at_exit"] = django_loaded()
with open(sys.argv[1], "w") as f:
    json.dump(report, f)
"""


def test_importing_every_hostagent_module_loads_no_django(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in {"DJANGO_SETTINGS_MODULE", "PYTHONPATH"}}
    env["PYTHONPATH"] = str(REPO)
    # Should a module touch its directories on import, let it be temporary ones.
    for var in ("VSERVER_CONFDIR", "VSERVER_ROOTDIR", "VSERVER_RUNDIR"):
        env[var] = str(tmp_path / var.lower())
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-c", IMPORT_ALL, str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0 and out.exists(), f"import run failed:\n{proc.stderr}"
    report = json.loads(out.read_text())

    assert not report["preloaded"], "Django is loaded at interpreter start; cannot check"
    modules = report["modules"]
    assert modules and modules[0]["name"] == "hostagent"
    loaders = [m["name"] for m in modules if m["django"]]
    assert not loaders, f"importing these hostagent modules loads Django: {loaders}"
    assert not report["django_at_exit"]
    # A module may fail to import only for want of an optional dependency that
    # is not Django (say, a library this host lacks); anything else is a bug.
    broken = [
        f"{m['name']}: {m['error']}"
        for m in modules
        if m["error"]
        and (
            not m["import_error"]
            or is_django(m["missing"])
            or re.search(r"\bdjango\b", m["error"], re.IGNORECASE)
        )
    ]
    assert not broken, "hostagent modules that fail to import:\n" + "\n".join(broken)


# --- (b) the fixed top level -----------------------------------------------------------

TOP_LEVEL_DIRS = [
    "panel",
    "panel/hosting",
    "panel/guests",
    "hostagent",
    "templates",
    "static",
    "tests",
    "bench",
    "docs",
]
TOP_LEVEL_FILES = ["manage.py", "Makefile", "README.md", ".ci/run", "pyproject.toml"]


@pytest.mark.parametrize("name", TOP_LEVEL_DIRS)
def test_top_level_directory_exists(name: str) -> None:
    assert (REPO / name).is_dir(), f"{name}/ is part of the fixed layout"


@pytest.mark.parametrize("name", TOP_LEVEL_FILES)
def test_top_level_file_exists(name: str) -> None:
    assert (REPO / name).is_file(), f"{name} is part of the fixed layout"


@pytest.mark.parametrize("name", [".ci/run", "manage.py"])
def test_entry_scripts_are_executable(name: str) -> None:
    assert os.access(REPO / name, os.X_OK), f"{name} should be executable"


# --- (c) console scripts point at a main() ---------------------------------------------

ENTRY_POINT_RE = re.compile(r"^\s*(?P<module>[\w.]+)\s*:\s*(?P<attr>[\w.]+)\s*(\[[^\]]*\])?\s*$")


def console_scripts() -> dict[str, str]:
    pyproject = REPO / "pyproject.toml"
    if not pyproject.is_file():
        return {}  # test_top_level_file_exists reports it
    with pyproject.open("rb") as f:
        scripts: dict[str, str] = tomllib.load(f).get("project", {}).get("scripts", {})
    return scripts


@pytest.mark.parametrize(("script", "target"), sorted(console_scripts().items()))
def test_console_script_points_at_a_main_callable(script: str, target: str) -> None:
    match = ENTRY_POINT_RE.match(target)
    assert match, f"{script} = {target!r} is not 'module:attribute'"
    assert match["attr"] == "main", f"{script} should point at module:main, not {target!r}"
    module = importlib.import_module(match["module"])
    assert callable(getattr(module, "main", None)), f"{match['module']}.main is not callable"


def test_make_run_says_how_to_enter_the_demo_vserver() -> None:
    """Issue 2: `make run` ends by printing how to enter its demo guest (`make -n`
    prints the recipe, running none of it)."""
    res = subprocess.run(["make", "-n", "-C", str(REPO), "run", "DEMO=/nonexistent/demo"],
                         capture_output=True, text=True, check=False, timeout=60)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    enter = [line for line in lines if "make demo-enter" in line]
    assert enter, res.stdout
    assert "VSERVER_ROOTDIR=/nonexistent/demo/vservers" in enter[0]
    assert "/bin/vserver web enter" in enter[0]
    # Printed before the panel takes the terminal, after the demo guest is made.
    last_echo = max(i for i, line in enumerate(lines) if line.startswith("echo "))
    assert lines.index(enter[0]) == last_echo
    assert lines.index(enter[0]) > next(i for i, line in enumerate(lines) if "seed_demo" in line)
