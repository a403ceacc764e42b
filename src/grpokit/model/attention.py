"""grpokit's attention kernel, registered with transformers: plain single-query attention for the
sampler's decode steps, and attention within segments for packed training rows (`core.packing`)."""

from __future__ import annotations

import sys

import torch

ATTENTION_PREFIX = "grpokit:"


def use_grpokit_attention(model) -> None:
    """Route the model's attention through grpokit's own where it is cheaper, the loaded one elsewhere:
    a forward that passes `grpokit_segments` (the packed layouts) -> `segment_attention`; a single-query
    decode step -> `single_query_attention`; anything else -> the attention the model was loaded with.

    Each attention layer looks its function up by `config._attn_implementation` at every call, also when
    gradient checkpointing recomputes it in the backward, so the switch is made once, for good, under the
    name "grpokit:<loaded>", whose mask function is the loaded one's. transformers does not write
    `_attn_implementation` into a saved config.json, so a saved model is as it was loaded.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    config = model.get_decoder().config if hasattr(model, "get_decoder") else model.config
    loaded = config._attn_implementation or "eager"
    if loaded.startswith(ATTENTION_PREFIX):
        return
    name = ATTENTION_PREFIX + loaded
    if name not in AttentionInterface._global_mapping:
        registered = AttentionInterface._global_mapping.get(loaded)  # None for eager: each model file has its own

        def attention(module, query, key, value, attention_mask, **kwargs):
            if kwargs.get("grpokit_segments") is not None:
                return segment_attention(module, query, key, value, attention_mask, **kwargs)
            if _is_plain_single_query(module, query, key, attention_mask, kwargs):
                return single_query_attention(query, key, value, attention_mask, kwargs.get("scaling")), None
            fn = registered or sys.modules[type(module).__module__].eager_attention_forward
            return fn(module, query, key, value, attention_mask, **kwargs)

        AttentionInterface.register(name, attention)
        if loaded in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
            AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS._global_mapping[loaded])
    config._attn_implementation = name


def _beyond_plain_attention(kwargs, key_length: int) -> list[str]:
    """What a layer asks of its attention that softmax(q k^T * scale) v over the given keys does not do:
    softcapping, attention sinks, a position bias, a sliding window shorter than the keys (one that holds
    them all changes nothing). grpokit's own attention functions compute only the plain kind."""
    asked = [k for k in ("softcap", "s_aux", "position_bias") if kwargs.get(k) is not None]
    window = kwargs.get("sliding_window")
    return asked + (["sliding_window"] if window is not None and key_length > window else [])


def _is_plain_single_query(module, query, key, attention_mask, kwargs) -> bool:
    """A decode step that two matrix products compute exactly: one query per row, no dropout in effect,
    nothing beyond plain attention (`_beyond_plain_attention`), a boolean or additive mask."""
    if query.shape[2] != 1 or query.shape[1] % key.shape[1] or kwargs.get("scaling") is None:
        return False
    if (module.training and kwargs.get("dropout", 0.0) > 0) or _beyond_plain_attention(kwargs, key.shape[2]):
        return False
    return attention_mask is None or attention_mask.dim() == 4


def single_query_attention(query, key, value, mask, scaling: float) -> torch.Tensor:
    """One query per row over its cached keys, as two matrix products: on a CPU ~3x faster than the sdpa
    kernel at decode shapes (a fifth of a tiny model's decode step went to it).
    query (N, Hq, 1, D), key / value (N, Hkv, T, D), mask (N, 1, 1, >=T) bool (True = attend) or additive
    -> (N, 1, Hq, D)."""
    n, hq, _, d = query.shape
    hkv, t = key.shape[1], key.shape[2]
    q = query.reshape(n, hkv, hq // hkv, d)  # (N, Hkv, rep, D): the query heads that share a kv head
    scores = torch.matmul(q, key.transpose(-1, -2)) * scaling  # (N, Hkv, rep, T)
    if mask is not None:
        mask = mask[..., :t]
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = scores.softmax(-1, dtype=torch.float32).to(value.dtype)  # (N, Hkv, rep, T)
    return torch.matmul(probs, value).reshape(n, 1, hq, d)  # (N, 1, Hq, D)


def segment_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention of a packed (1, L) sequence over its `grpokit_segments` (packing.Segments): the queries and
    keys of each run gathered into (R, heads, Qm / Km, D) and attended in one scaled_dot_product_attention
    call, then put back in packed order. A transformers attention function:
    query (1, Hq, L, D), key / value (1, Hkv, L, D) -> ((1, L, Hq, D), None)."""
    seg = kwargs.get("grpokit_segments")
    if seg is None:
        raise ValueError("segment_attention needs the grpokit_segments of a packed layout")
    runs, qm = seg.q_index.shape
    km = seg.k_index.shape[1]
    unsupported = _beyond_plain_attention(kwargs, km)
    if unsupported:
        raise ValueError(
            f"training_forward packed / shared_prefix cannot attend with this model's {unsupported[0]} "
            f"({type(module).__name__}); use training_forward: padded"
        )
    if query.shape[0] != 1:
        raise ValueError(f"segment_attention takes one packed sequence, got a batch of {query.shape[0]}")
    # index_select (its backward is an index_add) over the flattened slots, then to (R, heads, slots, D)
    q = query[0].index_select(1, seg.q_index.flatten()).unflatten(1, (runs, qm)).transpose(0, 1)
    k = key[0].index_select(1, seg.k_index.flatten()).unflatten(1, (runs, km)).transpose(0, 1)
    v = value[0].index_select(1, seg.k_index.flatten()).unflatten(1, (runs, km)).transpose(0, 1)
    out = torch.nn.functional.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=seg.allowed,
        dropout_p=dropout,
        scale=scaling,
        enable_gqa=q.shape[1] != k.shape[1],
    )  # (R, Hq, Qm, D)
    out = out.transpose(1, 2).flatten(0, 1).index_select(0, seg.order)  # (L, Hq, D)
    return out[None], None
