"""The architecture contract: stages import only the stages below them (setup.cfg's [importlinter]
contracts, checked by lint-imports), and no module uses another module's private names."""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "clipposter"
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    if not LINT_IMPORTS.exists():
        pytest.fail(f"{LINT_IMPORTS} missing: pip install -e '.[test]' (import-linter)")
    return subprocess.run([str(LINT_IMPORTS), str(cwd / "setup.cfg"), "--no-cache"], capture_output=True,
                          text=True, cwd=cwd, timeout=120)


def test_the_import_contracts_are_kept():
    proc = lint_imports(ROOT)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


@pytest.fixture
def copy_of_the_package(tmp_path):
    """The package and its setup.cfg in a scratch folder, where a test may break the rules."""
    shutil.copytree(PACKAGE, tmp_path / "clipposter", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy(ROOT / "setup.cfg", tmp_path / "setup.cfg")
    return tmp_path


@pytest.mark.parametrize("module, line, broken", [
    # an upward import: the lowest layer reaching for the command line
    ("files.py", "import clipposter.cli.main", "Stages import only the stages below them"),
    # a head reaching into search
    ("heads/genre/__init__.py", "import clipposter.search", "The genre head, the caption head and search stand alone"),
    # SQLite outside the cache module
    ("search/__init__.py", "import sqlite3", "Only the embedding cache opens SQLite"),
])
def test_a_broken_rule_fails_the_contract(copy_of_the_package, module, line, broken):
    path = copy_of_the_package / "clipposter" / module
    path.write_text(path.read_text() + f"\n{line}  # a deliberate break\n")
    proc = lint_imports(copy_of_the_package)
    assert proc.returncode != 0
    assert f"{broken} BROKEN" in proc.stdout, proc.stdout[-4000:]
    # lint-imports read the copy, not the installed package
    assert "a deliberate break" not in (PACKAGE / module).read_text()


# --------------------------------------------------------------------------------- private names

def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def absolute(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    base = base if is_package else base[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def is_module(name: str, root: Path) -> bool:
    path = root.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def private_definitions(tree: ast.AST) -> set[str]:
    """Private names a module defines: functions, classes, methods and `self._x` attributes."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
    return {n for n in names if is_private(n)}


def private_uses(path: Path, root: Path, elsewhere: dict[str, set[str]]) -> list[str]:
    """In one module: `from clipposter.x import _name`, `x._name` (x a clipposter module), and
    `obj._name` where `_name` is private to another clipposter module and not defined here."""
    importer = module_name(path, root)
    where = path.relative_to(root)
    tree = ast.parse(path.read_text(), filename=str(path))
    own = private_definitions(tree)
    found, modules = [], {}  # modules: local name → the clipposter module it stands for
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            source = absolute(node, importer, path.name == "__init__.py")
            if source.split(".")[0] != "clipposter":
                continue
            for alias in node.names:
                if is_private(alias.name) and source != importer:
                    found.append(f"{where}:{node.lineno}: from {source} import {alias.name}")
                elif is_module(f"{source}.{alias.name}", root):
                    modules[alias.asname or alias.name] = f"{source}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "clipposter" and alias.asname:
                    modules[alias.asname] = alias.name
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and is_private(node.attr)):
            continue
        base = node.value.id if isinstance(node.value, ast.Name) else None
        if base in modules:
            if modules[base] != importer:
                found.append(f"{where}:{node.lineno}: {modules[base]}.{node.attr}")
        elif base not in ("self", "cls") and node.attr not in own:
            owners = sorted(m for m, names in elsewhere.items() if node.attr in names and m != importer)
            if owners:
                found.append(f"{where}:{node.lineno}: .{node.attr} (private to {', '.join(owners)})")
    return found


def package_private_uses(root: Path) -> list[str]:
    files = sorted((root / "clipposter").rglob("*.py"))
    defined = {module_name(f, root): private_definitions(ast.parse(f.read_text())) for f in files}
    return [use for f in files for use in private_uses(f, root, defined)]


def test_no_module_uses_another_modules_private_names():
    found = package_private_uses(ROOT)
    assert found == [], "private names used outside their module:\n" + "\n".join(found)


def test_the_private_name_check_sees_every_spelling(copy_of_the_package):
    probe = copy_of_the_package / "clipposter" / "cli" / "probe.py"
    probe.write_text("from clipposter.cli.common import emit\n"
                     "from clipposter.embedding.cache import _Private\n"
                     "from clipposter.cli import common\n"
                     "import clipposter.embedding.cache as cache\n"
                     "common._hidden\n"
                     "cache._helper()\n"
                     "(common.EmbeddingCache)._secret\n"
                     "def _mine(): pass\n"
                     "probe._mine\n")
    (copy_of_the_package / "clipposter" / "cli" / "common.py").write_text("class A:\n    def _secret(self): pass\n")
    uses = [u for u in package_private_uses(copy_of_the_package) if u.startswith("clipposter/cli/probe.py")]
    assert sorted(u.split(": ", 1)[1] for u in uses) == ["._secret (private to clipposter.cli.common)",
                                                         "clipposter.cli.common._hidden",
                                                         "clipposter.embedding.cache._helper",
                                                         "from clipposter.embedding.cache import _Private"]
