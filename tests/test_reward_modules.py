"""Reward functions named as `module:function`: a module in the working folder imports without PYTHONPATH, and one
named like a standard-library module says which file was imported, whether the standard library's module shadows
it or it shadows the standard library's (then said at start, before another package's import breaks on it)."""

from __future__ import annotations

import calendar
import sys

import pytest

from grpokit.rewards.functions import import_reward


def test_a_reward_module_in_the_working_folder_imports_without_pythonpath(tmp_path, monkeypatch):
    (tmp_path / "my_rewards_beside_config.py").write_text("def short(prompts, completions, **_):\n    return [0.0]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    fn = import_reward("my_rewards_beside_config:short")
    assert fn.__name__ == "short" and sys.path[-1] == str(tmp_path)  # appended: installed packages win


def test_a_reward_module_shadowed_by_the_standard_library_says_which_file_was_imported(tmp_path, monkeypatch):
    (tmp_path / "calendar.py").write_text("def score(completions, **_):\n    return [0.0] * len(completions)\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as caught:
        import_reward("calendar:score")
    message = str(caught.value)
    assert calendar.__file__ in message and "standard library" in message and "rename your calendar.py" in message


def test_a_reward_module_that_shadows_the_standard_library_says_so(tmp_path, monkeypatch):
    (tmp_path / "tabnanny.py").write_text("def grade(completions, **_):\n    return [0.0] * len(completions)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "tabnanny", raising=False)
    try:
        with pytest.raises(ValueError) as caught:
            import_reward("tabnanny:score")
    finally:
        sys.modules.pop("tabnanny", None)  # the next importer of tabnanny gets Python's own
    message = str(caught.value)
    assert str(tmp_path / "tabnanny.py") in message and "shadows the standard library module 'tabnanny'" in message


def test_a_module_shadowing_the_standard_library_is_named_at_start(tmp_path):
    """`calendar.py` in a folder on PYTHONPATH (as the README's `module:function` rewards suggest): a traceback
    from inside huggingface_hub's import."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "calendar.py").write_text("def score(completions, **kw):\n    return [0.0] * len(completions)\n")
    src = str(Path(__file__).parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{tmp_path}"}
    proc = subprocess.run([sys.executable, "-m", "grpokit.cli", "train", "--model", "m"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert f"{tmp_path / 'calendar.py'} shadows the standard library module 'calendar'" in proc.stderr
    assert "Traceback" not in proc.stderr
