"""What a reward function does to the process it runs in: a changed working directory or file-creation mask, and
torch's grad mode switched off, are undone and said; os._exit, a closed sys.stdout or a closed file descriptor stop
the run naming the function."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest


def _score(fn, **inputs):
    from grpokit.rewards.functions import score

    batch = {"prompts": ["p", "p"], "completions": ["a", "bb"], **inputs}
    return score([(fn.__name__, fn), ], batch, timeout=None)  # fmt: skip


def test_a_reward_that_changes_the_working_directory_is_said_once_per_function_and_run(tmp_path, monkeypatch):
    import torch

    from grpokit.rewards.functions import RewardSet, RewardWarning

    monkeypatch.chdir(tmp_path)

    def f2_wanders(completions, **_):
        os.chdir("/")
        return [float(len(c)) for c in completions]

    settings = {"group_size": 2, "scale": "group", "aggregation": "sum_then_normalize", "timeout": None}
    batch = {"prompts": ["p", "p"], "completions": ["a", "bb"]}
    for _run in range(2):  # each run says it once, the second one too
        rewards = RewardSet([("f2_wanders", f2_wanders)], torch.ones(1), [])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rewards.score_step(batch, **settings)
            rewards.score_step(batch, **settings)
        moved = [w for w in caught if issubclass(w.category, RewardWarning)]
        assert len(moved) == 1 and "`f2_wanders` changed the working directory" in str(moved[0].message)
        assert Path.cwd() == tmp_path


def test_a_reward_that_changes_the_umask_is_undone_and_said(tmp_path):
    """`os.umask(0o777)` wrote the final model unreadable (mode 000), with no word."""
    import os

    from grpokit.rewards.functions import RewardWarning

    def hides(completions, **_):
        os.umask(0o777)
        return [1.0] * len(completions)

    before = os.umask(0o022)
    os.umask(before)
    with pytest.warns(RewardWarning, match=r"`hides` changed the file-creation mask \(umask\) to 777; grpokit set it"):
        _score(hides)
    now = os.umask(before)
    assert now == before


def test_a_reward_calling_os_exit_stops_the_run_naming_it(tmp_path):
    """It ended the process with exit code 0: nothing saved, nothing said."""
    import os

    from grpokit.rewards.functions import RewardError

    def quits(completions, **_):
        os._exit(0)

    real_exit = os._exit
    with pytest.raises(RewardError, match=r"reward function `quits` called os\._exit\(0\), which would end the run"):
        _score(quits)
    assert os._exit is real_exit


def test_a_reward_that_closes_stdout_is_named(monkeypatch):
    import io
    import sys

    from grpokit.rewards.functions import RewardError

    monkeypatch.setattr(sys, "stdout", io.StringIO())

    def closes(completions, **_):
        sys.stdout.close()
        return [1.0] * len(completions)

    with pytest.raises(RewardError, match=r"reward function `closes` closed sys\.stdout"):
        _score(closes)


def test_a_reward_that_closes_a_file_descriptor_or_switches_off_grad_is_named_or_undone(capfd):
    """`os.close(1)` ended in tqdm's EBADF traceback; `torch.set_grad_enabled(False)` in the backward's."""
    import os

    import torch

    from grpokit.rewards.functions import RewardError, RewardWarning

    def no_grad(completions, **_):
        torch.set_grad_enabled(False)
        return [1.0] * len(completions)

    with pytest.warns(RewardWarning, match=r"`no_grad` changed torch's grad mode; grpokit set it back"):
        _score(no_grad)
    assert torch.is_grad_enabled()

    def closes_fd(completions, **_):
        os.close(1)
        return [1.0] * len(completions)

    with pytest.raises(RewardError, match=r"reward function `closes_fd` closed file descriptor 1 \(stdout\)"):
        _score(closes_fd)
    os.fstat(1)  # open again
    print("still writes")
    assert "still writes" in capfd.readouterr().out
