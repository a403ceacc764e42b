"""What a reward function is handed and how it is called: each argument by its name, as TRL passes them
(conversational completions for chat prompts); `reward_funcs` as a function, a list or (name, function) pairs; a
parameter grpokit cannot pass refused before any work; a data column (an image column too) reaching only the
function that asks for it; a row shared by a group copied once per call; a function of yours named like a built-in
reward recorded as yours."""

from __future__ import annotations

import dataclasses

import pytest
from helpers import config, save_tiny, text_rows

from grpokit.rewards.functions import RewardError
from grpokit.stages.grpo import GRPOTrainer


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "llama", "llama")


# ---------------------------------------------------------------- each argument by its name


def test_a_reward_gets_each_argument_by_its_name(tmp_path, model):
    seen = {}

    def f(completions, prompts, **kw):  # TRL's order does not matter: names do
        seen.update(completions=completions, prompts=prompts, **kw)
        return [float(len(c)) for c in completions]

    trainer = GRPOTrainer(config(model, tmp_path / "run", max_steps=1), reward_funcs=f, train_dataset=text_rows())
    trainer.step()
    rows = {r["prompt"]: r["answer"] for r in text_rows()}
    assert all(p in rows for p in seen["prompts"])  # the prompts, not the completions
    assert all(isinstance(c, str) for c in seen["completions"])
    assert [rows[p] for p in seen["prompts"]] == seen["answer"]  # every data column, lined up
    decoded = trainer.tokenizer.batch_decode(seen["completion_ids"], skip_special_tokens=True)
    assert [d.strip() for d in decoded] == [c.strip() for c in seen["completions"]]
    assert seen["raw_prompts"] == seen["prompts"] and len(seen["truncated"]) == len(seen["completions"])


def test_chat_prompts_give_conversational_completions(tmp_path, model):
    seen = {}

    def reward_len(completions, **kwargs):  # TRL's documented conversational reward
        seen.update(completions=completions, **kwargs)
        return [-abs(4 - len(c[0]["content"])) for c in completions]

    rows = [{"prompt": [{"role": "user", "content": f"{i}+{i}="}], "answer": str(2 * i)} for i in range(8)]
    trainer = GRPOTrainer(config(model, tmp_path / "run", max_steps=1), reward_funcs=[reward_len], train_dataset=rows)
    metrics, _ = trainer.step()
    assert all(c[0]["role"] == "assistant" and isinstance(c[0]["content"], str) for c in seen["completions"])
    assert all(isinstance(p, list) and p[0]["role"] == "user" for p in seen["prompts"])
    assert seen["rendered_prompts"][0] == trainer.tokenizer.apply_chat_template(
        seen["prompts"][0], tokenize=False, add_generation_prompt=True
    )
    assert "rewards/reward_len/mean" in metrics


def test_a_reward_without_kwargs_gets_only_what_it_names(tmp_path, model):
    def exact(completions, answer):
        return [float(c.strip() == a) for c, a in zip(completions, answer)]

    metrics, _ = GRPOTrainer(config(model, tmp_path / "run"), reward_funcs=exact, train_dataset=text_rows()).step()
    assert 0.0 <= metrics["rewards/exact/mean"] <= 1.0


def test_a_reward_that_cannot_be_called_by_keyword_is_refused_before_work(tmp_path):
    def positional(p, c):
        return [0.0] * len(c)

    with pytest.raises(RewardError, match=r"reward function `positional` takes 'p', which grpokit does not pass"):
        GRPOTrainer(config("never-loaded", tmp_path / "run"), reward_funcs=[positional], train_dataset=text_rows())


def test_a_positional_only_reward_parameter_is_named_as_such(tmp_path):
    """`def posonly(completions, /, **kw)`: it said grpokit "does not pass" completions, which it does."""
    from grpokit.rewards.functions import RewardError
    from grpokit.stages.grpo import GRPOTrainer

    def posonly(completions, /, **kwargs):
        return [0.0] * len(completions)

    with pytest.raises(RewardError, match=r"takes 'completions' as a positional-only parameter \(before `/`\)"):
        GRPOTrainer(config("never-loaded", tmp_path / "run"), reward_funcs=[posonly])


def test_an_image_column_is_refused_naming_it_unless_a_reward_function_reads_it(tmp_path):
    from grpokit.data.rows import DataError

    model = save_tiny(tmp_path / "tiny")
    rows = [{"prompt": f"{i}+1=", "answer": str(i + 1), "images": [f"picture {i}"]} for i in range(4)]

    def length(completions, **kwargs):
        return [float(len(c)) for c in completions]

    def mentions_picture(completions, images, **kwargs):
        return [float(str(i[0]) in c) for c, i in zip(completions, images)]

    cfg = config(model, tmp_path / "out", train_data=None, max_steps=1)
    with pytest.raises(DataError, match=r"train data has an 'images' column .*the images would be dropped"):
        GRPOTrainer(cfg, train_dataset=rows, reward_funcs=length)
    text_rows = [{k: v for k, v in row.items() if k != "images"} for row in rows]
    with pytest.raises(DataError, match=r"eval data has an 'images' column"):
        GRPOTrainer(
            dataclasses.replace(cfg, num_eval_prompts=4),
            train_dataset=text_rows,
            eval_dataset=rows,
            reward_funcs=length,
        )
    assert not (tmp_path / "out").exists()
    trainer = GRPOTrainer(cfg, train_dataset=rows, reward_funcs=[length, mentions_picture])
    assert trainer.sample().rewards.shape == (8, 2)  # the column reached the function that asked for it


def test_a_row_shared_by_a_group_is_copied_once_per_reward_call_and_never_shared_between_functions():
    from grpokit.rewards.functions import score

    messages = [{"role": "user", "content": "1+1="}]  # one prompt row, shared by its group's 3 completions
    ids = [5, 6, 7]
    batch = {"prompts": [messages] * 3, "completions": ["2", "3", "4"], "completion_ids": [ids, [8], ids]}
    seen = []

    def keep(prompts, completion_ids, **_):
        seen.append((prompts, completion_ids))
        prompts[0][0]["content"] = "edited"  # an edit in place reaches neither the batch nor the next function
        completion_ids[0].append(0)
        return [1.0, 0.0, 0.5]

    score([("first", keep), ("second", keep)], batch)
    (first, first_ids), (second, second_ids) = seen
    assert first[0] is first[1] is first[2] and first_ids[0] is first_ids[2]  # copied once, as shared
    assert first[0] is not messages and second[0] is not first[0] and second_ids[0] is not first_ids[0]
    assert second[0][0]["content"] == "edited" and second_ids[0] == [5, 6, 7, 0]  # only its own edit
    assert messages == [{"role": "user", "content": "1+1="}] and ids == [5, 6, 7]


# ---------------------------------------------------------------- the functions handed in, and their names


def test_reward_funcs_as_a_function_a_list_or_pairs_and_names_made_unique(tmp_path, model):
    def ones(completions, **_):
        return [1.0] * len(completions)

    for funcs, names in [
        (ones, ["ones"]),
        ([ones, ones], ["ones", "ones_2"]),
        ([("custom", ones), "format"], ["custom", "format"]),
    ]:
        trainer = GRPOTrainer(config(model, tmp_path / "run"), reward_funcs=funcs, train_dataset=text_rows())
        assert trainer.rewards.names == names


def test_a_function_of_yours_named_as_a_built_in_reward_is_recorded_as_yours(model, tmp_path):
    """A script's `accuracy` (a length reward) was recorded as `accuracy`, so a resume with the built-in passed."""
    from grpokit.stages.grpo import GRPOTrainer

    script = {"__name__": "__main__"}  # a function as a script defines it: module __main__, qualname accuracy
    exec("def accuracy(completions, **_):\n    return [float(len(c)) for c in completions]\n", script)
    accuracy = script["accuracy"]
    trainer = GRPOTrainer(config(model, tmp_path / "run"), reward_funcs=[accuracy, "accuracy"])
    assert (
        trainer.cfg.reward_funcs[0] == "__main__:" + accuracy.__qualname__ and trainer.cfg.reward_funcs[1] != "accuracy"
    )
