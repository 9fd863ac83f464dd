"""The repository stands on its own: documents point only at files it contains (docs/, not design notes kept
elsewhere), every link in the README and docs/ resolves, and tests do not write past pytest's output capture."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Notes that lived outside the repository ("FACTS.md §5", "DESIGN §8"); docs/ holds their content now.
OUTSIDE_NOTES = re.compile(r"\b(FACTS|DESIGN)\b")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
TEXT_SUFFIXES = {".py", ".md", ".toml", ".txt", ".cfg", ".ini", ".json", ".yaml", ".yml", ".html", ".js", ".css"}


def _repository_files() -> list[Path]:
    try:
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
        paths = [ROOT / name for name in listed]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (e.g. an sdist)
        skip = {".git", ".venv", "runs", "build", "dist", "__pycache__", ".pytest_cache", ".ruff_cache"}
        paths = [p for p in ROOT.rglob("*") if not skip & set(p.relative_to(ROOT).parts)]
    this = Path(__file__).resolve()
    return sorted(
        p for p in paths if p.is_file() and p.resolve() != this and (p.suffix in TEXT_SUFFIXES or p.name == "Makefile")
    )


def _references(paths: list[Path]) -> list[str]:
    found = []
    for path in paths:
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if OUTSIDE_NOTES.search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    return found


def test_readme_docs_configs_and_benchmarks_reference_only_the_repository():
    owned = [
        p for p in _repository_files() if p.relative_to(ROOT).parts[0] in ("README.md", "docs", "configs", "benchmarks")
    ]
    assert owned, "no files found"
    assert _references(owned) == []


def test_no_file_references_notes_outside_the_repository():
    assert _references(_repository_files()) == []


def _slug(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    headings = [line.lstrip("#").strip() for line in path.read_text().splitlines() if re.match(r"#{1,6} ", line)]
    return {_slug(h) for h in headings}


def test_every_link_in_the_readme_and_docs_resolves():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert len(pages) > 5
    broken = []
    for page in pages:
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", target):  # http(s), mailto: not checked here
                continue
            name, _, anchor = target.partition("#")
            path = (page.parent / name).resolve() if name else page
            if not path.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert broken == []


def test_the_readme_links_the_docs():
    readme = ROOT / "README.md"
    links = {target.partition("#")[0] for target in LINK.findall(readme.read_text())}
    assert "docs/README.md" in links or "docs/" in links


def test_tests_do_not_write_past_output_capture():
    """A measurement printed by a test looks like a failure to whoever runs the suite: record it instead
    (`record_property`, logging)."""
    offenders = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        if path.resolve() == Path(__file__).resolve():
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\bcap(sys|fd)\.disabled\(", line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}")
    assert offenders == []
