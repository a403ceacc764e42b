"""Shared pieces of the trainer-level tests: tiny saved models, a small GRPO config, a recording sampler."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from grpokit.config import GRPOConfig, SFTConfig
from grpokit.data.tasks import AdditionTask, build_char_tokenizer, tiny_model
from grpokit.rewards.functions import gold_reward
from grpokit.rollout.sampler import KVCacheSampler

HIDDEN = 32
STEP_KEYS = (
    "reward",
    "reward_std",
    "rewards/accuracy/mean",
    "frac_reward_zero_std",
    "entropy",
    "completions/mean_length",
    "completions/clipped_ratio",
    "clip_ratio/low_mean",
    "clip_ratio/high_mean",
    "grad_norm",
    "learning_rate",
    "time/rollout",
    "time/update",
    "tokens_per_s",
)


def digit_share(prompts, completions, **_):
    """A graded reward that (almost) always differs inside a group, so advantages and gradients are not 0."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) + 0.05 * len(c) for c in completions]


def flat_when_even(prompts, completions, **_):
    """`digit_share`, except that a prompt whose digits add up to an even number gets 0.5 for every completion: its
    group is flat, decided by the prompt alone (dynamic sampling's tests; importable by launched ranks)."""
    graded = digit_share(prompts, completions)
    return [0.5 if sum(int(ch) for ch in p if ch.isdigit()) % 2 == 0 else r for p, r in zip(prompts, graded)]


KILL_AT_CALL = "GRPOKIT_TEST_KILL_AT_CALL"
_calls = 0


def digit_share_or_kill(prompts, completions, **kwargs):
    """`digit_share`, except that its call number $GRPOKIT_TEST_KILL_AT_CALL in a process SIGKILLs the process
    group (a launch started in a session of its own: torchrun and every rank), as `kill -9` would."""
    global _calls
    _calls += 1
    if os.environ.get(KILL_AT_CALL) == str(_calls):
        os.killpg(os.getpgrp(), signal.SIGKILL)
    return digit_share(prompts, completions)


STOP_LAUNCH_AT_CALL = "GRPOKIT_TEST_STOP_LAUNCH_AT_CALL"
FAULT_AT_CALL = "GRPOKIT_TEST_FAULT_AT_CALL"
_launch_calls = 0


def digit_share_with_faults(prompts, completions, **_):
    """`digit_share` on each rank of a torchrun launch, with a fault at a chosen call of the process:
    - $GRPOKIT_TEST_STOP_LAUNCH_AT_CALL = "N": rank 0's call N sends SIGTERM to torchrun (this process's parent), as
      a cluster does before preemption, and returns once the SIGTERM torchrun forwards has reached this rank (so
      the step the launch stops at does not depend on how fast torchrun forwards it);
    - $GRPOKIT_TEST_FAULT_AT_CALL = "N:R:kill": rank R's call N SIGKILLs that rank alone (an out-of-memory kill, a
      crashed GPU); "N:R:hang": rank R stops answering (a hang, a node lost without its connections closing) until
      torchrun's SIGTERM ends it; "N:R:raise": rank R's reward raises (an error only one rank meets)."""
    global _launch_calls
    _launch_calls += 1
    rank, call = os.environ.get("RANK"), str(_launch_calls)
    if rank == "0" and os.environ.get(STOP_LAUNCH_AT_CALL) == call:
        # Any thread of the process may take the forwarded signal (a reward's watchdog, gloo's); Python then runs the
        # run's handler in this, the main thread, at its next instruction. The byte Python writes to a wakeup pipe
        # for each signal it handles wakes this thread for it, wherever the signal landed.
        wake, wrote = os.pipe()
        os.set_blocking(wrote, False)
        before = signal.set_wakeup_fd(wrote)
        try:
            os.kill(os.getppid(), signal.SIGTERM)
            while os.read(wake, 1)[0] != signal.SIGTERM:
                pass
        finally:
            signal.set_wakeup_fd(before)
            os.close(wake)
            os.close(wrote)
    fault = os.environ.get(FAULT_AT_CALL, "::").split(":")
    if fault[:2] == [call, rank] and fault[2] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if fault[:2] == [call, rank] and fault[2] == "raise":
        raise ValueError(f"a fault on rank {rank} alone")
    if fault[:2] == [call, rank] and fault[2] == "hang":
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # torchrun's, once another rank has failed, ends this rank
        while True:
            signal.pause()
    return digit_share(prompts, completions)


def with_digit_share():
    """`accuracy` (the task's gold checker) plus the graded reward."""
    return [("accuracy", gold_reward(AdditionTask().is_correct)), ("digit_share", digit_share)]


def llama():
    """A fresh tiny Llama in memory (hidden HIDDEN, seed 0), to hand a stage as `model=`."""
    return tiny_model(build_char_tokenizer(), "llama", hidden_size=HIDDEN, seed=0)


def sft_rows(n: int = 8) -> list[dict[str, str]]:
    return [{"prompt": r["prompt"], "completion": r["answer"]} for r in AdditionTask().rows(n, seed=1)]


def sft_config(out, **overrides) -> SFTConfig:
    """An SFT config for a model and rows passed in: no model path, no task, no data file."""
    values = {
        "model": "",
        "task": None,
        "train_data": None,
        "output_dir": str(out),
        "batch_size": 4,
        "max_completion_length": 8,
        "device": "cpu",
        "progress": False,
        "seed": 0,
    }
    return SFTConfig(**{**values, **overrides})


def text_rows(n=8):
    """N addition rows as data handed in (`i+i=`, its answer as text)."""
    return [{"prompt": f"{i}+{i}=", "answer": str(2 * i)} for i in range(n)]


def module_level_reward(completions, **_):
    """Importable as helpers:module_level_reward, so the saved config can name it."""
    return [float(len(c)) for c in completions]


def save_tiny(path: Path, arch: str = "qwen2", *, pad_equals_eos: bool = False, seed: int = 0) -> Path:
    tokenizer = build_char_tokenizer(pad_equals_eos=pad_equals_eos)
    tiny_model(tokenizer, arch, hidden_size=HIDDEN, seed=seed).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_tiny_reward_model(folder: Path, chars: str | None = None, name: str = "reward_model") -> Path:
    """FOLDER/NAME, a reward model: a tiny Llama with a random, visible score head (rewards differ clearly
    between texts), with a character tokenizer over `chars` (default: grpokit's own alphabet)."""
    import torch

    from grpokit.model.loading import load_reward_model
    from grpokit.runtime.checkpoint import save_model

    tokenizer = build_char_tokenizer(chars) if chars else build_char_tokenizer()
    lm = save_model(tiny_model(tokenizer, "llama", hidden_size=HIDDEN, seed=0), tokenizer, folder / "llama")
    torch.manual_seed(0)
    model = load_reward_model(lm, "cpu", torch.float32, pad_token_id=tokenizer.pad_token_id, new_head=True)
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)
    return save_model(model, tokenizer, folder / name)


def tiny_lm(
    arch: str = "llama", attn: str = "sdpa", *, pad_token_id: int = 0, eos_token_id: int = 1, bos_token_id: int = 2
):
    """A float32 Llama / Qwen2 on a bare 32-token vocabulary (ids only, no tokenizer), grouped-query attention,
    seeded: for tests of the forward's arithmetic."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cls, config_cls = {"llama": (LlamaForCausalLM, LlamaConfig), "qwen2": (Qwen2ForCausalLM, Qwen2Config)}[arch]
    config = config_cls(
        vocab_size=32,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        bos_token_id=bos_token_id,
    )
    torch.manual_seed(0)
    model = cls(config).float()
    model.set_attn_implementation(attn)
    return model


def config(model, out: Path, **overrides) -> GRPOConfig:
    values = {
        "model": str(model),
        "output_dir": str(out),
        "max_steps": 2,
        "prompts_per_step": 2,
        "num_generations": 4,
        "max_completion_length": 8,
        "num_eval_prompts": 0,
        "learning_rate": 1e-3,
        "progress": False,
        "tensorboard": False,
        "seed": 0,
    }
    if "train_data" not in overrides:
        values["task"] = "addition"
    values = {**values, **overrides}
    if values.get("task") is not None:  # (the task's row count; with rows from elsewhere it would be refused)
        values.setdefault("num_train_prompts", 32)
    return GRPOConfig(**values)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def step_rows(out: Path) -> list[dict]:
    return [r for r in read_jsonl(out / "metrics.jsonl") if "reward" in r]


class RecordingSampler(KVCacheSampler):
    """The in-process sampler, keeping every Rollout it returns (handed to the trainer as `sampler=`)."""

    def __init__(self, tokenizer=None, **kwargs):
        super().__init__(tokenizer if tokenizer is not None else build_char_tokenizer(), **kwargs)
        self.rollouts = []

    def generate(self, *args, **kwargs):
        self.rollouts.append(super().generate(*args, **kwargs))
        return self.rollouts[-1]


def overriding(args: list, *extra) -> list[str]:
    """`args` then `extra`, where an option in `extra` replaces the same option (and its values) in `args`: grpokit
    refuses a field given twice on one command line, so a test helper's defaults give way to the test's own."""

    def name(arg) -> str | None:
        arg = str(arg)
        if not arg.startswith("--"):
            return None
        key = arg[2:].split("=", 1)[0].replace("_", "-")
        return key[3:] if key.startswith("no-") else key

    replaced = {name(arg) for arg in extra} - {None}
    kept, dropping = [], False
    for arg in args:
        if name(arg) is not None:
            dropping = name(arg) in replaced
        if not dropping:
            kept.append(arg)
    return [*kept, *extra]


def cli_run(capsys, *argv) -> tuple[int, str]:
    """`grpokit ARGV...` in this process (the CLI's own entry point): its exit code and what it wrote to stderr."""
    from grpokit.cli import main

    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def tiny_run_args(model, out, *extra) -> list[str]:
    """The options of a one-step GRPO run of the tiny model on the addition task into `out`; `extra` replace them
    (`--train-data` replaces the task and its row count)."""
    task = [] if "--train-data" in map(str, extra) else ["--task", "addition", "--num-train-prompts", "8"]
    return overriding([
        "--model", model, *task, "--output-dir", out, "--max-steps", "1", "--prompts-per-step", "2",
        "--num-generations", "2", "--max-completion-length", "4", "--num-eval-prompts", "0", "--no-progress",
        "--no-tensorboard",
    ], *extra)  # fmt: skip


def require_vllm() -> None:
    """Skip the calling test module when vLLM is not installed, unless `scripts/setup.sh --vllm` installed it into this
    environment (its marker `grpokit-vllm` beside the interpreter's prefix): then a vLLM that fails to import fails the
    module, so a broken install never passes as skipped tests."""
    import sys

    import pytest

    from grpokit.rollout.vllm import import_vllm

    try:
        import_vllm()
    except ImportError as err:
        if (Path(sys.prefix) / "grpokit-vllm").exists():
            pytest.fail(f"scripts/setup.sh --vllm installed vLLM here, but it does not import: {err}", pytrace=False)
        pytest.skip("vLLM is not installed (bash scripts/setup.sh --vllm)", allow_module_level=True)


def cpu_kind() -> str:
    """The kind of CPU a seeded record's exact floats belong to: the vendor and the vector width torch's kernels
    dispatch on. The same code rounds differently on an AMD and an Intel CPU of the same width (the BLAS each gets),
    so a record holds one set of figures per kind."""
    import torch

    vendor = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                vendor = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{vendor} {torch.backends.cpu.get_cpu_capability()}"


def seeded_record(path: Path, name: str, recorder: str):
    """`name`'s record for this kind of CPU; a kind with none is skipped, saying how to record it (`recorder`)."""
    import pytest

    records = json.loads(path.read_text())
    kind = cpu_kind()
    if kind not in records:
        pytest.skip(f"{path.name} has no figures for this CPU ({kind}; it has {', '.join(records)}): `{recorder}`")
    return records[kind][name]


def write_seeded_record(path: Path, record: dict) -> str:
    """Writes `record` as this CPU kind's, keeping the other kinds' figures; returns the kind."""
    records = json.loads(path.read_text()) if path.exists() else {}
    kind = cpu_kind()
    records[kind] = record
    path.write_text(json.dumps(records, indent=1) + "\n")
    return kind


if __name__ == "__main__":  # `torchrun ... -m helpers FOLDER ARGS...`: `grpokit ARGS` on each rank, its exit code kept
    import sys

    from grpokit.cli import main

    code = 1  # (an error raised out of main: Python's exit code)
    try:
        code = main(sys.argv[2:])
    finally:
        Path(sys.argv[1], f"exit-{os.environ['RANK']}").write_text(str(code))
    sys.exit(code)
