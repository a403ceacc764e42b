"""Tools in the chat template (`tool_format: chat`): what TRL's `tools=` / `environment_factory=` do, token in,
token out.

The prompt renders the tools through the template's own tool support (`apply_chat_template(..., tools=[schemas])`,
the JSON schemas transformers' `get_json_schema` makes from a typed, documented function: `tool_schemas`), passed
as template variables at run time, never written into the config's chat_template_kwargs. The model calls a tool in
the Hermes / Qwen form, `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, as many as it likes in one turn,
which ends at the end-of-turn token (`ChatSyntax`); a call that cannot be read (not JSON, no name) is answered with an
error the model reads, and counted. The answers are tool messages, `{"role": "tool", "name": ..., "content":
str(result)}`, and what goes between the model's end token and its next turn (the end of its turn, the tool
messages, the next assistant header) is the template's own rendering: a short conversation rendered with and without
the tool messages, the difference tokenized once and inserted (`ChatInsertion`), loss mask 0.

Before the first rollout the template is checked (`check_chat_template`): it must render a tool call, its arguments
and a tool's result (else it has no tool support: `tool_format: tags`), write the call in the form `ChatSyntax`
reads, end the assistant turn with the tokenizer's EOS token (where each turn stops), and keep every earlier turn as
it was once later ones follow (a template that drops earlier `<think>` blocks, as Qwen3's does, would show the model
after training something else than what it trained on). One that fails is refused, naming the template and why.

transformers 5's `tokenizer.parse_response` (a tokenizer's `response_template`) is not used: few tokenizers carry
one (TRL sets one for the templates it knows), and a call it cannot parse comes back as plain text, so the model is
never told its call was malformed; the Hermes form is read here, and a template writing calls in another form is
refused by name.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable
from typing import Any

from grpokit.core.types import ConfigError

TAGS_WAY_OUT = "tool_format: tags writes tool calls as tags (<NAME>ARGUMENT</NAME>) with any template"

_OPEN, _CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(_OPEN) + r".*?(?:" + re.escape(_CLOSE) + r"|$)", re.S)


class ChatSyntax:
    """Tool calls in the Hermes / Qwen form, `<tool_call>{"name": NAME, "arguments": {...}}</tool_call>`, several per
    turn, read from the model's whole turn (it ends at the end-of-turn token: no stop strings); the answers are tool
    messages, which `ChatInsertion` renders through the template."""

    stop_strings: tuple[str, ...] = ()

    def __init__(self, tools: dict[str, Callable[..., Any]]):
        self.tools = tools

    def parse(self, text: str) -> list[tuple[str | None, dict[str, Any]]]:
        """Every call in the turn, in order: (name, arguments), or (the name it wrote, or None when none can be read,
        {"__malformed__": why}) for a call that cannot be read; [] for a turn without a call."""
        return [call for _, call in _blocks(text)]

    def observation(self, outcomes: list[Any]) -> list[dict[str, Any]]:
        """The tool messages answering one turn's calls, in the calls' order (an error's text in place of a result;
        no `name` for a call whose name could not be read)."""
        return [
            {"role": "tool", **({"name": o.name} if o.name is not None else {}),
             "content": o.error if o.error is not None else str(o.result)}
            for o in outcomes
        ]  # fmt: skip


def _blocks(text: str) -> list[tuple[re.Match[str], tuple[str | None, dict[str, Any]]]]:
    """Each `<tool_call>` block of a turn (where it was written), with the call read from it (`ChatSyntax.parse`)."""
    out = []
    for match in _CALL.finditer(text):
        block = match.group(0)
        if not block.endswith(_CLOSE):
            out.append((match, (None, {"__malformed__": f"{_OPEN} without {_CLOSE} after it"})))
        else:
            out.append((match, _read_call(block[len(_OPEN) : -len(_CLOSE)])))
    return out


def assistant_message(text: str) -> dict[str, Any]:
    """A model turn in TRL's message form: its readable calls as `tool_calls`, the rest of what it wrote as
    `content`. A call that cannot be read stays in the content as written (as TRL keeps a turn it cannot parse)."""
    content, calls, at = [], [], 0
    for match, (name, arguments) in _blocks(text):
        content.append(text[at : match.start()])
        at = match.end()
        if "__malformed__" in arguments:
            content.append(match.group(0))
        else:
            calls.append({"type": "function", "function": {"name": name, "arguments": arguments}})
    message: dict[str, Any] = {"role": "assistant", "content": "".join([*content, text[at:]]).strip()}
    if calls:
        message["tool_calls"] = calls
    return message


def _read_call(body: str) -> tuple[str | None, dict[str, Any]]:
    """One call's JSON body -> (name, arguments); what cannot be read -> (its name if any, {"__malformed__": why})."""
    try:
        call = json.loads(body)
    except json.JSONDecodeError as err:  # (the model has its call before it: the error says where, not the text)
        return None, {"__malformed__": f"the tool call is not valid JSON: {err.msg} at character {err.pos}"}
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"]:
        return None, {"__malformed__": 'a tool call is {"name": NAME, "arguments": {...}}'}
    name, arguments = call["name"], call.get("arguments", call.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as a JSON text
        with contextlib.suppress(ValueError):
            arguments = json.loads(arguments) if arguments.strip() else {}
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        return name, {"__malformed__": f"the arguments of a call to {name} are an object of named values"}
    return name, arguments


# ---------------------------------------------------------------------------------------------------- the prompt
def tool_schemas(tools: dict[str, Callable[..., Any]]) -> list[dict[str, Any]]:
    """The tools' JSON schemas as the chat template renders them: transformers' `get_json_schema`, made from each
    function's type hints and Google-style docstring (what `apply_chat_template(tools=[fn])` does to a function).
    A tool it cannot describe is a ConfigError naming the tool and what it lacks."""
    from transformers.utils import get_json_schema

    schemas = []
    for name, fn in tools.items():
        try:
            schemas.append(get_json_schema(fn))
        except Exception as err:  # transformers' TypeHintParsingException, DocstringParsingException, ...
            raise ConfigError(
                f"tool {name!r}: {err}. With tool_format: chat the chat template shows the model each tool's JSON "
                "schema, made from its type hints and its Google-style docstring (a summary line, then `Args:` with "
                "one `name: description` line per argument)"
            ) from None
    return schemas


def chat_template_kwargs(tokenizer: Any, make_environment: Callable[[], Any], template_kwargs: dict[str, Any] | None,
                         prompts: list[Any]) -> dict[str, Any]:  # fmt: skip
    """The template variables a `tool_format: chat` run renders its prompts with: `template_kwargs` (the config's)
    and `tools`, the schemas of the tools a row's environment offers (one made here to read them), after the
    template is checked (`check_chat_template`) and the prompts found to be chat messages."""
    texts = [i for i, prompt in enumerate(prompts) if isinstance(prompt, str)]
    if texts:
        raise ConfigError(
            f"tool_format: chat renders the tools and their results through the chat template, which renders chat "
            f"prompts (lists of messages); train data row {texts[0]} has a text prompt: give the prompts as "
            f"messages, or {TAGS_WAY_OUT}"
        )
    tools = getattr(make_environment(), "tools", None) or {}  # (a ToolUse's, by name; an environment's own step: none)
    kwargs = {**(template_kwargs or {}), **({"tools": tool_schemas(tools)} if tools else {})}
    check_chat_template(tokenizer, kwargs)
    return kwargs


# ---------------------------------------------------------------------------------------------------- the template
# What the check renders: a user question, an assistant turn that calls a tool (without a thought: a template may
# render an empty thought in the last turn and drop it from earlier ones, as Qwen3's does; and thinking first, unless
# the generation prompt closes the thought itself), the tool's answer, and a last assistant turn; each marker must
# come through as it was written
_USER = {"role": "user", "content": "probe question"}
_THOUGHT = "probe thought"
_CALLED = {"name": "probe_tool", "arguments": {"probe_key": "probe value"}}
_ASKING = [
    {"role": "assistant", "content": text, "tool_calls": [{"type": "function", "function": _CALLED}]}
    for text in ("probe text", f"<think>\n{_THOUGHT}\n</think>\n\nprobe text")
]
_RESULT = {"role": "tool", "name": "probe_tool", "content": "probe result"}
_ANSWER = {"role": "assistant", "content": "probe answer"}


def tokenizer_name(tokenizer: Any) -> str:
    return f"the tokenizer {getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__!r}"


def template_name(tokenizer: Any) -> str:
    return f"the chat template of {tokenizer_name(tokenizer)}"


def render(tokenizer: Any, messages: list[dict[str, Any]], kwargs: dict[str, Any], *, generation: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation, **kwargs)


def check_chat_template(tokenizer: Any, kwargs: dict[str, Any]) -> None:
    """Refuse (a ConfigError naming the template and why) a chat template `tool_format: chat` cannot train through:
    no template; no tool support (it fails on, or drops, a tool call or a tool message); a call written in another
    form than `ChatSyntax` reads; an assistant turn that does not end with the tokenizer's EOS token, where each
    turn stops; or a template that rewrites earlier turns: each rendering must be a prefix of the next one, [user] +
    generation prompt -> [user, assistant] -> [user, assistant, tool] + generation prompt -> [..., assistant], for an
    assistant turn without a thought and one with (which must be kept)."""
    who = template_name(tokenizer)
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"tool_format: chat renders tools through the chat template, and "
                          f"{tokenizer_name(tokenizer)} has none: {TAGS_WAY_OUT}")  # fmt: skip
    special = [tag for tag in (_OPEN, _CLOSE) if tag in set(getattr(tokenizer, "all_special_tokens", ()))]
    if special:  # a model turn reaches the environment decoded without special tokens: the call would vanish
        raise ConfigError(f"{tokenizer_name(tokenizer)} marks {special[0]} as a special token, which a decoded "
                          f"model turn drops, so no tool call would ever be read: {TAGS_WAY_OUT}")  # fmt: skip
    for asking in _ASKING:
        _check_turns(tokenizer, kwargs, who, asking, thought=_THOUGHT in asking["content"])


def _check_turns(tokenizer: Any, kwargs: dict[str, Any], who: str, asking: dict[str, Any], *, thought: bool) -> None:
    try:
        prompt = render(tokenizer, [_USER], kwargs, generation=True)
        asked = render(tokenizer, [_USER, asking], kwargs, generation=False)
        answered = render(tokenizer, [_USER, asking, _RESULT], kwargs, generation=True)
        finished = render(tokenizer, [_USER, asking, _RESULT, _ANSWER], kwargs, generation=False)
    except Exception as err:  # jinja2's TemplateError (roles it refuses), a TypeError on dict arguments, ...
        raise ConfigError(
            f"{who} cannot render a tool-calling conversation (user, assistant with a tool call, tool result): "
            f"{type(err).__name__}: {err}. It has no tool support grpokit can use: {TAGS_WAY_OUT}"
        ) from None
    dropped = [what for what, marker in (("the tool call's name", "probe_tool"), ("its arguments", "probe value"),
                                         ("the tool's result", "probe result")) if marker not in answered]  # fmt: skip
    if dropped:
        raise ConfigError(f"{who} has no tool support: rendering a tool-calling conversation drops "
                          f"{' and '.join(dropped)}. {TAGS_WAY_OUT}")  # fmt: skip
    rewrites = f"{who} rewrites earlier turns"
    how = (
        "the tokens trained on would not be what the template shows the model once it is trained. Give the "
        "tokenizer a template that keeps earlier turns as they were (for templates it knows, TRL's "
        f"trl.chat_template_utils.get_training_chat_template makes one), or {TAGS_WAY_OUT}"
    )
    if thought and prompt.rstrip().endswith("</think>"):  # the template closes the thought: the model writes none
        return
    if not asked.startswith(prompt):
        raise ConfigError(f"{rewrites}: the prompt rendered with its generation prompt is not how it renders once the "
                          f"assistant's turn follows ({_diff(prompt, asked)}); {how}")  # fmt: skip
    eos = tokenizer.eos_token or ""
    end = asked.rfind(eos, len(prompt)) if eos else -1
    if end < 0:
        raise ConfigError(
            f"{who} does not end an assistant turn with the tokenizer's EOS token {eos!r}, where each model turn "
            f"stops (it renders the turn as {asked[len(prompt) :]!r:.160}): set the tokenizer's eos_token to the "
            f"template's end-of-turn token, or {TAGS_WAY_OUT}"
        )
    turn = asked[len(prompt) : end]
    if ChatSyntax({}).parse(turn) != [(_CALLED["name"], _CALLED["arguments"])]:
        raise ConfigError(
            f"{who} writes a tool call as {turn!r:.200}, not in the Hermes form tool_format: chat reads, "
            '<tool_call>{"name": NAME, "arguments": {...}}</tool_call>. ' + TAGS_WAY_OUT
        )
    if thought and _THOUGHT not in turn:
        raise ConfigError(f"{rewrites}: it drops the assistant's <think> block from its turn ({turn!r:.160}); {how}")
    closed = asked[: end + len(eos)]
    if not answered.startswith(closed):
        raise ConfigError(f"{rewrites}: the assistant's turn renders differently once a tool result follows it "
                          f"({_diff(closed, answered)}); {how}")  # fmt: skip
    if not finished.startswith(answered):
        raise ConfigError(f"{rewrites}: the conversation up to a tool result and the next assistant header renders "
                          f"differently once the next assistant turn follows ({_diff(answered, finished)}), as a "
                          f"template that drops earlier <think> blocks (Qwen3's) does; {how}")  # fmt: skip


def _diff(before: str, after: str) -> str:
    """Where `after` stops continuing `before`, for an error message."""
    at = next((i for i, (a, b) in enumerate(zip(before, after)) if a != b), min(len(before), len(after)))
    return f"{before[max(0, at - 40) : at + 40]!r} became {after[max(0, at - 40) : at + 40]!r}"


# ---------------------------------------------------------------------------------------------------- the insertion
class ChatInsertion:
    """What a `tool_format: chat` row inserts after the model's turn, as `MultiTurnSampler`'s `insertion`: the
    template's rendering of the observation (a list of tool messages, or a text, which becomes a user message) after
    an assistant turn, from the end of that turn (after its EOS token) to the next assistant header. A short
    conversation ending in an assistant turn is rendered with and without the messages; the difference is the
    insertion, tokenized once (so an end-of-turn token in it is the template's, never the model's). One longer than
    `max_tokens` (max_tool_output_tokens) is cut inside the messages' contents (`cut`), never through the
    template's own tokens, which `max_tokens` must leave room beside; a content so long that it must be cut is cut
    to `max_chars` characters before it is tokenized at all (a tool answering 10 MB is not tokenized whole), unless
    a normalizer that merges characters leaves those within `max_tokens` (then it is tokenized whole)."""

    def __init__(self, tokenizer: Any, template_kwargs: dict[str, Any] | None, max_tokens: int | None = None):
        self.tokenizer = tokenizer
        self.kwargs = dict(template_kwargs or {})
        check_chat_template(tokenizer, self.kwargs)
        self.end_id = tokenizer.eos_token_id
        self._heads: dict[str | None, tuple[list[dict[str, Any]], list[int]]] = {}
        # no token's text is longer than the vocabulary's longest string (a byte-level BPE writes a byte as one
        # character, SentencePiece's byte tokens as <0x..>): a content this long has more than max_tokens tokens
        longest = max(map(len, getattr(tokenizer, "get_vocab", dict)()), default=0) or 64
        self.max_tokens, self.max_chars = max_tokens, None if max_tokens is None else (max_tokens + 1) * longest
        bare = len(self.encode([{"role": "tool", "name": "probe_tool", "content": ""}]))
        if max_tokens is not None and bare >= max_tokens:
            raise ConfigError(
                f"config field `max_tool_output_tokens` is {max_tokens}, and {template_name(tokenizer)} takes {bare} "
                "tokens of its own around one tool result: no room is left for the result; raise it"
            )

    def encode(self, observation: Any) -> list[int]:
        messages = _as_messages(observation)
        bounded = self._bounded(messages)
        ids = self._rendered(bounded)
        if bounded is not messages and len(ids) <= self.max_tokens:  # (a normalizer merged characters: all of it)
            ids = self._rendered(messages)
        return ids

    def _rendered(self, messages: list[dict[str, Any]]) -> list[int]:
        called = (messages[0].get("name") or "") if messages[0].get("role") == "tool" else None
        head, head_ids = self._head(called)
        text = render(self.tokenizer, head + messages, self.kwargs, generation=True)
        ids = self._ids(text)
        if ids[: len(head_ids)] != head_ids:
            raise ConfigError(
                f"{template_name(self.tokenizer)} rewrites an assistant turn once {messages[0]['role']} messages "
                "follow it (the turn's tokens are not a prefix of the conversation's): grpokit cannot insert what "
                f"follows a model turn; {TAGS_WAY_OUT}"
            )
        return ids[len(head_ids) :]

    def cut(self, observation: Any, max_tokens: int) -> tuple[list[int], list[dict[str, Any]]]:
        """The insertion of `observation` in at most `max_tokens` tokens, and its messages as they were cut (what
        the model was shown): each message's content keeps its first tokens, an equal share of what the template's
        own tokens leave (shrunk while the whole is still longer)."""
        messages = self._bounded(_as_messages(observation))
        bare = len(self.encode([{**m, "content": ""} for m in messages]))
        share = (max_tokens - bare) // len(messages)
        while share >= 1:
            shown = [{**m, "content": self._first(m["content"], share)} for m in messages]
            ids = self.encode(shown)
            if len(ids) <= max_tokens:
                return ids, shown
            share = min(share - 1, share - (len(ids) - max_tokens) // len(messages))
        raise ConfigError(
            f"config field `max_tool_output_tokens` is {max_tokens}, and {template_name(self.tokenizer)} takes {bare} "
            f"tokens of its own around {len(messages)} tool results in one turn: no room is left for the results; "
            "raise it"
        )

    def _bounded(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        chars = self.max_chars
        if chars is None or all(not isinstance(m["content"], str) or len(m["content"]) <= chars for m in messages):
            return messages
        return [{**m, "content": m["content"][:chars]} if isinstance(m["content"], str) else m for m in messages]

    def messages(self, pieces: list[tuple[str, str]], shown: list[Any]) -> list[dict[str, Any]]:
        """A row's completion in TRL's message form, as the model was shown it: each model turn an assistant message
        (`assistant_message`), each insertion the messages it rendered (`shown`, in order: cut ones as they were
        cut, an environment's text as the user message it became)."""
        observations = iter(shown)
        out: list[dict[str, Any]] = []
        for kind, text in pieces:
            out += [assistant_message(text)] if kind == "model" else _as_messages(next(observations))
        return out

    def _first(self, content: Any, count: int) -> Any:
        if not isinstance(content, str):
            return content
        ids = self._ids(content)
        return content if len(ids) <= count else self.tokenizer.decode(ids[:count])

    def encode_reset(self, observation: Any) -> list[int]:
        """An environment's `reset()` observation (TRL appends it to the last user message): refused."""
        raise TypeError(
            "reset() returned an observation, which TRL appends to the last user message; with tool_format: chat "
            "grpokit does not: a group's G rows share one prompt, rendered once, and each row's tokens continue it "
            "unchanged (token in, token out), so a row's own text cannot go inside it. Return None from reset() and "
            "put the text in the prompt (a dataset column, or a chat prompt built from the row). The tag format "
            f"inserts it after the prompt: {TAGS_WAY_OUT}"
        )

    def closes_turn(self, ids: list[int]) -> bool:
        """A model turn ended at the end-of-turn token (EOS): only then does the template's glue follow it. A turn a
        stop string ended is left as it is: its row ends there."""
        return bool(ids) and ids[-1] == self.end_id

    def _head(self, called: str | None) -> tuple[list[dict[str, Any]], list[int]]:
        """A user question and an assistant turn (calling `called`, the tool answering, as some templates name the
        answer after the call), and its tokens up to the turn's EOS token."""
        if called not in self._heads:
            turn: dict[str, Any] = {"role": "assistant", "content": "x"}
            if called is not None:
                turn["tool_calls"] = [{"type": "function", "function": {"name": called, "arguments": {}}}]
            head = [{"role": "user", "content": "x"}, turn]
            text = render(self.tokenizer, head, self.kwargs, generation=False)
            eos = self.tokenizer.eos_token
            self._heads[called] = (head, self._ids(text[: text.rfind(eos) + len(eos)]))
        return self._heads[called]

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def _as_messages(observation: Any) -> list[dict[str, Any]]:
    if isinstance(observation, str):  # an environment's own step() answering in text: a user turn
        return [{"role": "user", "content": observation}]
    if (
        isinstance(observation, list)
        and observation
        and all(isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in observation)
    ):
        return observation
    raise TypeError(
        "with tool_format: chat an observation is a list of chat messages ({'role': 'tool' or 'user', 'content': "
        f"...}}), or a text (a user message); got {observation!r:.80}"
    )
