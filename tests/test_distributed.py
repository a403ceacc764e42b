"""torchrun: a run on 2 ranks (gloo, CPU) is the run on one process, split. The same completions, the same final
weights (to float rounding), for every loss type, with and without LoRA, with a KL reference; checkpoints written
by rank 0 resume on 2 ranks or on 1.

Each case launches `torchrun --nproc_per_node 2 grpokit train CONFIG.yaml` in a subprocess, as a user would, and
compares it with the same config trained in this process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import KILL_AT_CALL, read_jsonl, save_tiny, save_tiny_reward_model
from safetensors.torch import load_file

from grpokit.config import load_yaml
from grpokit.runtime.checkpoint import PROVENANCE, list_checkpoints
from grpokit.runtime.weight_files import INDEX_NAME, read_weight_files, weight_files
from grpokit.stages.grpo import GRPOTrainer

TESTS = Path(__file__).resolve().parent
TORCHRUN = Path(sys.executable).with_name("torchrun")
GRPOKIT = Path(sys.executable).with_name("grpokit")
LAUNCH_TIMEOUT = 600  # a hang guard only (a collective one rank never joins), far above a real launch

LORA = {"lora": {"r": 4, "alpha": 8.0}}
REUSE = {"num_iterations": 2, "minibatch_size": 4}  # mu = 2, two minibatches: spread unevenly over the ranks
# the high-entropy selection's threshold and the entropy bonus's normalizer, both over every rank's tokens
ENTROPY_TERMS = {"top_entropy_quantile": 0.5, "entropy_coef": 0.01}
SMALL_SHARDS = {"max_shard_size": "40KB"}  # the tiny Llama's final model in 5 files and an index
# (mode, loss type) -> what else the case turns on
EXTRAS = {
    ("fsdp", "grpo"): SMALL_SHARDS,  # (with LoRA by default: merged module by module as the shards are written)
    ("ddp", "dapo"): {"scale_rewards": "batch"},
    ("ddp", "dr_grpo"): {**REUSE, **ENTROPY_TERMS},
    ("fsdp", "dapo"): {**REUSE, **ENTROPY_TERMS},
    ("fsdp", "dr_grpo"): {"gradient_checkpointing": True},
}
# Every loss type under both modes, with LoRA and without: 16 launches. The default run takes the half in which
# each loss type meets each mode once and each mode meets LoRA and its absence twice; GRPOKIT_DISTRIBUTED_ALL=1
# runs the other half too (the whole product costs more than the 3 minutes the suite gives these tests).
DEFAULT = {("ddp", "grpo", False), ("ddp", "bnpo", True), ("ddp", "dapo", False), ("ddp", "dr_grpo", True)}
DEFAULT |= {("fsdp", "grpo", True), ("fsdp", "bnpo", False), ("fsdp", "dapo", True), ("fsdp", "dr_grpo", False)}
ALL = os.environ.get("GRPOKIT_DISTRIBUTED_ALL") == "1"
CASES = {}
for mode in ("ddp", "fsdp"):
    for loss_type in ("grpo", "bnpo", "dapo", "dr_grpo"):
        for lora in (False, True):
            name = f"{mode}-{loss_type}" + ("-lora" if lora else "")
            values = {"distributed": mode, "loss_type": loss_type, **(LORA if lora else {})}
            marks = [] if ALL or (mode, loss_type, lora) in DEFAULT else [pytest.mark.skip("GRPOKIT_DISTRIBUTED_ALL=1")]
            CASES[name] = pytest.param({**values, **EXTRAS.get((mode, loss_type), {})}, marks=marks, id=name)
CASES["fsdp-reward-model"] = pytest.param(
    {"distributed": "fsdp", "reward_funcs": ["REWARD_MODEL", "helpers:digit_share"]}, id="fsdp-reward-model"
)


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory):
    """A tiny Llama: no biases. (Qwen2's key bias has a gradient that is exactly 0 in exact arithmetic, a
    softmax does not see a shift shared by all its keys, so AdamW turns its rounding noise into steps of the
    learning rate's size that differ between any two summation orders: 1.7e-4 relative on a 3-step run here,
    every other tensor within 3.4e-6.)"""
    return save_tiny(tmp_path_factory.mktemp("tiny") / "llama", "llama")


def write_config(folder: Path, model: Path, **overrides) -> Path:
    values = {
        "model": str(model),
        "output_dir": str(folder / "run"),
        "task": "addition",
        "reward_funcs": ["helpers:digit_share"],
        "max_steps": 3,
        "prompts_per_step": 4,
        "num_generations": 2,  # every completion lands in completions.jsonl (it logs every G // 2-th)
        "max_completion_length": 8,
        "num_train_prompts": 32,
        "num_eval_prompts": 0,
        # the default learning rate (1e-5): at 1e-3, AdamW's steps on the few weights whose gradient is near its
        # eps (1e-8) amplify rounding (two summation orders) to 3e-5 of a weight, though the steps agree to 2e-5
        "beta": 0.04,
        "log_completions_every": 1,
        "save_every": 0,
        "progress": False,
        "tensorboard": False,
        "seed": 0,
        **overrides,
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def launch(config: Path, *extra: str, env: dict[str, str] | None = None, check: bool = True, command: str = "train"):
    """`torchrun --nproc_per_node 2 grpokit COMMAND CONFIG.yaml EXTRA...` in its own process group."""
    # the caller's PYTHONPATH after the tests' folder: a worktree's src/ must reach the ranks, not the installed one
    pythonpath = os.pathsep.join([str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", str(GRPOKIT), command, str(config), *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, start_new_session=True)
    assert not check or proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def one_process(config: Path, output_dir: Path, *, trainer: type = GRPOTrainer, **overrides) -> Path:
    """`config` trained in this process by `trainer` (its own config class) into `output_dir`."""
    cfg = load_yaml(trainer.config_class, config)
    cfg = trainer.config_class(**{**cfg.__dict__, "output_dir": str(output_dir), **overrides})
    sys.path.insert(0, str(TESTS))  # the config names helpers:digit_share, as the launched ranks import it
    trainer(cfg).train()
    return output_dir


def completions(run: Path) -> list[tuple[int, str, str]]:
    return [(r["step"], r["prompt"], r["completion"]) for r in read_jsonl(run / "completions.jsonl")]


def weights(run: Path) -> dict[str, torch.Tensor]:
    """The final model's tensors: one model.safetensors or the shards its index names."""
    return dict(read_weight_files(run / "model"))


def max_relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Over every tensor: max |a - b| / max |b|."""
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp(min=1e-12)) for k in a)


@pytest.mark.parametrize("case", list(CASES.values()))
def test_two_ranks_train_as_one_process(case, llama_path, tmp_path):
    overrides = dict(case)
    if "REWARD_MODEL" in overrides.get("reward_funcs", []):  # a reward model folder: loaded on every rank
        folder = str(save_tiny_reward_model(tmp_path / "rm"))
        overrides["reward_funcs"] = [folder if f == "REWARD_MODEL" else f for f in overrides["reward_funcs"]]
    config = write_config(tmp_path, llama_path, **overrides)
    proc = launch(config)
    if overrides["distributed"] == "fsdp":  # no rank loaded the whole model: each read its rows from the file
        assert "every rank loads the whole model" not in proc.stderr
        assert "grpokit: distributed fsdp: each rank read its own rows of" in proc.stderr
    split, whole = tmp_path / "run", one_process(config, tmp_path / "whole")
    assert len(completions(whole)) == 3 * 4 * 2
    assert completions(split) == completions(whole)
    moved = max_relative_difference(weights(whole), load_file(llama_path / "model.safetensors"))
    assert moved > 1e-4  # the run trained: the comparison below is not of two untouched models
    assert max_relative_difference(weights(split), weights(whole)) <= 1e-5
    steps_split, steps_whole = read_jsonl(split / "metrics.jsonl"), read_jsonl(whole / "metrics.jsonl")
    for a, b in zip(steps_split, steps_whole):  # figures of the whole step, reduced over the ranks
        for key in ("reward", "completions/mean_length", "frac_reward_zero_std", "kl", "entropy", "loss", "grad_norm",
                    "policy_loss", "entropy/threshold"):  # fmt: skip
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-7), (a["step"], key)
    assert [r["step"] for r in steps_split if "loss" in r] == [1, 2, 3]  # rank 0 alone wrote the log


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_killed_two_rank_run_resumes_on_two_ranks_and_on_one(mode, llama_path, tmp_path):
    """kill -9 of the whole launch (torchrun and both ranks) in step 3, after the checkpoint of step 2: the run
    resumed on 2 ranks ends where the straight run ends; the same checkpoint resumed in one process continues
    with the same data and draws. In small shards: a ddp checkpoint's weights are an index and shards; under fsdp
    the final model is written tensor by tensor, in the files one process writes, rank 0 never holding it whole."""
    reward = {"reward_funcs": ["helpers:digit_share_or_kill"]}
    config = write_config(tmp_path, llama_path, max_steps=4, save_every=2, distributed=mode, **reward, **SMALL_SHARDS)
    straight = one_process(config, tmp_path / "straight")

    # the reward function's 3rd call on a rank is in step 3: it SIGKILLs the launch's process group
    killed = launch(config, env={KILL_AT_CALL: "3"}, check=False)
    assert killed.returncode != 0
    run = tmp_path / "run"
    assert [step for step, _ in list_checkpoints(run)] == [2]
    assert (run / "checkpoint-2" / "shards").is_dir() == (mode == "fsdp")  # FSDP's: torch.distributed.checkpoint
    assert len(weight_files(run / "checkpoint-2")) == (5 if mode == "ddp" else 0)  # ddp's: save_pretrained's shards
    assert max(r["step"] for r in read_jsonl(run / "metrics.jsonl")) == 2  # it died in step 3
    one_rank = tmp_path / "one-rank"
    shutil.copytree(run, one_rank)

    launch(config, "--resume-from-checkpoint", "latest")
    assert completions(run) == completions(straight)
    assert max_relative_difference(weights(run), weights(straight)) <= 1e-5
    files = [[p.name for p in weight_files(folder / "model")] for folder in (run, straight)]
    assert files[0] == files[1] and len(files[0]) == 5  # the layout one process writes, its index too
    assert (run / "model" / INDEX_NAME).read_text() == (straight / "model" / INDEX_NAME).read_text()
    written = json.loads((run / "model" / PROVENANCE).read_text()).get("weights")
    if mode == "fsdp":  # the streaming writer's own count: at most one 40 KB shard of the 143 KB held at once
        assert written["files"] == 5 and written["largest_held"] <= 40_000 < written["total_size"] / 3

    one_process(config, one_rank, resume_from_checkpoint="latest")
    assert completions(one_rank) == completions(straight)
    assert max_relative_difference(weights(one_rank), weights(straight)) <= 1e-5


def test_dynamic_sampling_on_two_ranks_is_one_process(llama_path, tmp_path):
    """Dynamic sampling chooses on every rank from the whole round's rewards and deals the kept groups out (a group
    sampled on one rank may be trained on the other): 2 ranks train what one process trains, under `dapo`'s token
    count and a batch-level advantage scale, both over the kept batch. Under FSDP, which also gathers the sharded
    weights for each of a step's generation rounds and needs every rank to train as many rows."""
    config = write_config(
        tmp_path, llama_path, distributed="fsdp", reward_funcs=["helpers:flat_when_even"], dynamic_sampling=True,
        max_dynamic_sampling_rounds=3, loss_type="dapo", scale_rewards="batch",
    )  # fmt: skip
    launch(config)
    split, whole = tmp_path / "run", one_process(config, tmp_path / "whole")
    assert completions(split) == completions(whole)
    assert max_relative_difference(weights(split), weights(whole)) <= 1e-5
    steps_split = [r for r in read_jsonl(split / "metrics.jsonl") if "loss" in r]
    steps_whole = [r for r in read_jsonl(whole / "metrics.jsonl") if "loss" in r]
    assert sum(r["dynamic_sampling/groups_dropped"] for r in steps_whole) > 0  # flat groups were replaced
    for a, b in zip(steps_split, steps_whole, strict=True):
        for key in [k for k in b if k.startswith("dynamic_sampling/")] + ["reward", "frac_reward_zero_std", "loss"]:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-7, nan_ok=True), (b["step"], key)


def test_a_step_that_does_not_split_over_the_ranks_is_refused(llama_path, tmp_path):
    proc = launch(write_config(tmp_path, llama_path, prompts_per_step=3), check=False)
    assert proc.returncode != 0
    assert "`prompts_per_step` = 3 does not split over 2 ranks" in proc.stdout + proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before any work
