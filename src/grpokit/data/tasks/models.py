"""Tiny causal LMs built from standard `transformers` configs (Llama, Qwen2), for offline tests and demos.

The models are ordinary `LlamaForCausalLM` / `Qwen2ForCausalLM` instances, so everything grpokit does
to them (KV-cache decoding, `get_decoder()`, `get_output_embeddings()`, `save_pretrained`) is what it
does to a real checkpoint of the same family.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel, Qwen2Config

CONFIGS = {"llama": LlamaConfig, "qwen2": Qwen2Config}
NUM_HEADS = 4  # attention heads of every tiny model `grpokit init` / `demo` build


def check_sizes(hidden_size: int, num_layers: int, num_heads: int = NUM_HEADS) -> None:
    """Sizes a tiny model can be built and run with, refused by the names `init` and `demo` take (transformers would
    fail later, in a traceback: a width not divisible by the heads, 0 ** -x in the rotary frequencies, or a folder
    with -1 layers saved without a word). Each head's width must be even: rotary positions rotate pairs."""
    from grpokit.core.types import ConfigError

    if num_layers < 1:
        raise ConfigError(f"config field `num_layers` must be >= 1, got {num_layers}")
    if hidden_size < 1 or hidden_size % (2 * num_heads):
        raise ConfigError(
            f"config field `hidden_size` must be a positive multiple of {2 * num_heads} ({num_heads} attention heads, "
            f"each of an even width for the rotary positions), got {hidden_size}"
        )


def tiny_model(
    tokenizer,
    arch: str = "llama",
    *,
    hidden_size: int = 64,
    intermediate_size: int | None = None,
    num_layers: int = 2,
    num_heads: int = NUM_HEADS,
    num_kv_heads: int | None = None,
    max_position_embeddings: int = 128,
    seed: int = 0,
    **config_kwargs: Any,
) -> PreTrainedModel:
    """A randomly initialised float32 causal LM sized to `tokenizer`, with tied input/output embeddings.

    Args:
        tokenizer: supplies the vocabulary size and the bos/eos/pad ids written into the config.
        arch: "llama" or "qwen2".
        intermediate_size: MLP width; None -> 4 * hidden_size.
        num_kv_heads: key/value heads (grouped-query attention when < num_heads); None -> num_heads.
        seed: the same seed gives bit-identical weights; the global torch RNG is left untouched.
        **config_kwargs: passed to the config class as-is (e.g. rope_theta, attn_implementation).

    Note: transformers gives the embedding `padding_idx = pad_token_id`, so that row starts at zero;
    with a pad == eos tokenizer that is the EOS row (it still learns through the tied output head).
    """
    if arch not in CONFIGS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {sorted(CONFIGS)}")
    check_sizes(hidden_size, num_layers, num_heads)
    config = CONFIGS[arch](
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size if intermediate_size is None else intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads if num_kv_heads is None else num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **config_kwargs,
    )
    # fork_rng: seeding must not disturb the caller's global RNG stream (seeded rollouts, resume).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model
