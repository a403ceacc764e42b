"""Held-out accuracy of a model under a gold checker, greedy and sampled."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from grpokit.data import encode_prompts
from grpokit.rollout import SamplingParams, generate


def completions_for(
    model: Any,
    tokenizer: Any,
    prompts: list[Any],
    *,
    temperature: float,
    max_new_tokens: int,
    seed: int,
    batch_size: int = 256,
    max_prompt_length: int = 256,
) -> list[str]:
    """One completion per prompt (temperature 0: greedy), decoded without special tokens."""
    generator = torch.Generator(device=model.device).manual_seed(seed)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature)
    _, ids, _ = encode_prompts(tokenizer, prompts, max_prompt_length)
    texts: list[str] = []
    for start in range(0, len(ids), batch_size):
        rollout = generate(
            model,
            ids[start : start + batch_size],
            num_generations=1,
            params=params,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            generator=generator,
            tokenizer=tokenizer,
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
    model: Any,
    tokenizer: Any,
    rows: list[dict[str, Any]],
    is_correct: Callable[[str, str], bool],
    *,
    temperature: float,
    max_new_tokens: int,
    seed: int = 0,
    prompt_column: str = "prompt",
    max_prompt_length: int = 256,
) -> float:
    """Fraction of rows whose completion the gold checker accepts against the row's `answer`."""
    texts = completions_for(
        model,
        tokenizer,
        [r[prompt_column] for r in rows],
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        seed=seed,
        max_prompt_length=max_prompt_length,
    )
    return sum(is_correct(t, str(r["answer"])) for t, r in zip(texts, rows)) / max(1, len(rows))
