"""The TRL adapter's trainer as a TRL script drives it past the quick start: `reward_weights` count the functions
handed in, a `peft_config` of rank 0 is refused, `train()` returns TRL's figures and reads `resume_from_checkpoint`
as TRL does, a `max_steps` that is no whole number of generation steps is rounded and said, and a
transformers.Trainer member the adapter lacks is named."""

from __future__ import annotations

import json

import pytest
from helpers import save_tiny

from grpokit.trl import GRPOConfig, GRPOTrainer


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "llama", "llama")


def addition_rows(n: int = 8) -> list[dict[str, str]]:
    return [{"prompt": f"{i}+{i}=", "answer": str(2 * i)} for i in range(n)]


def exact(completions, answer, **_):
    return [float(c.strip() == a) for c, a in zip(completions, answer)]


def test_reward_weights_count_the_reward_functions_handed_to_the_trainer(model, tmp_path):
    """A name and a function in one list with two weights: the weights count the functions handed in, not the
    config's default `reward_funcs` (it used to say "2 entries for 1 reward_funcs")."""
    args = GRPOConfig(
        output_dir=str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=4, num_generations=2,
        max_completion_length=4, use_cpu=True, report_to="none", save_strategy="no", reward_weights=[1.0, 0.5],
    )  # fmt: skip
    trainer = GRPOTrainer(model=str(model), reward_funcs=["accuracy", exact], args=args, train_dataset=addition_rows())
    trainer.train()
    assert trainer.trainer.rewards.names == ["accuracy", "exact"]
    assert trainer.trainer.rewards.weights.tolist() == [1.0, 0.5]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "rewards/exact/mean" in rows[-1]


def test_a_peft_config_of_rank_0_is_refused_not_trained_in_full(model, tmp_path):
    """`peft_config=LoraConfig(r=0)` ran a full fine-tune of every weight without a word (grpokit's `lora.r: 0`
    means no LoRA); peft itself refuses a rank below 1."""
    from peft import LoraConfig

    from grpokit.config import ConfigError

    args = GRPOConfig(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, num_generations=2)
    with pytest.raises(ConfigError, match=r"peft_config.r = 0: a LoRA rank must be a positive integer"):
        GRPOTrainer(
            model=str(model), reward_funcs=exact, args=args, train_dataset=addition_rows(), peft_config=LoraConfig(r=0)
        )
    assert not (tmp_path / "run").exists()


def test_train_returns_trl_figures_and_the_adapter_names_trainer_members_it_lacks(model, tmp_path):
    from grpokit.trl import GRPOConfig, GRPOTrainer

    def length(completions, **_):
        return [float(len(c)) for c in completions]

    args = GRPOConfig(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=4, num_generations=2,
                      max_completion_length=4, use_cpu=True, report_to="none", save_strategy="no")  # fmt: skip
    trainer = GRPOTrainer(str(model), length, args=args, train_dataset=[{"prompt": f"{i}+1="} for i in range(8)])
    result = trainer.train()
    logged = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert result.global_step == 2 and result.training_loss == pytest.approx(sum(logged) / 2)
    assert result.metrics == {"train_loss": result.training_loss, "global_step": 2}
    with pytest.raises(AttributeError, match=r"has no `log_metrics` \(a transformers.Trainer member the adapter"):
        trainer.log_metrics("train", result.metrics)
    with pytest.raises(AttributeError, match=r"object has no attribute 'no_such_thing'"):
        trainer.no_such_thing  # noqa: B018


def test_trl_train_resume_false_starts_fresh_whatever_the_args_say(model, tmp_path):
    """args.resume_from_checkpoint=True and train(resume_from_checkpoint=False): the call's False was ignored and the
    run resumed; in TRL the call decides."""
    from grpokit.runtime.checkpoint import RunDirectoryError
    from grpokit.trl import GRPOConfig, GRPOTrainer

    def fields(**changes):
        base = {"output_dir": str(tmp_path / "r"), "max_steps": 1, "per_device_train_batch_size": 4,
                "num_generations": 2, "max_completion_length": 4, "use_cpu": True, "report_to": "none",
                "save_steps": 1}  # fmt: skip
        return {**base, **changes}

    rows = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(8)]
    GRPOTrainer(str(model), "accuracy", args=GRPOConfig(**fields()), train_dataset=rows).train()
    args = GRPOConfig(**fields(max_steps=2, resume_from_checkpoint=True))
    trainer = GRPOTrainer(str(model), "accuracy", args=args, train_dataset=rows)
    with pytest.raises(RunDirectoryError, match=r"holds an earlier run .*: continue it with trainer\.train\(resume_"):
        trainer.train(resume_from_checkpoint=False)  # a fresh run, as TRL reads False: refused over a run
    assert trainer.train().global_step == 2  # None: what the args ask, a resume


def test_trl_max_steps_rounded_up_to_whole_generation_steps_is_said(model, tmp_path):
    from grpokit.data.rows import InputWarning
    from grpokit.trl import GRPOConfig

    args = GRPOConfig(output_dir=str(tmp_path / "r"), max_steps=3, num_iterations=2, per_device_train_batch_size=4,
                      num_generations=2)  # fmt: skip
    with pytest.warns(InputWarning, match=r"`max_steps` = 3 optimizer steps is not a whole number of generation steps "
                                          r"\(2 optimizer steps each.*grpokit runs 2, 4 optimizer steps"):  # fmt: skip
        assert args.to_grpokit().max_steps == 2
