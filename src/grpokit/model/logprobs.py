"""Per-token logprobs of completions under a causal LM, chunked over the vocabulary.

Row layout: prompts LEFT-padded (N, Tp), completions RIGHT-padded (N, Tc). The completion mask is always passed in,
never derived from `ids != pad`, because pad may equal eos."""

from __future__ import annotations

import torch

from grpokit.core import algo, packing
from grpokit.model.attention import use_grpokit_attention


def completion_logprobs(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    temperature: float,
    chunk_size: int = 256,
    with_entropy: bool = False,
    entropy_grad: bool = False,
    layout: str = "padded",
    group_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (N, Tc) float32 of the completion tokens under logits / temperature, 0 where masked.

    Runs the decoder body once on the rows laid out as `layout` (`grpokit.core.packing`: padded, packed or
    shared_prefix, the last with `group_ids` (N,)) and applies the LM head only to the hidden states that
    predict a real completion token, in chunks of `chunk_size` tokens. The packed layouts run their attention
    through `segment_attention`, whatever attention the model was loaded with. `with_entropy`: also the entropies
    (N, Tc) of the token distributions, a metric unless `entropy_grad` (a loss term: `algo.logprobs_from_hidden`).
    """
    hidden, lay = completion_hidden(model, prompt_ids, prompt_mask, completion_ids, completion_mask, layout, group_ids)
    logp_flat, entropy_flat = algo.logprobs_from_hidden(
        hidden,
        model.get_output_embeddings(),
        lay.targets,  # (M,)
        temperature=temperature,
        chunk_size=chunk_size,
        with_entropy=with_entropy,
        entropy_grad=entropy_grad,
    )
    with_entropy = with_entropy or entropy_grad
    zeros = torch.zeros(lay.valid.shape, dtype=torch.float32, device=hidden.device)  # (N, Tc)
    logp = zeros.masked_scatter(lay.valid, logp_flat.float())  # (N, Tc)
    entropy = zeros.masked_scatter(lay.valid, entropy_flat.float()) if with_entropy else None  # (N, Tc)
    return logp, entropy


def completion_hidden(model, prompt_ids, prompt_mask, completion_ids, completion_mask, layout, group_ids):
    """The decoder's last hidden states (M, H) at the positions that predict a real completion token (position t
    predicts token t + 1), for the rows laid out as `layout`; -> (hidden, the layout: `valid` (N, Tc) places them)."""
    if prompt_ids.shape[1] == 0 or not bool(prompt_mask.bool().any(-1).all()):
        raise ValueError("completion_logprobs needs at least one prompt token (e.g. BOS) per row")
    decoder = model.get_decoder()
    lay = packing.build(layout, prompt_ids, prompt_mask, completion_ids, completion_mask, group_ids)
    extra = {}
    if lay.segments is not None:
        use_grpokit_attention(model)
        extra["grpokit_segments"] = lay.segments  # transformers passes extra kwargs down to every attention call
    out = decoder(
        input_ids=lay.input_ids,
        attention_mask=lay.attention_mask,
        position_ids=lay.position_ids,
        use_cache=False,
        **extra,
    )
    return out.last_hidden_state[lay.source_row, lay.source_pos], lay  # (M, H)
