"""The README and docs/ as a user reads them: the benchmark page is what the records make, the README stays short,
every relative link lands on a file of the repository, and no link leaves it."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")  # [text](target)


def _table_module():
    spec = importlib.util.spec_from_file_location("benchmarks_table", ROOT / "benchmarks" / "table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_page_is_what_the_records_make():
    page = ROOT / "docs" / "benchmarks.md"
    assert page.read_text() == _table_module().render_page(), (
        "docs/benchmarks.md differs from benchmarks/results/*.json: run `python benchmarks/table.py --write`"
    )


def test_readme_is_at_most_200_lines():
    assert len(README.read_text().splitlines()) <= 200


def test_ci_runs_the_readmes_test_command_verbatim():
    """.ci/run is the README's "Set up and run the tests" command, so what CI proves is what a reader types."""
    found = re.search(r"^Set up and run the tests:\n\n {4}(\S.*)$", README.read_text(), flags=re.M)
    assert found, "the README lost its 'Set up and run the tests:' command"
    assert found.group(1) in (ROOT / ".ci" / "run").read_text().splitlines()


def anchors(page: Path) -> set[str]:
    """The anchors a markdown renderer gives the page's headings: lower case, punctuation dropped, spaces -> '-'."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_every_relative_link_points_to_a_file_of_the_repository():
    broken = []
    for page in PAGES:
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):
                continue  # a scheme: the next test's
            file, _, anchor = target.partition("#")
            path = (page.parent / file).resolve() if file else page
            if not path.exists() or ROOT.resolve() not in path.parents:
                broken.append(f"{page.relative_to(ROOT)}: {target}")
            elif anchor and path.suffix == ".md" and anchor not in anchors(path):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, broken


def test_no_link_leaves_the_repository():
    outside = []
    for page in PAGES:
        text = page.read_text()
        outside += [f"{page.relative_to(ROOT)}: {t}" for t in LINK.findall(text) if re.match(r"[a-z][a-z0-9+.-]*:", t)]
        outside += [f"{page.relative_to(ROOT)}: {u}" for u in re.findall(r"https?://\S+", text)]
    assert not outside, outside


def test_the_link_check_finds_links_and_anchors(tmp_path):
    assert LINK.findall("see [a](docs/a.md#x) and [b](https://example.org)") == ["docs/a.md#x", "https://example.org"]
    assert any(LINK.findall(README.read_text()))
    page = tmp_path / "p.md"
    page.write_text("# Title\n## While running: rewards\n## GRPO beside PPO (`grpokit compare`)\n")
    assert anchors(page) == {"title", "while-running-rewards", "grpo-beside-ppo-grpokit-compare"}
