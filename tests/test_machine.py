"""The machine misbehaves (issue 19, class 4): a step that cannot fit in memory is refused before the model loads,
with the estimate and the fields that size it; the numbers of a seeded run do not depend on how many CPUs the
process was given when it started (torch's thread count), only on `num_threads`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import config, read_jsonl, save_tiny
from transformers import LlamaConfig

from grpokit.cli import main
from grpokit.config import ConfigError, DemoConfig, GRPOConfig, load_yaml
from grpokit.data.tasks import build_char_tokenizer, tiny_model
from grpokit.demo import run_demo
from grpokit.runtime import machine
from grpokit.runtime.machine import GIB, check_grpo_memory, estimate
from grpokit.stages import grpo as trainer_module
from grpokit.stages.grpo import GRPOTrainer
from grpokit.stages.setup import step_sizes

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "llama", "llama")


def small_llama_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=32,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )


def test_the_estimate_is_the_hand_computed_one():
    need = estimate(small_llama_config(), rows=8, positions=10, training_tokens=100, dtype_bytes=4)
    # 2 layers x (keys, values) x 2 kv heads x head_dim 64/4 x 10 positions x 8 rows x 4 bytes
    assert need.kv_cache == 2 * 2 * 2 * 16 * 10 * 8 * 4 == 40_960
    # 8 rows x 32 logits x (4 bytes of logits + 4 scaled + 4 probabilities + 2 x 8 of the float64 CDF)
    assert need.sampling == 8 * 32 * 28
    # 100 positions x 2 layers x (6 x hidden 64 + 4 x intermediate 128) values x 4 bytes
    assert need.training == 100 * 2 * (6 * 64 + 4 * 128) * 4
    assert need.total == max(40_960 + 8 * 32 * 28, 100 * 2 * 896 * 4)


def test_gradient_checkpointing_keeps_one_input_per_layer_and_one_layer_recomputed():
    need = estimate(
        small_llama_config(), rows=8, positions=10, training_tokens=100, dtype_bytes=4, gradient_checkpointing=True
    )
    # 100 positions x (2 layers x the layer's input, hidden 64 + one layer recomputed, 6 x 64 + 4 x 128) x 4 bytes
    assert need.training == 100 * (2 * 64 + 6 * 64 + 4 * 128) * 4


def test_a_micro_batch_that_fits_under_gradient_checkpointing_is_not_refused():
    # 24 layers: without checkpointing each keeps 6 x 64 + 4 x 128 = 896 values per token, with it 64 (+ one 896)
    deep = small_llama_config()
    deep.num_hidden_layers = 24
    fields = {"prompts_per_step": 2, "num_generations": 4, "max_completion_length": 22, "micro_batch_size": 8}
    positions, tokens = 10 + 22, 8 * (10 + 22)  # one micro-batch of 8 rows (the whole step, under the budget 512)
    budget = tokens * (24 * 64 + 896) * 4 + GIB // 1024  # what the checkpointed forward keeps, and a little more
    plain = GRPOConfig(model="m", max_tokens_per_micro_batch=None, **fields)
    with pytest.raises(ConfigError, match="training forward"):
        check_grpo_memory(deep, step_sizes(plain), 10, torch.device("cpu"), torch.float32, available=budget)
    checkpointed = GRPOConfig(model="m", max_tokens_per_micro_batch=None, gradient_checkpointing=True, **fields)
    need = check_grpo_memory(deep, step_sizes(checkpointed), 10, torch.device("cpu"), torch.float32, available=budget)
    assert need.training_tokens == tokens and need.positions == positions
    assert need.training == tokens * (24 * 64 + 896) * 4


def test_the_training_estimate_counts_one_micro_batch_not_the_step():
    cfg = GRPOConfig(model="m", prompts_per_step=4, num_generations=8, max_completion_length=6,
                     micro_batch_size=4, max_tokens_per_micro_batch=None)  # fmt: skip
    need = check_grpo_memory(
        small_llama_config(), step_sizes(cfg), 10, torch.device("cpu"), torch.float32, available=GIB
    )
    assert need.training_tokens == 4 * 16  # 4 rows of 10 + 6 positions, not the step's 32 rows
    budgeted = GRPOConfig(model="m", prompts_per_step=4, num_generations=8, max_completion_length=6,
                          max_tokens_per_micro_batch=40)  # fmt: skip
    need = check_grpo_memory(
        small_llama_config(), step_sizes(budgeted), 10, torch.device("cpu"), torch.float32, available=GIB
    )
    assert need.training_tokens == 40


def test_the_refusal_names_the_fields_and_gives_the_hand_computed_figures():
    cfg = GRPOConfig(model="m", prompts_per_step=64, num_generations=30000, max_completion_length=16)
    with pytest.raises(ConfigError) as err:
        check_grpo_memory(small_llama_config(), step_sizes(cfg), 6, torch.device("cpu"), torch.float32, available=GIB)
    message = str(err.value)
    rows, positions = 64 * 30000, 6 + 16
    kv = 2 * 2 * 2 * 16 * positions * rows * 4  # 28.3 GiB
    sampling = rows * 32 * 28  # 1.6 GiB
    assert f"needs about {(kv + sampling) / GIB:.1f} GiB" in message
    assert f"KV cache {kv / GIB:.1f} GiB" in message and "1.0 GiB of memory available on cpu" in message
    for field in ("num_generations", "prompts_per_step", "max_completion_length"):
        assert field in message


def test_num_generations_30000_is_refused_before_the_model_loads(tmp_path, model, capsys, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the memory check")

    monkeypatch.setattr(trainer_module, "training_model", no_load)
    rc = main(
        ["train", "--model", str(model), "--task", "addition", "--output-dir", str(tmp_path / "run"),
         "--prompts-per-step", "64", "--num-generations", "10000000", "--max-completion-length", "8",
         "--num-train-prompts", "64", "--num-eval-prompts", "0", "--no-progress"]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "grpokit train: error:" in err and "Traceback" not in err
    assert "num_generations 10000000" in err and "prompts_per_step 64" in err and "max_completion_length" in err
    assert "GiB of memory available" in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def smollm2_config() -> LlamaConfig:
    """SmolLM2-135M-Instruct's shape."""
    return LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
    )


def demo_model_config():
    tokenizer = build_char_tokenizer()
    return tiny_model(tokenizer, "llama", hidden_size=DemoConfig.hidden_size, num_layers=DemoConfig.num_layers).config


@pytest.mark.parametrize(
    ("model_config", "yaml_or_fields"),
    [
        (demo_model_config, "grpo_addition.yaml"),
        (demo_model_config, {"prompts_per_step": 32, "num_generations": 8, "max_completion_length": 4}),  # the demo
        (smollm2_config, "grpo_smollm2.yaml"),
        (smollm2_config, "compare_smollm2.yaml"),
    ],
)
def test_normal_configs_pass(model_config, yaml_or_fields):
    if isinstance(yaml_or_fields, str):
        cfg = load_yaml(GRPOConfig, EXAMPLES / yaml_or_fields)
    else:
        cfg = GRPOConfig(model="m", **yaml_or_fields)
    # at the longest prompt that max_prompt_length lets through, against 1 GiB (any machine that runs them has more)
    need = check_grpo_memory(model_config(), step_sizes(cfg), cfg.max_prompt_length, torch.device("cpu"), torch.float32,
                             num_eval_rows=cfg.num_eval_prompts, available=GIB)  # fmt: skip
    assert need is not None and need.total < GIB


def test_a_model_folder_is_read_for_the_estimate_without_loading(model):
    cfg = GRPOConfig(model=str(model), prompts_per_step=2, num_generations=4, max_completion_length=8)
    need = check_grpo_memory(str(model), step_sizes(cfg), 7, torch.device("cpu"), torch.float32)
    saved = json.loads((model / "config.json").read_text())
    head_dim = saved["hidden_size"] // saved["num_attention_heads"]
    assert need.kv_cache == saved["num_hidden_layers"] * 2 * saved["num_key_value_heads"] * head_dim * 15 * 8 * 4


def test_a_config_without_attention_heads_is_not_estimated():
    from transformers import PretrainedConfig

    cfg = GRPOConfig(model="m")
    assert (
        check_grpo_memory(PretrainedConfig(), step_sizes(cfg), 10, torch.device("cpu"), torch.float32, available=1)
        is None
    )


def test_the_tiny_grpo_config_of_the_tests_passes(tmp_path, model):
    cfg = config(model, tmp_path / "run")
    assert check_grpo_memory(str(model), step_sizes(cfg), 10, torch.device("cpu"), torch.float32) is not None


# ---------------------------------------------------------------- the same seed, the same numbers, whatever the CPUs


def test_no_num_threads_means_the_cpus_at_start_not_an_earlier_stages_pin():
    start = machine.STARTING_THREADS  # conftest: 1
    other = 1 if start != 1 else 2
    try:
        assert machine.pin_threads(other) == other  # an earlier stage (the demo's SFT) pinned another count
        assert machine.pin_threads(None) == start
        assert torch.get_num_threads() == start
    finally:
        torch.set_num_threads(start)


def demo_figures(out: Path) -> list[dict]:
    """Every figure of the demo's SFT and GRPO runs but the clocks (the step rows, the evaluations)."""
    rows = [r for stage in ("sft", "grpo") for r in read_jsonl(out / stage / "metrics.jsonl")]
    return [{k: v for k, v in r.items() if not k.startswith("time/") and k != "tokens_per_s"} for r in rows]


def test_the_demo_gives_the_same_figures_whatever_thread_count_the_process_started_with(tmp_path):
    """torch's default thread count is the CPUs the process may use (affinity, a container's cpuset,
    OMP_NUM_THREADS), and sums split among threads round differently: the demo started with two threads printed
    another table than with one. The demo pins its count (`num_threads`, default 1), so both starts agree."""
    short = {"sft_steps": 10, "sft_examples": 200, "grpo_steps": 2, "num_eval_prompts": 16, "progress": False}
    figures, used = [], []
    for threads_at_start in (2, 1):  # both CPUs allowed, or one
        torch.set_num_threads(threads_at_start)
        out = tmp_path / f"started_with_{threads_at_start}"
        run_demo(DemoConfig(output_dir=str(out), **short))
        figures.append(demo_figures(out))
        used.append(torch.get_num_threads())
    assert figures[0] == figures[1]  # exact: float == float, every step, every key
    assert used == [1, 1]
    assert yaml.safe_load((tmp_path / "started_with_2" / "grpo" / "config.yaml").read_text())["num_threads"] == 1


def test_num_threads_is_applied_and_recorded_and_empty_records_the_count_used(tmp_path, model):
    torch.set_num_threads(1)
    trainer = GRPOTrainer(config(model, tmp_path / "pinned", num_threads=2))
    assert torch.get_num_threads() == 2 and trainer.cfg.num_threads == 2
    # the pin of an earlier stage (2) is not inherited: empty means the count at start (conftest: 1)
    trainer = GRPOTrainer(config(model, tmp_path / "default"))
    start = machine.STARTING_THREADS
    assert torch.get_num_threads() == start and trainer.cfg.num_threads == start  # what the config.yaml will say


def test_num_threads_0_is_refused_by_name(tmp_path, model):
    with pytest.raises(ConfigError, match="num_threads"):
        GRPOTrainer(config(model, tmp_path / "run", num_threads=0))
