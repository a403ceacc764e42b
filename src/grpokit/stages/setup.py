"""The run set-up every training stage shares (SFT, reward-model, GRPO and PPO training) up to its loop, and what a
stage's config gives the layers below it.

`RunSetup(cfg, cluster)` seeds Python's and torch's RNGs, pins torch's CPU threads (the count recorded on a copy of
the config: the caller's config stays as it was) and resolves the device and compute dtype. The stage then reads and
checks its own data (and GRPO its rewards), and `RunSetup.open` checks the output folder against what the run reads
(`RunDirectory.plan`), then the model's source, and stages the tokenizer: all before any model loads, so that a
typo costs a second, not a load.

Below the stages a function takes the values it reads, not a config; the functions here take them from one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from grpokit.config import GRPOConfig, RunConfig
from grpokit.core.types import ConfigError
from grpokit.data.rows import answer_check
from grpokit.data.tasks import make_task
from grpokit.model.loading import check_model_source, is_hub_id, resolve_device, resolve_dtype, stage_tokenizer
from grpokit.model.optim import OptimizerSettings
from grpokit.model.policy import Policy
from grpokit.model.weights import PolicyWeights
from grpokit.rewards.functions import RewardSet, build_reward_funcs, exact_match, reward_set
from grpokit.rollout.environments import TRLEnvironment, environment_rewards
from grpokit.rollout.evaluate import HeldoutSettings
from grpokit.rollout.sampler import KVCacheSampler, Sampler, SamplingParams, push_weights
from grpokit.runtime.checkpoint import (
    RunDirectory,
    RunSettings,
    fingerprint_rows,
    fingerprint_source,
    fingerprint_tokenizer,
    seed_everything,
)
from grpokit.runtime.distributed import Cluster
from grpokit.runtime.machine import StepSizes, pin_threads
from grpokit.stages.update import SamplerCorrection


class RunSetup:
    """What every training stage does before its loop, in two parts around the stage's own data checks (the order
    of the checks is the order of the errors a user meets)."""

    def __init__(self, cfg: RunConfig, cluster: Cluster | None = None):
        """Seeds, pins threads and resolves `device` (this rank's under a torchrun launch, `cluster`) and `dtype`;
        `self.cfg` is the stage's config from here on."""
        seed_everything(cfg.seed)
        # the numbers depend on the thread count: recorded in config.yaml (on a copy: the caller's config stays)
        self.cfg = dataclasses.replace(cfg, num_threads=pin_threads(cfg.num_threads))
        self.cluster = cluster or Cluster()
        self.device = self.cluster.device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)

    def open(
        self, *, model: Any, tokenizer: Any, model_kind: str = "causal_lm", **rows: Any
    ) -> tuple[RunDirectory, Any]:
        """-> (the run's folder, checked and planned; the stage's tokenizer). `model` / `tokenizer`: the objects
        handed in, or None (the config's `model` names them: its source is checked as a `model_kind` folder);
        `rows`: the data the run reads (train_data=..., eval_data=...), which its checkpoints record."""
        cfg, main = self.cfg, self.cluster.is_main
        # what the run reads, which its checkpoints record and a resume must find again (rank 0 checks and writes)
        inputs = run_inputs(cfg, model=model, tokenizer=tokenizer, **rows) if main else None
        run_dir = run_directory(cfg, writer=main, inputs=inputs)
        run_dir.plan()
        if model is None:
            check_model_source(cfg.model, tokenizer=tokenizer is None, kind=model_kind)
        return run_dir, stage_tokenizer(tokenizer, cfg.model)


# ---------------------------------------------------------------- the run folder


def run_inputs(cfg: RunConfig, *, model: Any = None, tokenizer: Any = None, **rows: Any) -> dict[str, Any]:
    """Fingerprints of everything a stage reads besides its config, for the checkpoint's record: each of `rows`
    (train_data=[...], eval_data=[...]), the model (`model`, a model object, else the config's `model`: with
    beta > 0 also the reference), a `tokenizer` object handed in, and every other model folder the config names
    (`critic_model`, reward models in `reward_funcs` and `gold_reward`). One function for every stage, so all of
    them check the same things."""
    inputs: dict[str, Any] = {name: fingerprint_rows(value) for name, value in rows.items() if value is not None}
    inputs["model"] = fingerprint_source(model if model is not None else getattr(cfg, "model", None))
    if tokenizer is not None:
        inputs["tokenizer"] = fingerprint_tokenizer(tokenizer)
    if getattr(cfg, "critic_model", None):
        inputs["critic_model"] = fingerprint_source(cfg.critic_model)
    named = [*(getattr(cfg, "reward_funcs", None) or []), getattr(cfg, "gold_reward", None)]
    folders = [name for name in named if isinstance(name, str) and Path(name).is_dir()]
    if folders:
        inputs["reward_models"] = {name: fingerprint_source(name) for name in folders}
    return inputs


def plain_config(cfg: Any) -> dict[str, Any]:
    """A config dataclass as JSON values (nested sections as dicts, tuples as lists), as the record keeps it."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def config_defaults(cfg: Any) -> dict[str, Any]:
    """Each field's default of a config dataclass, as JSON values (`plain_config`'s form)."""
    found = {}
    for f in dataclasses.fields(cfg):
        if f.default is not dataclasses.MISSING:
            found[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            found[f.name] = f.default_factory()
    return json.loads(
        json.dumps(found, default=lambda v: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else str(v))
    )


def input_paths(cfg: Any) -> tuple[tuple[str, str], ...]:
    """(field, text) of every text a config field holds (a list field's entries too), but where the run writes
    (`output_dir`) and what it resumes (`resume_from_checkpoint`): the candidates for the inputs it names."""
    found = []
    for f in dataclasses.fields(cfg):
        if f.name in ("output_dir", "resume_from_checkpoint"):
            continue
        value = getattr(cfg, f.name)
        found += [(f.name, item) for item in (value if isinstance(value, (list, tuple)) else [value])]
    return tuple((name, item) for name, item in found if isinstance(item, str) and item)


def run_directory(cfg: RunConfig, *, writer: bool = True, inputs: dict[str, Any] | None = None) -> RunDirectory:
    """The run directory of a stage config (output_dir, resume_from_checkpoint, overwrite_output_dir, ...);
    `inputs`: the stage's `run_inputs`, recorded in its checkpoints and checked on resume."""
    stage = type(cfg).__name__
    settings = RunSettings(
        stage=stage,
        resolved_config=plain_config(cfg),
        max_steps=cfg.max_steps,
        logs_every_step=stage in ("GRPOConfig", "PPOConfig"),
        input_paths=input_paths(cfg),
        defaults=config_defaults(cfg),
    )
    return RunDirectory(
        cfg.output_dir,
        settings=settings,
        resume_from=cfg.resume_from_checkpoint,
        overwrite=cfg.overwrite_output_dir,
        keep=cfg.save_total_limit,
        writer=writer,
        inputs=inputs,
    )


# ---------------------------------------------------------------- the policy and the sampler


def optimizer_settings(cfg: RunConfig, *, learning_rate: float | None = None) -> OptimizerSettings:
    """The config's AdamW, schedule and gradient clip; `learning_rate` replaces its peak rate (PPO's critic)."""
    return OptimizerSettings(
        learning_rate=cfg.learning_rate if learning_rate is None else learning_rate,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_steps,
        lr_schedule=cfg.lr_schedule,
        max_grad_norm=cfg.max_grad_norm,
        adam_epsilon=cfg.adam_epsilon,
        min_lr_rate=cfg.min_lr_rate,
    )


def stage_policy(
    model: torch.nn.Module,
    cfg: RunConfig,
    *,
    total_steps: int,
    device: torch.device,
    dtype: torch.dtype,
    learning_rate: float | None = None,
    **options: Any,
) -> Policy:
    """A `Policy` training `model` as the config says: its optimizer (`optimizer_settings`), logprob chunks and
    gradient checkpointing; `options`: the rest of `Policy`'s (LoRA, a reference, the forward's layout, ...)."""
    return Policy(
        model,
        optimizer_settings(cfg, learning_rate=learning_rate),
        total_steps=total_steps,
        device=device,
        compute_dtype=dtype,
        logprob_chunk_size=cfg.logprob_chunk_size,
        gradient_checkpointing=cfg.gradient_checkpointing,
        **options,
    )


def grpo_policy(
    model: torch.nn.Module, cfg: GRPOConfig, *, total_steps: int, device: torch.device, dtype: torch.dtype, cluster
) -> Policy:
    """The policy of a GRPO (or PPO) run: LoRA, a reference when beta > 0, the sampling temperature, the training
    forward's layout and micro-batch bounds; `cluster` the ranks it trains on."""
    return stage_policy(
        model,
        cfg,
        total_steps=total_steps,
        device=device,
        dtype=dtype,
        lora=cfg.lora,
        reference=cfg.beta > 0,
        temperature=cfg.temperature,
        layout=cfg.training_forward,
        max_tokens_per_micro_batch=cfg.max_tokens_per_micro_batch,
        micro_batch_size=cfg.micro_batch_size,
        cluster=cluster,
    )


def run_sampler(tokenizer: Any, dtype: torch.dtype, weights: PolicyWeights, sampler: Sampler | None = None) -> Sampler:
    """The sampler a run draws its rollouts and its held-out evaluations from (and `grpokit eval` its figures):
    `sampler` handed in, else the in-process `KVCacheSampler` under the compute `dtype`; given `weights`, the
    policy's as they start."""
    sampler = sampler or KVCacheSampler(tokenizer, compute_dtype=dtype)
    push_weights(sampler, weights)
    return sampler


def grpo_sampler(
    cfg: GRPOConfig, tokenizer: Any, dtype: torch.dtype, weights: PolicyWeights, sampler: Any, *,
    device: torch.device, model_given: Any, longest_row: int, make_environment: Any = None, template: Any = None,
) -> tuple[Sampler, SamplerCorrection | None]:  # fmt: skip
    """A GRPO run's sampler (`sampler` handed in, else vLLM's with `use_vllm`, else the in-process one) holding
    `weights`, and the engine-vs-trainer correction its update applies (`sampler_correction`). `longest_row`: the
    longest prompt plus max_completion_length, which an engine's context must hold. With `make_environment` (the
    run's `environments`) it draws multi-turn rollouts through that sampler (`template`: the prompts' template
    variables, `prompt_template`)."""
    if cfg.use_vllm and sampler is None:
        sampler = vllm_sampler(cfg, tokenizer, dtype, weights, device=device, model_given=model_given is not None,
                               longest_row=longest_row)  # fmt: skip
    sampler = multi_turn(cfg, tokenizer, run_sampler(tokenizer, dtype, weights, sampler), make_environment, template)
    return sampler, sampler_correction(cfg, sampler)


def environments(cfg: Any, tools: Any = None, factory: Any = None) -> Any:
    """What makes each rollout row's environment (`rollout.environments.environment_maker`) from the config's
    `environment` and `tools`, or the `tools` / `environment_factory` handed to the trainer (which replace them and
    are recorded into the config by name, as reward functions are); None for a single-turn run."""
    from grpokit.rewards.functions import import_reward
    from grpokit.rollout.environments import environment_maker, resolve_tools

    def load(spec: str, field: str) -> Any:
        if field == "environment" and ":" not in spec:
            raise ConfigError(
                f"config field `environment` is {spec!r}: expected `package.module:factory` (a class or a function "
                "that makes one row's environment; there are no built-in ones)"
            )
        try:
            return import_reward(spec, kind=field.rstrip("s"))
        except ValueError as err:
            raise ConfigError(f"config field `{field}`: {err}") from None

    if factory is None and cfg.environment is not None:
        factory = load(cfg.environment, "environment")
    elif factory is not None:
        cfg.environment = _spec(factory)
    made = resolve_tools(cfg.tools if tools is None else list(tools), lambda spec: load(spec, "tools"))
    if tools is not None:
        cfg.tools = [_spec(tool) for tool in made]
    return environment_maker(made, factory, tool_format=cfg.tool_format, timeout=cfg.tool_timeout)


def _spec(fn: Any) -> str:
    """How the config records a tool or factory handed in: a built-in tool by its name, else `module:qualname`."""
    from grpokit.rollout.environments import BUILTIN_TOOLS

    fn = getattr(fn, "factory", fn) if isinstance(fn, TRLEnvironment) else fn  # (grpokit.trl's: the user's own)
    builtin = next((name for name, tool in BUILTIN_TOOLS.items() if tool is fn), None)
    return builtin or f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', type(fn).__name__)}"


def multi_turn(cfg: Any, tokenizer: Any, sampler: Sampler, make_environment: Any, template: Any = None) -> Sampler:
    """`sampler` drawing multi-turn rollouts (`rollout.multiturn.MultiTurnSampler`) when the run has environments;
    with `tool_format: chat` what follows a model turn is the chat template's (`chat_tools.ChatInsertion`, rendered
    with the prompts' `template` variables)."""
    if make_environment is None:
        return sampler
    from grpokit.rollout.chat_tools import ChatInsertion
    from grpokit.rollout.multiturn import MultiTurnSampler, TurnLimits

    limits = TurnLimits(cfg.max_turns, cfg.max_tool_output_tokens, cfg.tool_timeout, cfg.mask_inserted_tokens)
    chat = cfg.tool_format == "chat"
    insertion = ChatInsertion(tokenizer, template, cfg.max_tool_output_tokens) if chat else None
    return MultiTurnSampler(sampler, tokenizer, make_environment, limits, insertion=insertion)


def prompt_template(cfg: Any, tokenizer: Any, make_environment: Any, rows: list[dict[str, Any]]) -> Any:
    """The chat template variables the run renders its prompts with (training and held-out): the config's
    `chat_template_kwargs`, and with `tool_format: chat` the tools' JSON schemas as `tools`, given at run time and
    never written into the config; the template and the `rows`' prompts are checked then, before the model loads
    (`chat_tools.chat_template_kwargs`), and so are the tag syntax's tags against the tokenizer
    (`multiturn.check_tool_syntax`)."""
    if make_environment is None:
        return cfg.chat_template_kwargs
    from grpokit.rollout.multiturn import check_tool_syntax

    probe = make_environment()  # (one instance for both checks: a factory may be costly)
    check_tool_syntax(tokenizer, probe, cfg.max_tool_output_tokens)
    if cfg.tool_format != "chat":
        return cfg.chat_template_kwargs
    from grpokit.rollout.chat_tools import chat_template_kwargs

    prompts = [row[cfg.prompt_column] for row in rows]
    return chat_template_kwargs(tokenizer, lambda: probe, cfg.chat_template_kwargs, prompts)


def vllm_sampler(cfg: Any, tokenizer: Any, dtype: torch.dtype, weights: PolicyWeights, *, device: torch.device,
                 model_given: bool, longest_row: int) -> Sampler:  # fmt: skip
    """The `VLLMSampler` of a config with `use_vllm` (a GRPO config or `grpokit eval`'s), its engine started (a
    colocated engine loaded, or the server found healthy) and holding `weights`, before the first step: a missing
    vllm, a model vLLM cannot load or an unreachable server stops the run here. A colocated engine loads the config's
    model folder or hub id itself; a model handed in as an object (or a .gguf file) is written to a temporary folder
    first (its config, tokenizer and the policy's weights), deleted once the engine has read it."""
    from grpokit.rollout.vllm import EngineSettings, LocalEngine, ServerEngine, VLLMSampler, import_vllm, shape_mismatch

    if cfg.vllm_mode == "server":
        engine = ServerEngine(cfg.vllm_server_url(), timeout=cfg.vllm_server_timeout)
        wrong = shape_mismatch(engine.shapes, dict(weights.named_tensors()))
        if wrong is not None:
            raise ValueError(
                f"the vLLM server at {cfg.vllm_server_url()} serves {engine.model}, not the policy's model: {wrong}; "
                "start it with the run's starting model (`grpokit vllm-serve MODEL`)"
            )
    else:
        import_vllm()
        if cfg.vllm_max_model_length is not None and longest_row > cfg.vllm_max_model_length:
            raise ValueError(
                f"config field `vllm_max_model_length` is {cfg.vllm_max_model_length}, less than the longest prompt "
                f"plus max_completion_length ({longest_row}): raise it, or shorten max_prompt_length / "
                "max_completion_length"
            )
        on_cpu = device.type == "cpu"
        source = str(cfg.model)
        readable = not model_given and source.endswith(".gguf") is False
        readable = readable and (is_hub_id(source) or (Path(source) / "config.json").is_file())
        with contextlib.ExitStack() as stack:
            if not readable:
                folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="grpokit-vllm-"))
                write_engine_folder(folder, weights, tokenizer)
                source = folder
            settings = EngineSettings(
                model=source, dtype=str(dtype).removeprefix("torch."), max_model_length=cfg.vllm_max_model_length,
                gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
                tensor_parallel_size=cfg.vllm_tensor_parallel_size,
                kv_cache_gb=cfg.vllm_kv_cache_gb if on_cpu else None,
                enforce_eager=on_cpu if cfg.vllm_enforce_eager is None else cfg.vllm_enforce_eager,
                enable_sleep_mode=cfg.vllm_enable_sleep_mode, seed=cfg.seed,
            )  # fmt: skip
            engine = LocalEngine(settings)
    vocab = weights.module.get_input_embeddings().num_embeddings
    where = f"the vLLM server at {cfg.vllm_server_url()}" if cfg.vllm_mode == "server" else "the vLLM engine"
    if engine.max_model_len is not None and longest_row > engine.max_model_len:
        field = "vllm_max_model_length" if cfg.vllm_mode == "colocate" else "its --max-model-length"
        raise ValueError(
            f"{where} holds {engine.max_model_len} tokens ({field}), less than the longest prompt plus "
            f"max_completion_length ({longest_row}): raise it, or shorten max_prompt_length / max_completion_length"
        )
    if engine.vocab_size is not None and engine.vocab_size != vocab:
        raise ValueError(
            f"{where} serves a model of {engine.vocab_size} token embeddings, the policy has {vocab}: it serves "
            "another model (`grpokit vllm-serve` the policy's starting model)"
        )
    return VLLMSampler(engine, tokenizer, dtype=dtype)


def sampler_correction(cfg: GRPOConfig, sampler: Any) -> SamplerCorrection | None:
    """The engine-vs-trainer correction a GRPO update applies: for a sampler whose logprobs come from another
    implementation (`corrects_sampling`, vLLM) with `vllm_importance_sampling_correction`; else None. With a filter
    (top_p < 1, top_k > 0, min_p > 0) or a repetition penalty it says once what the engine's logprobs are."""
    if not (getattr(sampler, "corrects_sampling", False) and cfg.vllm_importance_sampling_correction):
        return None
    shaped = {"top_p": cfg.top_p < 1, "top_k": cfg.top_k > 0, "min_p": cfg.min_p > 0,
              "repetition_penalty": cfg.repetition_penalty != 1}  # fmt: skip
    if any(shaped.values()):
        from grpokit.data.rows import InputWarning

        named = ", ".join(f"{name} = {getattr(cfg, name)}" for name, on in shaped.items() if on)
        weights = (
            "the correction weights pi_trainer / q_vLLM move away from 1 (above it for a penalized token)"
            if shaped["repetition_penalty"]
            else "every correction weight pi_trainer / q_vLLM is <= 1 (the kept mass)"
        )
        warnings.warn(
            f"{named} with vLLM: the engine's logprob of a sampled token is that of the distribution it sampled from "
            "(penalized, renormalized over the kept set), the trainer's that of the model's whole distribution, so "
            f"{weights}, and the logged sampler_logp_diff is that gap, not a bug; vllm_importance_sampling_mode = "
            f"{cfg.vllm_importance_sampling_mode} weighs the tokens by it",
            InputWarning,
            stacklevel=2,
        )
    return SamplerCorrection(
        cfg.vllm_importance_sampling_mode, cfg.vllm_importance_sampling_clip_min, cfg.vllm_importance_sampling_clip_max
    )


def write_engine_folder(folder: str | Path, weights: PolicyWeights, tokenizer: Any) -> None:
    """A model folder an engine can load: the policy's config, its whole weights (LoRA merged) in one safetensors file,
    and the tokenizer."""
    from safetensors.torch import save_file

    from grpokit.rollout.vllm import own_storage

    module = weights.module
    config = module.get_base_model().config if hasattr(module, "get_base_model") else module.config
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    state = own_storage(weights.named_tensors())
    save_file(state, str(Path(folder) / "model.safetensors"), metadata={"format": "pt"})


def sampling_params(cfg: GRPOConfig) -> SamplingParams:
    """The rollout settings of a GRPO (or PPO) config."""
    return SamplingParams(
        max_new_tokens=cfg.max_completion_length,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
        stop_strings=tuple(cfg.stop_strings),
        min_p=cfg.min_p,
        repetition_penalty=cfg.repetition_penalty,
    )


def heldout_settings(cfg: GRPOConfig, template: dict[str, Any] | None = None) -> HeldoutSettings:
    """How a GRPO (or PPO) run samples and scores its held-out rows; `template`: the run's prompt template variables
    (`prompt_template`), default the config's."""
    return HeldoutSettings(
        temperature=cfg.eval_temperature,
        max_new_tokens=cfg.max_completion_length,
        seed=cfg.seed,
        prompt_column=cfg.prompt_column,
        max_prompt_length=cfg.max_prompt_length,
        reward_timeout=cfg.reward_timeout,
        chat_template_kwargs=cfg.chat_template_kwargs if template is None else template,
    )


def step_sizes(cfg: GRPOConfig) -> StepSizes:
    """What a GRPO (or PPO) step's memory grows with (`machine.check_grpo_memory`)."""
    return StepSizes(
        prompts_per_step=cfg.prompts_per_step,
        num_generations=cfg.num_generations,
        max_completion_length=cfg.max_completion_length,
        minibatch_size=cfg.minibatch_size,
        micro_batch_size=cfg.micro_batch_size,
        max_tokens_per_micro_batch=cfg.max_tokens_per_micro_batch,
        gradient_checkpointing=cfg.gradient_checkpointing,
    )


def run_task(cfg: Any) -> Any:
    """The task a config (a training stage's or `grpokit eval`'s) draws its rows from: a built-in one with
    `task_num_digits`, or `reasoning_gym:NAME` with `task_settings` (`data.tasks.make_task`); None without `task`."""
    if cfg.task is None:
        return None
    return make_task(cfg.task, num_digits=cfg.task_num_digits, settings=cfg.task_settings)


def gold_check(task: Any) -> Any:
    """Held-out accuracy's check of a completion against its row: the task's own (`check`), else exact match on the
    row's `answer` (rows without a text answer left out)."""
    return task.check if task is not None else answer_check(exact_match)


def grpo_rewards(
    cfg: GRPOConfig,
    task: Any,
    reward_funcs: Any,
    train_rows: list[dict[str, Any]],
    eval_rows: list[dict[str, Any]],
    state: Any = None,
    make_environment: Any = None,
) -> RewardSet:
    """The run's weighted reward functions (`rewards.RewardSet`): those passed in (`reward_funcs`), else the config's
    names built here, checked against the rows; they get the run's TrainerState `state` as `trainer_state`.
    Functions passed in are recorded into the config (saved with the run) by their specs, so config.yaml says what
    ran."""
    build = functools.partial(
        build_reward_funcs, format_pattern=cfg.format_pattern, max_completion_length=cfg.max_completion_length,
        overlong_buffer=cfg.overlong_buffer, task=task, device=str(resolve_device(cfg.device)),
        reward_model_batch_size=cfg.reward_model_batch_size,
    )  # fmt: skip
    extra = environment_rewards(make_environment) if make_environment else []  # (the environment's own columns)
    rewards = reward_set(
        reward_funcs, build, names=cfg.reward_funcs, weights=cfg.reward_weights, gold_reward=cfg.gold_reward,
        prompt_column=cfg.prompt_column, train_rows=train_rows, eval_rows=eval_rows, state=state,
        episodes=make_environment is not None, extra=extra, text_answers=task is None or task.text_answers,
    )  # fmt: skip
    if reward_funcs is not None:  # (not the environment's columns: its `environment` brings them back)
        cfg.reward_funcs = rewards.specs()[: len(rewards.funcs) - len(extra)]
    return rewards
