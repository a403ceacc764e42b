"""Arithmetic word problems for a chat model, and a reward that checks the answer: the shape of a GSM8K-style
GRPO data set, made locally (no download). Used by examples/grpo_smollm2.yaml and benchmarks/vs_trl.py.

    python examples/word_problems.py examples/data/word_problems.jsonl    # (re)write the data set
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


def write_jsonl(path: str, n: int = 256, *, chat: bool = True, seed: int = 0) -> None:
    with open(path, "w") as f:
        for row in problems(n, seed):
            prompt = [{"role": "user", "content": row["question"]}] if chat else row["question"]
            f.write(json.dumps({"prompt": prompt, "answer": row["answer"]}) + "\n")


if __name__ == "__main__":
    write_jsonl(sys.argv[1] if len(sys.argv) > 1 else "examples/data/word_problems.jsonl")
