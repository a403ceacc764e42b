"""A folder is loaded only as what it is, with every weight it needs; every stage runs the same checks of its data,
lengths and evaluation settings (issue 19, classes 3 and 5). A config.json of impossible sizes is refused, and a
hub id reaches the hub or says within seconds why not."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import config, digit_share, overriding, read_jsonl, save_tiny, save_tiny_reward_model

from grpokit.cli import main
from grpokit.config import ConfigError, PPOConfig, RewardModelConfig, SFTConfig
from grpokit.data.tasks.tokenizer import DEFAULT_CHARS, build_char_tokenizer
from grpokit.model.critic import build_critic
from grpokit.model.loading import ModelFolderError, check_model_source, load_model
from grpokit.rewards.scorer import RewardModelScorer
from grpokit.stages.grpo import GRPOTrainer
from grpokit.stages.ppo import PPOTrainer
from grpokit.stages.reward_model import train_reward_model
from grpokit.stages.sft import train_sft


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A causal LM, a reward model, and what two one-step GRPO runs leave: a checkpoint of a full run, and the
    final model and checkpoint of a LoRA run saved as an adapter."""
    root = tmp_path_factory.mktemp("folders")
    lm = save_tiny(root / "tiny", "llama")
    reward_model = save_tiny_reward_model(root)
    GRPOTrainer(config(lm, root / "full", max_steps=1, save_every=1)).train()
    lora = config(lm, root / "lora", max_steps=1, save_every=1)
    lora.lora.r, lora.lora.save = 2, "adapter"
    GRPOTrainer(lora, reward_funcs=[digit_share]).train()  # graded rewards: the adapter moves off 0
    return {
        "lm": lm,
        "reward_model": reward_model,
        "checkpoint": root / "full" / "checkpoint-1",
        "adapter": root / "lora" / "model",
        "lora_checkpoint": root / "lora" / "checkpoint-1",
    }


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def copy_with_config(source, target, **changes):
    shutil.copytree(source, target)
    spec = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**spec, **changes}))
    return target


def sft_config(model, out, **overrides) -> SFTConfig:
    values = {"model": str(model), "output_dir": str(out), "task": "addition", "max_steps": 1, "batch_size": 2}
    return SFTConfig(**{**values, "progress": False, **overrides})


def grpo_args(model, out, *extra) -> list[str]:
    return overriding(["train", "--model", model, "--output-dir", out, "--task", "addition", "--max-steps", "1",
            "--prompts-per-step", "2", "--num-generations", "2", "--max-completion-length", "4",
            "--num-eval-prompts", "0", "--no-progress", "--no-tensorboard"], *extra)  # fmt: skip


# ---------------------------------------------------------------- class 3: a folder loaded as something it is not


@pytest.mark.parametrize(("source", "what"), [("lm", "a causal LM"), ("checkpoint", "a grpokit training checkpoint")])
def test_a_folder_without_a_trained_score_head_is_refused_as_a_reward_model(folders, tmp_path, capsys, source, what):
    rc, _, err = cli(capsys, *grpo_args(folders["lm"], tmp_path / "run", "--reward-funcs", folders[source]))
    assert rc == 2 and "`reward_funcs`" in err and f"is {what}" in err and "not a reward model" in err, err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    rc, out, err = cli(capsys, "eval", "--model", folders["lm"], "--reward-funcs", folders[source],
                       "--num-eval-prompts", "2", "--max-completion-length", "4")  # fmt: skip
    assert rc == 2 and "`reward_funcs`" in err and "random" in err and "held-out" not in out, err


def test_a_lora_checkpoint_is_refused_as_a_reward_model(folders):
    with pytest.raises(ModelFolderError, match=r"`reward_funcs`.*is a LoRA adapter of a causal LM, not a reward model"):
        RewardModelScorer(folders["lora_checkpoint"])


def test_a_reward_model_folder_is_refused_as_the_policy(folders, tmp_path):
    with pytest.raises(ModelFolderError, match=r"`model`.*is a reward model \(LlamaForSequenceClassification\), not a"):
        GRPOTrainer(config(folders["reward_model"], tmp_path / "run"))
    with pytest.raises(ModelFolderError, match="not a causal LM"):
        load_model(folders["reward_model"], "cpu", torch.float32)


def test_a_config_with_more_layers_than_the_weights_is_refused_for_every_loader(folders, tmp_path):
    """The policy had this check; the reward model and the critic loaded a random third layer."""
    layers = json.loads((folders["reward_model"] / "config.json").read_text())["num_hidden_layers"]
    deeper = copy_with_config(folders["reward_model"], tmp_path / "rm3", num_hidden_layers=layers + 1)
    with pytest.raises(
        ModelFolderError, match=rf"`reward_funcs`: the weights in .*rm3 lack \d+ tensors.*layers\.{layers}"
    ):
        RewardModelScorer(deeper)
    with pytest.raises(
        ModelFolderError, match=rf"`critic_model`: the weights in .*rm3 lack \d+ tensors.*layers\.{layers}"
    ):
        build_critic(None, str(deeper), "cpu")
    with pytest.raises(ModelFolderError, match=r"`model`: the weights in .*rm3 lack"):
        train_reward_model(
            RewardModelConfig(
                model=str(deeper), output_dir=str(tmp_path / "rm"), task="addition", num_train_pairs=8, num_eval_pairs=4
            )
        )


def test_a_config_with_fewer_layers_than_the_weights_is_refused(folders, tmp_path):
    shallower = copy_with_config(folders["lm"], tmp_path / "lm1", num_hidden_layers=1)
    with pytest.raises(ModelFolderError, match=r"hold \d+ tensors a LlamaForCausalLM has no place for.*layers\.1\."):
        load_model(shallower, "cpu", torch.float32)


def test_a_reward_model_without_its_score_tensor_is_refused_as_a_critic(folders, tmp_path):
    """A critic from a reward-model folder takes its score head: one missing from the weights was random."""
    from safetensors.torch import load_file, save_file

    headless = shutil.copytree(folders["reward_model"], tmp_path / "headless")
    weights = load_file(headless / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("score.")}, headless / "model.safetensors")
    with pytest.raises(ModelFolderError, match=r"`critic_model`.*lack 1 tensors.*score\.weight"):
        build_critic(None, str(headless), "cpu")


def test_an_unknown_model_type_in_a_reward_model_folder_is_named(folders, tmp_path):
    odd = copy_with_config(folders["reward_model"], tmp_path / "odd", model_type="frobnicator")
    with pytest.raises(ModelFolderError, match=r"`reward_funcs`.*model_type 'frobnicator', which transformers"):
        RewardModelScorer(odd)


def grown_tokenizer_folder(source, target):
    """A copy of `source` whose tokenizer has two tokens more than the model has embeddings."""
    from grpokit.model.loading import load_tokenizer

    shutil.copytree(source, target)
    tokenizer = load_tokenizer(target)
    tokenizer.add_tokens(["<extra_a>", "<extra_b>"])
    tokenizer.save_pretrained(target)
    return target, len(tokenizer)


def test_a_tokenizer_larger_than_the_embeddings_is_refused_for_the_policy_and_the_reward_model(folders, tmp_path):
    policy, tokens = grown_tokenizer_folder(folders["lm"], tmp_path / "lm")
    with pytest.raises(ModelFolderError, match=rf"`model`: the tokenizer has {tokens} tokens, the model's token emb"):
        GRPOTrainer(config(policy, tmp_path / "run"))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    reward_model, tokens = grown_tokenizer_folder(folders["reward_model"], tmp_path / "rm")
    with pytest.raises(ModelFolderError, match=rf"`reward_funcs`: the tokenizer of .*rm has {tokens} tokens"):
        RewardModelScorer(reward_model)


def test_a_critic_trained_with_another_tokenizer_of_the_same_size_is_refused(folders, tmp_path):
    shuffled = save_tiny_reward_model(tmp_path, chars=DEFAULT_CHARS[::-1], name="reversed")
    assert len(build_char_tokenizer(DEFAULT_CHARS[::-1])) == len(build_char_tokenizer())  # every shape check passes
    cfg = PPOConfig(**{**vars(config(folders["lm"], tmp_path / "run")), "critic_model": str(shuffled)})
    with pytest.raises(ConfigError, match=r"`critic_model`: the tokenizer saved in .*reversed is not the policy's"):
        PPOTrainer(cfg)


@pytest.mark.parametrize("source", ["adapter", "lora_checkpoint"])
def test_eval_loads_a_lora_adapter_over_its_base(folders, capsys, source):
    """`lora.save: adapter` writes what peft users load with AutoPeftModelForCausalLM: grpokit loads it too."""
    rc, out, err = cli(capsys, "eval", "--model", folders[source], "--num-eval-prompts", "2",
                       "--max-completion-length", "4")  # fmt: skip
    assert rc == 0 and "addition held-out accuracy, greedy" in out, err
    merged, base = load_model(folders[source], "cpu", torch.float32), load_model(folders["lm"], "cpu", torch.float32)
    changed = [n for n, p in merged.state_dict().items() if not torch.equal(p, base.state_dict()[n])]
    assert changed and all("proj" in n for n in changed)  # the adapted projections carry the trained update


def test_an_adapter_whose_base_is_gone_is_named(folders, tmp_path):
    adapter = shutil.copytree(folders["adapter"], tmp_path / "adapter")
    spec = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**spec, "base_model_name_or_path": str(tmp_path / "no")}))
    with pytest.raises(ModelFolderError, match=r"`model`: .*adapter is a LoRA adapter over the base model .*no"):
        load_model_checked(adapter)


def load_model_checked(path):
    from grpokit.model.loading import check_model_source

    check_model_source(path)
    return load_model(path, "cpu", torch.float32)


# ---------------------------------------------------------------- class 5: every stage runs the same checks


def long_prompt_rows(n: int = 2) -> list[dict]:
    return [{"prompt": "1+1=" * 40, "completion": "2", "chosen": "2", "rejected": "3"} for _ in range(n)]


def test_sft_refuses_examples_longer_than_the_models_positions(folders, tmp_path):
    with pytest.raises(ModelFolderError, match=r"longest SFT example .* = 162 tokens.*max_position_embeddings = 128"):
        train_sft(sft_config(folders["lm"], tmp_path / "sft", task=None), rows=long_prompt_rows())
    assert not (tmp_path / "sft" / "metrics.jsonl").exists()


def test_reward_model_training_refuses_rows_longer_than_the_models_positions(folders, tmp_path):
    cfg = RewardModelConfig(model=str(folders["lm"]), output_dir=str(tmp_path / "rm"), max_steps=1, progress=False)
    with pytest.raises(ModelFolderError, match=r"longest reward-model row .*max_position_embeddings = 128"):
        train_reward_model(cfg, train_pairs=long_prompt_rows(), eval_pairs=[])
    assert not (tmp_path / "rm" / "metrics.jsonl").exists()


def test_sft_refuses_an_eval_data_file_that_does_not_exist(folders, tmp_path, capsys):
    rc, _, err = cli(capsys, "sft", "--model", folders["lm"], "--output-dir", tmp_path / "sft", "--task", "addition",
                     "--eval-data", tmp_path / "nonexistent.jsonl", "--max-steps", "1", "--batch-size", "2",
                     "--no-progress")  # fmt: skip
    assert rc == 2 and "`eval_data`" in err and "nonexistent.jsonl" in err and "does not exist" in err, err
    assert not (tmp_path / "sft" / "model").exists()


def test_sft_reports_the_held_out_loss_of_its_eval_data(folders, tmp_path):
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("".join(json.dumps({"prompt": "12+30=", "completion": "42"}) + "\n" for _ in range(3)))
    train_sft(sft_config(folders["lm"], tmp_path / "sft", eval_data=str(held_out)))
    (row,) = [r for r in read_jsonl(tmp_path / "sft" / "metrics.jsonl") if "eval/loss" in r]
    assert row["step"] == 1 and 0 < row["eval/loss"] < 20


@pytest.mark.parametrize("stage", ["grpo", "ppo"])
def test_eval_every_without_held_out_rows_is_refused(folders, tmp_path, stage):
    rows = tmp_path / "train.jsonl"
    rows.write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
    cfg = config(folders["lm"], tmp_path / "run", train_data=str(rows), eval_every=1)
    trainer = GRPOTrainer if stage == "grpo" else PPOTrainer
    cfg = cfg if stage == "grpo" else PPOConfig(**vars(cfg))
    with pytest.raises(ConfigError, match=r"`eval_every` is 1, but there are no held-out rows"):
        trainer(cfg)
    with pytest.raises(ConfigError, match=r"`eval_every` is 1"):  # a task whose held-out split is cut to nothing
        trainer(type(cfg)(**{**vars(cfg), "train_data": None, "task": "addition", "num_eval_prompts": 0}))


def test_eval_on_rows_with_nothing_to_measure_is_refused(folders, tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "1+1="}) + "\n")
    rc, out, err = cli(capsys, "eval", "--model", folders["lm"], "--eval-data", rows)
    assert rc == 2 and "`eval_data`" in err and "no `answer` column" in err and "--reward-funcs" in err, err


def test_eval_whose_reward_functions_cannot_score_the_rows_is_refused(folders, tmp_path, capsys, monkeypatch):
    (tmp_path / "column_rewards.py").write_text(
        "def by_label(completions, label, **_):\n    return [1.0] * len(completions)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "1+1="}) + "\n")
    with pytest.warns(UserWarning, match=r"held-out rows lack what \['column_rewards:by_label'\] need"):
        rc, out, err = cli(capsys, "eval", "--model", folders["lm"], "--eval-data", rows, "--reward-funcs",
                           "column_rewards:by_label", "--max-completion-length", "2")  # fmt: skip
    assert rc == 2 and "`reward_funcs`" in err and "nothing was measured" in err and "held-out" not in out, err


def test_a_classifier_with_two_outputs_is_refused_as_a_reward_model(folders, tmp_path):
    two = copy_with_config(folders["reward_model"], tmp_path / "two", id2label={"0": "NEG", "1": "POS"})
    with pytest.raises(ModelFolderError, match=r"`reward_funcs`.*a sequence classifier with 2 outputs"):
        RewardModelScorer(two)


def test_a_lora_runs_checkpoint_starts_a_new_run_as_its_merged_model(folders, tmp_path):
    trainer = GRPOTrainer(config(folders["lora_checkpoint"], tmp_path / "run"))
    merged = load_model(folders["lora_checkpoint"], "cpu", torch.float32).state_dict()
    assert all(torch.equal(p, merged[n]) for n, p in trainer.policy.model.state_dict().items())
    assert all(p.requires_grad for p in trainer.policy.model.parameters())  # peft had frozen the base: it trains


# ---------------------------------------------------------------- model sizes and hub ids


@pytest.mark.parametrize(
    "sizes, words",
    [
        ({"num_hidden_layers": -1}, "config.json says num_hidden_layers -1"),
        ({"hidden_size": 30}, "config.json says hidden_size 30, which 4 attention heads"),
    ],
)
def test_a_model_folder_whose_config_json_has_impossible_sizes_is_refused(tmp_path, sizes, words):
    folder = save_tiny(tmp_path / "llama", "llama")
    spec = json.loads((folder / "config.json").read_text())
    spec.pop("head_dim", None)  # the width then comes from hidden_size / num_attention_heads
    (folder / "config.json").write_text(json.dumps(spec | sizes))
    with pytest.raises(ModelFolderError, match=rf"model folder {folder}: its {words}"):
        check_model_source(folder)


@pytest.mark.parametrize("offline", [True, False], ids=["HF_HUB_OFFLINE", "hub-unreachable"])
def test_a_hub_id_reaches_the_hub_or_says_within_seconds_why_not(tmp_path, monkeypatch, offline):
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: refused at once
    expected = "HF_HUB_OFFLINE is set" if offline else "cannot be reached.*needs a network, or give a local folder"
    with pytest.raises(FileNotFoundError, match=expected):
        GRPOTrainer(config("some-org/some-model-that-is-not-here", tmp_path / "run"))
    from grpokit.data.rows import DataError, load_rows

    if not offline:
        with pytest.raises(DataError, match="config field `train_data`: the data set 'some-org/some-data'"):
            load_rows("some-org/some-data", field="train_data")


# ---------------------------------------------------------------- a .gguf file off a terminal


def write_tiny_gguf(path, vocab: int = 16, hidden: int = 8, intermediate: int = 16, heads: int = 2):
    """A one-layer Llama in GGUF form (float32 tensors, a byte-level BPE vocabulary of letters), as llama.cpp's
    converter writes one: what transformers' GGUF reader turns back into a LlamaForCausalLM."""
    import numpy as np

    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(32)
    writer.add_embedding_length(hidden)
    writer.add_block_count(1)
    writer.add_feed_forward_length(intermediate)
    writer.add_head_count(heads)
    writer.add_head_count_kv(heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["<eos>"] + [chr(ord("a") + i) for i in range(vocab - 1)])
    writer.add_token_types([1] * vocab)
    writer.add_token_scores([0.0] * vocab)
    writer.add_token_merges([])
    writer.add_eos_token_id(0)
    writer.add_bos_token_id(0)
    rng = np.random.default_rng(0)
    shapes = {"token_embd": (vocab, hidden), "output_norm": (hidden,), "output": (vocab, hidden)}
    shapes |= {f"blk.0.{name}": (hidden,) for name in ("attn_norm", "ffn_norm")}
    shapes |= {f"blk.0.attn_{name}": (hidden, hidden) for name in ("q", "k", "v", "output")}
    shapes |= {"blk.0.ffn_gate": (intermediate, hidden), "blk.0.ffn_up": (intermediate, hidden)}
    shapes |= {"blk.0.ffn_down": (hidden, intermediate)}
    for name, shape in shapes.items():
        writer.add_tensor(f"{name}.weight", rng.standard_normal(shape).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_gguf_file_loads_without_a_progress_bar_off_a_terminal(tmp_path, capsys):
    """`grpokit fetch-model` (which loads the packaged .gguf file through `load_model`) filled a log with one line
    per redraw of transformers' de-quantizing bar, which ignores transformers' own switch for bars."""
    path = write_tiny_gguf(tmp_path / "tiny.gguf")  # (skips without the `gguf` package: the `bench` extra)
    from transformers import modeling_gguf_pytorch_utils as reader

    bar = reader.tqdm
    model = load_model(path, "cpu", torch.float32)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 1
    err = capsys.readouterr().err  # not a terminal
    assert "Converting and de-quantizing" not in err, err
    assert reader.tqdm is bar  # the reader's own bar again after the load
