"""Faults of a torchrun launch (2 ranks, gloo, CPU), each started as a cluster would cause it: SIGTERM to torchrun
(preemption), one rank killed (SIGKILL: out of memory, a crashed GPU) or one rank that stops answering (a hang, a
node lost without its connections closing). SIGTERM finishes the step on every rank, writes one checkpoint and
every rank exits 143; a lost rank stops the others at once (killed, or stopped by an error of its own) or after
`ddp_timeout` (silent), each saying what happened and which checkpoint to resume; and the run resumed after both
faults ends where the straight run in one process ends (completions and weights).

Each launch runs `torchrun ... -m helpers FOLDER train CONFIG.yaml`: `grpokit train` on each rank, with each rank's
exit code kept in FOLDER (torchrun reports none after a SIGTERM)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import FAULT_AT_CALL, STOP_LAUNCH_AT_CALL, read_jsonl
from test_distributed import (
    LAUNCH_TIMEOUT,
    TESTS,
    TORCHRUN,
    completions,
    llama_path,  # noqa: F401 - the module's tiny Llama, a fixture
    max_relative_difference,
    one_process,
    weights,
    write_config,
)

from grpokit.model.policy import NumericsError
from grpokit.runtime.checkpoint import (
    LAUNCHER_ENV,
    RunDirectory,
    RunDirectoryError,
    TrainingInterrupted,
    list_checkpoints,
)
from grpokit.runtime.distributed import Cluster, DistributedError, LostRankError
from grpokit.stages.loop import leaving_cluster

TORCHRUN_SIGNALLED = 1  # torchrun 2.13 itself: it forwards SIGTERM, waits for the ranks, then raises SignalException


def launch(folder: Path, config: Path, *extra: str, env: dict[str, str]) -> tuple[int, dict[int, int], str]:
    """torchrun's exit code, each rank's own (a rank killed by a signal: absent) and the launch's output."""
    for old in folder.glob("exit-*"):
        old.unlink()
    pythonpath = os.pathsep.join([str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1", **env}
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "helpers", str(folder), "train", str(config)]
    # the timeout is the hang guard: a launch that never ends fails here, whatever the faults did
    proc = subprocess.run([*cmd, *extra], env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT,
                          start_new_session=True)  # fmt: skip
    codes = {int(p.name.split("-")[1]): int(p.read_text()) for p in folder.glob("exit-*")}
    return proc.returncode, codes, proc.stdout + proc.stderr


@pytest.mark.parametrize(("mode", "fault"), [("ddp", "kill"), ("fsdp", "hang")])
def test_sigterm_then_a_lost_rank_then_resume_is_the_straight_run(mode, fault, llama_path, tmp_path):  # noqa: F811
    """SIGTERM in step 2; resumed, rank 1 lost in step 4 (after the checkpoint of step 3); resumed again: the run
    is the straight run's 5 steps. `ddp`: rank 1 is killed, which the other sees at once (its connection closed);
    `fsdp` (every rank writes its own shards of each checkpoint): rank 1 hangs, which only `ddp_timeout` ends."""
    config = write_config(tmp_path, llama_path, max_steps=5, save_every=3, distributed=mode, ddp_timeout=10,
                          reward_funcs=["helpers:digit_share_with_faults"])  # fmt: skip
    run = tmp_path / "run"

    code, ranks, out = launch(tmp_path, config, env={STOP_LAUNCH_AT_CALL: "2"})
    assert (code, ranks) == (TORCHRUN_SIGNALLED, {0: 143, 1: 143}), out[-3000:]
    assert [step for step, _ in list_checkpoints(run)] == [2]  # one checkpoint: the step every rank was in
    assert (run / "checkpoint-2" / "shards").is_dir() == (mode == "fsdp")
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2]
    assert out.count("stopped by SIGTERM after step 2") == 1  # rank 0 says it for all
    assert "resume with: torchrun --nproc_per_node 2 " in out  # a launch of as many ranks, not one process

    # the resumed process's 2nd reward call is in step 4, after checkpoint-3
    code, ranks, out = launch(tmp_path, config, "--resume-from-checkpoint", "latest",
                              env={FAULT_AT_CALL: f"2:1:{fault}"})  # fmt: skip
    assert code == 1 and 1 not in ranks, out[-3000:]  # rank 1 ended by a signal (its own, or torchrun's)
    # rank 0 stops on its own (3); torchrun's SIGTERM, sent as it sees the lost rank, could only end it first in
    # the instant between the run's signal handlers and the CLI's ignoring it
    assert ranks.get(0, 3) == 3
    assert [step for step, _ in list_checkpoints(run)] == [2, 3]
    said = {"kill": "rank 1 left the launch", "hang": "rank 1 did not answer within ddp_timeout = 10 s"}[fault]
    assert f"grpokit: stopped: rank 0 of 2: {said}" in out, out[-3000:]
    assert f"the last complete checkpoint is {run / 'checkpoint-3'} (step 3)" in out

    code, ranks, out = launch(tmp_path, config, "--resume-from-checkpoint", "latest", env={})
    assert (code, ranks) == (0, {0: 0, 1: 0}), out[-3000:]
    straight = one_process(config, tmp_path / "straight")
    assert completions(run) == completions(straight)
    assert max_relative_difference(weights(run), weights(straight)) <= 1e-5


def test_an_error_on_one_rank_stops_both_at_once(llama_path, tmp_path):  # noqa: F811
    """Rank 1's reward raises in step 2 while rank 0 waits in the step's gather: rank 1 leaves the process group
    without the closing barrier (which rank 0's gather would have answered, both then waiting for `ddp_timeout`),
    so rank 0's gather fails at once, and each says why it stopped."""
    config = write_config(tmp_path, llama_path, save_every=1, reward_funcs=["helpers:digit_share_with_faults"])
    code, ranks, out = launch(tmp_path, config, env={FAULT_AT_CALL: "2:1:raise"})  # (ddp_timeout: 1800 s)
    assert (code, ranks) == (1, {0: 3, 1: 2}), out[-3000:]
    assert "grpokit train: error: reward function `helpers:digit_share_with_faults` raised ValueError: a fault on " \
           "rank 1 alone" in out  # fmt: skip
    assert "grpokit: stopped: rank 0 of 2: rank 1 left the launch (an error there" in out
    assert f"the last complete checkpoint is {tmp_path / 'run' / 'checkpoint-1'} (step 1)" in out


# ---------------------------------------------------------------- in this process: the handler, the classification


def signals_to(rd: RunDirectory, *signums: int) -> list[int]:
    """What reaches the handler before grpokit's (a signal grpokit passes on to stop at once) when `rd` gets
    `signums`."""
    received = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        rd._install_signal_handlers()
        for signum in signums:
            rd._on_signal(signum, None)
    finally:
        rd._restore_signal_handlers()
        signal.signal(signal.SIGTERM, previous)
    return received


def test_a_rank_stopped_by_another_ranks_signal_takes_its_own_as_the_first(tmp_path, capsys):
    """Rank 1 learns at a step's end that rank 0 got SIGTERM; torchrun's forward reaches rank 1 later: it is rank
    1's first signal, not a second one that would stop it mid-checkpoint."""
    rd = RunDirectory(tmp_path, settings=None, resume_from=None, overwrite=False, keep=0, writer=False)
    rd.stop_signal = signal.SIGTERM  # as `run_loop` sets it from the ranks' flags
    assert signals_to(rd, signal.SIGTERM) == []
    assert "SIGTERM: this rank is already stopping with the others" in capsys.readouterr().err
    assert signals_to(rd, signal.SIGTERM) == [signal.SIGTERM]  # its own second one: at once, as in one process


def test_under_torchrun_a_repeated_signal_does_not_stop_a_rank_mid_step(tmp_path, capsys, monkeypatch):
    """A cluster signals torchrun and every rank, and torchrun forwards its own: each rank gets SIGTERM twice, and
    the step still ends with its checkpoint (torchrun's SIGKILL after --shutdown-timeout is the stop at once)."""
    monkeypatch.setenv(LAUNCHER_ENV, "run-1")
    rd = RunDirectory(tmp_path, settings=None, resume_from=None, overwrite=False, keep=0, writer=False)
    assert signals_to(rd, signal.SIGTERM, signal.SIGTERM) == []
    assert rd.stop_signal == signal.SIGTERM
    err = capsys.readouterr().err
    assert "torchrun kills the ranks after its --shutdown-timeout" in err and "SIGTERM again: still finishing" in err


GLOO_RESET = "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:9108: Connection reset"
GLOO_TIMEOUT = "[/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 5000ms for recv"


def test_a_failed_collective_names_the_rank_that_left_and_other_errors_are_not_taken_for_one():
    two, four = Cluster(rank=0, world_size=2, timeout_s=5), Cluster(rank=2, world_size=4)
    assert two.lost_rank(RuntimeError(GLOO_RESET)).startswith("rank 0 of 2: rank 1 left the launch")
    assert "rank 1 did not answer within ddp_timeout = 5 s" in two.lost_rank(RuntimeError(GLOO_TIMEOUT))
    assert four.lost_rank(RuntimeError(GLOO_RESET)).startswith("rank 2 of 4: another rank (torchrun's summary")
    assert two.lost is not None and four.lost is not None  # `close` leaves a broken group without its barrier
    from grpokit.model.policy import NumericsError
    from grpokit.rewards.functions import RewardError

    # grpokit's own errors (RuntimeError subclasses) quoting a reset connection: a reward's, not a lost rank
    reward_reset = RewardError(f"reward function `judge` raised ConnectionResetError: {GLOO_RESET}")
    for other in (RuntimeError("CUDA out of memory"), ValueError(GLOO_RESET), reward_reset, NumericsError(GLOO_RESET)):
        assert Cluster(rank=0, world_size=2).lost_rank(other) is None
    assert Cluster().lost_rank(RuntimeError(GLOO_RESET)) is None  # one process: no rank to lose


class ClosingCluster(Cluster):
    """A cluster that records how it was left (`together`) instead of leaving a process group."""

    def close(self, *, together: bool = True) -> None:
        self.left = together


def left_after(err: BaseException | None) -> bool:
    """Whether `leaving_cluster` left with the closing barrier after a block that raised `err` (None: returned)."""
    cluster = ClosingCluster(rank=1, world_size=2)
    try:
        with leaving_cluster(cluster):
            if err is not None:
                raise err
    except BaseException as raised:  # noqa: BLE001 (a KeyboardInterrupt among them)
        assert raised is err
    return cluster.left


def test_a_rank_leaves_with_the_closing_barrier_only_when_every_rank_ends_together():
    """The barrier (gloo aborts at teardown without it) after a run, a signal's stop and the errors every rank
    raises together; without it after an error that may be this rank's alone (the others would answer it from
    another collective and hang) and after a lost rank, whose SIGTERM from torchrun is then ignored."""
    assert left_after(None)
    stopped = TrainingInterrupted(signal.SIGTERM, 2, Path("checkpoint-2"))
    for agreed in (stopped, NumericsError("nan"), DistributedError("output_dir")):
        assert left_after(agreed), agreed
    for alone in (ValueError("a reward"), RunDirectoryError("a shard"), KeyboardInterrupt()):
        assert not left_after(alone), alone
    previous = signal.getsignal(signal.SIGTERM)
    cluster = ClosingCluster(rank=1, world_size=2)
    try:
        with pytest.raises(LostRankError), leaving_cluster(cluster):
            raise LostRankError("rank 0 left")
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN and cluster.left is False
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_the_resume_command_printed_under_torchrun_is_a_launch_of_as_many_ranks(monkeypatch, tmp_path):
    """A run stopped under torchrun resumes under torchrun (one process would hold the whole model an FSDP run
    shards), by the script's path (torchrun reads its first argument as a file); over several nodes, on each."""
    from grpokit.cli import resume_command

    script = tmp_path / "bin" / "grpokit"
    script.parent.mkdir()
    script.write_text("")
    argv = ["train", "run.yaml", "--resume-from-checkpoint", "checkpoint-2"]
    assert resume_command(argv) == "grpokit train run.yaml --resume-from-checkpoint latest"
    monkeypatch.setattr(sys, "argv", [str(script), *argv])
    monkeypatch.setenv(LAUNCHER_ENV, "run-1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    expected = f"torchrun --nproc_per_node 2 {script} train run.yaml --resume-from-checkpoint latest"
    assert resume_command(argv) == expected
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert resume_command(argv) == f"{expected} (on every node, with this launch's --nnodes and rendezvous)"
