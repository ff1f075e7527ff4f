"""Imports flow one way (STYLE.md, habit 12), checked by parsing every module with ``ast``.

* ``core`` imports nothing from ``finetune``, ``nnunet``, ``_widgets``, ``_io`` or ``cli``, and
  no GUI library (napari, qtpy, magicgui, superqt), not even inside a function.
* ``nnunet`` and ``finetune`` import nothing from ``_widgets``, ``_io`` or ``cli``.
* No module imports a ``_private`` name from another module of the package (a helper used by
  two modules is public in the lower one). Dunder names (``__version__``) and private
  *modules* or packages (``from . import _widgets``) are allowed.

Every offence is reported as ``file:line: import statement``.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import napari_medclipsam

PACKAGE = "napari_medclipsam"
ROOT = Path(napari_medclipsam.__file__).resolve().parent
GUI_LIBRARIES = ("napari", "qtpy", "magicgui", "superqt")
AREAS = sorted(
    p.name if p.is_dir() else p.stem
    for p in ROOT.iterdir()
    if (p.is_dir() and (p / "__init__.py").exists()) or (p.suffix == ".py")
)


@dataclass(frozen=True)
class Import:
    path: Path  # the file that imports
    line: int
    module: str  # absolute module imported from (``a.b`` for ``from a.b import c``)
    names: tuple[str, ...]  # names imported from it; () for ``import a.b``
    text: str  # the statement as written

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT.parent)}:{self.line}: {self.text}"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def resolve(path: Path, level: int, module: str | None) -> str:
    """Absolute name of ``from {'.' * level}{module} import ...`` written in ``path``."""
    if level == 0:
        return module or ""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package.pop()  # a plain module's package is its parent
    if level > 1:
        package = package[: len(package) - (level - 1)]
    return ".".join([*package, module] if module else package)


def package_files() -> list[Path]:
    return sorted(ROOT.rglob("*.py"))


def imports_of(path: Path) -> list[Import]:
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source, filename=str(path))
    found = []
    for node in ast.walk(tree):  # includes imports inside functions and methods
        if not isinstance(node, ast.Import | ast.ImportFrom):
            continue
        text = " ".join((ast.get_source_segment(source, node) or "").split())
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append(Import(path, node.lineno, alias.name, (), text))
        elif isinstance(node, ast.ImportFrom):
            names = tuple(a.name for a in node.names)
            found.append(Import(path, node.lineno, resolve(path, node.level, node.module),
                                names, text))
    return sorted(found, key=lambda i: i.line)


def is_module_of_package(name: str) -> bool:
    """True if ``name`` (``napari_medclipsam.x.y``) is a module or package in the source tree."""
    rel = Path(*name.split(".")[1:])
    return (ROOT / rel).with_suffix(".py").exists() or (ROOT / rel / "__init__.py").exists()


def within(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def area_of(path: Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def check(offences: list[Import]) -> None:
    """Fail with every offending import, one per line."""
    if offences:
        pytest.fail(f"{len(offences)} offending import(s):\n" + "\n".join(map(str, offences)),
                    pytrace=False)


def test_the_checker_sees_the_package():
    files = package_files()
    assert ROOT / "core" / "pipeline.py" in files and ROOT / "cli" / "__init__.py" in files
    assert {"core", "cli", "nnunet", "finetune"} <= set(AREAS)
    pipeline = imports_of(ROOT / "core" / "pipeline.py")
    assert any(i.module == f"{PACKAGE}.core.config" for i in pipeline)  # relative, resolved
    assert resolve(ROOT / "cli" / "__init__.py", 2, "core.io") == f"{PACKAGE}.core.io"
    assert resolve(ROOT / "cli" / "segment.py", 1, "common") == f"{PACKAGE}.cli.common"
    assert resolve(ROOT / "cli" / "segment.py", 2, None) == PACKAGE


def test_core_imports_no_higher_layer_and_no_gui():
    banned = tuple(f"{PACKAGE}.{p}" for p in ("finetune", "nnunet", "_widgets", "_io", "cli"))
    offences = []
    for path in package_files():
        if area_of(path) != "core":
            continue
        for imp in imports_of(path):
            targets = [imp.module]
            if imp.module == PACKAGE:  # from .. import finetune
                targets += [f"{PACKAGE}.{n}" for n in imp.names]
            if any(within(t, *banned) or within(t, *GUI_LIBRARIES) for t in targets):
                offences.append(imp)
    check(offences)


@pytest.mark.parametrize("area", ["nnunet", "finetune"])
def test_training_packages_import_no_gui_or_cli(area):
    banned = tuple(f"{PACKAGE}.{p}" for p in ("_widgets", "_io", "cli"))
    offences = []
    for path in package_files():
        if area_of(path) != area:
            continue
        for imp in imports_of(path):
            targets = [imp.module]
            if imp.module == PACKAGE:
                targets += [f"{PACKAGE}.{n}" for n in imp.names]
            if any(within(t, *banned) for t in targets):
                offences.append(imp)
    check(offences)


@pytest.mark.parametrize("area", AREAS)
def test_no_private_name_imported_across_modules(area):
    offences = []
    for path in package_files():
        if area_of(path) != area:
            continue
        for imp in imports_of(path):
            if not within(imp.module, PACKAGE):
                continue
            private = [n for n in imp.names
                       if n.startswith("_") and not (n.startswith("__") and n.endswith("__"))
                       and not is_module_of_package(f"{imp.module}.{n}")]
            if private:
                offences.append(imp)
    check(offences)


def test_the_checker_finds_offences(tmp_path, monkeypatch):
    """A module planted in a copy of the layout is caught by each rule."""
    fake = tmp_path / PACKAGE
    (fake / "core").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "core" / "__init__.py").write_text("")
    (fake / "core" / "bad.py").write_text(
        "from ..finetune.convert import hf\n"
        "def f():\n    import napari.layers\n    from .saliency import _as_prompts, __doc__\n"
        "from . import _helpers\n")
    (fake / "core" / "_helpers.py").write_text("")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", fake)
    imps = imports_of(fake / "core" / "bad.py")
    modules = [i.module for i in imps]
    assert f"{PACKAGE}.finetune.convert" in modules and "napari.layers" in modules
    with pytest.raises(pytest.fail.Exception,
                       match=r"(?s)2 offending.*bad.py:1: from \.\.finetune.*bad.py:3: import"):
        test_core_imports_no_higher_layer_and_no_gui()
    with pytest.raises(pytest.fail.Exception,
                       match=r"(?s)1 offending.*bad.py:4: .*_as_prompts") as info:
        test_no_private_name_imported_across_modules("core")
    assert "_helpers" not in str(info.value)  # a private module is not a private name


def test_no_test_builds_a_widget_by_hand():
    """GUI tests open widgets as napari does (the Plugins menu path), never by calling the
    widget classes: a hand-built widget stayed green while the menu failed."""
    widget_classes = {"SegmentWidget", "TrainingWidget"}
    offences = []
    for path in sorted(Path(__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Call):
                func = node.func
                name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
                if name in widget_classes:
                    offences.append(f"{path.name}:{node.lineno}: {name}(...)")
    assert not offences, "\n".join(offences)


GUI = ("qtpy", "napari", "PyQt5", "PyQt6", "superqt")


@pytest.mark.parametrize(("module", "forbidden"), [
    ("segment_controller", GUI),
    ("training_controller", (*GUI, "torch")),
])
def test_controllers_import_no_gui(module, forbidden):
    """The widgets' controllers are testable without Qt or napari: importing one in a fresh
    interpreter loads neither (nor torch, for the training controller)."""
    import subprocess

    code = (f"import sys, {PACKAGE}._widgets.{module}; "
            f"bad = [n for n in {forbidden!r} if n in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
