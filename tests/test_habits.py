"""Small habits of a command-line tool: `--version`, a reward module beside the config, a log that is not a
terminal gets plain progress lines instead of bar redraws."""

from __future__ import annotations

import sys

from grpokit import __version__
from grpokit.cli import main
from grpokit.rewards import import_reward
from grpokit.runlog import PlainProgress, progress


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"grpokit {__version__}"


def test_a_reward_module_in_the_working_folder_imports_without_pythonpath(tmp_path, monkeypatch):
    (tmp_path / "my_rewards_beside_config.py").write_text("def short(prompts, completions, **_):\n    return [0.0]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    fn = import_reward("my_rewards_beside_config:short")
    assert fn.__name__ == "short" and sys.path[-1] == str(tmp_path)  # appended: installed packages win


def test_progress_off_a_terminal_is_a_plain_line_every_tenth_of_the_run(capsys):
    bar = progress(range(1, 21), "grpo", initial=0, total=20)  # pytest's stderr is not a terminal
    assert isinstance(bar, PlainProgress)
    for step in bar:
        bar.set_postfix(reward=f"{step / 10:.3f}")
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(",")[0] for line in lines] == [f"grpo: step {s}/20" for s in range(2, 21, 2)]
    assert "\r" not in "".join(lines) and lines[-1].endswith("reward=2.000")
