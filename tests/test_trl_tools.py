"""Tools in the chat template (`tool_format: chat`) and TRL's `tools=` / `environment_factory=` through grpokit.trl.

A tiny model learns one tool-calling conversation first (a Hermes-like template on the character tokenizer, a
hundred-odd Adam steps), so that the TRL scripts' two steps really call the tool; the rest use a scripted sampler.
Where TRL is installed, its own rendering of a tool's schema and its own turn glue are compared with grpokit's."""

from __future__ import annotations

import dataclasses
import json
import re
from types import SimpleNamespace

import pytest
import torch

from grpokit.core.types import ConfigError, Rollout, SamplerError
from grpokit.data.rows import encode_prompts
from grpokit.data.tasks import build_char_tokenizer, tiny_model
from grpokit.data.tasks.tokenizer import CHAT_TEMPLATE, DEFAULT_CHARS
from grpokit.rewards.functions import conversation
from grpokit.rollout.chat_tools import ChatInsertion, ChatSyntax, chat_template_kwargs, check_chat_template
from grpokit.rollout.environments import EnvironmentFailure, TRLEnvironment, environment_maker
from grpokit.rollout.multiturn import MultiTurnSampler, TurnLimits
from grpokit.rollout.sampler import SamplingParams
from grpokit.trl import GRPOConfig, GRPOTrainer

# A Hermes-like template, short enough for the character tokenizer: the tools as NAME(ARGUMENTS), calls as
# <tool_call>{json}</tool_call>, tool results in one user turn, every turn ended by EOS
TEMPLATE = (
    "{% if tools %}system: tools:{% for t in tools %} {{ t.function.name }}"
    "({{ t.function.parameters.properties | list | join(', ') }}){% endfor %}{{ eos_token }}{{ '\\n' }}{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'tool' %}"
    "{% if loop.first or messages[loop.index0 - 1].role != 'tool' %}user: {% endif %}"
    "<tool_response>{{ m.content }}</tool_response>"
    "{% if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{ eos_token }}{{ '\\n' }}{% endif %}"
    "{% else %}{{ m.role }}: {{ CONTENT }}"
    "{% for c in m.tool_calls or [] %}{% set f = c.function if c.function is defined else c %}"
    '<tool_call>{"name": "{{ f.name }}", "arguments": {{ f.arguments | tojson }}}</tool_call>{% endfor %}'
    "{{ eos_token }}{{ '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
KEEPS = TEMPLATE.replace("CONTENT", "m.content")
# The same, but an assistant turn that is not the last loses its <think> block, as Qwen3's template does
REWRITES = TEMPLATE.replace("CONTENT", "(m.content.split('</think>')[-1] if not loop.last else m.content)")
CHARS = DEFAULT_CHARS + "{}<>_|"
QUESTION = [{"role": "user", "content": "add 2 and 3"}]


def tokenizer(template: str = KEEPS):
    tok = build_char_tokenizer(CHARS)
    tok.chat_template = template
    return tok


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: the first
        b: the second
    """
    CALLS.append((a, b))
    return a + b


CALLS: list[tuple[int, int]] = []


# ---------------------------------------------------------------------------------------------------- no model
def test_chat_syntax_reads_every_call_of_a_turn_and_names_the_malformed_ones():
    text = (
        'I will add. <tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>'
        '<tool_call>{"name": "add", "arguments": {"a": 1</tool_call>'
        '<tool_call>["add"]</tool_call><tool_call>{"name": "add", "arguments": "{\\"a\\": 4, \\"b\\": 5}"}'
    )
    calls = ChatSyntax({"add": add}).parse(text)
    assert calls[0] == ("add", {"a": 2, "b": 3})
    assert "not valid JSON" in calls[1][1]["__malformed__"]
    assert 'a tool call is {"name": NAME' in calls[2][1]["__malformed__"]
    assert calls[3][1]["__malformed__"] == "<tool_call> without </tool_call> after it"
    assert ChatSyntax({"add": add}).parse("5") == []


def test_a_template_that_rewrites_earlier_turns_is_refused_naming_it():
    tok = tokenizer(REWRITES)
    tok.name_or_path = "my/rewriting-model"
    with pytest.raises(ConfigError, match=r"template of the tokenizer 'my/rewriting-model' rewrites earlier turns"):
        check_chat_template(tok, {})
    check_chat_template(tokenizer(KEEPS), {})  # the same template keeping earlier turns passes


def test_a_template_without_tool_support_is_refused_naming_the_tag_format():
    """grpokit's own character-tokenizer template renders `content` only: the call and its arguments vanish."""
    with pytest.raises(ConfigError, match=r"has no tool support: .*drops the tool call's name and its arguments.*"
                       r"tool_format: tags writes tool calls as tags"):  # fmt: skip
        check_chat_template(tokenizer(CHAT_TEMPLATE), {})


def test_text_prompts_and_undocumented_tools_are_refused_before_any_model():
    def make():
        return SimpleNamespace(tools={"add": add})

    with pytest.raises(ConfigError, match=r"row 1 has a text prompt: give the prompts as messages"):
        chat_template_kwargs(tokenizer(), make, None, [QUESTION, "add 2 and 3"])

    def bare(x):
        return x

    with pytest.raises(ConfigError, match=r"tool 'bare': .*no docstring.*type hints and its Google-style docstring"):
        chat_template_kwargs(tokenizer(), lambda: SimpleNamespace(tools={"bare": bare}), None, [QUESTION])


class Scripted:
    """A sampler answering every row of its i-th call with the i-th text of `turns` (then EOS, unless the text ends
    with "STOP", as a stop string would end it), each token at logprob -0.5."""

    def __init__(self, tok, turns):
        self.tok, self.turns = tok, list(turns)

    def update_weights(self, weights):
        pass

    def generate(self, prompt_ids, *, num_generations, params, seeds):
        text = self.turns.pop(0)
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        ids = ids if text.endswith("STOP") else [*ids, self.tok.eos_token_id]
        n, longest, pad = len(prompt_ids) * num_generations, max(map(len, prompt_ids)), self.tok.pad_token_id
        prompts = torch.tensor([[pad] * (longest - len(p)) + list(p) for p in prompt_ids])
        mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompt_ids])
        return Rollout(
            prompt_ids=prompts.repeat_interleave(num_generations, 0),
            prompt_mask=mask.repeat_interleave(num_generations, 0),
            completion_ids=torch.tensor([ids] * n),
            completion_mask=torch.ones(n, len(ids), dtype=torch.long),
            sampling_logp=torch.full((n, len(ids)), -0.5),
            truncated=torch.zeros(n, dtype=torch.bool),
            group_size=num_generations,
        )


def chat_rollout(turns, factory=None, tools=(add,), insertion_tokenizer=None, budget=400, **limits):
    tok = tokenizer()
    make = environment_maker(list(tools), factory, tool_format="chat", timeout=5.0)
    kwargs = chat_template_kwargs(tok, make, None, [QUESTION])
    insertion = ChatInsertion(insertion_tokenizer or tok, kwargs, limits.get("max_tool_output_tokens"))
    sampler = MultiTurnSampler(Scripted(tok, turns), tok, make, TurnLimits(**limits), insertion=insertion)
    prompt = encode_prompts(tok, [QUESTION], 256, kwargs).ids
    rollout = sampler.generate(prompt, num_generations=2, params=SamplingParams(max_new_tokens=budget), seeds=[7])
    return tok, rollout


def test_a_tool_call_with_bad_json_comes_back_to_the_model_as_an_error_it_reads():
    CALLS.clear()
    bad = '<tool_call>{"name": "add", "arguments": {"a": 2,, "b": 3}}</tool_call>'
    good = '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>'
    tok, rollout = chat_rollout([bad, good, "5"])
    row, mask = rollout.completion_ids[0].tolist(), rollout.trained_mask[0].tolist()
    inserted = [tok.decode(row[i : i + 1]) for i in range(len(row)) if rollout.completion_mask[0][i] and not mask[i]]
    first_answer = "".join(inserted).split("assistant: ")[0]
    assert first_answer.startswith("\nuser: <tool_response>error: the tool call is not valid JSON: Expecting")
    assert CALLS == [(2, 3), (2, 3)]  # the good call of each row, called with the parsed arguments
    episode = rollout.episodes[0]
    assert (episode.num_turns, episode.tool_errors, episode.ended_by) == (3, 1, "done")
    trained = tok.decode([t for t, m in zip(row, mask) if m])
    assert trained == f"{bad}<eos>{good}<eos>5<eos>"  # the model's three turns, each with its EOS, and nothing else
    messages = conversation("", episode)
    assert [m["role"] for m in messages] == ["assistant", "tool", "assistant", "tool", "assistant"]
    call = {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}
    assert messages[2]["tool_calls"] == [call]
    assert messages[3] == {"role": "tool", "name": "add", "content": "5"}


def test_an_unreadable_call_stays_in_the_rewards_message_as_written_and_names_no_made_up_tool():
    """TRL keeps a turn it cannot parse as content; the failed call's record has the name the model wrote, if any."""
    CALLS.clear()
    unclosed, no_object = '<<tool_call>\n{"<tool_>', '<tool_call>{"name": "add", "arguments": 5}</tool_call>'
    good = '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>'
    tok, rollout = chat_rollout([f"I try {good} then {no_object}", unclosed, "5"], budget=600)
    episode = rollout.episodes[0]
    messages = conversation("", episode)
    call = {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}
    assert messages[0] == {"role": "assistant", "content": f"I try  then {no_object}", "tool_calls": [call]}
    assert messages[1:3] == [{"role": "tool", "name": "add", "content": "5"},
                             {"role": "tool", "name": "add", "content": "error: the arguments of a call to add are an "
                              "object of named values"}]  # fmt: skip
    assert messages[3] == {"role": "assistant", "content": unclosed}  # the model's text, no tool_calls
    assert messages[4] == {"role": "tool", "content": "error: <tool_call> without </tool_call> after it"}
    assert [c["name"] for c in episode.tool_calls] == ["add", "add", None] and episode.tool_errors == 2


def test_an_environments_text_reaches_the_rewards_as_the_user_message_it_became():
    class Guess:
        def reset(self, **_):
            self.tries = 0

        def step(self, text):
            self.tries += 1
            return ("lower", 0.0, False) if self.tries == 1 else (None, 1.0, True)

    tok, rollout = chat_rollout(["7", "5"], factory=Guess, tools=())
    assert inserted_text(tok, rollout, 0) == "\nuser: lower<eos>\nassistant: "  # the template's glue, not trained
    assert conversation("", rollout.episodes[0]) == [
        {"role": "assistant", "content": "7"}, {"role": "user", "content": "lower"},
        {"role": "assistant", "content": "5"}]  # fmt: skip


def test_a_turn_a_stop_string_ended_is_left_as_it_is_and_ends_the_row():
    """The template's glue follows the end-of-turn token; a turn without it ends its row, its call not made."""
    CALLS.clear()
    tok, rollout = chat_rollout(['<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>STOP'])
    assert CALLS == [] and rollout.episodes[0].ended_by == "stop" and rollout.loss_mask.all()


def spell(word: str) -> str:
    """Spell a word out.

    Args:
        word: the word
    """
    return " ".join(word * 20)


def test_a_long_tool_output_is_cut_inside_its_message_never_through_the_template():
    call = '<tool_call>{"name": "spell", "arguments": {"word": "abc"}}</tool_call>'
    tok, rollout = chat_rollout([call, "ok"], tools=[spell], max_tool_output_tokens=64)
    glue = inserted_text(tok, rollout, 0)
    assert glue.startswith("\nuser: <tool_response>a b c a b") and glue.endswith("</tool_response><eos>\nassistant: ")
    assert len(tok(glue, add_special_tokens=False)["input_ids"]) <= 64 and rollout.episodes[0].observations_cut == 1
    assert rollout.episodes[0].pieces[-1] == ("model", "ok")  # the model's next turn followed the assistant header
    with pytest.raises(ConfigError, match=r"`max_tool_output_tokens` is 20, and the chat template .* takes 51 tokens"):
        ChatInsertion(tokenizer(), {}, 20)


def test_the_rewards_see_a_cut_tool_output_as_the_model_was_shown_it():
    call = '<tool_call>{"name": "spell", "arguments": {"word": "abc"}}</tool_call>'
    tok, rollout = chat_rollout([call, "ok"], tools=[spell], max_tool_output_tokens=64)
    shown = inserted_text(tok, rollout, 0).split("<tool_response>")[1].split("</tool_response>")[0]
    assert 0 < len(shown) < len(spell("abc"))
    assert conversation("", rollout.episodes[0])[1] == {"role": "tool", "name": "spell", "content": shown}


class Counting:
    """A tokenizer that keeps the length of the longest text it was asked to tokenize."""

    def __init__(self, tok):
        self.tok, self.longest = tok, 0

    def __getattr__(self, name):
        return getattr(self.__dict__["tok"], name)

    def __call__(self, text, **kwargs):
        self.longest = max(self.longest, len(text))
        return self.tok(text, **kwargs)


def test_a_huge_tool_output_is_cut_before_it_is_tokenized():
    def flood(word: str) -> str:
        """Repeat a word a great many times.

        Args:
            word: the word
        """
        return word * 100_000

    call = '<tool_call>{"name": "flood", "arguments": {"word": "ab"}}</tool_call>'
    counting = Counting(tokenizer())
    tok, rollout = chat_rollout([call, "ok"], tools=[flood], insertion_tokenizer=counting, max_tool_output_tokens=64)
    # (64 + 1) tokens of the vocabulary's longest string (<eos>, 5 characters) and the template's own text
    assert counting.longest < 1_000 and rollout.episodes[0].observations_cut == 1
    assert conversation("", rollout.episodes[0])[1]["content"].startswith("abab")


def test_a_tokenizer_that_marks_the_call_tags_special_is_refused():
    """A model turn reaches the environment decoded without special tokens: its calls would vanish unread."""
    tok = tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<tool_call>", "</tool_call>"]})
    with pytest.raises(ConfigError, match=r"marks <tool_call> as a special token, which a decoded model turn drops"):
        check_chat_template(tok, {})


def test_a_reset_observation_is_refused_in_chat_format_with_the_way_out():
    class Talks:
        def reset(self, **_):
            return "the numbers are 2 and 3"

    with pytest.raises(EnvironmentFailure, match=r"\(Talks\).* reset\(\) returned an observation, which TRL appends.*"
                       r"tool_format: tags"):  # fmt: skip
        chat_rollout(["5"], factory=TRLEnvironment(Talks))


def test_trl_environment_methods_are_tools_by_trls_rule():
    """A TRL environment's `step` method is a tool (TRL lists every public method but reset and get_reward);
    grpokit's own rule would read it as an environment that reads every turn."""

    class Game:
        def reset(self, **_):
            return None

        def step(self, move: str) -> str:
            """Make a move.

            Args:
                move: where to
            """
            return move

        def get_reward(self) -> float:
            return 1.0

    made = environment_maker([], TRLEnvironment(Game), tool_format="chat", timeout=None)()
    assert sorted(made.tools) == ["step"] and made.reward() == 1.0


def test_max_tool_calling_iterations_counts_the_rounds_after_the_first_turn():
    assert GRPOConfig(max_tool_calling_iterations=2, max_steps=1).to_grpokit().max_turns == 3
    unbounded = GRPOConfig(max_completion_length=64, max_steps=1).to_grpokit()  # None: the completion's tokens bound
    assert (unbounded.max_turns, unbounded.tool_format, unbounded.tool_timeout) == (64, "chat", None)
    with pytest.raises(ConfigError, match=r"TRL field `max_tool_calling_iterations` must be >= 0"):
        GRPOConfig(max_tool_calling_iterations=-1)


# ---------------------------------------------------------------------------------------------------- TRL's own
def qwen_tokenizer(name: str):
    """The character tokenizer with Qwen's turn tokens and TRL's copy of a Qwen chat template."""
    trl = pytest.importorskip("trl")
    from pathlib import Path

    tok = build_char_tokenizer(CHARS + "#")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.eos_token = "<|im_end|>"
    tok.chat_template = (Path(trl.__file__).parent / "chat_templates" / f"{name}.jinja").read_text()
    return tok


def test_grpokits_tool_prompt_and_turn_glue_equal_what_trl_renders():
    """The prompt with the tool's schema (TRL's _tokenize_prompts) and what follows a turn (TRL's
    _get_tool_suffix_ids), on TRL's copy of the Qwen2.5 template; Qwen3's, which TRL also finds not
    prefix-preserving, is refused."""
    from trl import GRPOTrainer as TRLTrainer
    from trl.chat_template_utils import is_chat_template_prefix_preserving

    tok = qwen_tokenizer("qwen2_5")
    kwargs = chat_template_kwargs(tok, lambda: SimpleNamespace(tools={"add": add}), None, [QUESTION])
    trl_self = SimpleNamespace(processing_class=tok, tools=[add], chat_template=None, chat_template_kwargs={},
                               _is_vlm=False, environment_factories=None, _tokenizer=tok)  # fmt: skip
    trl_prompt_ids, _, _ = TRLTrainer._tokenize_prompts(trl_self, [QUESTION])
    assert encode_prompts(tok, [QUESTION], 10_000, kwargs).ids == [list(trl_prompt_ids[0])]
    answers = [{"role": "tool", "name": "add", "content": "5"}, {"role": "tool", "name": "add", "content": "error: x"}]
    assert ChatInsertion(tok, kwargs).encode(answers) == TRLTrainer._get_tool_suffix_ids(trl_self, answers)

    qwen3 = qwen_tokenizer("qwen3")
    assert not is_chat_template_prefix_preserving(qwen3)
    with pytest.raises(ConfigError, match=r"rewrites earlier turns: the assistant's turn renders differently"):
        check_chat_template(qwen3, {})


# ---------------------------------------------------------------------------------------------------- TRL scripts
@pytest.fixture(scope="module")
def caller(tmp_path_factory):
    """A tiny Qwen2 that has learned one conversation: asked "add 2 and 3" with the tool `add`, it calls
    add(a=2, b=3), reads 5 and answers 5."""
    tok = tokenizer()
    schemas = chat_template_kwargs(tok, lambda: SimpleNamespace(tools={"add": add}), None, [QUESTION])
    call = {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}
    conversation = [*QUESTION, {"role": "assistant", "content": "", "tool_calls": [call]},
                    {"role": "tool", "name": "add", "content": "5"}, {"role": "assistant", "content": "5"}]  # fmt: skip
    prompt = tok.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True, **schemas)
    whole = tok.apply_chat_template(conversation, tokenize=False, **schemas)
    ids = torch.tensor([tok(whole, add_special_tokens=False)["input_ids"]])
    labels = ids.clone()
    labels[:, : len(tok(prompt, add_special_tokens=False)["input_ids"])] = -100
    model = tiny_model(tok, "qwen2", hidden_size=64, max_position_embeddings=256, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # (a module fixture runs before conftest's one_thread: ten times faster on shared cores)
    for _ in range(200):
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.set_num_threads(threads)
    assert loss.item() < 0.01
    folder = tmp_path_factory.mktemp("caller")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


class Recording:
    """The trainer's sampler, keeping what it returns."""

    def __init__(self, inner):
        self.inner, self.rollouts = inner, []

    def __getattr__(self, name):
        return getattr(self.__dict__["inner"], name)

    def generate(self, *args, **kwargs):
        self.rollouts.append(self.inner.generate(*args, **kwargs))
        return self.rollouts[-1]


def trl_args(out, **fields):
    return GRPOConfig(
        output_dir=str(out), max_steps=2, per_device_train_batch_size=4, num_generations=4, max_completion_length=160,
        temperature=0.5, learning_rate=1e-5, use_cpu=True, report_to="none", save_strategy="no", seed=0, **fields,
    )  # fmt: skip


def inserted_text(tok, rollout, row: int) -> str:
    ids, real, trained = rollout.completion_ids[row], rollout.completion_mask[row], rollout.trained_mask[row]
    return tok.decode([int(t) for t, r, m in zip(ids, real, trained) if r and not m])


def test_a_trl_script_with_tools_runs_through_grpokit_trl(caller, tmp_path):
    CALLS.clear()
    seen = []

    def answered(completions, **_):
        seen.extend(completions)
        return [float(c[-1]["role"] == "assistant" and c[-1]["content"] == "5") for c in completions]

    dataset = [{"prompt": QUESTION}] * 4
    trainer = GRPOTrainer(str(caller), answered, args=trl_args(tmp_path / "run", max_tool_calling_iterations=1),
                          train_dataset=dataset, tools=[add])  # fmt: skip
    trainer.trainer.sampler = recording = Recording(trainer.trainer.sampler)
    trainer.train()
    assert CALLS and set(CALLS) == {(2, 3)}  # called with the arguments the model wrote
    tok, rollout = trainer.trainer.tokenizer, recording.rollouts[0]
    calling = [i for i, e in enumerate(rollout.episodes) if e.tool_calls]
    assert calling
    # the template's glue, its end-of-turn token included, is inserted and not trained
    assert inserted_text(tok, rollout, calling[0]) == "\nuser: <tool_response>5</tool_response><eos>\nassistant: "
    called = [c for c in seen if c[0].get("tool_calls")]
    assert called[0][:2] == [
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]},
        {"role": "tool", "name": "add", "content": "5"},
    ]  # fmt: skip
    assert trainer.trainer.cfg.max_turns == 2 and trainer.trainer.cfg.tools == ["test_trl_tools:add"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["tools/call_frequency"] > 0


class Calculator:
    """A TRL environment: its method is the tool, get_reward() scores what it saw."""

    def reset(self, **row):
        self.results = []
        return None

    def add(self, a: int, b: int) -> int:
        """Add two integers.

        Args:
            a: the first
            b: the second
        """
        self.results.append(a + b)
        return a + b

    def get_reward(self) -> float:
        return float(self.results == [5])


def test_a_trl_script_with_an_environment_factory_runs_through_grpokit_trl(caller, tmp_path):
    seen = []

    def kinds(environments, **_):
        seen.extend(environments)
        return [0.0] * len(environments)

    dataset = [{"prompt": QUESTION}] * 4
    trainer = GRPOTrainer(str(caller), kinds, args=trl_args(tmp_path / "run"), train_dataset=dataset,
                          environment_factory=Calculator)  # fmt: skip
    trainer.train()
    rewards = trainer.trainer.rewards
    assert rewards.names == ["kinds", "Calculator"] and rewards.weights.tolist() == [1.0, 1.0]
    assert seen and all(type(e) is Calculator for e in seen)  # each row's own instance, as TRL passes it
    assert sum(e.results == [5] for e in seen) > 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["rewards/Calculator/mean"] > 0


def test_trls_environment_forms_grpokit_does_not_take_are_refused_by_name(caller, tmp_path):
    args = trl_args(tmp_path / "run")
    dataset = [{"prompt": QUESTION}]
    with pytest.raises(ConfigError, match=r"`environment_factory` is a dict \(TRL's experimental multi-environment"):
        GRPOTrainer(str(caller), None, args=args, train_dataset=dataset, environment_factory={"c": Calculator})
    with pytest.raises(ConfigError, match=r"`environment_factory` without a train_dataset"):
        GRPOTrainer(str(caller), None, args=args, environment_factory=Calculator)
    with pytest.raises(ConfigError, match=r"needs reward_funcs .* or an environment_factory whose environments define"):
        GRPOTrainer(str(caller), None, args=args, train_dataset=dataset, tools=[add])
    assert not (tmp_path / "run").exists()


def test_a_trl_user_is_told_the_way_out_of_tool_format_chat_that_a_trl_script_can_take(caller, tmp_path):
    """grpokit's `tool_format: tags` is no TRL field: the advice a TRL config gets is code that runs."""

    def echo(text: str) -> str:
        return text

    args, text_prompts = trl_args(tmp_path / "run"), [{"prompt": "add 2 and 3"}] * 4
    with pytest.raises(ConfigError, match=r"row 0 has a text prompt: .*TRL's GRPOConfig has no field for it") as told:
        GRPOTrainer(str(caller), lambda completions, **_: [0.0] * len(completions), args=args,
                    train_dataset=text_prompts, tools=[add])  # fmt: skip
    assert "tool_format: tags writes" not in str(told.value)
    advice = re.search(r"args=(.*\))$", str(told.value)).group(1)
    native = eval(advice, {"dataclasses": dataclasses, "args": args, "train_dataset": text_prompts})
    trainer = GRPOTrainer(str(caller), lambda completions, **_: [0.0] * len(completions), args=native,
                          train_dataset=text_prompts, tools=[echo])  # fmt: skip
    assert trainer.trainer.cfg.tool_format == "tags" and trainer.trainer.cfg.tools[0].endswith(".echo")

    class Talks(Calculator):
        def reset(self, **row):
            super().reset(**row)
            return "use the tool"

    dataset = [{"prompt": QUESTION}] * 4
    trainer = GRPOTrainer(str(caller), None, args=trl_args(tmp_path / "talks"), train_dataset=dataset,
                          environment_factory=Talks)  # fmt: skip
    with pytest.raises(SamplerError, match=r"reset\(\) returned an observation.*TRL's GRPOConfig has no field"):
        trainer.train()
