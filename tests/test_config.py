"""Bad configs fail before any model is loaded, with the field's name in the message (invariant 9)."""

from __future__ import annotations

import pytest

from grpokit.config import ConfigError, GRPOConfig, LoRAConfig, SFTConfig, from_dict, load_yaml


def grpo(**overrides) -> GRPOConfig:
    return GRPOConfig(**{"model": "some/path", "task": "addition", **overrides})


@pytest.mark.parametrize(
    ("overrides", "field", "detail"),
    [
        ({"num_generations": 1}, "num_generations", "must be >= 2"),
        ({"prompts_per_step": 3, "num_generations": 4, "minibatch_size": 5}, "minibatch_size", "must divide"),
        (
            {"minibatch_size": 16, "micro_batch_size": 6},
            "micro_batch_size",
            "must divide minibatch_size = 16",
        ),
        ({"loss_type": "ppo"}, "loss_type", "'grpo', 'bnpo', 'dapo', 'dr_grpo'"),
        ({"scale_rewards": "zscore"}, "scale_rewards", "'group'"),
        ({"kl_estimator": "k4"}, "kl_estimator", "'k3'"),
        ({"reward_funcs": ["accuracy"], "reward_weights": [1.0, 2.0]}, "reward_weights", "2 entries for 1"),
        ({"temperature": 0.0}, "temperature", "must be > 0"),
        ({"learning_rate": "fast"}, "learning_rate", "expects float"),
        ({"beta": -0.1}, "beta", "must be >= 0"),
        ({"task": "sorting"}, "task", "known tasks: ['addition']"),
        ({"ref_sync_every": 10}, "ref_sync_every", "needs beta > 0"),
        ({"lora": LoRAConfig(save="adapter")}, "lora.save", "no adapter to save"),
    ],
)
def test_bad_grpo_field_is_named(overrides, field, detail):
    with pytest.raises(ConfigError) as err:
        grpo(**overrides).validate()
    assert f"`{field}`" in str(err.value)
    assert detail in str(err.value)


def test_valid_config_passes_and_batch_arithmetic_is_checked_on_the_product():
    grpo(prompts_per_step=3, num_generations=4, minibatch_size=6, micro_batch_size=2).validate()


def test_exactly_one_data_source():
    with pytest.raises(ConfigError, match="exactly one of `task`"):
        GRPOConfig(model="m").validate()
    with pytest.raises(ConfigError, match="exactly one of `task`"):
        GRPOConfig(model="m", task="addition", train_data="x.jsonl").validate()


def test_unknown_yaml_key_suggests_the_real_field(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: m\ntask: addition\nlearning_rte: 0.1\n")
    with pytest.raises(ConfigError, match="unknown field `learning_rte`.*did you mean `learning_rate`"):
        load_yaml(GRPOConfig, path)


def test_yaml_int_for_float_field_becomes_float(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: m\ntask: addition\nlearning_rate: 1\n")
    cfg = load_yaml(GRPOConfig, path)
    assert isinstance(cfg.learning_rate, float) and cfg.learning_rate == 1.0
    cfg.validate()


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_yaml(GRPOConfig, tmp_path / "nope.yaml")


def test_sft_config_checks_its_own_fields():
    with pytest.raises(ConfigError, match="`forget_carry`"):
        from_dict(SFTConfig, {"model": "m", "task": "addition", "forget_carry": 1.5}).validate()


def test_model_path_may_be_empty_only_when_a_model_object_is_given():
    cfg = GRPOConfig(task="addition")
    with pytest.raises(ConfigError, match="`model` is empty"):
        cfg.validate()
    cfg.validate(model_given=True)
