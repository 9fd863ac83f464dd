"""A name means one thing: one `Job`, one `retrieval` module, the jobs' prefetch module not named like training's
pipeline, and no top-level name defined both in `blip.jobs` and in `blip.capfilt` (CapFilt uses the jobs' pieces, it
does not copy them)."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import blip

SRC = Path(blip.__file__).parent
SHARED_OK = {"logger", "all__", "main"}  # `_logger`, `__all__`, the `python -m` entry point


def _top_level_names(package: str) -> dict[str, list[str]]:
    """Top-level classes, functions and assigned names of a package's modules (leading underscores dropped)."""
    names: dict[str, list[str]] = defaultdict(list)
    for path in sorted((SRC / package).glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            targets: list[ast.expr] = []
            if isinstance(node, ast.FunctionDef | ast.ClassDef):
                names[node.name.lstrip("_")].append(path.name)
            elif isinstance(node, ast.Assign):
                targets = node.targets
            elif isinstance(node, ast.AnnAssign):
                targets = [node.target]
            for target in targets:
                for name in ast.walk(target):
                    if isinstance(name, ast.Name):
                        names[name.id.lstrip("_")].append(path.name)
    return names


def test_one_job_class():
    """The batch job, across all of blip (CapFilt runs as one; the server's micro-batcher queues `QueuedWork`)."""
    jobs = [
        f"{path.relative_to(SRC)}:{node.name}"
        for path in sorted(SRC.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ClassDef) and node.name.lstrip("_") == "Job"
    ]
    assert jobs == ["jobs/job.py:Job"]


def test_one_retrieval_module():
    """Reading an index and searching it is `blip.tasks.retrieval`; the server's side of serving indexes (specs,
    opening, matching them to the served models) is `blip.serve.indexes`, not a second `retrieval`."""
    assert [str(p.relative_to(SRC)) for p in sorted(SRC.rglob("retrieval.py"))] == ["tasks/retrieval.py"]
    assert (SRC / "serve" / "indexes.py").is_file()


def test_prefetch_is_not_a_second_pipeline():
    assert not (SRC / "jobs" / "pipeline.py").exists() and (SRC / "jobs" / "prefetch.py").exists()
    assert (SRC / "train" / "pipeline.py").exists()


def test_jobs_and_capfilt_define_no_name_twice():
    jobs, capfilt = _top_level_names("jobs"), _top_level_names("capfilt")
    both = {name: (jobs[name], capfilt[name]) for name in set(jobs) & set(capfilt) if name not in SHARED_OK}
    assert both == {}
