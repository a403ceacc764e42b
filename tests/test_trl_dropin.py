"""`from grpokit.trl import GRPOConfig, GRPOTrainer`: TRL's quick-start script and its conversational twin run
with only the import line changed (and a local tiny model and in-memory data instead of hub names)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from datasets import Dataset
from helpers import save_tiny, step_rows

from grpokit.config import ConfigError
from grpokit.config import GRPOConfig as NativeConfig
from grpokit.config.trl_names import CONVERSIONS
from grpokit.trl import GRPOConfig, GRPOTrainer

TRL_PAGE = Path(__file__).resolve().parents[1] / "docs" / "from-trl.md"  # the TRL field map


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "qwen2", "qwen2")


def test_trl_quick_start_runs_with_the_import_line_changed(tmp_path, model):
    dataset = Dataset.from_list([{"prompt": f"{a}+{b}="} for a in range(8) for b in range(4)])

    # Define the reward function, which rewards completions that are close to 20 characters
    def reward_len(completions, **kwargs):
        return [-abs(20 - len(completion)) for completion in completions]

    training_args = GRPOConfig(
        output_dir=str(tmp_path / "Qwen2-GRPO"),
        per_device_train_batch_size=16,
        num_generations=8,
        max_completion_length=8,
        learning_rate=1e-5,
        logging_steps=1,
        max_steps=2,
        report_to="tensorboard",
        gradient_checkpointing=True,
        bf16=True,
        use_vllm=False,
        save_steps=100,
    )
    trainer = GRPOTrainer(model=str(model), reward_funcs=reward_len, args=training_args, train_dataset=dataset)
    trainer.train()

    cfg = trainer.trainer.cfg  # what it became in grpokit's terms
    assert (cfg.prompts_per_step, cfg.num_generations, cfg.micro_batch_size, cfg.minibatch_size) == (2, 8, 16, None)
    assert (cfg.save_every, cfg.dtype, cfg.gradient_checkpointing, cfg.tensorboard) == (100, "bfloat16", True, True)
    assert (cfg.loss_type, cfg.adam_beta2, cfg.seed, cfg.lr_schedule) == ("dapo", 0.999, 42, "linear")  # TRL's
    out = tmp_path / "Qwen2-GRPO"
    assert [r["step"] for r in step_rows(out)] == [1, 2]
    assert all(r["rewards/reward_len/mean"] <= 0 for r in step_rows(out))
    assert (out / "model" / "config.json").is_file() and any((out / "tensorboard").iterdir())


def test_the_conversational_twin_reads_completion_content(tmp_path, model):
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": f"{a}+{a}="}]} for a in range(16)])

    def reward_len(completions, **kwargs):
        return [-abs(20 - len(completion[0]["content"])) for completion in completions]

    args = GRPOConfig(
        output_dir=str(tmp_path / "chat"),
        per_device_train_batch_size=8,
        num_generations=4,
        max_steps=1,
        max_completion_length=8,
        gradient_accumulation_steps=2,
    )
    trainer = GRPOTrainer(model=str(model), reward_funcs=[reward_len], args=args, train_dataset=dataset)
    trainer.train()
    cfg = trainer.trainer.cfg
    assert (cfg.prompts_per_step, cfg.minibatch_size, cfg.micro_batch_size) == (4, None, 8)
    assert [r["step"] for r in step_rows(tmp_path / "chat")] == [1]


def test_epochs_become_steps_and_steps_per_generation_splits_the_batch():
    cfg = GRPOConfig(per_device_train_batch_size=4, num_generations=4, steps_per_generation=4).to_grpokit(
        num_prompts=10
    )
    # a generation batch of 4 x 4 = 16 completions (4 prompts), optimizer steps of 4; 3 epochs of 10 prompts, each
    # 2 generation batches: TRL's sampler drops the last 2 prompts, which make no whole batch
    assert (cfg.prompts_per_step, cfg.minibatch_size, cfg.max_steps) == (4, 4, 6)
    assert GRPOConfig(epsilon=0.3, epsilon_high=0.28).to_grpokit(num_prompts=1).epsilon_low == 0.3
    assert GRPOConfig(warmup_steps=0.1, max_steps=50).to_grpokit().warmup_steps == 5


def test_trls_vllm_fields_map_to_grpokits():
    """`use_vllm=True` samples through vLLM with TRL's mode, server address and importance correction as given."""
    cfg = GRPOConfig(
        use_vllm=True, vllm_mode="server", vllm_server_host="10.0.0.2", vllm_server_port=8100, vllm_server_timeout=30.0,
        vllm_importance_sampling_mode="token_truncate", vllm_importance_sampling_clip_max=2.0,
    ).to_grpokit(num_prompts=16)  # fmt: skip
    assert (cfg.use_vllm, cfg.vllm_mode, cfg.vllm_server_url(), cfg.vllm_server_timeout) == (
        True, "server", "http://10.0.0.2:8100", 30.0,
    )  # fmt: skip
    assert (cfg.vllm_importance_sampling_mode, cfg.vllm_importance_sampling_clip_max) == ("token_truncate", 2.0)
    defaults = GRPOConfig(use_vllm=True).to_grpokit(num_prompts=16)
    assert (defaults.vllm_mode, defaults.vllm_gpu_memory_utilization, defaults.vllm_importance_sampling_mode) == (
        "colocate", 0.3, "sequence_mask",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"vllm_group_port": 51217}, "`vllm_group_port` = 51217 is not supported"),
        ({"deepspeed": "ds.json"}, "`deepspeed` = 'ds.json' is not supported"),
        ({"fp16": True}, "`fp16` = True is not supported"),
        ({"no_such_field": 1}, "`no_such_field` is not a field of TRL 1.16's GRPOConfig"),
    ],
)
def test_a_trl_option_grpokit_lacks_is_an_error_naming_it(fields, expected):
    with pytest.raises(ConfigError, match=re.escape(expected)):
        GRPOConfig(**fields)


def test_unknown_report_targets_and_schedules_are_errors_not_ignored():
    with pytest.raises(ConfigError, match="`report_to` = 'comet_ml'"):
        GRPOConfig(report_to=["tensorboard", "comet_ml"], max_steps=1).to_grpokit()
    assert GRPOConfig(report_to="wandb", max_steps=1).to_grpokit().wandb
    with pytest.raises(ConfigError, match="`lr_scheduler_type` = 'polynomial'"):
        GRPOConfig(lr_scheduler_type="polynomial", max_steps=1).to_grpokit()


def test_a_trl_name_in_native_yaml_names_the_grpokit_field(tmp_path):
    from grpokit.config import load_yaml

    path = tmp_path / "run.yaml"
    path.write_text("model: m\ntask: addition\nper_device_train_batch_size: 16\n")
    with pytest.raises(
        ConfigError, match="`per_device_train_batch_size` is TRL's name. In grpokit: .*prompts_per_step"
    ):
        load_yaml(NativeConfig, path)


def test_every_grpokit_field_the_trl_page_table_names_exists():
    text = TRL_PAGE.read_text()
    table = text[text.index("| TRL GRPOConfig field |") :].split("\n\n", 1)[0]
    rows = [line for line in table.splitlines()[2:] if line.startswith("|")]
    assert len(rows) >= 40
    native = set(NativeConfig.__dataclass_fields__) | {f"lora.{f}" for f in ("r", "alpha", "dropout")}
    named = set()
    for row in rows:
        trl_cell, grpokit_cell = [cell.strip() for cell in row.strip("|").split("|")][:2]
        named.update(re.findall(r"`([a-z_.]+)`", grpokit_cell))
        for trl_field in re.findall(r"`([a-z_0-9]+)`", trl_cell):  # and every TRL name is one the adapter reads
            assert trl_field in CONVERSIONS or trl_field in GRPOConfig().fields, trl_field
    assert named and named <= native, sorted(named - native)
