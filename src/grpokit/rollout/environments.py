"""The environment contract of a multi-turn rollout, tools on top of it, and the tag protocol for small models.

An environment is any object with

    reset(**columns) -> str | None          the row's data columns; an observation put before the model's first turn
    step(text) -> (observation, reward, done)   after each model turn: what goes back to the model (None: nothing),
                                             this turn's reward, whether the episode is over
    reward() -> float | None                 (optional; TRL's `get_reward()` too) the episode's outcome, read once

made fresh for every rollout row by a factory called with no arguments (TRL's `environment_factory`), so that the G
rows of a group never share state. It is duck-typed: an OpenEnv, SkyRL or rLLM environment fits through a class of
a few lines that calls it. `rollout.multiturn.MultiTurnSampler` drives it.

Tools are the common case: `ToolUse` is an environment whose `step` finds the tool calls in the model's turn, calls
them (each under a timeout, its exception or timeout told to the model as text, never raised) and answers with their
results. How calls are written and answered is a syntax: `TagSyntax`, for chat templates without tool support and for
tiny models, where a tool `calc` is called by `<calc>ARGUMENT</calc>` (the turn stops at the closing tag) and answered
`<result>OUTPUT</result>`.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import operator
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from grpokit.core.types import ConfigError
from grpokit.rollout.chat_tools import ChatSyntax
from grpokit.runtime.sandbox import SandboxUnavailable, check_sandbox, default_interpreter, find_bwrap
from grpokit.runtime.sandbox import python as python_tool


class Environment(Protocol):
    """What a multi-turn rollout needs from one row's environment (see the module's docstring)."""

    def reset(self, **columns: Any) -> str | None: ...

    def step(self, text: str) -> tuple[str | None, float, bool]: ...


class EnvironmentFailure(RuntimeError):
    """An environment's own code failed (reset or step raised, or gave what the contract does not allow); the
    message names its class and the row."""


# ---------------------------------------------------------------------------------------------------- tool calls
@dataclass
class ToolOutcome:
    """One tool call: its name and arguments, and its result, or the error the model is told instead."""

    name: str
    arguments: dict[str, Any]
    result: Any = None
    error: str | None = None  # the text the model sees instead of a result
    timed_out: bool = False

    def as_record(self) -> dict[str, Any]:
        """The call as the reward functions see it (`tool_calls`)."""
        answer = {"error": self.error} if self.error is not None else {"result": self.result}
        return {"name": self.name, "arguments": self.arguments, **answer}


def call_tool(tools: dict[str, Callable[..., Any]], name: str, arguments: dict[str, Any], timeout: float | None) -> (
    ToolOutcome
):  # fmt: skip
    """`tools[name](**arguments)` in a thread of its own, waited for at most `timeout` seconds. An unknown name, an
    exception or a timeout becomes the outcome's `error` text (the model reads it and may try again); nothing is
    raised, except SandboxUnavailable (the machine cannot run the tool's code safely: the trainer's problem, not the
    model's). A timed-out call's thread is left to finish on its own (a daemon: Python cannot stop a thread), so a tool
    that can hang should run its work in a process it can kill, as `grpokit.sandbox` does."""
    if name not in tools:
        known = ", ".join(sorted(tools)) or "none"
        return ToolOutcome(name, arguments, error=f"error: no tool named {name!r} (tools: {known})")
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            result = tools[name](**arguments)
            box["result"] = asyncio.run(_awaited(result)) if inspect.isawaitable(result) else result  # (an async tool)
        except SandboxUnavailable as err:  # no sandbox here: the run must stop, not the model read it
            box["fatal"] = err
        except BaseException as err:  # noqa: BLE001 (a tool's failure is the model's to read, whatever it is)
            box["error"] = f"error: {type(err).__name__}: {err}"

    worker = threading.Thread(target=run, name=f"grpokit-tool-{name}", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        return ToolOutcome(name, arguments, error=f"error: {name} timed out after {timeout:g} s", timed_out=True)
    if "fatal" in box:
        raise box["fatal"]
    if "error" in box:
        return ToolOutcome(name, arguments, error=box["error"])
    return ToolOutcome(name, arguments, result=box.get("result"))


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


def tool_name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


def check_tools(tools: Sequence[Callable[..., Any]]) -> dict[str, Callable[..., Any]]:
    """The tools by name, refused (a ConfigError naming the tool) when one is not callable or two share a name."""
    by_name: dict[str, Callable[..., Any]] = {}
    for fn in tools:
        if not callable(fn):
            raise ConfigError(f"`tools` holds {fn!r}, which is not callable: a tool is a typed Python function")
        name = tool_name(fn)
        if name in by_name:
            raise ConfigError(f"`tools` has two tools named {name!r}: the model calls a tool by its name")
        by_name[name] = fn
    return by_name


# ---------------------------------------------------------------------------------------------------- the tag syntax
class TagSyntax:
    """Tool calls as tags, for templates without tool support and for tiny models: the model writes
    `<NAME>ARGUMENT</NAME>`, its turn stops at the stop string `</NAME>`, and the tool's output comes back as
    `<result>OUTPUT</result>` (`result_tag`). A tool in this syntax takes one argument, the text between the tags."""

    def __init__(self, tools: dict[str, Callable[..., Any]], *, result_tag: str = "result"):
        if result_tag in tools:  # its calls and every answer would share one tag
            raise ConfigError(
                f"tool {result_tag!r} has the name of the tag every tool's answer comes in (<{result_tag}>...</"
                f"{result_tag}>): the model could not tell its calls from the answers; rename the function"
            )
        for name, fn in tools.items():
            required = [
                p
                for p in _parameters(fn)
                if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            ]
            if len(required) > 1:
                raise ConfigError(
                    f"tool {name!r} takes {len(required)} arguments ({', '.join(p.name for p in required)}); in the "
                    f"tag syntax a tool takes one, the text between <{name}> and </{name}>; with tool_format: chat a "
                    "tool takes its arguments by name (through the chat template's tool support)"
                )
        self.tools = tools
        self.result_tag = result_tag
        self.stop_strings = tuple(f"</{name}>" for name in tools)

    def parse(self, text: str) -> list[tuple[str, dict[str, Any]]]:
        """The call that ended the turn: the last `</NAME>` of a tool and the `<NAME>` before it; [] for none."""
        found: tuple[int, str] | None = None
        for name in self.tools:
            end = text.rfind(f"</{name}>")
            if end >= 0 and (found is None or end > found[0]):
                found = (end, name)
        if found is None:
            return []
        end, name = found
        start = text.rfind(f"<{name}>", 0, end)
        if start < 0:
            return [(name, {"__malformed__": f"</{name}> without <{name}> before it"})]
        argument = text[start + len(name) + 2 : end]
        params = [p.name for p in _parameters(self.tools[name])]
        return [(name, {params[0]: argument} if params else {})]

    def observation(self, outcomes: list[ToolOutcome]) -> str:
        tag = self.result_tag
        return "".join(f"<{tag}>{o.error if o.error is not None else o.result}</{tag}>" for o in outcomes)

    @property
    def result_frame(self) -> tuple[str, str]:
        """The tags around an answer, which an answer cut to max_tool_output_tokens keeps."""
        return f"<{self.result_tag}>", f"</{self.result_tag}>"

    def frame(self, observation: str) -> tuple[str, str, str] | None:
        """An answer as (`<result>`, what is between, `</result>`), so that a cut keeps both tags (a model that reads
        an unclosed `<result>` goes on writing inside it); None for text that is not an answer."""
        head, tail = self.result_frame
        if len(observation) >= len(head) + len(tail) and observation.startswith(head) and observation.endswith(tail):
            return head, observation[len(head) : len(observation) - len(tail)], tail
        return None


def _parameters(fn: Callable[..., Any]) -> list[inspect.Parameter]:
    try:
        return list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return []


# ---------------------------------------------------------------------------------------------------- tool use
class ToolUse:
    """An environment whose `step` calls the tools the model's turn asks for and answers with their outputs; a turn
    without a call ends the episode. `base` (optional) is an environment of TRL's `environment_factory` form: its
    `reset(**columns)` is called with the row, its public methods are tools beside `tools`, its `get_reward()` /
    `reward()` is the episode's outcome."""

    manages_timeouts = True  # each call has its own timeout: the sampler waits for `step` without one

    def __init__(self, tools: Sequence[Callable[..., Any]], syntax_factory: Callable[[dict], Any], *,
                 timeout: float | None, base: Any = None, trl_methods: bool = False):  # fmt: skip
        self.base = base
        self.outcome_names = ("get_reward",) if trl_methods else ("reward", "get_reward")
        skip = TRL_NOT_TOOLS if trl_methods else NOT_TOOLS
        self.tools = check_tools([*tools, *(environment_methods(base, skip) if base is not None else [])])
        self.syntax = syntax_factory(self.tools)
        self.timeout = timeout
        self.calls: list[ToolOutcome] = []

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return getattr(self.syntax, "stop_strings", ())

    def reset(self, **columns: Any) -> str | None:
        self.calls = []
        return self.base.reset(**columns) if self.base is not None else None

    def last_step(self, text: str) -> tuple[Any, float, bool]:
        """`step` of the row's last allowed turn: whether the model ended (no call), without making the calls, whose
        output the model would never read (a tool's step rewards are 0)."""
        return None, 0.0, not self.syntax.parse(text)

    def step(self, text: str) -> tuple[Any, float, bool]:
        requests = self.syntax.parse(text)
        if not requests:
            return None, 0.0, True
        outcomes = []
        for name, arguments in requests:
            if "__malformed__" in arguments:
                outcomes.append(ToolOutcome(name, {}, error=f"error: {arguments['__malformed__']}"))
            else:
                outcomes.append(call_tool(self.tools, name, arguments, self.timeout))
        self.calls += outcomes
        return self.syntax.observation(outcomes), 0.0, False

    def observation_frame(self, observation: Any) -> tuple[str, str, str] | None:
        """(opening, body, closing) of an answer whose tags a cut keeps (the tag syntax's); None: cut as it is."""
        frame = getattr(self.syntax, "frame", None)
        return frame(observation) if frame is not None and isinstance(observation, str) else None

    def reward(self) -> float | None:
        outcome = _reward_method(self.base, self.outcome_names)
        return None if outcome is None else outcome()

    @property
    def user_environment(self) -> Any:
        """What the reward functions get as this row's environment: the instance the user's factory made (as TRL
        passes it: its own class, its state), or this object for tools alone."""
        return self if self.base is None else self.base

    def chat_messages(self, pieces: list[tuple[str, str]]) -> list[dict[str, Any]] | None:
        """The row's completion as TRL's messages, when the syntax knows them (`ChatSyntax`); None: the default."""
        form = getattr(self.syntax, "messages", None)
        return None if form is None else form(pieces)

    def __getattr__(self, name: str) -> Any:  # a reward function reading `environments` sees the base's state
        base = self.__dict__.get("base")
        if base is None:
            raise AttributeError(name)
        return getattr(base, name)


NOT_TOOLS = frozenset({"reset", "step", "get_reward", "reward"})
TRL_NOT_TOOLS = frozenset({"reset", "get_reward"})  # TRL's rule: a `step` or `reward` method is a tool there


def environment_methods(instance: Any, skip: frozenset[str] = NOT_TOOLS) -> list[Callable[..., Any]]:
    """An environment instance's tools as TRL exposes them: its public methods but those in `skip` (listed on the
    class, so that a property is not evaluated)."""
    return [
        getattr(instance, name)
        for name, _ in inspect.getmembers(type(instance), predicate=inspect.isfunction)
        if not name.startswith("_") and name not in skip
    ]


def _reward_method(instance: Any, names: tuple[str, ...] = ("reward", "get_reward")) -> Callable[[], Any] | None:
    for name in names:
        method = getattr(type(instance), name, None) if instance is not None else None
        if callable(method):
            return getattr(instance, name)
    return None


def outcome_reward(environment: Any) -> Callable[[], Any] | None:
    """The environment's episode reward (`reward()`, or TRL's `get_reward()`), None when it has none."""
    if isinstance(environment, ToolUse):
        return environment.reward if _reward_method(environment.base, environment.outcome_names) is not None else None
    return _reward_method(environment)


# ---------------------------------------------------------------------------------------------------- built-in tools
_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
              ast.Mod: operator.mod}  # fmt: skip
_MAX_DIGITS = 200  # a product of products would otherwise grow without bound


def calc(expression: str) -> str:
    """Evaluate an integer arithmetic expression (+, -, *, //, %, parentheses) and return its value.

    Args:
        expression: the expression, e.g. "12345+67890".
    """

    def value(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            inner = value(node.operand)
            return -inner if isinstance(node.op, ast.USub) else inner
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            left, right = value(node.left), value(node.right)
            out = _OPERATORS[type(node.op)](left, right)
            if len(str(abs(out))) > _MAX_DIGITS:
                raise ValueError(f"the result has more than {_MAX_DIGITS} digits")
            return out
        raise ValueError(f"not integer arithmetic: {ast.unparse(node)!r}")

    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as err:
        raise ValueError(f"cannot read {expression!r}: {err.msg}") from None
    return str(value(tree.body))


BUILTIN_TOOLS: dict[str, Callable[..., Any]] = {"calc": calc, "python": python_tool}
"""Tools a config names by a bare name (`tools: [calc]`); any other is `module:function`."""


# ---------------------------------------------------------------------------------------------- a run's environments
SYNTAXES: dict[str, Callable[[dict[str, Callable[..., Any]]], Any]] = {"tags": TagSyntax, "chat": ChatSyntax}
"""`tool_format` -> the syntax of tool calls, made from the tools by name (`chat`: `rollout.chat_tools`)."""


class TRLEnvironment:
    """TRL's `environment_factory` as `grpokit.trl` hands it over: every public method of its instances is a tool,
    `step` and `reward` too (TRL lists them so), only `reset` and `get_reward` are not, and `get_reward()` is the
    episode's outcome. (grpokit's own rule reads an environment with a `step` method as one that reads every turn.)"""

    def __init__(self, factory: Callable[[], Any]):
        self.factory = factory
        self.__name__ = getattr(factory, "__name__", type(factory).__name__)  # (what errors name)

    def __call__(self) -> Any:
        return self.factory()


def resolve_tools(specs: Sequence[Any], importer: Callable[[str], Any]) -> list[Callable[..., Any]]:
    """Tools as a config names them (a built-in name, or `package.module:function` through `importer`) or as
    functions handed in."""
    out = []
    for spec in specs:
        if callable(spec):
            out.append(spec)
        elif spec in BUILTIN_TOOLS:
            if spec == "python":  # no sandbox here: said now, before any model loads, not at the first call
                check_sandbox(find_bwrap(), default_interpreter())
            out.append(BUILTIN_TOOLS[spec])
        elif isinstance(spec, str) and ":" in spec:
            out.append(importer(spec))
        else:
            raise ConfigError(
                f"config field `tools` holds {spec!r}: a built-in tool ({', '.join(BUILTIN_TOOLS)}) or "
                "`package.module:function`"
            )
    return out


def environment_maker(tools: Sequence[Callable[..., Any]], factory: Callable[[], Any] | None, *, tool_format: str,
                      timeout: float | None) -> Callable[[], Any] | None:  # fmt: skip
    """What makes one row's environment: `factory` itself when its instances have their own `step`, else a `ToolUse`
    over `tools` and the factory's instance (TRL's `environment_factory`: methods as tools); None for neither. One
    instance is made here to check the factory (as TRL does), so a broken one stops the run before any model loads."""
    if factory is None and not tools:
        return None
    if tool_format not in SYNTAXES:
        raise ConfigError(f"config field `tool_format` is {tool_format!r}: one of {', '.join(SYNTAXES)}")
    check_tools(tools)  # names and callables, before any row
    trl = isinstance(factory, TRLEnvironment)
    if factory is not None:
        if not callable(factory):
            raise ConfigError(f"`environment` is {factory!r}, which is not callable: give a class or a function")
        try:
            probe = factory()
        except Exception as err:
            raise ConfigError(f"`environment` ({tool_name(factory)}) raised {type(err).__name__} when called with no "
                              f"arguments: {err}") from err  # fmt: skip
        if not callable(getattr(probe, "reset", None)):
            raise ConfigError(f"`environment` makes {type(probe).__name__} objects, which have no `reset` method: an "
                              "environment has reset(**columns) (and step(text), or tool methods)")  # fmt: skip
        if callable(getattr(probe, "step", None)) and not trl:
            if tools:
                raise ConfigError(
                    f"`environment` ({type(probe).__name__}) has its own step(), which reads every model turn, and "
                    "`tools` are set too: call the tools from its step(), or give an environment without step() "
                    "whose methods are its tools"
                )
            return factory
    # the tools (the factory's methods among them) checked by the syntax, before any row: one argument, no clash
    ToolUse(tools, SYNTAXES[tool_format], timeout=timeout, base=probe if factory else None, trl_methods=trl)

    def make() -> ToolUse:
        base = factory() if factory else None
        return ToolUse(tools, SYNTAXES[tool_format], timeout=timeout, base=base, trl_methods=trl)

    return make


def environment_rewards(make: Callable[[], Any]) -> list[tuple[str, Callable[..., list[float | None]]]]:
    """The reward columns an environment brings: its `reward()` / `get_reward()` (named after its class, as TRL
    names it), and the sum of its `step` rewards (NAME_steps) for an environment with its own step()."""
    probe = make()
    base = probe.base if isinstance(probe, ToolUse) else probe
    names = probe.outcome_names if isinstance(probe, ToolUse) else ("reward", "get_reward")
    columns: list[tuple[str, Callable[..., list[float | None]]]] = []
    if base is not None and outcome_reward(probe) is not None:

        def outcome(environments: list[Any], **_: Any) -> Any:  # (the instances the factory made: `user_environment`)
            values = [_reward_method(e, names)() for e in environments]
            if not any(inspect.isawaitable(v) for v in values):
                return values

            async def gathered() -> list[Any]:  # an async get_reward (TRL allows one): awaited together
                return [await v if inspect.isawaitable(v) else v for v in values]

            return gathered()

        columns.append((type(base).__name__, outcome))
    if not isinstance(probe, ToolUse):

        def steps(step_rewards: list[list[float]], **_: Any) -> list[float]:
            return [float(sum(rewards)) for rewards in step_rewards]

        columns.append((f"{type(probe).__name__}_steps", steps))
    return columns
