"""`reward_weights` count the reward functions a run scores with, whichever way they were handed in: one function, a
list, (name, function) pairs, built-in names, a reward-model folder, `module:function` names in YAML, the config's
names replaced by functions passed in, and through grpokit.trl. Matching weights are taken as given; a wrong count
is refused before any model loads, naming both counts."""

from __future__ import annotations

import pytest
import yaml
from helpers import config, save_tiny, save_tiny_reward_model, text_rows

from grpokit.config import ConfigError
from grpokit.stages.grpo import GRPOTrainer


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "llama", "llama")


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
    return save_tiny_reward_model(tmp_path_factory.mktemp("rm"))


def ones(completions, **_):
    return [1.0] * len(completions)


def length(completions, **_):
    return [float(len(c)) for c in completions]


def digits(completions, **_):
    return [float(sum(ch.isdigit() for ch in c)) for c in completions]


def exact(completions, answer, **_):
    return [float(c.strip() == a) for c, a in zip(completions, answer)]


HANDED_IN = {  # way -> (reward_funcs as handed to the trainer, the names the run scores with)
    "one function": (length, ["length"]),
    "a list": ([ones, length, digits, exact], ["ones", "length", "digits", "exact"]),
    "(name, function) pairs": ([("short", length), ("numbers", digits)], ["short", "numbers"]),
    "built-in names": (["accuracy", "format", "overlong"], ["accuracy", "format", "overlong"]),
    "names and functions": (["accuracy", length], ["accuracy", "length"]),
}


@pytest.mark.parametrize("way", HANDED_IN)
def test_weights_count_the_functions_handed_to_the_trainer(way, model, tmp_path):
    funcs, names = HANDED_IN[way]
    weights = [float(k + 1) for k in range(len(names))]
    trainer = GRPOTrainer(config(model, tmp_path / "ok", reward_weights=weights), reward_funcs=funcs)
    assert trainer.rewards.names == names and trainer.rewards.weights.tolist() == weights
    wrong = [*weights, 1.0]
    with pytest.raises(ConfigError, match=rf"`reward_weights` has {len(wrong)} entries for {len(names)} reward func"):
        GRPOTrainer(config("never-loaded", tmp_path / "wrong", reward_weights=wrong), reward_funcs=funcs)
    assert not (tmp_path / "wrong").exists()


def test_weights_count_a_reward_model_folder_among_the_functions(model, reward_model, tmp_path):
    weights = [1.0, 0.5]
    trainer = GRPOTrainer(config(model, tmp_path / "ok", reward_weights=weights), reward_funcs=[reward_model, length])
    assert trainer.rewards.names[0].endswith("reward_model") and trainer.rewards.names[1] == "length"
    assert trainer.rewards.weights.tolist() == weights
    with pytest.raises(ConfigError, match=r"`reward_weights` has 1 entries for 2 reward functions"):
        GRPOTrainer(config(model, tmp_path / "wrong", reward_weights=[1.0]), reward_funcs=[reward_model, length])


def test_the_config_names_give_way_to_the_functions_passed_in_and_so_do_their_weights(model, tmp_path):
    """The config names two rewards and four functions are handed in: the four replace the two, and four weights
    count them (the issue's "reward_weights has 4 entries for 1 reward_funcs")."""
    four = [ones, length, digits, exact]
    cfg = config(model, tmp_path / "ok", reward_funcs=["accuracy", "format"], reward_weights=[1.0, 2.0, 3.0, 4.0])
    trainer = GRPOTrainer(cfg, reward_funcs=four)
    assert trainer.rewards.names == ["ones", "length", "digits", "exact"]
    assert trainer.rewards.weights.tolist() == [1.0, 2.0, 3.0, 4.0]
    cfg = config("never-loaded", tmp_path / "wrong", reward_funcs=["accuracy", "format"], reward_weights=[1.0, 2.0])
    with pytest.raises(ConfigError, match=r"`reward_weights` has 2 entries for 4 reward functions"):
        GRPOTrainer(cfg, reward_funcs=four)


def test_yaml_module_function_names_are_counted_against_their_weights(model, tmp_path):
    fields = {
        **{k: v for k, v in vars(config(model, tmp_path / "ok")).items() if k in ("model", "task", "max_steps")},
        "output_dir": str(tmp_path / "ok"),
        "reward_funcs": ["helpers:module_level_reward", "helpers:digit_share", "format"],
        "reward_weights": [1.0, 0.5, 0.25],
    }
    (tmp_path / "ok.yaml").write_text(yaml.safe_dump(fields))
    trainer = GRPOTrainer(tmp_path / "ok.yaml")
    assert trainer.rewards.names == ["helpers:module_level_reward", "helpers:digit_share", "format"]
    assert trainer.rewards.weights.tolist() == [1.0, 0.5, 0.25]
    (tmp_path / "wrong.yaml").write_text(yaml.safe_dump({**fields, "reward_weights": [1.0, 0.5]}))
    with pytest.raises(ConfigError, match=r"`reward_weights` has 2 entries for 3 reward_funcs"):
        GRPOTrainer(tmp_path / "wrong.yaml")


def test_trl_reward_weights_count_the_functions_handed_to_the_trl_trainer(model, tmp_path):
    from grpokit.trl import GRPOConfig
    from grpokit.trl import GRPOTrainer as TRLTrainer

    def args(weights, out):
        return GRPOConfig(
            output_dir=str(tmp_path / out), max_steps=1, per_device_train_batch_size=4, num_generations=2,
            max_completion_length=4, use_cpu=True, report_to="none", save_strategy="no", reward_weights=weights,
        )  # fmt: skip

    four = [ones, length, digits, exact]
    trainer = TRLTrainer(
        str(model), reward_funcs=four, args=args([1.0, 0.5, 0.2, 0.1], "ok"), train_dataset=text_rows()
    )
    assert trainer.trainer.rewards.weights.tolist() == pytest.approx([1.0, 0.5, 0.2, 0.1])
    with pytest.raises(ConfigError, match=r"`reward_weights` has 3 entries for 4 reward functions"):
        TRLTrainer(str(model), reward_funcs=four, args=args([1.0, 0.5, 0.2], "wrong"), train_dataset=text_rows())
