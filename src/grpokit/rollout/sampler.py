"""The sampler: G completions for each of P prompts, with the logprobs the trainer will need.

The seam: a `Sampler` generates a `Rollout` for a batch of prompts, each prompt's draws seeded by an integer
(`prompt_seeds`), and receives the policy's weights once per generation step (`update_weights`, a `PolicyWeights`).
`KVCacheSampler`, the in-process one, shares the policy's module, so it has nothing to copy; an engine in another
memory loads `PolicyWeights.named_tensors()`. Training rollouts and held-out evaluation go through the same object.

GRPO (Shao et al. 2024, "DeepSeekMath", Sec. 4.1) samples a group of G outputs per question. All G
share the prompt, so the prompt is prefilled ONCE and its KV cache is repeated G times along the
batch; only the decode steps run on all N = P * G rows.

The logprob of each sampled token is taken under log_softmax(logits / temperature) on the
UNFILTERED logits (the repetition penalty, top-k, top-p and min-p only shape the draw), which is exactly
what the trainer computes from the same weights (DESIGN.md invariant 6), so old_logp can come straight
from here. The draw follows transformers' order: penalty on the raw logits, temperature, top-k, top-p, min-p.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from grpokit.core.packing import position_ids_from_mask
from grpokit.core.types import Rollout, SamplerError, kind_of
from grpokit.model.attention import use_grpokit_attention
from grpokit.model.weights import PolicyWeights


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one generation batch. Training samples at the config's `temperature`; greedy held-out evaluation
    asks for `temperature=0.0` (argmax), which an engine must take as greedy, not divide by."""

    max_new_tokens: int
    """Most completion tokens per row; a row that reaches it without ending is truncated."""
    temperature: float = 1.0
    """Logits are divided by it before softmax; 0 means greedy (argmax), logprobs then at temperature 1."""
    top_p: float = 1.0
    """Nucleus sampling (Holtzman et al. 2020): draw from the smallest set with this much mass; 1 = off."""
    top_k: int = 0
    """Draw from the k most likely tokens only; 0 = off."""
    stop_strings: tuple[str, ...] = ()
    """A row ends at the first step whose decoded completion contains one of these (needs a tokenizer)."""
    min_p: float = 0.0
    """Min-p (Nguyen et al. 2024): after top-k and top-p, drop the tokens less likely than min_p x the most likely
    one; 0 = off."""
    repetition_penalty: float = 1.0
    """A token already in the prompt or the completion so far has its raw logit divided by it (multiplied when
    negative), greedy draws included (`penalize_repeats`); 1 = off."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1] (0 = off), got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        if isinstance(self.stop_strings, str) or any(not s for s in self.stop_strings):
            raise ValueError(f"stop_strings must be a tuple of non-empty strings, got {self.stop_strings!r}")


def check_rollout(
    rollout: Any, sampler: Any, *, rows: int, vocab_size: int | None = None, prompts: list[list[int]] | None = None
) -> None:
    """What `sampler.generate` returned is a `Rollout` of `rows` rows whose tensors have the shapes, dtypes and
    token ids the trainer indexes with, and (given `prompts`, the token ids it was asked to continue) whose row
    p*G + g holds prompt p under its `prompt_mask`; otherwise a SamplerError naming the sampler. Shapes and dtypes
    cost nothing; the id range is two reductions over (N, Tc) and the prompts one look per row, once per
    generation batch. Its sampling logprobs of real tokens are numbers (else a NumericsError: the weights broke)."""
    where = f"`sampler` ({type(sampler).__name__}).generate returned"
    if not isinstance(rollout, Rollout):
        raise SamplerError(f"{where} {kind_of(rollout)}; expected a grpokit.core.types.Rollout")
    tensors = {name: getattr(rollout, name) for name in _ROLLOUT_DTYPES}
    for name, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            got = kind_of(value)
            raise SamplerError(f"{where} a Rollout whose `{name}` is {got}; expected a torch.Tensor")
    shape = tuple(rollout.completion_ids.shape)
    if len(shape) != 2 or shape[0] != rows:
        raise SamplerError(
            f"{where} `completion_ids` of shape {shape}; expected ({rows}, completion length): one row per prompt "
            "and generation (prompts x num_generations, each prompt's generations together)"
        )
    expected = {
        "completion_mask": shape,
        "sampling_logp": shape,
        "truncated": (rows,),
        "prompt_ids": (rows, None),
        "prompt_mask": tuple(rollout.prompt_ids.shape),
    }
    for name, want in expected.items():
        got = tuple(tensors[name].shape)
        if len(got) != len(want) or any(w is not None and g != w for g, w in zip(got, want)):
            wanted = ", ".join("prompt length" if w is None else str(w) for w in want)
            raise SamplerError(f"{where} `{name}` of shape {got}; expected ({wanted}), as `completion_ids` {shape}")
    for name, kinds in _ROLLOUT_DTYPES.items():
        if tensors[name].dtype not in kinds:
            allowed = " or ".join(str(k) for k in kinds)
            raise SamplerError(f"{where} `{name}` of dtype {tensors[name].dtype}; expected {allowed}")
    if rollout.loss_mask is not None:  # a subset of the real tokens, shaped like them
        loss_mask = rollout.loss_mask
        if not isinstance(loss_mask, torch.Tensor) or tuple(loss_mask.shape) != shape:
            got = tuple(loss_mask.shape) if isinstance(loss_mask, torch.Tensor) else kind_of(loss_mask)
            raise SamplerError(f"{where} `loss_mask` of shape {got}; expected {shape}, as `completion_ids`")
        if loss_mask.dtype not in _ROLLOUT_DTYPES["completion_mask"]:
            raise SamplerError(f"{where} `loss_mask` of dtype {loss_mask.dtype}; expected an integer or bool mask")
        if bool((loss_mask.bool() & ~rollout.completion_mask.bool()).any()):
            raise SamplerError(
                f"{where} a `loss_mask` that trains tokens outside `completion_mask` (padding): every trained token "
                "is a real one"
            )
    empty = (rollout.completion_mask.sum(dim=1) == 0).nonzero()
    if len(empty):
        raise SamplerError(
            f"{where} a Rollout whose row {int(empty[0])} has no completion token (its `completion_mask` is all 0; a "
            "completion holds at least the EOS that ends it, or the tokens written until it was cut)"
        )
    ids = rollout.completion_ids
    if ids.numel() and (int(ids.min()) < 0 or (vocab_size is not None and int(ids.max()) >= vocab_size)):
        bound = f" and below the model's {vocab_size} token embeddings" if vocab_size is not None else ""
        raise SamplerError(
            f"{where} completion ids from {int(ids.min())} to {int(ids.max())}; token ids are >= 0{bound}. "
            "Does the sampler use another model's tokenizer?"
        )
    if not bool(rollout.sampling_logp[rollout.completion_mask.bool()].isfinite().all()):
        from grpokit.model.policy import NumericsError

        own = type(sampler) is KVCacheSampler  # (a subclass may change what it returns)
        source = "the policy's" if own else f"`sampler` ({type(sampler).__name__})'s"
        raise NumericsError(
            f"{source} logprobs in the rollout are NaN or inf: the weights it sampled with no longer give numbers"
        )
    if prompts is not None:
        group = rows // len(prompts)
        if rollout.group_size != group:
            raise SamplerError(
                f"{where} a Rollout whose `group_size` is {rollout.group_size!r}; it was asked for num_generations = "
                f"{group} completions of each of {len(prompts)} prompts"
            )
        prompt_mask = rollout.prompt_mask.bool().cpu()
        for row, (ids_row, mask_row) in enumerate(zip(rollout.prompt_ids.cpu(), prompt_mask)):
            if ids_row[mask_row].tolist() != list(prompts[row // group]):
                raise SamplerError(
                    f"{where} a Rollout whose row {row} holds other prompt tokens (under `prompt_mask`) than prompt "
                    f"{row // group} it was given: row p*G + g must continue prompt p, its tokens unchanged"
                )


def call_generate(sampler: Any, prompt_ids: list[list[int]], rows: list[Any] | None = None, **kwargs: Any) -> Any:
    """`sampler.generate(prompt_ids, **kwargs)`, with the prompts' data `rows` for a sampler that `takes_rows` (a
    multi-turn one: they reset its environments); what it raises (an engine that died) is a SamplerError naming the
    sampler, which the run turns into a stop naming the step and its last checkpoint."""
    if rows is not None and getattr(sampler, "takes_rows", False):
        kwargs["rows"] = rows
    try:
        return sampler.generate(prompt_ids, **kwargs)
    except SamplerError:
        raise
    except (Exception, KeyboardInterrupt) as err:  # (Ctrl-C reaches the run's signal handler, not here)
        raise SamplerError(f"`sampler` ({type(sampler).__name__}).generate raised {type(err).__name__}: {err}") from err


def push_weights(sampler: Any, model: torch.nn.Module) -> None:
    """`sampler.update_weights(model)`; what it raises (an engine that died, a weight it refused) is a SamplerError
    naming the sampler, not a bare exception from inside the step."""
    try:
        sampler.update_weights(model)
    except (Exception, KeyboardInterrupt) as err:  # (Ctrl-C reaches the run's signal handler, not here)
        raise SamplerError(
            f"`sampler` ({type(sampler).__name__}).update_weights raised {type(err).__name__}: {err}"
        ) from err


_INTEGERS = (torch.int64, torch.int32)
_ROLLOUT_DTYPES = {
    "prompt_ids": _INTEGERS,
    "prompt_mask": (*_INTEGERS, torch.bool),
    "completion_ids": _INTEGERS,
    "completion_mask": (*_INTEGERS, torch.bool),
    "sampling_logp": (torch.float32, torch.float64, torch.bfloat16, torch.float16),
    "truncated": (torch.bool,),
}


SHRINK_AT = 0.25  # ended rows leave the decode batch once they are this share of it


def penalize_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """The repetition penalty (Keskar et al. 2019, CTRL) as transformers and vLLM apply it: the raw logit (N, V) of
    every token marked in `seen` (N, V) bool (present in the row's prompt or completion so far) is divided by
    `penalty` when positive and multiplied by it when negative, so a penalty > 1 makes repeats less likely."""
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)  # (N, V)
    return torch.where(seen, penalized, logits)  # (N, V)


def filter_logits(logits: torch.Tensor, *, top_k: int, top_p: float, min_p: float = 0.0) -> torch.Tensor:
    """Set to -inf every logit outside the top-k, then outside the top-p nucleus (Holtzman et al. 2020), then
    below min-p (Nguyen et al. 2024), the order transformers applies them in.

    logits (N, V) are already divided by the temperature. The nucleus is the smallest set of most
    likely tokens whose probability reaches top_p; the most likely token is always kept. Min-p keeps the
    tokens whose probability is at least min_p x the most likely token's (a ratio the earlier filters'
    renormalization leaves unchanged).
    """
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (N, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))  # (N, V)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (N, V)
        probs = sorted_logits.softmax(dim=-1)  # (N, V)
        mass_before = probs.cumsum(dim=-1) - probs  # (N, V) mass of the strictly more likely tokens
        drop_sorted = mass_before >= top_p  # (N, V) the set before it already reaches top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # (N, V) back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))  # (N, V)
    if min_p > 0.0:
        # p_v / p_max = exp(logit_v - logit_max): the threshold in logit space needs no softmax
        floor = logits.amax(dim=-1, keepdim=True) + math.log(min_p)  # (N, 1)
        logits = logits.masked_fill(logits < floor, float("-inf"))  # (N, V)
    return logits


def draw(probs: torch.Tensor, generator: torch.Generator | None, uniforms: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row of `probs` (N, V), by inverting the cumulative distribution at a uniform draw.

    The same distribution as torch.multinomial, from one uniform number per row instead of V exponential
    ones: on a CPU, with V = 49k, multinomial spent more time drawing random numbers than the model spent on
    the token. float64 sums keep the tail exact enough; a token of probability 0 is never drawn. `uniforms`
    (N,) float64 in [0, 1), when given, are the draws (`generator` is then unused).
    """
    cdf = probs.double().cumsum(-1)  # (N, V)
    if uniforms is None:
        uniforms = torch.rand(probs.shape[0], generator=generator, device=probs.device, dtype=torch.float64)
    u = uniforms.to(device=probs.device, dtype=torch.float64)[:, None]  # (N, 1)
    tokens = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1)  # (N,)
    tokens = tokens.clamp(max=probs.shape[-1] - 1)
    impossible = probs.gather(-1, tokens[:, None]).squeeze(-1) <= 0  # (N,) only at a rounding edge
    return torch.where(impossible, probs.argmax(-1), tokens) if bool(impossible.any()) else tokens  # (N,)


def sample_tokens(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
    uniforms: torch.Tensor | None = None,
    seen: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row (from `uniforms` (N,) when given, see `draw`); return (tokens (N,), logp (N,)
    float32 on the unfiltered, unpenalized logits: the model's own, as the trainer computes it). `seen` (N, V) bool:
    the tokens each row holds so far, for `params.repetition_penalty`."""
    greedy = params.temperature == 0
    scaled = logits.float() / (1.0 if greedy else params.temperature)  # (N, V)
    shaped = scaled  # (N, V) what the draw sees
    if params.repetition_penalty != 1.0:
        if seen is None:
            raise ValueError("repetition_penalty needs `seen`, the tokens each row holds so far")
        shaped = penalize_repeats(logits.float(), seen, params.repetition_penalty)  # on the raw logits (N, V)
        shaped = shaped / (1.0 if greedy else params.temperature)  # (N, V)
    if greedy:
        tokens = shaped.argmax(dim=-1)  # (N,)
    else:
        kept = filter_logits(shaped, top_k=params.top_k, top_p=params.top_p, min_p=params.min_p)  # (N, V)
        tokens = draw(kept.softmax(dim=-1), generator, uniforms)  # (N,)
    logp = scaled.log_softmax(dim=-1).gather(-1, tokens[:, None]).squeeze(-1)  # (N,)
    return tokens, logp


class _ReservedLayer(DynamicLayer):
    """A layer of the KV cache that grows inside a buffer reserved for the whole rollout.

    transformers' DynamicLayer grows by torch.cat, which copies the whole cache at every token (a fifth of
    the decode time of a 135M model on a CPU); here each token writes one slice. `keys` / `values` stay
    views of the filled part, so every method of DynamicLayer still reads them as it would its own.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, capacity: int):
        super().__init__()
        self.lazy_initialization(keys, values)
        batch, heads, length, _ = keys.shape  # (N, kv, T, hd)
        self._keys = keys.new_empty(batch, heads, capacity, keys.shape[-1])  # (N, kv, capacity, hd)
        self._values = values.new_empty(batch, heads, capacity, values.shape[-1])
        self._keys[:, :, :length], self._values[:, :, :length] = keys, values
        self.keys, self.values = self._keys[:, :, :length], self._values[:, :, :length]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        length = self.keys.shape[-2]
        self._keys, self._values = self._keys[indices], self._values[indices]
        self.keys, self.values = self._keys[:, :, :length], self._values[:, :, :length]

    def update(self, key_states, value_states, *args, **kwargs):
        start, end = self.keys.shape[-2], self.keys.shape[-2] + key_states.shape[-2]
        self._keys[:, :, start:end], self._values[:, :, start:end] = key_states, value_states
        self.keys, self.values = self._keys[:, :, :end], self._values[:, :, :end]
        return self.keys, self.values


def reserve(cache: DynamicCache, capacity: int) -> None:
    """Give every full-attention layer of a filled cache room for `capacity` positions (`_ReservedLayer`);
    other layer types (sliding windows, ...) keep their own update."""
    for i, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer and layer.get_seq_length() > 0:
            cache.layers[i] = _ReservedLayer(layer.keys, layer.values, capacity)


EVAL_STEP = 0
"""The `step` of evaluation's seeds (`prompt_seeds`): training steps count from 1, so the streams never meet."""


def prompt_seeds(seed: int, step: int, places: list[int]) -> list[int]:
    """One integer seed per prompt of a step, from (the run's seed, the step, the prompt's place in the step): the
    same prompt at the same place draws the same completions however the step is split over ranks, micro-batches
    or engine calls, a resumed run needs no sampling state, and any engine can take them (integers, not torch
    generators). Each is an unsigned 64-bit integer in [0, 2**64), what `torch.Generator.manual_seed` takes; an
    engine must take it as it is (vLLM does, but reads -1 as "unseeded": no signed remapping). Evaluation uses step
    `EVAL_STEP`."""
    import numpy as np

    out = []
    for place in places:
        entropy = [seed % 2**64, step, place]  # a seed may be negative; SeedSequence takes naturals
        (state,) = np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)
        out.append(int(state))
    return out


def prompt_generators(seed: int, step: int, places: list[int], device: torch.device | str) -> list[torch.Generator]:
    """`prompt_seeds` as the torch generators the in-process `generate` draws from."""
    return [torch.Generator(device=device).manual_seed(s) for s in prompt_seeds(seed, step, places)]


def _cache_kwarg(model: torch.nn.Module) -> str:
    """The forward() keyword for the KV cache: `cache` in transformers >= 5.x, `past_key_values` before."""
    # Wrappers (PEFT, DDP) hide the name behind **kwargs; the decoder underneath still lists it.
    forwards = [model.forward] + ([model.get_decoder().forward] if hasattr(model, "get_decoder") else [])
    for fn in forwards:
        params = inspect.signature(fn).parameters
        for name in ("cache", "past_key_values"):
            if name in params:
                return name
    return "past_key_values"


def _left_pad(prompt_ids: list[list[int]], pad_token_id: int, device: torch.device):
    """Left-pad token lists into (ids (P, Tp), mask (P, Tp)) so every prompt ends at the last column."""
    width = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), width), pad_token_id, dtype=torch.long)  # (P, Tp)
    mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)  # (P, Tp)
    for i, p in enumerate(prompt_ids):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


def _prompt_tokens(prompt_ids: list[list[int]], vocab_size: int, group_size: int) -> torch.Tensor:
    """(N, V) bool: the tokens of each row's prompt (padding is not a token of it), each prompt's row repeated
    `group_size` times, for the repetition penalty. Ids past the logits' width (an embedding larger than the head)
    are never drawn, so they need no mark."""
    seen = torch.zeros(len(prompt_ids), vocab_size, dtype=torch.bool)  # (P, V)
    for p, ids in enumerate(prompt_ids):
        seen[p, [t for t in ids if t < vocab_size]] = True
    return seen.repeat_interleave(group_size, dim=0)  # (N, V)


def hits_stop_string(tokenizer, rows: list[list[int]], stop_strings: tuple[str, ...]) -> list[bool]:
    """Whether each row's decoded completion so far contains any stop string."""
    texts = tokenizer.batch_decode(rows, skip_special_tokens=False)
    return [any(s in text for s in stop_strings) for text in texts]


@torch.no_grad()
def generate(
    model,
    prompt_ids: list[list[int]],
    *,
    num_generations: int,
    params: SamplingParams,
    eos_token_id: int | list[int],
    pad_token_id: int,
    generator: torch.Generator | list[torch.Generator] | None = None,
    tokenizer=None,
) -> Rollout:
    """Sample `num_generations` completions for each prompt with a shared-prefix KV cache.

    Rows p*G .. p*G+G-1 belong to prompt p. A row ends at its first EOS (kept, mask 1) or at the first
    step whose decoded text contains a stop string (tokens kept); rows that reach max_new_tokens without
    ending are truncated. Rows that have ended leave the decode batch (in batches, with their cache), so the
    decode's cost follows the rows still writing. Draws use `generator`, so a seeded generator
    reproduces the rollout exactly.
    """
    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise ValueError("prompt_ids must be a non-empty list of non-empty token lists")
    if num_generations < 1:
        raise ValueError(f"num_generations must be >= 1, got {num_generations}")
    if params.stop_strings and tokenizer is None:
        raise ValueError(f"stop_strings={params.stop_strings!r} need a tokenizer to decode completions")
    device = next(model.parameters()).device
    per_prompt = isinstance(generator, (list, tuple))
    for g in generator if per_prompt else [generator]:
        if g is not None and g.device.type != device.type:
            raise ValueError(f"generator is on {g.device} but the model is on {device}; they must match")
    if per_prompt and len(generator) != len(prompt_ids):
        raise ValueError(f"{len(generator)} generators for {len(prompt_ids)} prompts: give one per prompt")
    eos_ids = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=device)
    G = num_generations

    def uniforms() -> torch.Tensor | None:
        """(N,) this step's draws, G from each prompt's stream (drawn for ended rows too, so that a stream
        advances one number per row per step whatever the rest of the batch does)."""
        if not per_prompt or params.temperature == 0:
            return None
        return torch.cat([torch.rand(G, generator=g, device=device, dtype=torch.float64) for g in generator])

    use_grpokit_attention(model)  # single-query decode steps as two matrix products
    was_training = model.training
    model.eval()
    try:
        p_ids, p_mask = _left_pad(prompt_ids, pad_token_id, device)  # (P, Tp)
        prompt_len = p_mask.sum(-1)  # (P,)
        cache = DynamicCache(config=getattr(model, "config", None))
        cache_kw = {_cache_kwarg(model): cache}
        # Prefill once per distinct prompt; only the last position's logits are needed.
        out = model(
            input_ids=p_ids,
            attention_mask=p_mask,
            position_ids=position_ids_from_mask(p_mask),  # (P, Tp)
            use_cache=True,
            logits_to_keep=1,
            **cache_kw,
        )
        logits = out.logits[:, -1].repeat_interleave(G, dim=0)  # (N, V)
        cache.batch_repeat_interleave(G)  # every layer's (P, kv, Tp, hd) -> (N, kv, Tp, hd)
        reserve(cache, p_ids.shape[1] + params.max_new_tokens)
        attn_mask = p_mask.repeat_interleave(G, dim=0)  # (N, Tp), grows one column per step
        # A row that has ended attends to whatever follows it, but its outputs are discarded and no other row
        # sees it: the mask matters only for left-padded prompts. Without any, decode runs unmasked (faster).
        masked = not bool(p_mask.all())
        next_pos = prompt_len.repeat_interleave(G, dim=0)  # (N,) position of the next fed token

        N = logits.shape[0]
        active = torch.arange(N, device=device)  # (n,) the rows still in the decode batch
        done = torch.zeros(N, dtype=torch.bool, device=device)  # (N,)
        penalized = params.repetition_penalty != 1.0
        seen = _prompt_tokens(prompt_ids, logits.shape[-1], G).to(device) if penalized else None  # (N, V)
        step_ids, step_logp, step_mask = [], [], []
        for step in range(params.max_new_tokens):
            u = uniforms()  # (N,) or None
            drawn, drawn_logp = sample_tokens(
                logits, params, None if per_prompt else generator, None if u is None else u[active],
                None if seen is None else seen[active],
            )  # fmt: skip
            if seen is not None:
                seen[active, drawn] = True  # (N, V) a row's own tokens count against it from the next step on
            alive = ~done  # (N,) rows whose token this step is part of the completion
            tokens = torch.full((N,), pad_token_id, dtype=torch.long, device=device).index_copy(0, active, drawn)
            logp = torch.zeros(N, dtype=torch.float32, device=device).index_copy(0, active, drawn_logp.float())
            tokens = torch.where(alive, tokens, pad_token_id)  # (N,)
            step_ids.append(tokens)
            step_logp.append(torch.where(alive, logp, 0.0))
            step_mask.append(alive.long())
            done = done | (alive & torch.isin(tokens, eos_ids))  # (N,)
            if params.stop_strings:
                running = (~done).nonzero().squeeze(-1).tolist()
                so_far = torch.stack(step_ids, dim=1)[running].tolist()  # (n_running, step + 1)
                hits = hits_stop_string(tokenizer, so_far, params.stop_strings)
                done[running] |= torch.tensor(hits, dtype=torch.bool, device=device)
            if bool(done.all()) or step == params.max_new_tokens - 1:
                break
            # Rows that have ended leave the decode batch once they are a quarter of it: all they would
            # still produce is padding, and no other row attends to them.
            if int(done[active].sum()) >= SHRINK_AT * len(active):
                keep = (~done[active]).nonzero().squeeze(-1)  # (n',) positions in the decode batch
                cache.batch_select_indices(keep)
                attn_mask, next_pos, active = attn_mask[keep], next_pos[keep], active[keep]
            # Feed this step's tokens; rows that already ended get mask 0, so the attention mask
            # stays equal to [prompt_mask | completion_mask], the layout the trainer sees.
            if masked:
                attn_mask = torch.cat([attn_mask, alive[active].long()[:, None]], dim=-1)  # (n, Tp + step + 1)
            out = model(
                input_ids=tokens[active][:, None],  # (n, 1)
                attention_mask=attn_mask if masked else None,
                position_ids=next_pos[:, None],  # (n, 1)
                use_cache=True,
                **cache_kw,
            )
            logits = out.logits[:, -1]  # (n, V)
            next_pos = next_pos + 1
    finally:
        model.train(was_training)

    return Rollout(
        prompt_ids=p_ids.repeat_interleave(G, dim=0),  # (N, Tp)
        prompt_mask=p_mask.repeat_interleave(G, dim=0),  # (N, Tp)
        completion_ids=torch.stack(step_ids, dim=1),  # (N, Tc)
        completion_mask=torch.stack(step_mask, dim=1),  # (N, Tc)
        sampling_logp=torch.stack(step_logp, dim=1).float(),  # (N, Tc)
        truncated=~done,  # (N,)
        group_size=G,
    )


class Sampler(Protocol):
    """What the trainer needs from a generation engine."""

    def update_weights(self, weights: PolicyWeights) -> None:
        """Take the policy's current weights (`PolicyWeights`: the live module, or its full named tensors), once per
        generation step: before the first rollout and after each step's update."""

    def generate(
        self,
        prompt_ids: list[list[int]],
        *,
        num_generations: int,
        params: SamplingParams,
        seeds: list[int] | None,
    ) -> Rollout:
        """`num_generations` completions of every prompt, rows p*G .. p*G+G-1 for prompt p; prompt p's draws from
        `seeds[p]` (an integer: `prompt_seeds`), so that a seed reproduces them; None: unseeded."""


class KVCacheSampler:
    """The in-process sampler: `generate` above on the policy's own module, under its compute dtype.

    `compute_dtype` below float32 runs the draws under autocast, as the trainer's forward does, so the
    sampler's logprobs stay comparable to the trainer's (`sampler_logp_diff`). It decodes with the policy's own
    module (`PolicyWeights.module`, inside `PolicyWeights.gather()`): nothing is copied.
    """

    def __init__(self, tokenizer: Any, *, compute_dtype: torch.dtype = torch.float32):
        self.tokenizer = tokenizer
        self.compute_dtype = compute_dtype
        self.weights: PolicyWeights | None = None

    @property
    def model(self) -> torch.nn.Module | None:
        return None if self.weights is None else self.weights.module

    def update_weights(self, weights: PolicyWeights | torch.nn.Module) -> None:
        """`weights`: the policy's (a bare module is taken as its own whole weights)."""
        self.weights = weights if isinstance(weights, PolicyWeights) else PolicyWeights(weights)

    def generate(
        self,
        prompt_ids: list[list[int]],
        *,
        num_generations: int,
        params: SamplingParams,
        seeds: list[int] | None,
    ) -> Rollout:
        if self.weights is None:
            raise RuntimeError("KVCacheSampler.generate before update_weights: the sampler has no model yet")
        device = next(self.model.parameters()).device
        device_type = device.type
        autocast = (
            torch.autocast(device_type, dtype=self.compute_dtype)
            if self.compute_dtype != torch.float32
            else contextlib.nullcontext()
        )
        generators = None if seeds is None else [torch.Generator(device=device).manual_seed(s) for s in seeds]
        with autocast, self.weights.gather():
            return generate(
                self.model,
                prompt_ids,
                num_generations=num_generations,
                params=params,
                eos_token_id=self.tokenizer.eos_token_id,
                pad_token_id=self.tokenizer.pad_token_id,
                generator=generators,
                tokenizer=self.tokenizer,
            )
