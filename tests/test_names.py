"""Names that don't collide: a module is not named like one of blip's packages, a name means one thing, and running a
model over an evaluation set lives with the metrics in `blip.evaluation`, below training."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import blip
from blip.data import shapes

SRC = Path(blip.__file__).parent
PACKAGES = sorted(p.name for p in SRC.iterdir() if (p / "__init__.py").is_file())


def _imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.append(node.module)
    return out


def test_no_module_is_named_like_a_blip_package():
    clashes = [str(path.relative_to(SRC)) for path in sorted(SRC.glob("*/**/*.py")) if path.stem in PACKAGES]
    assert clashes == []  # e.g. train/tasks.py beside blip.tasks: now train/objectives.py


def test_vqa_accuracy_is_defined_once_in_evaluation():
    homes = [
        str(path.relative_to(SRC))
        for path in sorted(SRC.rglob("*.py"))
        for node in ast.parse(path.read_text()).body
        if isinstance(node, ast.FunctionDef) and node.name == "vqa_accuracy"
    ]
    assert homes == ["evaluation/vqa_metrics.py"]


def test_evaluation_runs_models_and_imports_nothing_from_train_or_above():
    run = importlib.import_module("blip.evaluation.run")
    assert callable(run.evaluate) and callable(run.write_result)
    assert not (SRC / "train" / "evaluate.py").exists()
    bad = [
        f"{path.name}: {module}"
        for path in sorted((SRC / "evaluation").glob("*.py"))
        for module in _imports(path)
        if module.startswith(("blip.train", "blip.serve", "blip.jobs", "blip.capfilt", "blip.demo"))
    ]
    assert bad == []


def test_shapes_submodules_are_not_shadowed_by_the_names_the_package_exports():
    names = [m.name for m in pkgutil.iter_modules(shapes.__path__) if m.name != "__main__"]
    assert len(names) >= 8
    for name in names:
        module = importlib.import_module(f"blip.data.shapes.{name}")
        assert getattr(shapes, name) is module, name
        assert name not in shapes.__all__
    for name in shapes.__all__:  # every public name is reachable from the package
        assert getattr(shapes, name) is not None
