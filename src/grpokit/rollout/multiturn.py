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
columns; a factory that hands two rows the same object is refused: the rows step theirs concurrently). At turn 1
the prompts whose environments inserted nothing before it are one call of the wrapped sampler (G draws each, seeded
as a single-turn rollout is); every other row, at every turn, is a prompt of its own (its whole history) with a seed
derived from its prompt's seed, its place in the group and the turn (`turn_seeds`), so a row's draws do not depend
on the other rows of the call.

Limits: `max_turns` model turns; `max_new_tokens` (the run's max_completion_length) counts the model's and the
inserted tokens together: a turn gets what is left, and an observation that would leave no room for a model token is
rolled back (the row ends, truncated); an observation is cut to `max_tool_output_tokens` (a tool's answer in the tag
syntax inside its `<result>` tags, which stay), and a text observation is cut to a bound of characters before it is
tokenized (`PlainInsertion.encode_within`: a tool's 10 MB answer costs its first tokens, not 10 MB of tokenizing); an
environment's `step`
that does not manage its own timeouts gets `step_timeout` seconds. The rows' `step` calls of one turn run
concurrently (threads; tools that do real work run it in processes, `grpokit.sandbox`).
"""

from __future__ import annotations

import numbers
import threading
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from grpokit.core.types import ConfigError, Episode, Rollout
from grpokit.rollout.environments import EnvironmentFailure, ToolUse
from grpokit.rollout.sampler import SamplingParams, call_generate, check_rollout


@dataclass(frozen=True)
class TurnLimits:
    """How far a multi-turn rollout may go."""

    max_turns: int = 8
    """Model turns per row; the row ends after its last (its environment's step still scores that turn)."""
    max_tool_output_tokens: int = 256
    """An observation (a tool's output) is cut to this many tokens before it is inserted (the tag syntax's answer
    inside its `<result>` tags, which count)."""
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
        self._chars_per_token: int | None = None

    def encode(self, observation: Any) -> list[int]:
        if not isinstance(observation, str):
            raise TypeError(f"an observation is a str here, got {type(observation).__name__}")
        return list(self.tokenizer(observation, add_special_tokens=False)["input_ids"])

    def chars_per_token(self) -> int:
        """A bound on the characters one token stands for: the longest entry of the vocabulary (byte-level BPE
        writes a token as its bytes, SentencePiece as its characters: never fewer than the characters it covers)."""
        if self._chars_per_token is None:
            vocabulary = self.tokenizer.get_vocab() if hasattr(self.tokenizer, "get_vocab") else {}
            self._chars_per_token = max(map(len, vocabulary), default=0) or 64
        return self._chars_per_token

    def encode_within(self, text: str, limit: int) -> list[int]:
        """The ids of `text`, or of a prefix of it that holds more than `limit` tokens: only (limit + 1) x
        `chars_per_token()` characters are tokenized first, doubled while a normalizer that merges characters leaves
        them under `limit + 1` tokens. A caller keeping at most `limit` tokens keeps what the whole text would
        give, up to the prefix's last word."""
        if not isinstance(text, str):
            raise TypeError(f"an observation is a str here, got {type(text).__name__}")
        size = (limit + 1) * self.chars_per_token()
        while size < len(text):
            ids = self.encode(text[:size])
            if len(ids) > limit:
                return ids
            size *= 2
        return self.encode(text)

    def fit(self, observation: Any, limit: int, frame: tuple[str, str, str] | None) -> tuple[list[int], bool]:
        """(the ids inserted for `observation`, whether it was cut to `limit` tokens). With `frame` (opening, body,
        closing: the tag syntax's `<result>`, the answer, `</result>`) a cut keeps both tags whole around the body's
        first tokens; else it keeps the first `limit` tokens."""
        ids = self.encode_within(observation, limit)
        if len(ids) <= limit:
            return ids, False
        if frame is None:
            return ids[:limit], True
        head, body, tail = (self.encode(frame[0]), frame[1], self.encode(frame[2]))
        room = limit - len(head) - len(tail)  # >= 1: check_tool_syntax refuses a limit the tags fill
        if room < 1:
            raise ConfigError(f"max_tool_output_tokens = {limit} leaves no room inside {frame[0]}...{frame[2]}")
        return head + self.encode_within(body, room)[:room] + tail, True


def turn_seeds(prompt_seed: int, place_in_group: int, turn: int) -> int:
    """The seed of one row's turn `turn` (turn 1 of a prompt without opening observations draws from the prompt's
    seed as a single-turn rollout does): an unsigned 64-bit integer from (its prompt's seed, its place in the group,
    the turn)."""
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
    shown: list[Any] = field(default_factory=list)  # each inserted observation (chat: its messages as cut)


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
        self._syntax_checked = False

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
        made = [self.make_environment() for _ in range(len(prompt_ids) * G)]
        one_per_row(made, G)
        if not self._syntax_checked:  # (stages.setup checks it before the model loads; a sampler built by hand here)
            check_tool_syntax(self.tokenizer, made[0], self.limits.max_tool_output_tokens)
            self._syntax_checked = True
        episodes = [self._start(i // G, i % G, env, columns[i // G], budget) for i, env in enumerate(made)]
        syntax_stops = tuple(getattr(episodes[0].environment, "stop_strings", ()))
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
    def _start(self, p: int, g: int, environment: Any, columns: dict[str, Any], budget: int) -> _Row:
        row = _Row(p, g, environment, Episode(environment, [], step_rewards=[]))
        try:
            observation = environment.reset(**columns)
        except Exception as err:
            raise EnvironmentFailure(
                f"the environment ({_kind(environment)}).reset raised {type(err).__name__}: {err} (prompt {p})"
            ) from err
        if observation is not None:
            ids = self._encode_reset(environment, observation, p)
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
            ids, cut, observation = self._observation_ids(row, observation, turn)
            row.episode.observations_cut += cut
            if len(row.ids) + len(ids) >= budget:  # no room left for a model token after it: rolled back
                row.live, row.truncated, row.episode.ended_by = False, True, "overflow"
                continue
            self._insert(row, ids, observation)

    def _observation_ids(self, row: _Row, observation: Any, turn: int) -> tuple[list[int], bool, Any]:
        """The ids inserted for a step's observation, cut to max_tool_output_tokens, whether it was cut, and the
        observation as it was shown: plain text bounded before it is tokenized, a tag syntax answer cut inside its
        tags (`PlainInsertion.fit`); with `tool_format: chat` bounded, rendered, then cut inside the messages'
        contents (the template's tokens kept; `ChatInsertion.cut` gives the messages as cut)."""
        limit = self.limits.max_tool_output_tokens
        fit = getattr(self.insertion, "fit", None)
        try:
            if fit is None:
                ids = self.insertion.encode(observation)
                if len(ids) <= limit:
                    return ids, False, observation
                ids, shown = self.insertion.cut(observation, limit)
                return ids, True, shown
            frame = getattr(row.environment, "observation_frame", None)
            return (*fit(observation, limit, frame(observation) if callable(frame) else None), observation)
        except TypeError as err:
            raise EnvironmentFailure(
                f"the environment ({_kind(row.environment)}).step of prompt {row.prompt}, generation {row.place}, "
                f"turn {turn} returned an observation grpokit cannot insert: {err}"
            ) from err

    def _closes(self, ids: list[int]) -> bool:
        closes = getattr(self.insertion, "closes_turn", None)
        return closes is None or closes(ids)

    def _encode_reset(self, environment: Any, observation: Any, p: int) -> list[int]:
        try:
            encode = getattr(self.insertion, "encode_reset", None)  # (chat: refused)
            return (encode or self.insertion.encode)(observation)
        except TypeError as err:
            raise EnvironmentFailure(
                f"the environment ({_kind(environment)}).reset of prompt {p} returned an observation grpokit cannot "
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
        for row in rows:  # the calls a ToolUse made (a user environment's own `calls` is theirs)
            row.episode.messages = None if form is None else form(row.episode.pieces, row.shown)
            calls = row.environment.calls if isinstance(row.environment, ToolUse) else None
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


def one_per_row(environments: list[Any], G: int) -> None:
    """Each row has an environment of its own: a factory that returns one object for two rows (a shared instance)
    would have the rows step it concurrently, each reading the others' moves. An EnvironmentFailure naming them."""
    first: dict[int, int] = {}
    for i, environment in enumerate(environments):
        j = first.setdefault(id(getattr(environment, "user_environment", environment)), i)
        if j != i:
            raise EnvironmentFailure(
                f"the environment factory returned the same {_kind(environment)} object for rows {j} and {i} (prompt "
                f"{j // G}, generation {j % G} and prompt {i // G}, generation {i % G}): make an environment per row "
                "(a class, or a function that builds a new instance each call); the rows step theirs concurrently"
            )


def check_tool_syntax(tokenizer: Any, environment: Any, max_tool_output_tokens: int) -> None:
    """Before the first rollout (`stages.setup` calls it before the model loads): the stop strings that end a model
    turn at a tool call (`</calc>`) are text the tokenizer can write: one with a character it maps to its unknown
    token could never be sampled, and every rollout would stay one turn without a word (the built-in character
    tokenizer has no `<`); and max_tool_output_tokens leaves room for an answer inside the tag syntax's `<result>`
    tags, which a cut keeps. A ConfigError naming the tool and the config field otherwise."""

    def encode(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    unknown = getattr(tokenizer, "unk_token_id", None)
    tools = environment.tools if isinstance(environment, ToolUse) else {}
    for text in getattr(environment, "stop_strings", ()) if unknown is not None else ():
        if unknown not in encode(text):
            continue
        name = next((name for name in tools if text == f"</{name}>"), None)
        if name is None:
            who = f"config field `environment`: {_kind(environment)} ends a model turn at {text!r}"
        else:
            base = environment.base
            field = "environment" if base is not None and getattr(tools[name], "__self__", None) is base else "tools"
            who = f"config field `{field}`: the tool `{name}` is called as <{name}>...</{name}> (tool_format: tags)"
        raise ConfigError(
            f"{who}, and the tokenizer cannot write {text!r} (it encodes a character of it as {tokenizer.unk_token!r}):"
            " the model could never call it. Use a tokenizer whose vocabulary has those characters"
        )
    frame = getattr(getattr(environment, "syntax", None), "result_frame", None)
    taken = sum(len(encode(tag)) for tag in frame) if frame else 0
    if frame and taken >= max_tool_output_tokens:
        raise ConfigError(
            f"config field `max_tool_output_tokens` is {max_tool_output_tokens}, and an answer's tags {frame[0]} and "
            f"{frame[1]} take {taken} tokens of it (tool_format: tags; a cut answer keeps them): no room is left for "
            f"the answer; raise it above {taken}"
        )


def _step_answer(value: Any, name: str, row: _Row, turn: int) -> tuple[Any, float, bool]:
    """An environment's `step` answer, checked: (observation or None, a finite reward, done)."""
    where = f"the environment ({name}).step of prompt {row.prompt}, generation {row.place}, turn {turn}"
    if not (isinstance(value, tuple) and len(value) == 3):
        raise EnvironmentFailure(f"{where} returned {value!r:.80}; expected (observation or None, reward, done)")
    observation, reward, done = value
    if not isinstance(reward, numbers.Real):  # a str "1.0" is not taken as 1.0 (numpy's numbers are Real)
        raise EnvironmentFailure(
            f"{where} returned the reward {reward!r:.40} ({type(reward).__name__}), which is not a number: a reward "
            "is a real number (int, float or a numpy number)"
        )
    reward = float(reward)
    if reward != reward or reward in (float("inf"), float("-inf")):
        raise EnvironmentFailure(f"{where} returned the reward {reward}: a reward is a finite number")
    if not isinstance(done, (bool, np.bool_)):  # "no" is truthy: it would end the episode
        raise EnvironmentFailure(
            f"{where} returned done = {done!r:.40} ({type(done).__name__}): done is a bool (True ends the episode)"
        )
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
