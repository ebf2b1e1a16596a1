"""README.md and docs/ stay true to the code they describe.

Fast and offline (no Ray, no TensorFlow): the generated spec reference
matches the spec, every relative link and every repository path named
points to a file that exists, and every `orchestra.…` module named imports.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from pathlib import Path

import pytest

from orchestra.tools import spec_reference

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
# A dotted name or a repository path, not part of a longer path or name (`/opt/orchestra/jobs/…`).
MODULE = re.compile(r"(?<![\w/.\"-])orchestra(?:\.[A-Za-z_]\w*)+")  # a quoted name is a string (an entry-point group)
RUN_MODULE = re.compile(r"python3? -m (orchestra(?:\.\w+)*)")
REPO_PATH = re.compile(r"(?<![\w/.<>-])((?:orchestra|tests|jobs|bench|deploy|docs)/[\w./-]*[\w/])")


def _pages_ids():
    return [str(page.relative_to(ROOT)) for page in PAGES]


def test_spec_reference_is_generated_from_the_spec():
    text = (ROOT / "docs" / "spec.md").read_text()
    start, end = spec_reference.START_MARKER, spec_reference.END_MARKER
    assert text.count(start) == 1 and text.count(end) == 1, f"docs/spec.md needs one {start} and one {end}"
    written = text.split(start, 1)[1].split(end, 1)[0]
    assert written.strip() == spec_reference.render().strip(), (
        f"docs/spec.md's field reference differs from orchestra/spec/: run `{spec_reference.COMMAND}`")


def test_spec_reference_has_a_row_for_every_field():
    reference = spec_reference.render()
    for path, model in spec_reference._sections(spec_reference.JobSpec, ""):
        for name in model.model_fields:
            assert f"| `{spec_reference._join(path, name)}` |" in reference


@pytest.mark.parametrize("page", PAGES, ids=_pages_ids())
def test_relative_links_point_to_files(page: Path):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        if not path.exists() or (anchor and path.suffix == ".md" and anchor not in _anchors(path)):
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)} links to files or headings that do not exist: {broken}"


def _anchors(page: Path) -> set[str]:
    """The anchors GitHub makes of a page's headings: lower case, spaces
    to hyphens, punctuation other than hyphens and underscores dropped."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    headings = re.findall(r"^#{1,6} +(.+?) *$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


@pytest.mark.parametrize("page", PAGES, ids=_pages_ids())
def test_repository_paths_exist(page: Path):
    missing = sorted({path for path in REPO_PATH.findall(page.read_text()) if not (ROOT / path).exists()})
    assert not missing, f"{page.relative_to(ROOT)} names paths that do not exist: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=_pages_ids())
def test_named_modules_import(page: Path):
    text = page.read_text()
    problems = [f"python -m {name}" for name in set(RUN_MODULE.findall(text)) if not _is_module(name)]
    problems += [name for name in set(MODULE.findall(text)) if not _resolves(name)]
    assert not problems, f"{page.relative_to(ROOT)} names modules or attributes that do not exist: {sorted(problems)}"


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent that is not a package
        return False


def _resolves(name: str) -> bool:
    """A module (`orchestra.tools.samples`), or a module's attribute
    (`orchestra.load_model`, `orchestra.Client`)."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        module = ".".join(parts[:cut])
        if _is_module(module):
            if cut == len(parts):
                return True
            value = importlib.import_module(module)
            for attribute in parts[cut:]:
                if not hasattr(value, attribute):
                    return False
                value = getattr(value, attribute)
            return True
    return False


def test_readme_keeps_the_ci_test_command():
    """`.ci/run` runs the line two lines after the marker: the full suite."""
    lines = (ROOT / "README.md").read_text().splitlines()
    marker = lines.index("<!-- test-command -->")
    assert lines[marker + 1] == "```sh"
    command = lines[marker + 2]
    assert command.endswith("python -m pytest") and "pip install -e \".[test]\"" in command


def test_performance_page_has_the_bench_table_markers():
    """The benchmark rewrites the table between these two lines."""
    lines = (ROOT / "docs" / "performance.md").read_text().splitlines()
    start, end = lines.index("<!-- bench:table:start -->"), lines.index("<!-- bench:table:end -->")
    assert start < end and any(line.startswith("| way |") for line in lines[start + 1:end])
