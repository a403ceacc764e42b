"""The TRL adapter's arguments (`grpokit.trl`): wrong types and ranges are errors naming the TRL field the user
wrote, grpokit's own validation speaks TRL's names, no TRL or peft option is dropped without a word, args changed
after the trainer is built are refused, and TRL's habits (train(resume_from_checkpoint=True), args= as a dict) work
as in TRL."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from datasets import Dataset
from helpers import config, save_tiny, step_rows

from grpokit.config import ConfigError, PPOConfig
from grpokit.config import GRPOConfig as NativeConfig
from grpokit.runtime.checkpoint import RunDirectoryError
from grpokit.trl import GRPOConfig, GRPOTrainer, lora_from_peft


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "qwen2", "qwen2")


DATA = Dataset.from_list([{"prompt": f"{a}+{a}="} for a in range(16)])


def length_reward(completions, **kwargs):
    return [float(len(c)) for c in completions]


def trl_args(tmp_path, **fields) -> GRPOConfig:
    small = {
        "output_dir": str(tmp_path / "out"),
        "per_device_train_batch_size": 4,
        "num_generations": 4,
        "max_steps": 1,
        "max_completion_length": 4,
        "disable_tqdm": True,
    }
    return GRPOConfig(**{**small, **fields})


# ---------------------------------------------------------------- types and ranges, by TRL's name


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("per_device_train_batch_size", "4", "`per_device_train_batch_size` expects int, got '4' (a str)"),
        ("max_steps", "10", "`max_steps` expects int, got '10' (a str)"),
        ("warmup_steps", "0.1", "`warmup_steps` expects float, got '0.1' (a str)"),
        ("learning_rate", "1e-5", "`learning_rate` expects float, got '1e-5' (a str) (a number written as text"),
        ("gradient_accumulation_steps", 0, "`gradient_accumulation_steps` must be >= 1, got 0"),
        ("per_device_train_batch_size", 0, "`per_device_train_batch_size` must be >= 1, got 0"),
        ("max_steps", True, "`max_steps` expects int, got True (a bool)"),
        ("reward_weights", "1,2", "`reward_weights` expects list[float] | None, got '1,2'"),
        ("save_steps", 0, "`save_steps` must be > 0, got 0"),
        ("num_generations", 1, "`num_generations` must be >= 2, got 1"),
    ],
)
def test_a_wrong_type_or_range_is_an_error_naming_the_trl_field(field, value, expected):
    with pytest.raises(ConfigError, match=re.escape(f"TRL field {expected}")):
        GRPOConfig(**{field: value}).to_grpokit(num_prompts=64)


def test_a_path_is_taken_where_trl_takes_a_folder_name(tmp_path):
    cfg = GRPOConfig(output_dir=tmp_path / "out", max_steps=1, resume_from_checkpoint=tmp_path / "out" / "checkpoint-1")
    assert (cfg.to_grpokit().output_dir, cfg.to_grpokit().resume_from_checkpoint) == (
        str(tmp_path / "out"),
        str(tmp_path / "out" / "checkpoint-1"),
    )


def test_strategies_by_epoch_are_mapped_and_unknown_ones_refused():
    # 32 prompts, generation batches of 8 / 4 = 2 prompts: an epoch is 16 generation steps
    cfg = GRPOConfig(eval_strategy="epoch", save_strategy="epoch", num_generations=4).to_grpokit(num_prompts=32)
    assert (cfg.eval_every, cfg.save_every) == (16, 16)
    with pytest.raises(ConfigError, match="TRL field `eval_strategy` = 'sometimes'"):
        GRPOConfig(eval_strategy="sometimes", max_steps=1).to_grpokit()
    with pytest.raises(ConfigError, match="TRL field `save_strategy` = 'best'.*no metric"):
        GRPOConfig(save_strategy="best", max_steps=1).to_grpokit()


def test_eval_strategy_without_an_eval_dataset_is_refused(tmp_path, model):
    with pytest.raises(ConfigError, match="TRL field `eval_strategy` = 'steps' needs an eval_dataset"):
        GRPOTrainer(str(model), length_reward, args=trl_args(tmp_path, eval_strategy="steps"), train_dataset=DATA)


def test_trl_step_counts_become_generation_steps():
    # 2 passes (num_iterations) x 2 optimizer steps per generation batch (steps_per_generation 2): TRL's 8 optimizer
    # steps are 2 generation steps, its save_steps 4 every generation step, its warm-up fraction of 8 steps 2
    cfg = GRPOConfig(
        per_device_train_batch_size=4,
        num_generations=4,
        steps_per_generation=2,
        num_iterations=2,
        max_steps=8,
        save_steps=4,
        warmup_steps=0.25,
    ).to_grpokit()
    assert (cfg.max_steps, cfg.save_every, cfg.warmup_steps, cfg.minibatch_size) == (2, 1, 2, 4)
    assert GRPOConfig(max_steps=10, save_steps=0.5).to_grpokit().save_every == 5  # a fraction of the run


def test_an_epoch_smaller_than_one_generation_batch_is_refused():
    with pytest.raises(ConfigError, match="TRL field `num_train_epochs`: the training set's 3 prompts"):
        GRPOConfig(per_device_train_batch_size=8, num_generations=2).to_grpokit(num_prompts=3)


def test_accumulation_that_splits_no_generation_batch_names_the_trl_fields():
    with pytest.raises(ConfigError, match=r"gradient_accumulation_steps = 3 does not divide .*\(steps_per_generation"):
        GRPOConfig(per_device_train_batch_size=4, num_generations=4, steps_per_generation=2,
                   gradient_accumulation_steps=3, max_steps=1).to_grpokit()  # fmt: skip


# ---------------------------------------------------------------- grpokit's errors in TRL's names


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"epsilon": 1.5}, "TRL field `epsilon`, as grpokit's `epsilon_low`, must be in [0, 1)"),
        ({"sync_ref_model": True}, "TRL field `sync_ref_model`, as grpokit's `ref_sync_every`, needs beta > 0"),
        ({"top_p": 0.0}, "TRL field `top_p` must be in (0, 1], got 0.0"),
    ],
)
def test_grpokit_validation_names_the_trl_field_written(tmp_path, model, fields, expected):
    with pytest.raises(ConfigError) as caught:
        GRPOTrainer(str(model), length_reward, args=trl_args(tmp_path, **fields), train_dataset=DATA)
    assert str(caught.value).startswith(expected), caught.value
    assert "config field" not in str(caught.value)


def test_an_error_about_a_computed_field_names_the_trl_fields_written():
    from grpokit.trl import trl_error

    err = trl_error(ConfigError("config field `prompts_per_step` must divide by 3 ranks"), {"num_generations"})
    assert str(err) == "TRL field `num_generations`, as grpokit's `prompts_per_step`, must divide by 3 ranks"
    err = trl_error(ConfigError("config field `minibatch_size` is 12"), set())  # none written: every source
    assert str(err).startswith("TRL fields `per_device_train_batch_size`, `gradient_accumulation_steps`")
    kept = ConfigError("config field `stop_strings` holds an empty string")  # no TRL source: kept as it is
    assert trl_error(kept, set()) is kept


# ---------------------------------------------------------------- peft


def with_peft(tmp_path, model, peft_config) -> GRPOTrainer:
    return GRPOTrainer(str(model), length_reward, args=trl_args(tmp_path), train_dataset=DATA, peft_config=peft_config)


def test_peft_options_grpokit_lacks_are_refused_by_name(tmp_path, model):
    from peft import LoraConfig

    with pytest.raises(ConfigError, match=r"peft_config.use_dora = True is not supported"):
        with_peft(tmp_path, model, LoraConfig(r=4, use_dora=True, target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match=r"peft_config.modules_to_save = \['lm_head'\] is not supported"):
        with_peft(tmp_path, model, LoraConfig(r=4, modules_to_save=["lm_head"], target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="peft_config.task_type = 'SEQ_CLS'"):
        with_peft(tmp_path, model, LoraConfig(r=4, task_type="SEQ_CLS", target_modules=["q_proj"]))


def test_peft_target_modules_are_resolved_as_peft_resolves_them(tmp_path, model):
    from peft import LoraConfig

    regex = LoraConfig(r=4, lora_alpha=8, target_modules=r"model\.layers\.0\.self_attn\.(q|v)_proj")
    assert with_peft(tmp_path, model, regex).trainer.cfg.lora.target_modules == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
    ]
    default = with_peft(tmp_path, model, LoraConfig(r=4)).trainer.cfg.lora.target_modules
    assert default == ["q_proj", "v_proj"]  # peft's default for Qwen2
    with pytest.raises(ConfigError, match="target_modules = 'attn' .* matches no module"):
        lora_from_peft(LoraConfig(r=4, target_modules="attn"), str(model))


def test_a_dict_peft_config_is_read_as_lora_config_keywords(tmp_path, model):
    trainer = GRPOTrainer(
        str(model),
        length_reward,
        args=trl_args(tmp_path),
        train_dataset=DATA,
        peft_config={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]},
    )
    lora = trainer.trainer.cfg.lora
    assert (lora.r, lora.alpha, lora.target_modules) == (4, 8.0, ["q_proj"])
    with pytest.raises(ConfigError, match="peft_config .*unexpected keyword argument 'rank'"):
        lora_from_peft({"rank": 4}, str(model))


# ---------------------------------------------------------------- args= and resume, as TRL users write them


def test_args_as_a_dict_or_grpokit_config_and_refusals(tmp_path, model):
    fields = {"output_dir": str(tmp_path / "d"), "per_device_train_batch_size": 4, "num_generations": 4,
              "max_completion_length": 4}  # fmt: skip
    by_dict = GRPOTrainer(str(model), length_reward, args={**fields, "max_steps": 1}, train_dataset=DATA)
    assert (by_dict.trainer.cfg.prompts_per_step, by_dict.trainer.cfg.loss_type) == (1, "dapo")  # TRL's default
    own = NativeConfig(output_dir=str(tmp_path / "n"), max_steps=1, prompts_per_step=2, num_generations=2)
    assert GRPOTrainer(str(model), length_reward, args=own, train_dataset=DATA).trainer.cfg.prompts_per_step == 2
    with pytest.raises(ConfigError, match="`args` is grpokit's PPOConfig"):
        GRPOTrainer(str(model), length_reward, args=PPOConfig(), train_dataset=DATA)
    with pytest.raises(ConfigError, match="`args` is a builtins.object; it takes grpokit.trl.GRPOConfig"):
        GRPOTrainer(str(model), length_reward, args=object(), train_dataset=DATA)


def test_train_resume_from_checkpoint_true_continues_the_latest_checkpoint(tmp_path, model):
    def trainer(**fields):
        args = trl_args(tmp_path, save_steps=1, **fields)
        return GRPOTrainer(str(model), length_reward, args=args, train_dataset=DATA)

    trainer(max_steps=2).train()
    again = trainer(max_steps=3)  # built on the earlier run's folder, as in TRL
    with pytest.raises(RunDirectoryError, match=r"continue it with trainer.train\(resume_from_checkpoint=True\)"):
        again.train()  # nothing of the earlier run is replaced without being asked
    assert [r["step"] for r in step_rows(tmp_path / "out")] == [1, 2]
    again.train(resume_from_checkpoint=True)
    assert [r["step"] for r in step_rows(tmp_path / "out")] == [1, 2, 3]
    assert again.trainer.cfg.resume_from_checkpoint == "latest"


def test_resume_from_checkpoint_true_with_no_checkpoint_is_refused(tmp_path, model):
    trainer = GRPOTrainer(str(model), length_reward, args=trl_args(tmp_path), train_dataset=DATA)
    with pytest.raises(RunDirectoryError, match="resume_from_checkpoint=True: output_dir .* holds no complete"):
        trainer.train(resume_from_checkpoint=True)


def test_save_model_to_output_dir_as_trl_scripts_end_saves_the_run_model(tmp_path, model):
    args = trl_args(tmp_path)
    trainer = GRPOTrainer(str(model), length_reward, args=args, train_dataset=DATA)
    trainer.train()
    written = trainer.save_model(args.output_dir)  # the last line of TRL's own scripts
    assert Path(written) == tmp_path / "out" / "model"
    assert (tmp_path / "out" / "model" / "config.json").is_file()
    assert (tmp_path / "out" / "metrics.jsonl").is_file()  # the run folder is kept around it


def test_rerunning_a_finished_trl_script_says_the_run_finished_and_how_to_start_anew(tmp_path, model):
    def trainer():
        return GRPOTrainer(str(model), length_reward, args=trl_args(tmp_path, save_steps=1), train_dataset=DATA)

    trainer().train()
    with pytest.raises(RunDirectoryError) as refused:
        trainer()  # the same script, run again
    message = str(refused.value)
    assert "is the last step of a finished run" in message and "overwrite_output_dir=True" in message
    assert "not with these arguments" not in message  # the arguments are the same: that is not the reason


# ---------------------------------------------------------------- args changed after the trainer is built


@pytest.mark.parametrize("kind", ["trl", "native"])
def test_trl_args_changed_after_the_trainer_is_built_are_refused_naming_them(tmp_path, kind):
    from grpokit.config import ConfigError
    from grpokit.trl import GRPOConfig as TRLConfig
    from grpokit.trl import GRPOTrainer as TRLTrainer

    model = save_tiny(tmp_path / "tiny")
    out = tmp_path / "out"
    if kind == "trl":
        args = TRLConfig(output_dir=str(out), per_device_train_batch_size=4, num_generations=4, max_steps=1,
                         max_completion_length=4, disable_tqdm=True)  # fmt: skip
    else:
        args = config(model, out, train_data=None, max_steps=1)
    rows = [{"prompt": f"{a}+{a}="} for a in range(8)]
    trainer = TRLTrainer(str(model), reward_funcs=lambda completions, **kw: [1.0] * len(completions), args=args,
                         train_dataset=rows)  # fmt: skip
    trainer.args.max_steps = 3  # TRL's own trainer reads args in train(); grpokit's was built from them
    trainer.args.learning_rate = 0.5
    with pytest.raises(ConfigError, match=r"`learning_rate` \(.* -> 0\.5\), `max_steps` \(1 -> 3\).*set them before"):
        trainer.train()
    assert not (out / "metrics.jsonl").exists()


def test_under_torchrun_the_per_device_batch_counts_every_process(monkeypatch):
    """TRL's per_device_train_batch_size is per process: launched on 2 (torchrun's WORLD_SIZE), a generation batch
    holds twice the completions, so twice the prompts per step, as in TRL."""
    args = GRPOConfig(per_device_train_batch_size=4, num_generations=2, max_steps=1)
    assert args.to_grpokit().prompts_per_step == 2
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = args.to_grpokit()
    assert (cfg.prompts_per_step, cfg.micro_batch_size, cfg.minibatch_size) == (4, 4, None)
    assert args.to_grpokit(world_size=1).prompts_per_step == 2
