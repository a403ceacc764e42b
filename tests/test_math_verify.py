"""The `math_accuracy` reward (`rewards.mathverify`, math-verify) on hand-picked answers: equivalent forms, where the
answer is read from (the last box, the last tags, the text), unparsable gold answers (None, a warning, a metric),
math-verify's SIGALRM timeouts in the main thread and its absence in another; the tag-layout format rewards; both
in `grpokit eval`. (The error without math-verify: tests/test_reasoning_gym.py, which blocks both extras at once.)"""

from __future__ import annotations

import json
import threading
import warnings

import pytest
from helpers import save_tiny

from grpokit.cli import main
from grpokit.core.types import InputWarning
from grpokit.rewards.functions import build_reward_funcs, score
from grpokit.rewards.mathverify import completion_answer, last_boxed, math_accuracy_reward


def accuracy(pairs, **kwargs):
    """math_accuracy of (gold answer, completion) pairs."""
    reward = math_accuracy_reward(**kwargs)
    return reward(completions=[c for _, c in pairs], answer=[g for g, _ in pairs])


EQUIVALENT = [  # (gold answer, completion): each scores 1
    ("1/2", r"So the probability is \boxed{0.5}."),
    (r"\frac{1}{2}", "<answer>0.5</answer>"),
    ("0.5", "<answer>1/2</answer>"),
    ("(x+1)^2", "<answer>x^2+2x+1</answer>"),  # both bare: read as LaTeX between $...$
    ("x^2+2x+1", r"Expanding, we get $(x+1)^2$."),
    (r"\frac{1}{2}", r"\boxed{\frac{2}{4}}"),
    ("2248", "The answer is 2248"),  # no tags, no box: math-verify finds the number in the text
    (2248, "<answer>2248</answer>"),  # a JSON number as the gold answer
    ("-4", "<answer> -4 </answer>"),
    ("{1,2}", r"<answer>\{2,1\}</answer>"),
    ("2", r"\boxed{1}, no: \boxed{2}"),  # the last box (math-verify alone would read the set {1, 2})
    ("2", r"<answer>\boxed{2}</answer> or maybe \boxed{3}"),  # a box inside the last tags
]
WRONG = [  # each scores 0
    ("1/2", r"\boxed{0.51}"),
    ("0.333", "<answer>1/3</answer>"),  # math-verify compares to 6 decimals
    ("(x+1)^2", "<answer>x^2+1</answer>"),
    ("2248", "<answer>2249</answer>, though 2248 came up"),  # the tags are the answer, not the text around them
    ("3", "<answer>3</answer> no: <answer>4</answer>"),  # the last tags
    ("1", r"\boxed{1}, no: \boxed{2}"),
    ("2248", "I do not know"),
    ("2248", ""),
]


def test_equivalent_forms_score_1_and_wrong_answers_0():
    assert accuracy(EQUIVALENT) == [1.0] * len(EQUIVALENT)
    assert accuracy(WRONG) == [0.0] * len(WRONG)


def test_where_the_answer_is_read_from():
    assert last_boxed(r"a \boxed{1} b \boxed{\frac{1}{2}} c") == r"\boxed{\frac{1}{2}}"
    assert last_boxed(r"\boxed{\frac{1}{2}") is None  # cut: no whole box
    assert completion_answer(r"<answer>x</answer> \boxed{2}") == ("x", True)  # the tags first, bare math
    assert completion_answer(r"<answer>so \boxed{2}</answer>") == (r"\boxed{2}", False)
    assert completion_answer("it is 7") == ("it is 7", False)  # prose: never wrapped in $...$


def test_an_unparsable_gold_answer_leaves_the_row_out_said_once_and_counted():
    reward, logged = math_accuracy_reward(), []
    golds = ["hello world", "2", "", None]  # words (never read as a product of symbols), a number, empty, missing
    with pytest.warns(InputWarning, match=r"math_accuracy: the gold answer 'hello world' \(sample 0\) does not parse"):
        out = reward(completions=["<answer>hello world</answer>", "2", "2", "2"], answer=golds,
                     log_metric=lambda name, value: logged.append((name, value)))  # fmt: skip
    assert out == [None, 1.0, None, None]
    assert logged == [("math_accuracy/unparsable_gold", 0.75)]
    with warnings.catch_warnings():  # said once per run's reward, not per batch
        warnings.simplefilter("error")
        assert reward(completions=["1"], answer=["hello world"]) == [None]


def test_math_verify_timeouts_work_in_the_main_thread_and_are_off_in_another(caplog):
    """Comparing 1 with 2^(2^(2^40)) never ends: with verify_timeout 1, SIGALRM stops it in the main thread, under
    grpokit's own watchdog (reward_timeout, SIGUSR1; the backstop should it not) -> 0.0, math-verify's timeout said,
    and the next row checked. In another thread signals cannot be set: the timeouts are off (no error) and easy
    answers are still checked."""
    reward = math_accuracy_reward(parsing_timeout=1, verify_timeout=1)
    inputs = {"prompts": ["p", "p"], "completions": ["<answer>1</answer>", "<answer>3</answer>"],
              "answer": ["$2^{2^{2^{40}}}$", "3"]}  # fmt: skip
    with caplog.at_level("WARNING", logger="math_verify"):
        assert score([("math_accuracy", reward)], inputs, timeout=60)[:, 0].tolist() == [0.0, 1.0]
    assert "Timeout during comparison" in caplog.text
    seen = {}
    worker = threading.Thread(target=lambda: seen.update(out=accuracy(EQUIVALENT[:4], parsing_timeout=1)))
    worker.start()
    worker.join()
    assert seen["out"] == [1.0] * 4


def test_tag_layout_rewards():
    funcs = dict(build_reward_funcs(["format_think_answer", "format_answer_tags"], format_pattern="",
                                    max_completion_length=8, overlong_buffer=4))  # fmt: skip
    cases = {  # completion: (format_think_answer, format_answer_tags)
        "<think>add them</think><answer>7</answer>": (1, 0),
        "<think>\nadd\nthem\n</think>\n<answer>\n7\n</answer>\n": (1, 0),
        "<answer>7</answer>": (0, 1),
        "  <answer>7\n</answer> ": (0, 1),
        "<think>a</think>": (0, 0),
        "so <think>a</think><answer>7</answer>": (0, 0),  # text outside the blocks
        "<think>a</think><answer>7</answer> done": (0, 0),
        "<think>a<think>b</think><answer>7</answer>": (0, 0),  # a second <think> inside
        "<answer>7</answer><answer>8</answer>": (0, 0),
        "<answer>7": (0, 0),
    }
    for text, expected in cases.items():
        got = tuple(funcs[name](completions=[text])[0] for name in ("format_think_answer", "format_answer_tags"))
        assert got == expected, text
    chat = [[{"role": "assistant", "content": "<answer>7</answer>"}]]  # TRL's conversational form
    assert funcs["format_answer_tags"](completions=chat) == [1.0]


def test_grpokit_eval_reports_math_accuracy_and_the_format_rewards(tmp_path, capsys):
    model = save_tiny(tmp_path / "tiny")
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(3)))
    rc = main(["eval", "--model", str(model), "--eval-data", str(data), "--reward-funcs", "math_accuracy",
               "format_answer_tags", "--num-eval-prompts", "3", "--max-completion-length", "4"])  # fmt: skip
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    for name in ("math_accuracy", "format_answer_tags"):
        for mode in ("greedy", "sampled (T=1)"):
            assert f"held-out rewards/{name}, {mode}: " in printed.out, printed.out
    assert "held-out math_accuracy/unparsable_gold, greedy: 0.0000" in printed.out  # every gold answer parses
