"""Arithmetic word problems for a chat model, and a reward that checks the answer: the shape of a GSM8K-style
GRPO data set, made locally (no download). Used by benchmarks/vs_trl.py (the two-step problems) and by the
CPU recipe examples/grpo_smollm2.yaml (one-step problems that ask for "The answer is N", and `answer_format`).

    python examples/word_problems.py examples/data/word_problems.jsonl    # (re)write the data set
    python examples/word_problems.py --one-step examples/data/word_problems_one_step.jsonl 256 0
    python examples/word_problems.py --one-step examples/data/word_problems_one_step_eval.jsonl 64 1
"""

from __future__ import annotations

import json
import random
import re
import sys

NAMES = ["Ava", "Ben", "Chloe", "Dan", "Emma", "Finn", "Grace", "Hugo", "Iris", "Jack", "Lena", "Omar"]
ITEMS = ["apples", "marbles", "stamps", "books", "coins", "shells", "pencils", "stickers"]


def problems(n: int, seed: int = 0) -> list[dict]:
    """`n` rows {"question", "answer"}: two additions and a subtraction in a short story."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b, c = rng.randint(3, 40), rng.randint(2, 30), rng.randint(1, 9)
        who, other, item = rng.choice(NAMES), rng.choice(NAMES), rng.choice(ITEMS)
        text = (
            f"{who} has {a} {item}. {other} gives {who} {b} more, and then {who} gives away {c}. "
            f"How many {item} does {who} have now? Think step by step, then give the number."
        )
        rows.append({"question": text, "answer": str(a + b - c)})
    return rows


# SmolLM2-135M-Instruct answers about 2% of the two-step problems above (sampled at temperature 1): too few groups
# hold a right answer for GRPO to learn from in CPU minutes. One addition of small numbers, with the form of the
# answer asked for, it answers about 8% and ends about 2 replies in 3 within 24 tokens (measured for the recipe).
ONE_STEP_INSTRUCTION = 'Write the addition with its result, then "The answer is" and the number.'


def one_step_problems(n: int, seed: int = 0) -> list[dict]:
    """`n` rows {"question", "answer"}: one addition of small numbers (a in 2..15, b in 2..9) in a short story,
    with the instruction to end on "The answer is" and the number."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(2, 15), rng.randint(2, 9)
        who, other, item = rng.choice(NAMES), rng.choice(NAMES), rng.choice(ITEMS)
        other = other if other != who else NAMES[(NAMES.index(who) + 1) % len(NAMES)]
        text = f"{who} has {a} {item}. {other} gives {who} {b} more. How many {item} does {who} have now? "
        rows.append({"question": text + ONE_STEP_INSTRUCTION, "answer": str(a + b)})
    return rows


def last_number_is_answer(prompts, completions, answer, **_):
    """1 when the last number in the completion is the answer, else 0; plus up to 0.1 for a short answer, so
    the completions of a group rarely tie. Takes plain strings and TRL's conversational completions
    ([{"role": "assistant", "content": ...}]) alike, so TRL and grpokit can share it."""
    scores = []
    for completion, gold in zip(completions, answer):
        text = completion[-1]["content"] if isinstance(completion, list) else completion
        numbers = re.findall(r"-?\d+", text)
        scores.append(float(bool(numbers) and numbers[-1] == gold) + 0.1 / (1 + len(text) / 50))
    return scores


def answer_is_right(prompts, completions, answer, **_):
    """1 when the last number in the completion is the answer, else 0: correctness alone, with no length term.
    The recipe (examples/grpo_smollm2.yaml) trains on it beside `answer_format`."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [float(re.findall(r"-?\d+", text)[-1:] == [gold]) for text, gold in zip(texts, answer)]


def answer_format(prompts, completions, **_):
    """1 when the completion writes an addition with its result ("9 + 7 = 16") and ends with "The answer is" and
    a number (a final period allowed), right or wrong, else 0: the form the one-step prompts ask for. It pays
    for the form only and `answer_is_right` for the number, so a run's two curves tell the form learnt from the
    arithmetic learnt."""
    scores = []
    for completion in completions:
        text = completion[-1]["content"] if isinstance(completion, list) else completion
        scores.append(float(re.search(r"\d+ ?\+ ?\d+ ?= ?\d+.*The answer is -?\d+\.?\s*$", text, re.S) is not None))
    return scores


def write_jsonl(path: str, n: int = 256, *, chat: bool = True, seed: int = 0, one_step: bool = False) -> None:
    with open(path, "w") as f:
        for row in (one_step_problems if one_step else problems)(n, seed):
            prompt = [{"role": "user", "content": row["question"]}] if chat else row["question"]
            f.write(json.dumps({"prompt": prompt, "answer": row["answer"]}) + "\n")


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--one-step"]
    path = args[0] if args else "examples/data/word_problems.jsonl"
    n, seed = (int(args[1]), int(args[2])) if len(args) > 2 else (256, 0)
    write_jsonl(path, n, seed=seed, one_step="--one-step" in sys.argv[1:])
