"""`task: reasoning_gym:NAME` (`data.tasks.reasoning_gym_task`): rows from reasoning-gym's seeded generator with the
task's settings, held-out rows that never equal training rows, the answer extracted from `<answer>` tags before the
task's own scorer, that scorer as the `accuracy` reward and as held-out accuracy (in a run's metrics and in
`grpokit eval`), the config's errors, and the error when reasoning-gym is not installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from helpers import cli_run, config, read_jsonl, tiny_run_args

from grpokit.cli import main
from grpokit.config import ConfigError, EvalConfig, SFTConfig
from grpokit.core.types import Rollout
from grpokit.data.tasks import ReasoningGymTask, build_char_tokenizer, make_task, tiny_model
from grpokit.data.tasks.reasoning_gym_task import INSTRUCTION, is_eval_question, max_draws, split_seed
from grpokit.data.tasks.tokenizer import DEFAULT_CHARS
from grpokit.rewards.functions import build_reward_funcs, score
from grpokit.stages.grpo import GRPOTrainer

CHAIN_SUM = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}  # about 200 distinct questions
CHARS = DEFAULT_CHARS + "<>_"  # the instruction's tags


@pytest.fixture(scope="module")
def chain_sum():
    return ReasoningGymTask("chain_sum", CHAIN_SUM)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny Qwen2 whose character tokenizer knows `<>_`, with room for the chat-rendered prompt (~200 tokens)."""
    tokenizer = build_char_tokenizer(CHARS)
    path = tmp_path_factory.mktemp("tiny") / "qwen2"
    tiny_model(tokenizer, "qwen2", hidden_size=32, max_position_embeddings=320).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def entry_row(answer: str = "2248") -> dict:
    return ReasoningGymTask("chain_sum", CHAIN_SUM).row(
        {"question": "What is 1124 + 1124?", "answer": answer, "metadata": {}}
    )


# ---------------------------------------------------------------- rows


def test_rows_carry_the_instruction_the_question_and_the_entry(chain_sum):
    rows = chain_sum.rows(6, split="train", seed=3)
    assert rows == chain_sum.rows(6, split="train", seed=3)  # seeded
    assert rows != chain_sum.rows(6, split="train", seed=4)
    row = rows[0]
    assert row["prompt"] == [{"role": "system", "content": INSTRUCTION}, {"role": "user", "content": row["question"]}]
    assert "<answer>" in INSTRUCTION
    assert set(row) == {"prompt", "question", "answer", "metadata"}
    terms = row["metadata"]["expression"].split()  # e.g. ['4', '-', '7']: the settings' 2 terms of 1 digit
    assert len(terms) == 3 and row["metadata"]["source_dataset"] == "chain_sum"
    assert row["answer"] == str(eval(row["metadata"]["expression"]))  # the entry's own answer


def test_held_out_rows_never_equal_training_rows(chain_sum):
    """About 200 distinct questions: 600 training rows repeat most of the training side, yet no held-out question is
    among them; the split is by a hash of the question, and the two splits draw from disjoint generator seeds."""
    train = chain_sum.rows(600, split="train", seed=0)
    held_out = chain_sum.rows(100, split="eval", seed=0)
    train_questions, held_out_questions = {r["question"] for r in train}, {r["question"] for r in held_out}
    assert len(train_questions) > 100 and len(held_out_questions) >= 10
    assert not train_questions & held_out_questions
    assert not any(r in train for r in held_out)
    assert all(is_eval_question(q) for q in held_out_questions) and not any(map(is_eval_question, train_questions))
    for seed in (0, 1, 2**40):  # the seeds s + i of entries i < max_draws never meet
        low, high = split_seed(seed, "train"), split_seed(seed, "eval")
        assert low + max_draws(600) < high and high + max_draws(100) < 2**32


def test_settings_that_leave_a_split_no_question_are_an_error_not_an_endless_loop():
    """prime_factorization of 2 alone has one question, on the training side; of 8 alone one, held out."""
    two, eight = (ReasoningGymTask("prime_factorization", {"min_value": v, "max_value": v}) for v in (2, 8))
    assert [r["answer"] for r in two.rows(3, split="train", seed=0)] == ["2"] * 3
    assert [r["answer"] for r in eight.rows(2, split="eval", seed=0)] == ["2 × 2 × 2"] * 2
    with pytest.raises(ValueError, match=r"`task_settings`: reasoning_gym:prime_factorization gave 0 eval rows of the 1"
                       r" asked for in 1500 problems .* too few distinct questions"):  # fmt: skip
        two.rows(1, split="eval", seed=0)
    with pytest.raises(ValueError, match=r"gave 0 train rows"):
        eight.rows(1, split="train", seed=0)


# ---------------------------------------------------------------- scores


def test_the_answer_is_extracted_from_the_tags_before_the_tasks_scorer(chain_sum):
    """reasoning-gym's scorer alone gives "The answer is 2248" 4/18 of a point; after extraction it gets nothing
    (no tags), the tagged answer full marks and a sentence inside the tags partial credit."""
    row, basic = entry_row(), ReasoningGymTask("basic_arithmetic")
    raw = {k: row[k] for k in ("question", "answer", "metadata")}
    assert chain_sum.scorer.score_answer("The answer is 2248", raw) == pytest.approx(4 / 18)

    def scores(task, text):
        return task.score(text, row["question"], row["answer"], row["metadata"])

    assert scores(chain_sum, "<answer>2248</answer>") == 1.0
    assert scores(chain_sum, "<think>1124 twice</think>\n<answer> 2248 </answer>") == 1.0  # stripped
    assert scores(chain_sum, "The answer is 2248") == 0.0
    assert scores(chain_sum, "<answer>The answer is 2248</answer>") == pytest.approx(4 / 18)
    assert scores(chain_sum, "<answer>2249</answer>") == 0.0
    assert scores(chain_sum, "<answer>7</answer> no: <answer>2248</answer>") == 1.0  # the last tags
    assert scores(chain_sum, "<answer>2248") == 0.0  # cut before the closing tag
    # each task's own scorer: chain_sum reads "+02,248.00" as 2248, basic_arithmetic compares the text
    assert scores(chain_sum, "<answer>+02,248.00</answer>") == 1.0
    assert scores(basic, "<answer>+02,248.00</answer>") == 0.0
    assert scores(basic, "<answer>2248</answer>") == 1.0
    # held-out accuracy counts full marks only
    assert chain_sum.check("<answer>2248</answer>", row) is True
    assert chain_sum.check("<answer>The answer is 2248</answer>", row) is False


def test_answer_format_last_number_asks_with_the_question_alone_and_reads_the_last_number():
    """For a model that never writes the tags: the prompt is the question as plain text, the answer the
    completion's last number (tags or not), scored by the task's own scorer."""
    task = ReasoningGymTask("chain_sum", {**CHAIN_SUM, "answer_format": "last_number"})
    assert "answer_format" not in task.settings  # grpokit's key, never handed to reasoning-gym
    row = task.rows(3, split="train", seed=0)[0]
    assert row["prompt"] == row["question"]  # a plain-text prompt: no template, no instruction

    def scores(text):
        return task.score(text, "What is 1124 + 1124?", "2248", {})

    assert scores("The answer is 2248.") == 1.0
    assert scores("1124 + 1124 = 2248") == 1.0
    assert scores("2248, or maybe 2249") == 0.0  # the last number is read
    assert scores("<answer>2248</answer>") == 1.0
    assert scores("no number") == 0.0
    assert task.score("5 - 9 = -4", "5 - 9 =", "-4", {}) == 1.0  # the sign belongs to the number
    assert task.score("5 - 9 = \u22124", "5 - 9 =", "-4", {}) == 1.0  # a Unicode minus too
    assert task.extract("It is 1,234.5 in all") == "1234.5"  # thousands grouped by commas
    assert task.extract("3, 4, then 5,") == "5"  # a comma that groups no thousands ends the number
    with pytest.raises(ValueError, match="task_settings.*answer_format.*'boxed'"):
        ReasoningGymTask("chain_sum", {"answer_format": "boxed"})
    with pytest.raises(ValueError, match="task_settings.*last_number.*not all numbers"):
        ReasoningGymTask("spell_backward", {"answer_format": "last_number"})  # answers are words


def test_accuracy_reward_is_the_tasks_scorer_under_the_reward_contract():
    task = ReasoningGymTask("basic_arithmetic", {"min_terms": 2, "max_terms": 2, "max_digits": 1})
    rows = task.rows(3, split="train", seed=0)
    (name, accuracy), = build_reward_funcs(["accuracy"], format_pattern=".*", max_completion_length=8,
                                           overlong_buffer=4, task=task)  # fmt: skip
    texts = [f"<answer>{rows[0]['answer']}</answer>", f"{rows[1]['answer']}", f"<answer>x{rows[2]['answer']}</answer>"]
    columns = {key: [r[key] for r in rows] for key in ("question", "answer", "metadata")}
    inputs = {"prompts": [r["prompt"] for r in rows], "completions": texts, **columns}
    partial = len(rows[2]["answer"]) / (len(rows[2]["answer"]) + 1)
    assert name == "accuracy"
    assert score([(name, accuracy)], inputs)[:, 0].tolist() == pytest.approx([1.0, 0.0, partial])
    # a multi-turn row is scored on its final turn
    turns = accuracy(completions=texts, final_turns=[texts[1], texts[0], texts[2]], **columns)
    assert turns[:2] == [0.0, 0.0] and turns[2] == pytest.approx(partial)


# ---------------------------------------------------------------- the config


def test_config_names_the_field_of_a_wrong_task_or_setting(tmp_path):
    def error(**fields) -> str:
        with pytest.raises(ConfigError) as info:
            config("m", tmp_path / "run", **fields).validate()
        return str(info.value)

    assert "reasoning-gym has no task 'chain_summ'" in error(task="reasoning_gym:chain_summ")
    message = error(task="reasoning_gym:chain_sum", task_settings={"max_digit": 2})
    assert "config field `task_settings`" in message and "max_digit" in message and "max_digits" in message
    assert "max_terms must be >= min_terms" in error(
        task="reasoning_gym:chain_sum", task_settings={"min_terms": 5, "max_terms": 2}
    )
    assert "`task_settings` sets 'seed'" in error(task="reasoning_gym:chain_sum", task_settings={"seed": 1})
    assert "`task_num_digits` is 3" in error(task="reasoning_gym:chain_sum", task_num_digits=3)
    assert "`task_settings` is {'max_digits': 2}, but the built-in task 'addition'" in error(
        task="addition", task_settings={"max_digits": 2}
    )
    assert "reasoning_gym:NAME" in error(task="chain_sum")
    config("m", tmp_path / "ok", task="reasoning_gym:chain_sum", task_settings=CHAIN_SUM).validate()
    with pytest.raises(ConfigError, match=r"`task` is 'reasoning_gym:chain_sum': grpokit sft trains on a task's "):
        SFTConfig(model="m", output_dir=str(tmp_path / "sft"), task="reasoning_gym:chain_sum").validate()
    with pytest.raises(ConfigError, match=r"`task_settings` is \{'max_digits': 2\}, but it shapes a reasoning_gym"):
        EvalConfig(model="m", eval_data="rows.jsonl", task_settings={"max_digits": 2}).validate()


def test_without_the_extras_the_errors_say_which_to_install(tmp_path):
    """reasoning_gym and math_verify blocked in a fresh interpreter (None in sys.modules: `import` raises ImportError),
    as where the `reasoning` and `math` extras are not installed: the config names the field and the extra, and so do
    the task and the reward built from Python."""
    code = f"""
import json, sys
sys.modules["reasoning_gym"] = sys.modules["math_verify"] = None
from grpokit.config import ConfigError, EvalConfig, GRPOConfig
from grpokit.data.tasks import ReasoningGymTask
from grpokit.rewards.functions import build_reward_funcs
out = {{}}
for key, make in (
    ("task", lambda: GRPOConfig(model="m", output_dir={str(tmp_path / "a")!r}, task="reasoning_gym:chain_sum")),
    ("reward", lambda: GRPOConfig(model="m", output_dir={str(tmp_path / "b")!r}, task="addition",
                                  reward_funcs=["math_accuracy"])),
    ("eval", lambda: EvalConfig(model="m", eval_data="rows.jsonl", reward_funcs=["math_accuracy"])),
):
    try:
        make().validate()
    except ConfigError as err:
        out[key] = str(err)
for key, make in (("python task", lambda: ReasoningGymTask("chain_sum")),
                  ("python reward", lambda: build_reward_funcs(["math_accuracy"], format_pattern="",
                                                               max_completion_length=8, overlong_buffer=4))):
    try:
        make()
    except ImportError as err:
        out[key] = str(err)
print(json.dumps(out))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ, check=True)
    out = json.loads(done.stdout.splitlines()[-1])
    assert out["task"].startswith("config field `task` is 'reasoning_gym:chain_sum': `reasoning_gym:` tasks need")
    assert out["task"].endswith("pip install 'grpokit[reasoning]'")
    assert out["python task"].endswith("pip install 'grpokit[reasoning]'")
    for key in ("reward", "eval"):
        assert out[key] == (
            "config field `reward_funcs` names 'math_accuracy', which needs the math-verify package: pip install "
            "'grpokit[math]'"
        )
    assert out["python reward"].startswith("the `math_accuracy` reward needs the math-verify package")
    assert out["python reward"].endswith("pip install 'grpokit[math]'")


# ---------------------------------------------------------------- held-out accuracy and runs


class Answers:
    """A sampler that writes, for each prompt, what `reply(prompt text)` says (then EOS): no model."""

    def __init__(self, tokenizer, reply):
        self.tokenizer, self.reply = tokenizer, reply

    def update_weights(self, weights) -> None:
        pass

    def generate(self, prompt_ids, *, num_generations, params, seeds):
        tok, G = self.tokenizer, num_generations
        texts = [self.reply(tok.decode(p)) for p in prompt_ids for _ in range(G)]
        rows = [tok(t, add_special_tokens=False)["input_ids"][: params.max_new_tokens - 1] + [tok.eos_token_id]
                for t in texts]  # fmt: skip
        prompts = [list(p) for p in prompt_ids for _ in range(G)]
        tp, tc, pad = max(map(len, prompts)), max(map(len, rows)), tok.pad_token_id
        return Rollout(
            prompt_ids=torch.tensor([[pad] * (tp - len(p)) + p for p in prompts]),
            prompt_mask=torch.tensor([[0] * (tp - len(p)) + [1] * len(p) for p in prompts]),
            completion_ids=torch.tensor([r + [pad] * (tc - len(r)) for r in rows]),
            completion_mask=torch.tensor([[1] * len(r) + [0] * (tc - len(r)) for r in rows]),
            sampling_logp=torch.full((len(rows), tc), -0.5),
            truncated=torch.zeros(len(rows), dtype=torch.bool),
            group_size=G,
        )


def test_held_out_accuracy_is_full_marks_of_the_tasks_scorer(model, tmp_path):
    """Four held-out rows answered right in tags, right without tags, in tags inside a sentence, wrong: accuracy
    1/4, the accuracy reward's mean (1 + 0 + partial + 0) / 4."""
    cfg = config(model, tmp_path / "run", task="reasoning_gym:chain_sum", task_settings=CHAIN_SUM, num_eval_prompts=4,
                 max_completion_length=40)  # fmt: skip
    rows = make_task(cfg.task, num_digits=2, settings=CHAIN_SUM).rows(4, split="eval", seed=cfg.seed)
    forms = ["<answer>{}</answer>", "{}", "<answer>it is {}</answer>", "<answer>{}</answer>"]
    answers = [r["answer"] for r in rows[:3]] + [str(int(rows[3]["answer"]) + 1)]  # the last one wrong
    said = {r["question"]: form.format(a) for r, form, a in zip(rows, forms, answers)}
    sampler = Answers(build_char_tokenizer(CHARS), lambda prompt: next(v for q, v in said.items() if q in prompt))
    trainer = GRPOTrainer(cfg, sampler=sampler)
    assert trainer.eval_rows == rows  # `grpokit eval --task` draws the same ones
    result = trainer.evaluate(0)
    partial = len(rows[2]["answer"]) / len(f"it is {rows[2]['answer']}")
    assert result["eval/accuracy_greedy"] == result["eval/accuracy_sampled"] == 0.25
    assert result["eval/rewards/accuracy/mean_greedy"] == pytest.approx((1 + partial) / 4)


def test_a_tiny_grpo_run_on_chain_sum_logs_held_out_accuracy_and_grpokit_eval_scores_it(model, tmp_path, capsys):
    out = tmp_path / "run"
    settings = json.dumps(CHAIN_SUM)
    rc, err = cli_run(capsys, "train", *tiny_run_args(
        model, out, "--task", "reasoning_gym:chain_sum", "--task-settings", settings, "--max-steps", "2",
        "--num-eval-prompts", "2", "--eval-every", "1", "--max-completion-length", "6",
    ))  # fmt: skip
    assert rc == 0, err
    logged = read_jsonl(out / "metrics.jsonl")
    steps = [row for row in logged if "reward" in row]
    assert [row["step"] for row in steps] == [1, 2] and all("rewards/accuracy/mean" in row for row in steps)
    evals = [row["step"] for row in logged if "eval/accuracy_greedy" in row]
    assert evals == [0, 1, 2]
    assert all("eval/rewards/accuracy/mean_sampled" in row for row in logged if "eval/accuracy_greedy" in row)
    assert yaml.safe_load((out / "config.yaml").read_text())["task_settings"] == CHAIN_SUM  # recorded with the run
    rc = main(["eval", "--model", str(out / "model"), "--task", "reasoning_gym:chain_sum", "--task-settings", settings,
               "--num-eval-prompts", "2", "--max-completion-length", "6"])  # fmt: skip
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert "reasoning_gym:chain_sum held-out accuracy, greedy: 0.0% of 2" in printed.out
    assert "reasoning_gym:chain_sum held-out accuracy, sampled (T=1): 0.0% of 2" in printed.out
