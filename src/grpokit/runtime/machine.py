"""What a run takes from the machine, settled before it starts: the memory a GRPO step needs, and torch's CPU threads.

Memory. A config such as `num_generations: 30000` would otherwise fail deep inside the sampler, when its KV cache is
allocated, after the model loaded and the first evaluation ran, with a bare allocator error. The estimate, made
from the model's config before the model loads, counts what grows with the config's sizes and is certain to be
allocated, so a refusal is never a false alarm:
- the KV cache `KVCacheSampler` reserves for a whole rollout: every row (prompts_per_step x num_generations, this
  rank's share) at full length (the longest prompt + max_completion_length), all at once (the sampler does not
  split rows into chunks);
- the buffers of one sampling step: the (rows, vocabulary) logits and the probabilities and float64 CDF drawn
  from them (`sampler.sample_tokens`);
- the activations one training forward keeps for its backward, for the largest micro-batch the config allows
  (`micro_batch_size` rows, within the `max_tokens_per_micro_batch` budget; the micro-batches of a step run one
  after another) with every completion at max_completion_length (a step can reach that). Under
  `gradient_checkpointing` a layer keeps only its input (hidden_size values per token) and one layer's
  activations exist at a time, while the backward recomputes it.
The weights and the optimizer state are not counted (they do not grow with these fields).

Threads. torch splits a sum, and MKL a matrix product along its inner dimension, into one part per intra-op
thread, so the float rounding, and with it a whole seeded run, depends on the thread count (the demo's GRPO
figures differ from step 10 on between 1 and 2 threads). torch's default count is the CPUs the process may use
when it starts (its CPU affinity or cpuset, OMP_NUM_THREADS), not the machine's load: a run started under
`taskset`, in a container given fewer CPUs, or with OMP_NUM_THREADS set prints another table. A stage pins the
count (`num_threads`, recorded in config.yaml), and an explicit count also switches off MKL's own choice of
fewer threads (MKL_DYNAMIC), so the same seed and the same `num_threads` give the same numbers on the same CPU.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from grpokit.core.types import ConfigError

GIB = 2**30
SAMPLING_BYTES_PER_LOGIT = 24
"""Bytes per row and vocabulary entry that `sample_tokens` holds at its peak besides the model's logits: the
logits divided by the temperature (float32), their softmax (float32), and the float64 CDF with the float64 copy
it is summed from."""
SAVED_PER_TOKEN_LAYER = (6, 4)
"""Values a decoder layer keeps for the backward per token, at least: 6 x hidden_size (norm outputs, q / k / v,
the attention output, the residual) + 4 x intermediate_size (gate, up, activation, product). A Llama measured
with saved-tensor hooks keeps more (3,467 values per token-layer at hidden 128 / intermediate 512, against
6 x 128 + 4 x 512 = 2,816): the attention's own buffers come on top."""
EVAL_BATCH_ROWS = 256  # `evaluate.heldout_eval`'s prompts per sampler call, one completion each


@dataclass(frozen=True)
class StepSizes:
    """What a GRPO / PPO step's memory grows with, as its config sets it (`run_setup.step_sizes`); a refusal names
    these fields."""

    prompts_per_step: int
    num_generations: int
    max_completion_length: int
    minibatch_size: int | None
    micro_batch_size: int | None
    max_tokens_per_micro_batch: int | None
    gradient_checkpointing: bool


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak bytes of a GRPO step's parts (see the module's docstring), and what they were computed from."""

    kv_cache: int
    sampling: int
    training: int
    rows: int
    positions: int
    training_tokens: int

    @property
    def total(self) -> int:
        # the rollout's buffers are freed before the update's forward, but the sampling step's buffers sit beside
        # the full KV cache
        return max(self.kv_cache + self.sampling, self.training)


def text_config(model_config: Any) -> Any:
    """The language model's part of a model's config (a multimodal config nests it)."""
    return model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config


def kv_cache_bytes(model_config: Any, rows: int, positions: int, dtype_bytes: int) -> int:
    """Bytes of a KV cache of `positions` for `rows` rows: layers x 2 (keys, values) x kv_heads x head_dim x
    positions x rows x dtype_bytes. A sliding-window layer (`layer_types`) keeps at most its window."""
    config = text_config(model_config)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    kept = [min(positions, window) if kind == "sliding_attention" and window else positions for kind in layer_types]
    return 2 * kv_heads * head_dim * sum(kept) * rows * dtype_bytes


def estimate(
    model_config: Any,
    *,
    rows: int,
    positions: int,
    training_tokens: int,
    dtype_bytes: int,
    gradient_checkpointing: bool = False,
) -> MemoryEstimate:
    """The estimate for a model's config (`model_config`): `rows` sampled at once for `positions` (prompt +
    completion), `training_tokens` positions in the largest training forward, activations of `dtype_bytes`."""
    text = text_config(model_config)
    hidden = text.hidden_size
    intermediate = getattr(text, "intermediate_size", None) or 4 * hidden
    per_hidden, per_intermediate = SAVED_PER_TOKEN_LAYER
    one_layer = per_hidden * hidden + per_intermediate * intermediate
    if gradient_checkpointing:  # every layer's input kept, plus the one layer the backward is recomputing
        saved_per_token = text.num_hidden_layers * hidden + one_layer
    else:
        saved_per_token = text.num_hidden_layers * one_layer
    return MemoryEstimate(
        kv_cache=kv_cache_bytes(model_config, rows, positions, dtype_bytes),
        sampling=rows * text.vocab_size * (dtype_bytes + SAMPLING_BYTES_PER_LOGIT),
        training=training_tokens * saved_per_token * dtype_bytes,
        rows=rows,
        positions=positions,
        training_tokens=training_tokens,
    )


def available_bytes(device: torch.device) -> int | None:
    """Memory a new allocation can still get: on CUDA the device's free memory plus what torch's cache holds
    unused; on a CPU MemAvailable (/proc/meminfo), within the cgroup's limit when there is one. None where it
    cannot be read."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type != "cpu":
        return None
    found = []
    with contextlib.suppress(OSError, ValueError, KeyError):  # no /proc (not Linux), or an old kernel
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        found.append(int(meminfo["MemAvailable"].split()[0]) * 1024)
    if not found and hasattr(os, "sysconf"):  # not Linux: free pages (less than what reclaiming the cache gives)
        with contextlib.suppress(OSError, ValueError):
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    for limit, usage in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),  # v1
    ):
        try:
            found.append(int(Path(limit).read_text()) - int(Path(usage).read_text()))
        except (OSError, ValueError):  # absent, or "max": no limit
            continue
    return min(found) if found else None


def model_config(source: Any) -> Any:
    """A model's config: given, of a model object, or read from a local model folder / .gguf file (config only, no
    weights); None where it cannot be read without loading or downloading (the loader then says what is wrong)."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(source, PretrainedConfig):
        return source
    if hasattr(source, "config"):
        return source.config

    path = Path(str(source))
    try:
        if path.is_file() and path.suffix == ".gguf":
            return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
        return AutoConfig.from_pretrained(str(source), local_files_only=True)  # a hub id: only when cached
    except Exception:  # noqa: BLE001 - an unreadable config is the loader's to report, with its own message
        return None


def check_grpo_memory(
    source: Any,
    sizes: StepSizes,
    longest_prompt: int,
    device: torch.device,
    dtype: torch.dtype,
    *,
    world_size: int = 1,
    num_eval_rows: int = 0,
    in_process_sampler: bool = True,
    available: int | None = None,
) -> MemoryEstimate | None:
    """Refuse (ConfigError) a GRPO / PPO step of `sizes` that cannot fit in memory, before the model loads: the
    estimate of the model `source` (a model object, its config, or a path whose config is read) against `available`
    bytes (default: what `available_bytes` reads; on a CPU the ranks of one machine share it). Without
    `in_process_sampler` (an engine of its own, such as vLLM) the rollout's memory is not this process's. The
    message names the fields that size it. -> the estimate, or None where the model's config cannot be read or has
    no attention of the usual shape."""
    source_config = model_config(source)
    if source_config is None:
        return None
    G, P = sizes.num_generations, sizes.prompts_per_step // world_size
    positions = longest_prompt + sizes.max_completion_length
    rows = max(P * G, min(num_eval_rows, EVAL_BATCH_ROWS)) if in_process_sampler else 0
    minibatch = (sizes.minibatch_size or sizes.prompts_per_step * G) // world_size
    training_tokens = (sizes.micro_batch_size or minibatch) * positions
    if sizes.max_tokens_per_micro_batch:  # cut by the budget, but a single longer row runs alone
        training_tokens = min(training_tokens, max(sizes.max_tokens_per_micro_batch, positions))
    shape = {"rows": rows, "positions": positions, "training_tokens": training_tokens}
    shape["gradient_checkpointing"] = bool(sizes.gradient_checkpointing)
    try:
        need = estimate(source_config, **shape, dtype_bytes=torch.empty((), dtype=dtype).element_size())
    except (AttributeError, TypeError, ZeroDivisionError):  # no attention heads (a state-space model, ...): no KV
        return None  # cache of this shape to estimate
    if available is None:
        available = available_bytes(device)
        ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if device.type == "cpu" else 1
        if available is not None:
            available //= max(1, ranks_here)
    if available is None or need.total <= available:
        return need
    raise ConfigError(memory_message(need, sizes, longest_prompt, device, available, per_rank=world_size > 1))


def memory_message(
    need: MemoryEstimate, sizes: StepSizes, longest_prompt: int, device: torch.device, available: int, *, per_rank: bool
) -> str:
    rank = " per rank" if per_rank else ""
    rows = (
        f"prompts_per_step {sizes.prompts_per_step}{' / ranks' if per_rank else ''} x num_generations "
        f"{sizes.num_generations} = {need.rows} rows"
    )
    return (
        f"this config needs about {need.total / GIB:.1f} GiB{rank} at its peak, more than the "
        f"{available / GIB:.1f} GiB of memory available on {device.type}: the sampler's KV cache "
        f"{need.kv_cache / GIB:.1f} GiB ({rows} x {need.positions} positions: the longest prompt, {longest_prompt} "
        f"tokens, + max_completion_length {sizes.max_completion_length}) and its sampling buffers "
        f"{need.sampling / GIB:.1f} GiB (rows x vocabulary); the training forward {need.training / GIB:.1f} GiB "
        f"({need.training_tokens} positions of one micro-batch, see max_tokens_per_micro_batch, micro_batch_size "
        "and gradient_checkpointing). Lower `num_generations`, "
        "`prompts_per_step` or `max_completion_length` (or `max_prompt_length`)"
    )


STARTING_THREADS = torch.get_num_threads()
"""torch's intra-op thread count when this module was first imported, before any stage pinned it: the CPUs the
process may use. A later stage of the same process (the demo's GRPO after its SFT, a script running two trainers)
must not inherit an earlier stage's `num_threads` as its default."""


def pin_threads(num_threads: int | None) -> int:
    """Set torch's intra-op CPU threads to `num_threads` (None: `STARTING_THREADS`, the count torch started with,
    whatever an earlier stage pinned) and return the count, for the run's config to record. Setting it explicitly,
    even to torch's own default, fixes the count MKL uses too."""
    count = num_threads or STARTING_THREADS
    torch.set_num_threads(count)
    return count
