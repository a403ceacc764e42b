"""The seeded records of the other training stages (beside tests/loss_record.json, GRPO's): a short seeded CPU run
of PPO (a critic, beta > 0, mu = 2), of SFT and of reward-model training reproduces its recorded metrics exactly,
and the sum of its final weights to the last bit (SFT and the reward model log every 10 steps; the weights see
every step). One set of figures per kind of CPU, as tests/loss_record.json (`helpers.cpu_kind`).

A refactor keeps tests/stage_records.json unchanged. An intended change of the numbers re-records it
(`python tests/test_stage_records.py`) and its commit says why.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from helpers import seeded_record, write_seeded_record

from grpokit.config import PPOConfig, RewardModelConfig, SFTConfig
from grpokit.data.tasks import build_char_tokenizer, tiny_model
from grpokit.stages.ppo import PPOTrainer
from grpokit.stages.reward_model import train_reward_model
from grpokit.stages.sft import train_sft

RECORD = Path(__file__).with_name("stage_records.json")


def graded_reward(prompts, completions, **_):
    """Differs inside almost every group, so every step has advantages and a gradient (as the GRPO record's)."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) + 0.05 * len(c) for c in completions]


def common(output_dir: Path) -> dict:
    return {"task": "addition", "output_dir": str(output_dir), "progress": False, "seed": 0, "num_threads": 1}


def weights_sum(folder: Path) -> float:
    """The float64 sum of every weight saved in `folder`: any change of any step moves it."""
    from safetensors.torch import load_file

    tensors = load_file(folder / "model.safetensors")
    return float(sum(t.double().sum() for _, t in sorted(tensors.items())))


def logged(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def ppo(output_dir: Path) -> dict:
    tokenizer = build_char_tokenizer()
    model = tiny_model(tokenizer, "llama", hidden_size=32, seed=0)
    cfg = PPOConfig(**common(output_dir), max_steps=6, prompts_per_step=4, num_generations=2,
                    max_completion_length=8, num_train_prompts=64, num_eval_prompts=0, learning_rate=1e-3,
                    tensorboard=False, beta=0.04, num_iterations=2)  # fmt: skip
    PPOTrainer(cfg, model=model, tokenizer=tokenizer, reward_funcs=[("graded", graded_reward)]).train()
    keys = ("loss", "reward", "grad_norm", "kl", "value_loss", "critic/grad_norm")
    rows = [{"step": r["step"], **{k: r[k] for k in keys if k in r}} for r in logged(output_dir) if "loss" in r]
    return {"rows": rows, "weights_sum": weights_sum(output_dir / "model")}


def sft(output_dir: Path) -> dict:
    tokenizer = build_char_tokenizer()
    model = tiny_model(tokenizer, "llama", hidden_size=32, seed=0)
    cfg = SFTConfig(**common(output_dir), max_steps=20, num_train_prompts=64, batch_size=8, max_completion_length=4)
    folder = train_sft(cfg, model=model, tokenizer=tokenizer)
    return {"rows": logged(output_dir), "weights_sum": weights_sum(folder)}


def reward_model(output_dir: Path) -> dict:
    from transformers import LlamaForSequenceClassification

    tokenizer = build_char_tokenizer()
    body = tiny_model(tokenizer, "llama", hidden_size=32, seed=0)
    config = body.config.__class__(**{**body.config.to_dict(), "num_labels": 1, "pad_token_id": tokenizer.pad_token_id})
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config)
    cfg = RewardModelConfig(**common(output_dir), max_steps=20, num_train_pairs=256, num_eval_pairs=32, batch_size=8,
                            max_completion_length=4, learning_rate=1e-3)  # fmt: skip
    result = train_reward_model(cfg, model=model, tokenizer=tokenizer)
    return {"rows": logged(output_dir), "weights_sum": weights_sum(result.model_dir)}


STAGES = {"ppo_beta_mu2": ppo, "sft": sft, "reward_model": reward_model}


@pytest.mark.parametrize("name", list(STAGES))
def test_seeded_stage_reproduces_its_record(name, tmp_path):
    recorded = seeded_record(RECORD, name, "python tests/test_stage_records.py")
    assert recorded["rows"], name
    assert STAGES[name](tmp_path / name) == recorded  # exact: every logged number, and the weights to the last bit


if __name__ == "__main__":  # re-record: only for an intended change, said in the commit
    import tempfile

    torch.set_num_threads(1)  # as the test runs (conftest), so the sums happen in the same order
    with tempfile.TemporaryDirectory() as tmp:
        record = {name: make(Path(tmp) / name) for name, make in STAGES.items()}
    kind = write_seeded_record(RECORD, record)
    print(f"wrote {RECORD} for {kind}", file=sys.stderr)
