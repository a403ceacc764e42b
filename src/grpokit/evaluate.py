"""Held-out accuracy of a model under a gold checker, greedy and sampled, through the run's sampler."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from grpokit.data import encode_prompts
from grpokit.sampler import Sampler, SamplingParams


def completions_for(
    sampler: Sampler,
    tokenizer: Any,
    prompts: list[Any],
    *,
    temperature: float,
    max_new_tokens: int,
    seed: int,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    max_prompt_length: int = 256,
) -> list[str]:
    """One completion per prompt (temperature 0: greedy), decoded without special tokens. The draws use a
    generator of their own, seeded with `seed`, so evaluating never moves the training RNG streams."""
    generator = torch.Generator(device=device).manual_seed(seed)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature)
    ids = encode_prompts(tokenizer, prompts, max_prompt_length).ids
    texts: list[str] = []
    for start in range(0, len(ids), batch_size):
        rollout = sampler.generate(
            ids[start : start + batch_size], num_generations=1, params=params, generator=generator
        )
        texts += decode_completions(tokenizer, rollout.completion_ids, rollout.completion_mask)
    return texts


def decode_completions(tokenizer: Any, completion_ids: torch.Tensor, completion_mask: torch.Tensor) -> list[str]:
    """Masked tokens (after EOS) are dropped before decoding; special tokens such as EOS are skipped."""
    return [
        tokenizer.decode(ids[mask.bool()].tolist(), skip_special_tokens=True)
        for ids, mask in zip(completion_ids, completion_mask)
    ]


def accuracy(
    sampler: Sampler,
    tokenizer: Any,
    rows: list[dict[str, Any]],
    is_correct: Callable[[str, str], bool],
    *,
    temperature: float,
    max_new_tokens: int,
    seed: int = 0,
    device: torch.device | str = "cpu",
    prompt_column: str = "prompt",
    max_prompt_length: int = 256,
) -> float:
    """Fraction of rows whose completion the gold checker accepts against the row's `answer`."""
    texts = completions_for(
        sampler,
        tokenizer,
        [r[prompt_column] for r in rows],
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        seed=seed,
        device=device,
        max_prompt_length=max_prompt_length,
    )
    return sum(is_correct(t, str(r["answer"])) for t, r in zip(texts, rows)) / max(1, len(rows))


def heldout_accuracy(
    sampler: Sampler,
    tokenizer: Any,
    rows: list[dict[str, Any]],
    is_correct: Callable[[str, str], bool],
    cfg: Any,
    device: torch.device | str,
) -> dict[str, float]:
    """{eval/accuracy_greedy, eval/accuracy_sampled} of a GRPO run's held-out rows; {} when they have no
    `answer` to check."""
    if not rows or "answer" not in rows[0]:
        return {}
    kwargs = {
        "max_new_tokens": cfg.max_completion_length,
        "seed": cfg.seed,
        "device": device,
        "prompt_column": cfg.prompt_column,
        "max_prompt_length": cfg.max_prompt_length,
    }
    return {
        "eval/accuracy_greedy": accuracy(sampler, tokenizer, rows, is_correct, temperature=0.0, **kwargs),
        "eval/accuracy_sampled": accuracy(
            sampler, tokenizer, rows, is_correct, temperature=cfg.eval_temperature, **kwargs
        ),
    }
