"""The README's step-by-step command list runs top to bottom in a fresh clone: each line, as written, exits 0 in a
copy of the repository's files (what `git clone` gives: no runs/, no earlier output), and leaves the paths its
comment promises (`-> runs/sft/model`) for the lines after it. The list is the indented block after the marker
comment, so the test reads what a newcomer reads.

The commands run in this process through the CLI's entry point (`grpokit.cli.main`, what the installed `grpokit`
script calls) with the package of this checkout: one interpreter importing torch once keeps the whole list within
about a minute on 2 cores. `grpokit compare` starts its own two processes, as it does for a user."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from grpokit.cli import main

ROOT = Path(__file__).resolve().parents[1]
MARKER = "<!-- commands: run in order from a fresh clone (tests/test_readme_commands.py) -->"


def command_list(text: str) -> list[tuple[str, list[str], list[str]]]:
    """(line, grpokit's arguments, the paths after `->` in its comment) for each line of the indented block after
    MARKER. The set-up line and `grpokit demo` are not run here: the set-up made the environment this test runs in,
    and the demo has its own test (tests/test_demo.py)."""
    found = re.search(re.escape(MARKER) + r"\n\n((?: {4}.*\n|\n)+)", text)
    assert found, f"no indented block after {MARKER!r}"
    commands = []
    for line in found.group(1).strip("\n").splitlines():
        line = line.strip()
        if not line:
            continue
        command, _, comment = line.partition("  # ")
        words = shlex.split(command)
        if words[0] == "bash" or words[:2] == ["grpokit", "demo"]:
            continue
        assert words[0] == "grpokit", f"{line!r}: the list holds grpokit commands"
        made = [p.strip() for p in comment.split("->", 1)[1].split(",")] if "->" in comment else []
        commands.append((line, words[1:], made))
    return commands


def test_the_command_list_is_read_as_written():
    """The reader on a made-up block: a scanner that finds nothing or mangles a line cannot make the real check pass."""
    text = f"""intro\n\n{MARKER}\n\n    bash scripts/setup.sh && source .venv/bin/activate
    grpokit init --output-dir runs/tiny            # a model -> runs/tiny
    grpokit demo --pipeline

    grpokit eval --model runs/tiny --eval-data "my data.jsonl"   # scores -> runs/a, runs/b\n\nafter\n"""
    assert command_list(text) == [
        ("grpokit init --output-dir runs/tiny            # a model -> runs/tiny", ["init", "--output-dir", "runs/tiny"],
         ["runs/tiny"]),
        ('grpokit eval --model runs/tiny --eval-data "my data.jsonl"   # scores -> runs/a, runs/b',
         ["eval", "--model", "runs/tiny", "--eval-data", "my data.jsonl"], ["runs/a", "runs/b"]),
    ]  # fmt: skip


def fresh_clone(into: Path) -> Path:
    """The repository's files as a clone has them (tracked, and new ones not ignored), without any output."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the files of a fresh clone are unknown")
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    for name in filter(None, listed.split("\0")):
        if (ROOT / name).is_file():  # (a file deleted but not yet committed is listed too)
            (into / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, into / name)
    return into


def test_the_readmes_command_list_runs_top_to_bottom_in_a_fresh_clone(tmp_path, monkeypatch, capsys):
    commands = command_list((ROOT / "README.md").read_text())
    assert len(commands) >= 8, commands
    monkeypatch.chdir(fresh_clone(tmp_path / "clone"))
    # compare's two processes: one intra-op thread, as this one has (conftest), since the tiny model runs faster so
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for line, args, made in commands:
        rc = main(args)
        out, err = capsys.readouterr()
        assert rc == 0, f"{line}\nexited {rc}\n{out[-3000:]}\n{err[-3000:]}"
        missing = [path for path in made if not Path(path).exists()]
        assert not missing, f"{line}\nleft no {missing}\n{out[-3000:]}"
