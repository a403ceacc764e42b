"""The offline small world: character tokenizer, tiny models, the addition task and its demonstrator."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from grpokit.data.tasks import (
    TASKS,
    AdditionTask,
    ToolAdditionTask,
    accuracy_reward,
    build_char_tokenizer,
    count_carries,
    get_task,
    tiny_model,
)
from grpokit.data.tasks.arithmetic import is_eval_pair

ROUND_TRIP = ["47+85=132", "Hello, World! a b  c", " leading and trailing ", "x\ny: (1 * 2) - 3 = -1?", ""]


class ScriptedRng:
    """Stands in for random.Random: returns the given random() values in order."""

    def __init__(self, values):
        self.values = list(values)

    def random(self):
        return self.values.pop(0)


# --- tokenizer ---------------------------------------------------------------------------------------


def test_char_tokenizer_ids(char_tokenizer):
    tok = char_tokenizer
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert (tok.pad_token, tok.eos_token, tok.bos_token) == ("<pad>", "<eos>", "<bos>")
    assert len(tok) == 85  # 4 specials + 10 digits + "+-=* " + 52 letters + 14 punctuation incl. "\n"
    assert tok.padding_side == "left"
    # digits start at 4, then "+", "-", "=", "*", " "; no BOS/EOS is added by encode
    assert tok.encode("47+85=") == [8, 11, 14, 12, 9, 16]
    assert tok.encode("1 2") == [5, 18, 6]
    assert tok("9")["input_ids"] == [13]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_char_tokenizer_round_trip(char_tokenizer, text):
    ids = char_tokenizer.encode(text)
    assert len(ids) == len(text)  # one token per character
    assert char_tokenizer.decode(ids) == text


def test_char_tokenizer_special_tokens_and_unknowns(char_tokenizer):
    tok = char_tokenizer
    ids = tok.encode("132") + [tok.eos_token_id]
    assert tok.decode(ids) == "132<eos>"
    assert tok.decode(ids, skip_special_tokens=True) == "132"
    assert tok.encode("7<eos>") == [11, 1]  # the special token's text maps to its id, not 5 chars
    assert tok.encode("7é") == [11, 3]  # unknown character -> <unk>


def test_char_tokenizer_left_pads(char_tokenizer):
    batch = char_tokenizer(["1", "123"], padding=True)
    assert batch["input_ids"] == [[0, 0, 5], [5, 6, 7]]
    assert batch["attention_mask"] == [[0, 0, 1], [1, 1, 1]]


def test_pad_equals_eos_variant(char_tokenizer):
    tok = build_char_tokenizer(pad_equals_eos=True)
    assert tok.pad_token_id == tok.eos_token_id == 1
    assert tok.pad_token == "<eos>"
    assert tok.encode("47+85=") == char_tokenizer.encode("47+85=")  # same vocabulary, same ids
    assert tok(["1", "123"], padding=True)["input_ids"] == [[1, 1, 5], [5, 6, 7]]


def test_custom_alphabet_keeps_template_chars():
    tok = build_char_tokenizer("0123456789+=")
    assert tok.encode("0") == [4]
    text = tok.apply_chat_template([{"role": "user", "content": "3+4="}], add_generation_prompt=True, tokenize=False)
    assert tok.unk_token_id not in tok.encode(text)


def test_chat_template_exact(char_tokenizer):
    tok = char_tokenizer
    user = [{"role": "user", "content": "3+4="}]
    text = tok.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    assert text == "user: 3+4=\nassistant: "
    assert tok.apply_chat_template(user, tokenize=False) == "user: 3+4=\n"
    # tokenize=True returns a BatchEncoding in transformers 5; the ids equal encode(text)
    assert tok.apply_chat_template(user, add_generation_prompt=True)["input_ids"] == tok.encode(text)
    chat = [*user, {"role": "assistant", "content": "7"}]
    assert tok.apply_chat_template(chat, tokenize=False) == "user: 3+4=\nassistant: 7<eos>\n"
    out = tok.apply_chat_template(chat, return_assistant_tokens_mask=True)
    marked = [i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert marked == [11, 1]  # "7" and <eos>


@pytest.mark.parametrize("pad_equals_eos", [False, True])
def test_tokenizer_save_load(tmp_path, pad_equals_eos):
    tok = build_char_tokenizer(pad_equals_eos=pad_equals_eos)
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    user = [{"role": "user", "content": "12+9="}]
    assert loaded.apply_chat_template(user, add_generation_prompt=True, tokenize=False) == "user: 12+9=\nassistant: "
    assert loaded.chat_template == tok.chat_template
    assert (loaded.pad_token_id, loaded.eos_token_id, loaded.bos_token_id) == (
        (1 if pad_equals_eos else 0),
        1,
        2,
    )
    assert loaded.padding_side == "left"
    assert len(loaded) == len(tok)
    for text in ROUND_TRIP:
        assert loaded.encode(text) == tok.encode(text)
        assert loaded.decode(tok.encode(text)) == text


# --- tiny models ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch, cls_name", [("llama", "LlamaForCausalLM"), ("qwen2", "Qwen2ForCausalLM")])
def test_tiny_model_config(char_tokenizer, arch, cls_name):
    model = tiny_model(char_tokenizer, arch, num_kv_heads=2)
    cfg = model.config
    assert type(model).__name__ == cls_name
    assert model.dtype == torch.float32
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size) == (85, 64, 256)
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (2, 4, 2)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (2, 1, 0)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied
    logits = model(torch.tensor([[8, 11, 14]])).logits  # (1, 3, V)
    assert logits.shape == (1, 3, 85)


def test_tiny_model_seeded_and_leaves_global_rng(char_tokenizer):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = tiny_model(char_tokenizer, seed=0)
    after = torch.rand(3)
    b = tiny_model(char_tokenizer, seed=0)
    c = tiny_model(char_tokenizer, seed=1)
    assert torch.equal(after, expected_next)  # building a model did not consume the caller's RNG
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.layers.0.self_attn.q_proj.weight"], sc["model.layers.0.self_attn.q_proj.weight"])


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2"])
def test_tiny_model_save_load_identical_logits(request, tmp_path, fixture):
    model = request.getfixturevalue(fixture).eval()
    ids = torch.tensor([[8, 11, 14, 12, 9, 16], [0, 0, 5, 14, 6, 16]])  # (2, 6), second row left-padded
    mask = (ids != 0).long()  # (2, 6)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    assert loaded.dtype == torch.float32
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits  # (2, 6, V)
        got = loaded(ids, attention_mask=mask).logits  # (2, 6, V)
    assert torch.equal(got, want)
    assert want.abs().max() > 0


def test_tiny_model_unknown_arch(char_tokenizer):
    with pytest.raises(ValueError, match="gpt2"):
        tiny_model(char_tokenizer, "gpt2")


# --- addition task: data --------------------------------------------------------------------------------


def _pairs(rows):
    return {tuple(sorted(map(int, r["prompt"][:-1].split("+")))) for r in rows}


def test_rows_format_and_answers(addition_task):
    rows = addition_task.rows(300, split="train", seed=0)
    assert len(rows) == 300
    for row in rows:
        assert set(row) == {"prompt", "answer"}
        a, b = map(int, row["prompt"].removesuffix("=").split("+"))
        assert 0 <= a < 100 and 0 <= b < 100
        assert row["prompt"] == f"{a:02d}+{b:02d}="  # fixed width: a column's digits sit at one position
        assert row["answer"] == f"{a + b:03d}"


def test_splits_disjoint_and_seeded(addition_task):
    train = addition_task.rows(3000, split="train", seed=0)
    evals = addition_task.rows(500, split="eval", seed=0)
    assert _pairs(train).isdisjoint(_pairs(evals))  # also disjoint up to commuting the operands
    assert addition_task.rows(3000, split="train", seed=0) == train
    assert addition_task.rows(500, split="eval", seed=0) == evals
    assert addition_task.rows(50, split="train", seed=1) != train[:50]
    # the held-out set is a fixed ~10% of all pairs, symmetric in (a, b)
    held_out = [(a, b) for a in range(100) for b in range(100) if is_eval_pair(a, b)]
    assert 800 <= len(held_out) <= 1200
    assert all(is_eval_pair(b, a) for a, b in held_out)
    with pytest.raises(ValueError, match="split"):
        addition_task.rows(1, split="test")


def test_task_chars_are_tokens(addition_task, char_tokenizer):
    text = "".join(r["prompt"] + r["answer"] for r in addition_task.rows(50, seed=0))
    assert set(text) <= set(addition_task.chars)
    assert char_tokenizer.unk_token_id not in char_tokenizer.encode(addition_task.chars)


def test_registry():
    task = get_task("addition", num_digits=3, forget_carry=0.2)
    assert isinstance(task, AdditionTask) and TASKS["addition"] is AdditionTask
    assert (task.name, task.num_digits, task.forget_carry, task.max_completion_chars) == (
        "addition",
        3,
        0.2,
        4,
    )
    with pytest.raises(ValueError, match="known tasks: \\['addition', 'tool_addition'\\]"):
        get_task("multiplication")
    with pytest.raises(ValueError, match="forget_carry"):
        AdditionTask(forget_carry=1.5)
    tool = get_task("tool_addition", num_digits=5, forget_carry=0.2)
    assert isinstance(tool, ToolAdditionTask) and (tool.name, tool.max_completion_chars) == ("tool_addition", 53)
    with pytest.raises(ValueError, match="tool_rate"):
        ToolAdditionTask(tool_rate=-0.1)
    with pytest.raises(ValueError, match="num_digits"):
        AdditionTask(num_digits=0)


# --- addition task: checker, carries, demonstrator -------------------------------------------------------


def test_gold_checker(addition_task):
    assert addition_task.is_correct("132", "132")
    assert addition_task.is_correct(" 132 ", "132")
    assert addition_task.is_correct("132\n", "132")
    assert not addition_task.is_correct("122", "132")
    assert not addition_task.is_correct("", "132")
    assert not addition_task.is_correct("1 32", "132")
    assert addition_task.is_correct("89", "089")  # leading zeros are optional
    assert addition_task.is_correct("089", "089")
    assert not addition_task.is_correct("+89", "089")
    assert not addition_task.is_correct("8.9e1", "089")
    assert not addition_task.is_correct("\u0668\u0669", "089")  # non-ASCII digits are not accepted


def test_count_carries():
    cases = {(47, 85): 2, (12, 34): 0, (95, 5): 2, (5, 5): 1, (999, 1): 3, (0, 0): 0, (50, 50): 1, (19, 1): 1}
    assert {pair: count_carries(*pair) for pair in cases} == cases


def test_demonstrator_never_forgets_at_zero():
    task = AdditionTask(num_digits=2, forget_carry=0.0)
    rows = [
        {"prompt": task.format_prompt(a, b), "answer": task.format_answer(a + b)}
        for a in range(100)
        for b in range(100)
    ]
    assert all(task.demonstrate(r, random.Random(0)) == r["answer"] for r in rows)
    assert task.demonstrator_accuracy(rows, random.Random(0)) == 1.0


def test_demonstrator_always_forgets_at_one():
    task = AdditionTask(num_digits=2, forget_carry=1.0)
    rng = random.Random(0)
    hand = {
        "47+85=": "022",
        "95+05=": "090",
        "99+01=": "090",
        "50+50=": "000",
        "05+05=": "000",
        "12+34=": "046",
        "00+00=": "000",
    }
    assert {p: task.demonstrate({"prompt": p, "answer": ""}, rng) for p in hand} == hand
    # wrong exactly on the problems that carry
    for a in range(100):
        for b in range(100):
            said = task.demonstrate({"prompt": task.format_prompt(a, b), "answer": ""}, rng)
            assert (said == task.format_answer(a + b)) == (count_carries(a, b) == 0), (a, b, said)


def test_demonstrator_forgets_one_carry_at_a_time(addition_task):
    row = {"prompt": "47+85=", "answer": "132"}
    # forget_carry = 0.5: a draw below 0.5 forgets the carry of that column
    assert addition_task.demonstrate(row, ScriptedRng([0.1, 0.9])) == "122"  # units carry forgotten
    assert addition_task.demonstrate(row, ScriptedRng([0.9, 0.1])) == "032"  # final carry forgotten
    assert addition_task.demonstrate(row, ScriptedRng([0.9, 0.9])) == "132"
    assert addition_task.demonstrate(row, ScriptedRng([0.1, 0.1])) == "022"
    # forgetting the units carry of 95+05 removes the tens carry: only one draw is made
    assert addition_task.demonstrate({"prompt": "95+05=", "answer": "100"}, ScriptedRng([0.1])) == "090"


def test_demonstrator_accuracy_matches_analytic(addition_task):
    rows = addition_task.rows(2000, split="train", seed=0)
    measured = addition_task.demonstrator_accuracy(rows, random.Random(0))
    expected = addition_task.expected_demonstrator_accuracy(rows)
    assert expected == pytest.approx(
        sum(0.5 ** count_carries(*map(int, r["prompt"][:-1].split("+"))) for r in rows) / 2000
    )
    assert abs(measured - expected) < 0.03
    assert abs(measured - 0.589375) < 0.03  # the closed form below at f = 0.5


@pytest.mark.parametrize("forget", [0.0, 0.3, 0.5, 0.7, 1.0])
def test_expected_accuracy_closed_form(forget):
    # two digits: P(no carry) = 0.55^2; E[(1-f)^c] = 0.3025 + 0.45 q + 0.2475 q^2 with q = 1 - f
    q = 1.0 - forget
    task = AdditionTask(num_digits=2, forget_carry=forget)
    brute = sum(q ** count_carries(a, b) for a in range(100) for b in range(100)) / 10_000
    assert task.expected_demonstrator_accuracy() == pytest.approx(brute, abs=1e-12)
    assert brute == pytest.approx(0.3025 + 0.45 * q + 0.2475 * q * q, abs=1e-12)


def test_carry_fraction_two_digits():
    with_carry = sum(count_carries(a, b) > 0 for a in range(100) for b in range(100))
    assert with_carry == 6975


# --- reward ------------------------------------------------------------------------------------------------


def test_accuracy_reward():
    prompts = ["47+85="] * 5
    completions = ["132", " 132\n", "122", "", "132<eos>"]
    assert accuracy_reward(prompts, completions, answer=["132"] * 5, other=[0] * 5) == [
        1.0,
        1.0,
        0.0,
        0.0,
        0.0,
    ]
    chat = [[{"role": "assistant", "content": "7"}], [{"role": "assistant", "content": "8"}]]
    assert accuracy_reward(["3+4="] * 2, chat, answer=["7", "7"]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        accuracy_reward(["a", "b"], ["1", "2"], answer=["1"])
