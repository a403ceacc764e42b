"""Weights on disk in `save_pretrained`'s sharded form (`runtime.weight_files`): the shard plan is huggingface_hub's,
the streaming writer's files are save_pretrained's byte for byte while it holds one shard at a time, a model saved
in small shards loads back equal (grpokit's loader, transformers', a merged LoRA model), a folder whose index names a
missing shard is refused naming it, and a one-process run in small shards resumes from its sharded checkpoint to
the straight run. The 2-rank FSDP writer is checked in tests/test_distributed.py (its launches, small shards)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import config, read_jsonl, save_tiny

from grpokit.config import ConfigError, LoRAConfig
from grpokit.data.tasks import build_char_tokenizer, tiny_model
from grpokit.model.loading import ModelFolderError, check_model_source, load_model
from grpokit.runtime.checkpoint import RunDirectoryError, save_model
from grpokit.runtime.weight_files import (
    INDEX_NAME,
    WEIGHTS_NAME,
    plan_shards,
    read_weight_files,
    shard_file_names,
    shard_size_bytes,
    tensor_source,
    weight_files,
    write_weight_files,
)
from grpokit.stages.grpo import GRPOTrainer

SMALL = "40KB"  # the tiny Llama's 143 KB of float32 weights in 5 files (its largest tensor, the embedding, is 33 KB)
SHARDS = [f"model-0000{k}-of-00005.safetensors" for k in range(1, 6)]


def tiny(arch: str = "llama", seed: int = 0):
    tokenizer = build_char_tokenizer()
    return tiny_model(tokenizer, arch, hidden_size=32, seed=seed), tokenizer


def test_the_shard_plan_is_huggingface_hubs():
    """Hand-worked at a 10-byte limit: a shard closes when the next tensor would pass the limit (10 itself fits); a
    tensor over the limit is a shard of its own, placed as it comes, before the shard still filling."""
    from huggingface_hub import split_state_dict_into_shards_factory

    sizes = [("a", 6), ("b", 6), ("c", 2), ("d", 6), ("e", 2), ("f", 2), ("g", 15), ("h", 1)]
    plan = plan_shards(sizes, 10)
    assert plan == [["a"], ["b", "c"], ["g"], ["d", "e", "f"], ["h"]]
    hub = split_state_dict_into_shards_factory(
        dict(sizes), get_storage_size=lambda n: n, filename_pattern="model{suffix}.safetensors", max_shard_size=10
    )
    assert hub.filename_to_tensors == dict(zip(shard_file_names(len(plan)), plan))
    assert plan_shards(sizes, 100) == [[name for name, _ in sizes]] and shard_file_names(1) == [WEIGHTS_NAME]


def test_a_shard_size_is_read_as_save_pretrained_reads_it_and_a_bad_one_is_refused_by_name(tmp_path):
    read = {"5GB": 5 * 10**9, "1.5MB": 1_500_000, " 200kb ": 200_000, "3TB": 3 * 10**12, "40KB": 40_000}
    for text, size in read.items():  # powers of 1000, as huggingface_hub's parse_size_to_int reads them
        assert shard_size_bytes(text) == size
    assert shard_size_bytes(1234) == 1234
    for bad in ("5G", "GB", "0KB", "-1MB", "5 gigabytes", True, 0):
        with pytest.raises(ValueError, match="give a number and a unit"):
            shard_size_bytes(bad)
    with pytest.raises(ConfigError, match="config field `max_shard_size` is '5G'"):
        config("in-memory", tmp_path / "run", max_shard_size="5G").validate(model_given=True)
    config("in-memory", tmp_path / "run", max_shard_size="1.5GB").validate(model_given=True)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_the_streaming_writer_writes_save_pretraineds_files_holding_one_shard_at_a_time(arch, tmp_path):
    """Tied embeddings written once; the index's metadata and layout; every byte the same. The writer held at most
    one shard's worth of tensors at once, well below the whole model."""
    model, _ = tiny(arch)
    model.save_pretrained(tmp_path / "reference", max_shard_size=SMALL)
    ours = tmp_path / "ours"
    model.save_pretrained(ours, state_dict={})  # its config files alone
    state = model.state_dict()
    # the tied head is the embedding's second name
    sources = [tensor_source(name, t) for name, t in state.items() if name != "lm_head.weight"]
    written = write_weight_files(ours, sources, SMALL, total_parameters=model.num_parameters())
    files = sorted(p.name for p in (tmp_path / "reference").iterdir())
    assert files == sorted(p.name for p in ours.iterdir()) == sorted([*SHARDS, INDEX_NAME, "config.json",
                                                                       "generation_config.json"])  # fmt: skip
    for name in files:
        assert (ours / name).read_bytes() == (tmp_path / "reference" / name).read_bytes(), name
    assert written.files == SHARDS and written.total_size == sum(s.nbytes for s in sources)
    largest_tensor = max(s.nbytes for s in sources)
    assert largest_tensor <= written.largest_held <= shard_size_bytes(SMALL) < written.total_size / 3


def test_a_model_saved_in_small_shards_loads_back_equal_and_a_missing_shard_is_named(tmp_path):
    from transformers import AutoModelForCausalLM

    model, tokenizer = tiny()
    expected = model.state_dict()
    folder = save_model(model, tokenizer, tmp_path / "sharded", max_shard_size=SMALL)
    assert [p.name for p in weight_files(folder)] == SHARDS and not (folder / WEIGHTS_NAME).exists()
    check_model_source(folder)
    for loaded in (load_model(folder, "cpu", torch.float32), AutoModelForCausalLM.from_pretrained(folder)):
        got = loaded.state_dict()
        assert got.keys() == expected.keys()
        for name, tensor in expected.items():
            assert torch.equal(got[name], tensor), name
    assert sorted(dict(read_weight_files(folder))) == sorted(set(expected) - {"lm_head.weight"})
    # the default size keeps a tiny model in one model.safetensors, as save_pretrained does
    assert [p.name for p in weight_files(save_model(model, tokenizer, tmp_path / "whole"))] == [WEIGHTS_NAME]

    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / SHARDS[2]).unlink()
    with pytest.raises(ModelFolderError, match=f"{INDEX_NAME} lists {SHARDS[2]}, which is missing"):
        check_model_source(broken)
    with pytest.raises(FileNotFoundError, match=f"lists {SHARDS[2]}, which is missing"):
        weight_files(broken)
    (broken / INDEX_NAME).write_text("{not json")
    with pytest.raises(ModelFolderError, match=f"{INDEX_NAME} is not an index"):
        check_model_source(broken)


def test_a_merged_lora_model_saved_in_small_shards_loads_back_as_its_merged_weights(tmp_path):
    from grpokit.model.lora import apply_lora, merged_state_dict, save_policy

    model, tokenizer = tiny()
    policy = apply_lora(model, LoRAConfig(r=4, alpha=8.0))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # B = 0 would merge to the base weights
    merged = merged_state_dict(policy)
    folder = save_policy(policy, tokenizer, tmp_path / "merged", "merged", max_shard_size=SMALL)
    assert len(weight_files(folder)) > 1
    got = load_model(folder, "cpu", torch.float32).state_dict()
    for name, tensor in merged.items():
        assert torch.equal(got[name], tensor), name
    base = model.state_dict()["model.layers.0.self_attn.q_proj.base_layer.weight"]  # (apply_lora wrapped its layers)
    assert not torch.equal(got["model.layers.0.self_attn.q_proj.weight"], base)


def test_a_one_process_run_in_small_shards_resumes_from_its_sharded_checkpoint_as_the_straight_run(tmp_path):
    """2 steps, then resumed to 4 (with another shard size: how the files are cut is not what the run computes),
    equal the 4 straight steps: weights bit for bit, the completions. A checkpoint whose index names a missing shard
    is refused, naming it."""
    model = save_tiny(tmp_path / "llama", "llama")
    run = {"max_shard_size": SMALL, "save_every": 2, "log_completions_every": 1}
    GRPOTrainer(config(model, tmp_path / "straight", max_steps=4, **run)).train()
    GRPOTrainer(config(model, tmp_path / "resumed", max_steps=2, **run)).train()
    checkpoint = tmp_path / "resumed" / "checkpoint-2"
    assert [p.name for p in weight_files(checkpoint)] == SHARDS and not (checkpoint / WEIGHTS_NAME).exists()

    broken = tmp_path / "broken"
    shutil.copytree(tmp_path / "resumed", broken)
    (broken / "checkpoint-2" / SHARDS[1]).unlink()
    with pytest.raises(RunDirectoryError, match=f"lists {SHARDS[1]}, which is missing"):
        GRPOTrainer(config(model, broken, max_steps=4, resume_from_checkpoint="latest", **run)).train()

    resumed = {**run, "max_shard_size": "60KB"}
    GRPOTrainer(config(model, tmp_path / "resumed", max_steps=4, resume_from_checkpoint="latest", **resumed)).train()
    straight, ours = (dict(read_weight_files(tmp_path / name / "model")) for name in ("straight", "resumed"))
    assert straight.keys() == ours.keys() and straight
    for name in straight:
        assert torch.equal(straight[name], ours[name]), name
    assert len(weight_files(tmp_path / "resumed" / "model")) == 3  # cut at 60KB now
    rows = [read_jsonl(tmp_path / name / "completions.jsonl") for name in ("straight", "resumed")]
    assert rows[0] == rows[1] and {r["step"] for r in rows[0]} == {1, 2, 3, 4}


def test_the_one_file_writer_writes_save_files_bytes_holding_one_tensor_at_a_time(tmp_path):
    """PPO's critic under FSDP (`write_streamed_file`): the header first, then each tensor as it is made; the file is
    safetensors' own (every dtype the critic may have, a scalar, an empty tensor), and the writer held at most the
    largest tensor."""
    from safetensors.torch import save_file

    from grpokit.runtime.weight_files import write_streamed_file

    g = torch.Generator().manual_seed(0)
    tensors = {"a.weight": torch.randn(7, 5, generator=g), "b.bias": torch.randn(3, generator=g).bfloat16(),
               "c.half": torch.randn(2, 3, generator=g).half(), "d.count": torch.tensor(4), "e.mask": torch.ones(3) > 0,
               "f.scalar": torch.tensor(0.5), "g.empty": torch.zeros(0, 4)}  # fmt: skip
    save_file(tensors, str(tmp_path / "reference.safetensors"), metadata={"format": "pt"})
    reference = (tmp_path / "reference.safetensors").read_bytes()
    header = json.loads(reference[8 : 8 + int.from_bytes(reference[:8], "little")])
    order = [name for name in header if name != "__metadata__"]  # safetensors' order: by alignment, then name
    with open(tmp_path / "ours.safetensors", "wb") as out:
        held = write_streamed_file(out, [(name, tensors[name]) for name in order])
    assert (tmp_path / "ours.safetensors").read_bytes() == reference
    assert held == max(t.nbytes for t in tensors.values())
    assert write_streamed_file(None, list(tensors.items())) == 0  # another rank: gathers, writes and keeps nothing
