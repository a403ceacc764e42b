"""Multi-turn rollouts: a sampler that lets the model act in an environment over several turns, behind the same
Sampler protocol, wrapping any sampler (the in-process one or vLLM's).

Token in, token out. Each turn continues the row's whole token history (prompt, the model's earlier turns and what
the environment inserted) as it is: the model's tokens are never decoded and re-encoded, an observation is tokenized
once (`add_special_tokens=False`) and appended. So the ids the trainer forwards are, token for token, the ids the
sampler conditioned on at every turn. In the returned Rollout every token is real (attended to, `completion_mask`),
and the loss mask is 1 exactly on the tokens the model sampled, each turn's end token included, 0 on everything
inserted (their sampling logprob 0). No mask is ever inferred from token ids: pad == eos in many checkpoints, and an
end-of-turn token in mid-sequence stays attended and trained.

The group of prompt p is G rows, each with its own environment instance (`make_environment()`, reset with the row's
columns). At turn 1 the prompts whose environments inserted nothing before it are one call of the wrapped sampler
(G draws each, seeded as a single-turn rollout is); every other row, at every turn, is a prompt of its own (its
whole history) with a seed derived from its prompt's seed, its place in the group and the turn (`turn_seeds`), so a
row's draws do not depend on the other rows of the call.

Limits: `max_turns` model turns; `max_new_tokens` (the run's max_completion_length) counts the model's and the
inserted tokens together: a turn gets what is left, and an observation that would leave no room for a model token is
rolled back (the row ends, truncated); an observation is cut to `max_tool_output_tokens`; an environment's `step`
that does not manage its own timeouts gets `step_timeout` seconds. The rows' `step` calls of one turn run
concurrently (threads; tools that do real work run it in processes, `grpokit.sandbox`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from grpokit.core.types import ConfigError, Episode, Rollout
from grpokit.rollout.environments import EnvironmentFailure
from grpokit.rollout.sampler import SamplingParams, call_generate, check_rollout


@dataclass(frozen=True)
class TurnLimits:
    """How far a multi-turn rollout may go."""

    max_turns: int = 8
    """Model turns per row; the row ends after its last (its environment's step still scores that turn)."""
    max_tool_output_tokens: int = 256
    """An observation (a tool's output) is cut to this many tokens before it is inserted."""
    step_timeout: float | None = 10.0
    """Seconds an environment's `step` may take, unless it times its own calls (`manages_timeouts`, as `ToolUse`
    does per tool call); past it the row ends and the timeout is counted."""
    mask_inserted_tokens: bool = True
    """False trains on the inserted tokens too (a control: what goes wrong without the mask)."""

    def __post_init__(self) -> None:
        if self.max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {self.max_turns}")
        if self.max_tool_output_tokens < 1:
            raise ValueError(f"max_tool_output_tokens must be >= 1, got {self.max_tool_output_tokens}")


class PlainInsertion:
    """Observations inserted as their own text (the tag syntax, a plain-text prompt): tokenized once,
    `add_special_tokens=False`."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    def encode(self, observation: Any) -> list[int]:
        if not isinstance(observation, str):
            raise TypeError(f"an observation is a str here, got {type(observation).__name__}")
        return list(self.tokenizer(observation, add_special_tokens=False)["input_ids"])


def turn_seeds(prompt_seed: int, place_in_group: int, turn: int) -> int:
    """The seed of one row's turn `turn` (turn 1 of a prompt without opening observations draws from the prompt's
    seed as a single-turn rollout does): an unsigned 64-bit integer from (its prompt's seed, its place in the group,
    the turn)."""
    import numpy as np

    (state,) = np.random.SeedSequence([prompt_seed % 2**64, place_in_group, turn]).generate_state(1, dtype=np.uint64)
    return int(state)


@dataclass
class _Row:
    prompt: int  # p
    place: int  # g
    environment: Any
    episode: Episode
    ids: list[int] = field(default_factory=list)
    trained: list[int] = field(default_factory=list)
    logp: list[float] = field(default_factory=list)
    live: bool = True
    truncated: bool = False
    shown: list[Any] = field(default_factory=list)  # each inserted observation as the model was shown it (cut)


class MultiTurnSampler:
    """A sampler whose rows are episodes of `make_environment()` instances (see the module's docstring). `inner` is
    the sampler that draws each turn; weights and everything else go to it. `generate` takes the prompts' data rows
    (`rows`, whose columns reset each row's environment): the trainer and held-out evaluation pass them to a sampler
    with `takes_rows`."""

    takes_rows = True

    def __init__(self, inner: Any, tokenizer: Any, make_environment: Any, limits: TurnLimits, *,
                 insertion: Any = None):  # fmt: skip
        self.inner = inner
        self.tokenizer = tokenizer
        self.make_environment = make_environment
        self.limits = limits
        self.insertion = insertion or PlainInsertion(tokenizer)

    def __getattr__(self, name: str) -> Any:  # corrects_sampling, engine, ...: the wrapped sampler's
        inner = self.__dict__.get("inner")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)

    def update_weights(self, weights: Any) -> None:
        self.inner.update_weights(weights)

    def generate(self, prompt_ids: list[list[int]], *, num_generations: int, params: SamplingParams,
                 seeds: list[int] | None, rows: list[dict[str, Any]] | None = None) -> Rollout:  # fmt: skip
        G, budget = num_generations, params.max_new_tokens
        columns = rows if rows is not None else [{} for _ in prompt_ids]
        if len(columns) != len(prompt_ids):
            raise ValueError(f"{len(columns)} data rows for {len(prompt_ids)} prompts: one row per prompt")
        episodes = [self._start(p, g, columns[p], budget) for p in range(len(prompt_ids)) for g in range(G)]
        syntax_stops = tuple(getattr(episodes[0].environment, "stop_strings", ()))
        writable_stop_strings(self.tokenizer, syntax_stops, _kind(episodes[0].environment))
        stop = tuple(dict.fromkeys((*params.stop_strings, *syntax_stops)))
        for turn in range(1, self.limits.max_turns + 1):
            going = [row for row in episodes if row.live]
            if not going:
                break
            drawn = self._draw(prompt_ids, going, G, params, stop, seeds, turn, budget)
            stepping = []
            for row, (ids, logp, truncated) in zip(going, drawn):
                room = budget - len(row.ids)
                cut = len(ids) > room
                ids, logp = ids[:room], logp[:room]
                row.ids += ids
                row.trained += [1] * len(ids)
                row.logp += logp
                row.episode.pieces.append(("model", self.tokenizer.decode(ids, skip_special_tokens=True)))
                row.episode.num_turns += 1
                if cut or truncated:
                    row.live, row.truncated, row.episode.ended_by = False, True, "length"
                elif not self._closes(ids):  # (chat: a stop string ended it, not its end token: left as it is)
                    row.live, row.episode.ended_by = False, "stop"
                else:
                    stepping.append(row)
            self._step(stepping, turn, budget)
        return self._rollout(prompt_ids, episodes, G, params)

    # ---------------------------------------------------------------- the parts of `generate`
    def _start(self, p: int, g: int, columns: dict[str, Any], budget: int) -> _Row:
        environment = self.make_environment()
        row = _Row(p, g, environment, Episode(environment, [], step_rewards=[]))
        try:
            observation = environment.reset(**columns)
        except Exception as err:
            raise EnvironmentFailure(
                f"the environment ({_kind(environment)}).reset raised {type(err).__name__}: {err} (prompt {p})"
            ) from err
        if observation is not None:
            ids = self._encode(environment, observation, p, reset=True)
            if len(ids) >= budget:
                raise EnvironmentFailure(
                    f"the environment ({_kind(environment)}).reset of prompt {p} returned an observation of "
                    f"{len(ids)} tokens, which leaves no room for the model in max_completion_length = {budget}"
                )
            self._insert(row, ids, observation)
        return row

    def _draw(
        self,
        prompt_ids,
        going: list[_Row],
        G: int,
        params: SamplingParams,
        stop: tuple[str, ...],
        seeds: list[int] | None,
        turn: int,
        budget: int,
    ) -> list[tuple[list, list, bool]]:  # fmt: skip
        """One turn of the wrapped sampler for the rows still going: (new ids, their logprobs, truncated) per row.
        At turn 1 a prompt whose rows all start at the bare prompt (no opening observation) is drawn as a group, one
        prefill, seeded as a single-turn rollout is; every other row is a prompt of its own with its turn's seed.
        Two calls at most, so that no prompt's draws depend on what the others' environments did."""
        room = max(budget - len(row.ids) for row in going)
        turn_params = replace(params, max_new_tokens=room, stop_strings=stop)
        opened = {row.prompt for row in going if row.ids}
        bare = sorted({row.prompt for row in going} - opened) if turn == 1 else []
        grouped = [row for row in going if row.prompt in bare]  # (in order: row p*G + g of the call)
        alone = [row for row in going if row.prompt not in bare]
        calls = []
        if grouped:
            calls.append((grouped, [list(prompt_ids[p]) for p in bare], G, None if seeds is None else
                          [seeds[p] for p in bare]))  # fmt: skip
        if alone:
            calls.append((alone, [list(prompt_ids[row.prompt]) + row.ids for row in alone], 1, None if seeds is None
                          else [turn_seeds(seeds[row.prompt], row.place, turn) for row in alone]))  # fmt: skip
        drawn: dict[int, tuple[list, list, bool]] = {}
        for rows, histories, count, row_seeds in calls:
            rollout = call_generate(self.inner, histories, num_generations=count, params=turn_params, seeds=row_seeds)
            check_rollout(rollout, self.inner, rows=len(histories) * count, prompts=histories)
            real = rollout.completion_mask.bool().cpu()
            ids, logp, truncated = rollout.completion_ids.cpu(), rollout.sampling_logp.float().cpu(), rollout.truncated
            for i, row in enumerate(rows):
                drawn[id(row)] = (ids[i][real[i]].tolist(), logp[i][real[i]].tolist(), bool(truncated[i]))
        return [drawn[id(row)] for row in going]

    def _step(self, rows: list[_Row], turn: int, budget: int) -> None:
        """Every row's environment reads the model's turn (concurrently); its observation is inserted, or the row
        ends (done, no observation, its last turn, or no room left)."""

        def step(environment: Any) -> Any:  # (a last turn's tool calls are not made: nobody would read them)
            last = turn == self.limits.max_turns and getattr(environment, "last_step", None)
            return last or environment.step

        answers = _concurrently(
            [(step(row.environment), row.episode.pieces[-1][1]) for row in rows],
            [None if getattr(row.environment, "manages_timeouts", False) else self.limits.step_timeout for row in rows],
        )
        for row, (status, value) in zip(rows, answers):
            name = _kind(row.environment)
            if status == "timeout":
                row.episode.tool_timeouts += 1
                row.live, row.episode.ended_by = False, "timeout"
                continue
            if status == "raised":
                raise EnvironmentFailure(
                    f"the environment ({name}).step raised {type(value).__name__}: {value} (prompt {row.prompt}, "
                    f"generation {row.place}, turn {turn})"
                ) from value
            observation, reward, done = _step_answer(value, name, row, turn)
            row.episode.step_rewards.append(reward)
            if not done and turn == self.limits.max_turns:
                row.live, row.episode.ended_by = False, "max_turns"
                continue
            if done or observation is None:
                row.live, row.episode.done, row.episode.ended_by = False, bool(done), "done"
                continue
            ids = self._encode(row.environment, observation, row.prompt)
            if len(ids) > self.limits.max_tool_output_tokens:  # (chat: cut inside the messages, the template kept)
                cut = getattr(self.insertion, "cut", None)
                limit = self.limits.max_tool_output_tokens
                ids, observation = (ids[:limit], observation) if cut is None else cut(observation, limit)
                row.episode.observations_cut += 1
            if len(row.ids) + len(ids) >= budget:  # no room left for a model token after it: rolled back
                row.live, row.truncated, row.episode.ended_by = False, True, "overflow"
                continue
            self._insert(row, ids, observation)

    def _closes(self, ids: list[int]) -> bool:
        closes = getattr(self.insertion, "closes_turn", None)
        return closes is None or closes(ids)

    def _encode(self, environment: Any, observation: Any, p: int, reset: bool = False) -> list[int]:
        try:
            encode = getattr(self.insertion, "encode_reset", None) if reset else None  # (chat: refused)
            return (encode or self.insertion.encode)(observation)
        except TypeError as err:
            raise EnvironmentFailure(
                f"the environment ({_kind(environment)}) of prompt {p} returned an observation grpokit cannot "
                f"insert: {err}"
            ) from err

    def _insert(self, row: _Row, ids: list[int], observation: Any) -> None:
        row.shown.append(observation)
        row.ids += ids
        row.trained += [0 if self.limits.mask_inserted_tokens else 1] * len(ids)
        row.logp += [0.0] * len(ids)
        row.episode.pieces.append(("inserted", self.tokenizer.decode(ids, skip_special_tokens=True)))

    def _rollout(self, prompt_ids: list[list[int]], rows: list[_Row], G: int, params: SamplingParams) -> Rollout:
        pad = self.tokenizer.pad_token_id
        width = max(len(row.ids) for row in rows)
        longest = max(len(ids) for ids in prompt_ids)
        prompts = torch.tensor([[pad] * (longest - len(ids)) + list(ids) for ids in prompt_ids])  # (P, Tp) left-padded
        prompt_mask = torch.tensor([[0] * (longest - len(ids)) + [1] * len(ids) for ids in prompt_ids])

        def right(values: list, fill) -> list:
            return values + [fill] * (width - len(values))

        form = getattr(self.insertion, "messages", None)  # (chat: the completion in TRL's message form)
        for row in rows:  # the tool calls the row's environment made, as the rewards see them
            row.episode.messages = None if form is None else form(row.episode.pieces, row.shown)
            calls = getattr(row.environment, "calls", None)
            if calls is not None:
                row.episode.tool_calls = [call.as_record() for call in calls]
                row.episode.tool_timeouts += sum(call.timed_out for call in calls)
                row.episode.tool_errors = sum(call.error is not None and not call.timed_out for call in calls)
        return Rollout(
            prompt_ids=prompts.repeat_interleave(G, dim=0),  # (N, Tp)
            prompt_mask=prompt_mask.repeat_interleave(G, dim=0),  # (N, Tp)
            completion_ids=torch.tensor([right(row.ids, pad) for row in rows]),  # (N, Tc)
            completion_mask=torch.tensor([right([1] * len(row.ids), 0) for row in rows]),  # (N, Tc) every real token
            sampling_logp=torch.tensor([right(row.logp, 0.0) for row in rows], dtype=torch.float32),  # (N, Tc)
            truncated=torch.tensor([row.truncated for row in rows]),  # (N,)
            group_size=G,
            loss_mask=torch.tensor([right(row.trained, 0) for row in rows]),  # (N, Tc) 1 on sampled tokens only
            episodes=tuple(row.episode for row in rows),
        )


def _kind(environment: Any) -> str:
    """The environment's class as its errors name it: the user's own (a ToolUse's base), not grpokit's wrapper."""
    return type(getattr(environment, "user_environment", environment)).__name__


def writable_stop_strings(tokenizer: Any, stop_strings: tuple[str, ...], environment: str) -> None:
    """The stop strings that end a model turn at a tool call (`</calc>`) are text the tokenizer can write: one with a
    character it maps to its unknown token could never be sampled, and every rollout would stay one turn without a
    word (the built-in character tokenizer has no `<`). A ConfigError naming the string otherwise."""
    unknown = getattr(tokenizer, "unk_token_id", None)
    if unknown is None:
        return
    for text in stop_strings:
        if unknown in tokenizer(text, add_special_tokens=False)["input_ids"]:
            raise ConfigError(
                f"the environment ({environment}) ends a turn at {text!r}, which the tokenizer cannot write (it "
                f"encodes a character of it as {tokenizer.unk_token!r}): the model could never call the tool. Use a "
                "tokenizer whose vocabulary has those characters"
            )


def _step_answer(value: Any, name: str, row: _Row, turn: int) -> tuple[Any, float, bool]:
    """An environment's `step` answer, checked: (observation or None, a finite reward, done)."""
    where = f"the environment ({name}).step of prompt {row.prompt}, generation {row.place}, turn {turn}"
    if not (isinstance(value, tuple) and len(value) == 3):
        raise EnvironmentFailure(f"{where} returned {value!r:.80}; expected (observation or None, reward, done)")
    observation, reward, done = value
    try:
        reward = float(reward)
    except (TypeError, ValueError):
        raise EnvironmentFailure(f"{where} returned the reward {reward!r:.40}, which is not a number") from None
    if reward != reward or reward in (float("inf"), float("-inf")):
        raise EnvironmentFailure(f"{where} returned the reward {reward}: a reward is a finite number")
    return observation, reward, bool(done)


def _concurrently(calls: list[tuple[Any, Any]], timeouts: list[float | None]) -> list[tuple[str, Any]]:
    """`fn(argument)` for every (fn, argument), each in a thread of its own, all at once; per call ("ok", value),
    ("raised", the exception) or ("timeout", None) once its timeout has passed since the calls started (a thread
    that overruns is left to finish on its own: a daemon)."""
    import time

    boxes: list[dict[str, Any]] = [{} for _ in calls]

    def run(box: dict[str, Any], fn: Any, argument: Any) -> None:
        try:
            box["ok"] = fn(argument)
        except Exception as err:  # noqa: BLE001 (named by the caller, with its row)
            box["raised"] = err

    threads = [threading.Thread(target=run, args=(box, fn, arg), daemon=True) for box, (fn, arg) in zip(boxes, calls)]
    start = time.monotonic()
    for thread in threads:
        thread.start()
    out = []
    for thread, box, timeout in zip(threads, boxes, timeouts):
        thread.join(None if timeout is None else max(0.0, start + timeout - time.monotonic()))
        if thread.is_alive():
            out.append(("timeout", None))
        else:
            out.append(("raised", box["raised"]) if "raised" in box else ("ok", box["ok"]))
    return out


ENDINGS = ("max_turns", "length", "overflow", "timeout", "stop")  # how a row ends but "done", each counted


def rollout_counts(episodes: tuple[Episode, ...] | None, prompts_cut: int) -> dict[str, float]:
    """This rank's counts of a step's rollout that the step's figures sum over the ranks (`episode_figures`): the
    prompts cut to max_prompt_length, and for a multi-turn rollout its rows, turns, tool calls and how rows ended."""
    counts = {"prompts_truncated": float(prompts_cut)}
    if episodes is None:
        return counts
    ended = [e.ended_by for e in episodes]
    counts.update({
        "rows": float(len(episodes)),
        "turns": float(sum(e.num_turns for e in episodes)),
        "calls": float(sum(len(e.tool_calls or []) for e in episodes)),
        "rows_with_calls": float(sum(bool(e.tool_calls) for e in episodes)),
        "errors": float(sum(e.tool_errors for e in episodes)),
        "timeouts": float(sum(e.tool_timeouts for e in episodes)),
        "cut": float(sum(e.observations_cut for e in episodes)),
        **{f"ended_{why}": float(ended.count(why)) for why in ENDINGS},
    })  # fmt: skip
    return counts


def episode_figures(counts: dict[str, float]) -> dict[str, float]:
    """The step's figures from `rollout_counts` summed over the ranks: per row, tool calls (`tools/call_frequency`,
    TRL's name), rows that called a tool, failures (errors and timeouts, told to the model), model turns; and counts
    of calls that failed, observations cut and rows ended by each limit."""
    figures = {"prompts_truncated": counts["prompts_truncated"]}
    rows = counts.get("rows")
    if not rows:
        return figures
    figures.update({
        "turns/mean": counts["turns"] / rows,
        "tools/call_frequency": counts["calls"] / rows,
        "tools/rows_with_calls": counts["rows_with_calls"] / rows,
        "tools/failure_frequency": (counts["errors"] + counts["timeouts"]) / rows,
        "tools/errors": counts["errors"],
        "tools/timeouts": counts["timeouts"],
        "turns/observations_cut": counts["cut"],
        **{f"turns/ended_{why}": counts[f"ended_{why}"] for why in ENDINGS},
    })  # fmt: skip
    return figures
