"""The few data types that travel between the sampler, the reward step and the update.

N = P * G rows: prompt p owns rows p*G .. p*G + G - 1 (groups are contiguous and never split).
Tp = padded prompt length (prompts are LEFT-padded), Tc = padded completion length (RIGHT-padded).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class Episode:
    """One row of a multi-turn rollout: what happened between the model and its environment, in order.

    `pieces` is the completion as it was written, ("model", text) for a turn the model sampled and ("inserted", text)
    for what the environment put between turns (a tool's output, an observation, template glue); their tokens are
    the row's completion ids, never re-encoded from these texts."""

    environment: Any  # the row's own environment instance (made for this row, reset with its columns)
    pieces: list[tuple[str, str]]  # ("model" | "inserted", decoded text), in order
    num_turns: int = 0  # model turns sampled
    tool_calls: list[dict[str, Any]] | None = None  # {"name", "arguments", "result" | "error"} per call, in order
    step_rewards: list[float] | None = None  # the environment's step() reward after each model turn
    done: bool = False  # the environment said done (False: max_turns or the token budget ended the row)
    ended_by: str = ""  # "done" | "max_turns" | "length" (the token budget) | "overflow" (an observation did not fit)
    # | "timeout" (the environment's own step ran past its timeout)
    # | "stop" (a chat-format turn a stop string ended, not its end token)
    tool_errors: int = 0  # tool calls that raised (their error went back to the model as text)
    tool_timeouts: int = 0  # tool calls past their timeout (said to the model as text)
    observations_cut: int = 0  # observations cut to max_tool_output_tokens
    messages: list[dict[str, Any]] | None = None  # tool_format chat: the completion in TRL's message form, as the
    # model was shown it (`ChatInsertion.messages`)


@dataclass(frozen=True)
class Rollout:
    """What the sampler returns for one generation batch of N = prompts x G rows, row p*G + g the g-th completion of
    prompt p:

    - prompt_ids, prompt_mask: (N, Tp) long, the prompts left-padded (pad_token_id), mask 1 on real tokens;
    - completion_ids, completion_mask: (N, Tc) long, right-padded after each completion's end, mask 1 on the real
      completion tokens including the EOS;
    - sampling_logp: (N, Tc) float32, log pi(token) under logits / temperature (temperature 1 for greedy), 0 where
      masked: compared with the trainer's logprobs, never used in the ratio;
    - truncated: (N,) bool, no EOS or stop string within max_new_tokens;
    - group_size: G;
    - loss_mask: (N, Tc) long or None, the tokens the loss trains on (None: every real completion token).

    `rollout.sampler.check_rollout` checks all of it every step."""

    prompt_ids: torch.Tensor  # (N, Tp) long, left-padded with pad_token_id
    prompt_mask: torch.Tensor  # (N, Tp) long, 1 for real prompt tokens
    completion_ids: torch.Tensor  # (N, Tc) long, pad_token_id after the end of each completion
    completion_mask: torch.Tensor  # (N, Tc) long, 1 for real completion tokens INCLUDING the EOS
    sampling_logp: torch.Tensor  # (N, Tc) float32, log pi(token) under logits / temperature; 0 where masked
    truncated: torch.Tensor  # (N,) bool, True when no EOS / stop string within max_new_tokens
    group_size: int  # G
    # (N, Tc) long, 1 for the completion tokens the loss trains on; None: every real completion token. A token the
    # model did not write (a tool's output, an observation, template glue between turns) is real (attended to, in
    # `completion_mask`) and not trained (0 here, sampling_logp 0); the forward reads `completion_mask`, every
    # loss, count and figure reads `trained_mask`.
    loss_mask: torch.Tensor | None = None
    # (N,) one Episode per row for a multi-turn rollout (`rollout.multiturn`): its environment, turns, tool calls and
    # step rewards, what the reward functions see; None for a single-turn sampler.
    episodes: tuple[Episode, ...] | None = None

    @property
    def num_sequences(self) -> int:
        return self.completion_ids.shape[0]

    @property
    def trained_mask(self) -> torch.Tensor:
        """(N, Tc): the tokens in the loss (`loss_mask`, or every real completion token)."""
        return self.completion_mask if self.loss_mask is None else self.loss_mask


@dataclass
class StepBatch:
    """One step between its rollout and its update (`GRPOTrainer.sample`): this rank's n rows, the whole step's N."""

    rollout: Rollout  # this rank's n rows
    prompts: Any  # `data.encode_prompts` of this rank's prompts: .texts, .seen (as the model saw them), .cut
    completions: list[str]  # (n,) decoded
    rewards: torch.Tensor  # (N, K) float32, NaN where a function returned None
    total: torch.Tensor  # (N,) the weighted sum
    scorable: torch.Tensor  # (N,) bool
    gold: torch.Tensor | None  # (N, 1) the watched-only reward
    advantages: torch.Tensor  # (n,) this rank's rows' group advantages, on the device
    step_advantages: torch.Tensor  # (N,) shown beside the logged samples
    mask: torch.Tensor  # (n, Tc) float: the tokens in the loss
    step_mask: torch.Tensor  # (N, max_completion_length) every rank's `mask`
    first_row: int  # this rank's rows among the step's N start here
    clock: list[float]  # perf_counter at the start, after the rollout, after scoring; the step appends the rest
    figures: dict[str, float] = field(default_factory=dict)  # what else the step logs (dynamic sampling's cost)


@dataclass
class Generation:
    """One generation round of a step (`GRPOTrainer.sample_round`): P prompts, this rank's share sampled, the whole
    round's N = P x G rows scored."""

    rows: list[Any]  # (P,) the round's data rows, every rank's (every rank walks the same prompt order)
    prompts: Any  # `data.encode_prompts` of this rank's share of them
    rollout: Rollout  # this rank's n rows
    completions: list[str]  # (n,) decoded
    rewards: torch.Tensor  # (N, K) float32, NaN where a function returned None
    total: torch.Tensor  # (N,) the weighted sum
    scorable: torch.Tensor  # (N,) bool
    advantages: torch.Tensor  # (N,) the round's group advantages
    gold: torch.Tensor | None  # (N, 1) the watched-only reward
    logged: Any  # `rewards.LoggedValues`: what the reward functions logged, over the ranks
    first_row: int  # this rank's rows among the round's N start here
    clock: list[float]  # perf_counter at the start, after the rollout, after scoring


@dataclass
class TrainResult:
    """What a GRPO run returns (its files are in `output_dir`)."""

    output_dir: Path
    model_dir: Path
    plot_path: Path | None
    final_metrics: dict[str, float]
    eval_history: list[dict[str, float]]
    warnings: list[str]
    monitor_summary: list[str]  # one line per monitor: FIRED with its first warning, or its last figures
    monitor_fired: dict[str, str]  # monitor kind -> its first warning
    global_step: int = 0  # steps taken (grpokit.trl: optimizer steps), as TRL names it; max_steps unless ended early
    training_loss: float = float("nan")  # the mean logged loss over those steps (metrics.jsonl), as TRL's

    @property
    def metrics(self) -> dict[str, float]:
        """TRL's `TrainOutput.metrics` keys grpokit has: `train_loss` and `global_step`."""
        return {"train_loss": self.training_loss, "global_step": self.global_step}

    def _asdict(self) -> dict[str, Any]:
        """TRL's TrainOutput is a named tuple (global_step, training_loss, metrics); a TrainResult reads as one too:
        unpacked, indexed, measured and as this dict."""
        return {"global_step": self.global_step, "training_loss": self.training_loss, "metrics": self.metrics}

    def __iter__(self):
        return iter(self._asdict().values())

    def __getitem__(self, index: int | slice) -> Any:
        return tuple(self._asdict().values())[index]

    def __len__(self) -> int:
        return 3


class DataError(ValueError):
    """The data set is missing, malformed, or lacks a column; the message names the file and the row."""


class InputWarning(UserWarning):
    """grpokit changed an input to fit (a prompt cut to max_prompt_length, characters read as <unk>)."""


class ConfigError(ValueError):
    """A config value is wrong; the message names the field."""


class ArgumentError(ConfigError, TypeError):
    """An argument of a Python entry point has a type grpokit cannot use; the message names the argument.
    A TypeError for Python callers, a ConfigError for the command line's error printing."""


def kind_of(value: object) -> str:
    """`an int`, `a str`, `an SFTConfig`: the type of `value` with its article (for messages about arguments)."""
    return with_article(type(value).__name__)


def with_article(name: str) -> str:
    spelled = name[:2].isupper() and name[0] in "FHLMNRSX"  # an acronym read letter by letter: an SFTConfig
    return f"{'an' if name[0].lower() in 'aeiou' or spelled else 'a'} {name}"


class SamplerError(RuntimeError):
    """A sampler's `generate` returned what the trainer cannot use; the message names the sampler's class and what
    was wrong, before the rollout reaches the reward functions or the update."""


def check_path_length(path: str, name: str) -> Path:
    """The absolute path of a folder grpokit will write, refused (a ConfigError naming `name`) when the names it
    writes below it (checkpoint-123456/.tmp-...) would not fit the file system's limits, which count bytes (255 a
    name, 4096 a path), not characters: `é` is two."""
    import os

    target = Path(os.path.abspath(os.path.expanduser(path)))
    longest_name, path_max = max(len(os.fsencode(part)) for part in target.parts), 4096 - 200
    if longest_name > 255 - 40:
        raise ConfigError(f"config field `{name}` has a folder name of {longest_name} bytes: keep names under 215")
    length = len(os.fsencode(str(target)))
    if length > path_max:
        raise ConfigError(f"config field `{name}` is {length} bytes long: keep it under {path_max}")
    return target
