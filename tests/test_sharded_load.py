"""A sharded start under `distributed: fsdp`: the model built on the meta device, each rank reading only its own rows
of the safetensors files (`grpokit.model.sharded`). In one process: the fill from an index and its shards equals
`from_pretrained`, the folder's tensors are checked as `load_pretrained` checks them, the LoRA adapters drawn over a
meta model are one process's, and what cannot start so falls back and says why. Under torchrun (2 ranks, gloo): a
run started so equals one process, and each rank read about half of the files."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import HIDDEN, build_char_tokenizer, tiny_model
from safetensors.torch import load_file, save_file
from test_distributed import ALL, completions, launch, max_relative_difference, one_process, weights, write_config

from grpokit.model.loading import ModelFolderError, load_model
from grpokit.model.logprobs import completion_logprobs
from grpokit.model.lora import apply_lora
from grpokit.model.sharded import (
    fill_from_folder,
    lora_on_meta,
    meta_model,
    sharded_source,
    tensor_bytes,
    training_model,
    weight_files,
)
from grpokit.runtime.distributed import Cluster, shard, shard_of

LORA = SimpleNamespace(r=4, alpha=8.0, dropout=0.0, target_modules=["all-linear"])
# FSDP over one rank, as training_model sees it (its collectives are the identity)
FSDP_ONE = Cluster(rank=0, world_size=1, mode="fsdp", grouped=True)


def save_in_shards(path: Path, *, dtype: torch.dtype = torch.float32, seed: int = 0) -> Path:
    """A tiny tied Llama (with its tokenizer) as `save_pretrained` writes a big one: an index and several shards."""
    tokenizer = build_char_tokenizer()
    model = tiny_model(tokenizer, "llama", hidden_size=HIDDEN, seed=seed).to(dtype)
    model.save_pretrained(path, max_shard_size="16KB")
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def sharded_llama(tmp_path_factory) -> Path:
    return save_in_shards(tmp_path_factory.mktemp("sharded") / "llama")


@pytest.fixture
def one_rank_group(tmp_path):
    """A process group of this process alone (gloo), left after the test: FSDP2 over one rank."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_a_meta_model_sharded_and_filled_from_an_index_and_its_shards_is_the_model_from_pretrained_loads(
    tmp_path, one_rank_group
):
    """bfloat16 shards: every tensor cast to float32 as a whole load casts it, the rotary frequencies (in no file)
    computed, the tied head one parameter; one rank reads every byte of the tensors once."""
    folder = save_in_shards(tmp_path / "bf16", dtype=torch.bfloat16)
    assert len(weight_files(folder)) >= 3  # an index and its shards, not one file
    model = meta_model(folder)
    assert all(p.is_meta for p in model.parameters())
    read = []
    shard(model, completion_logprobs, fill=lambda lm: read.append(fill_from_folder(lm, folder)), device="cpu")
    assert read == [tensor_bytes(folder)]
    assert model.lm_head.weight is model.model.embed_tokens.weight
    whole = load_model(folder, "cpu", torch.float32)
    assert {k for k, _ in model.named_buffers()} == {"model.rotary_emb.inv_freq", "model.rotary_emb.original_inv_freq"}
    expected = {**dict(whole.named_parameters()), **dict(whole.named_buffers())}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        assert tensor.dtype == torch.float32 and torch.equal(shard_of(tensor), expected[name]), name


def folder_like(source: Path, dest: Path, *, drop: str = "", config: dict | None = None) -> Path:
    """`source` copied to `dest` as one model.safetensors, without the tensor `drop`, its config.json updated."""
    import json

    dest.mkdir()
    tensors = {}
    for path in weight_files(source):
        tensors.update(load_file(path))
    save_file({k: v for k, v in tensors.items() if k != drop}, dest / "model.safetensors", metadata={"format": "pt"})
    spec = json.loads((source / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps({**spec, **(config or {})}))
    return dest


@pytest.mark.parametrize(
    "damage",
    [
        {"drop": "model.layers.1.mlp.down_proj.weight"},  # a tensor missing
        {"config": {"intermediate_size": 4 * HIDDEN + 8}},  # tensors of another shape
        {"config": {"num_hidden_layers": 1}},  # tensors without a place
    ],
    ids=["missing", "mismatched", "unexpected"],
)
def test_a_damaged_folder_is_refused_before_any_read_as_a_whole_load_refuses_it(damage, sharded_llama, tmp_path):
    folder = folder_like(sharded_llama, tmp_path / "damaged", **damage)
    with pytest.raises(ModelFolderError) as whole:
        load_model(folder, "cpu", torch.float32)
    with pytest.raises(ModelFolderError) as sharded:
        meta_model(folder)
    assert str(sharded.value) == str(whole.value)


def test_lora_over_a_meta_model_starts_from_the_adapters_one_process_draws(sharded_llama):
    torch.manual_seed(3)
    whole = apply_lora(load_model(sharded_llama, "cpu", torch.float32), LORA)
    after_whole = torch.random.get_rng_state()
    expected = {name: p.detach() for name, p in whole.named_parameters() if p.requires_grad}
    torch.manual_seed(3)
    model, drawn = lora_on_meta(meta_model(sharded_llama), LORA)
    assert torch.equal(torch.random.get_rng_state(), after_whole)  # the RNG walked as far: later draws agree too
    assert all(p.is_meta for p in model.parameters())
    assert drawn.keys() == expected.keys() and len(drawn) == 2 * 7 * 2  # A and B of 7 linear layers x 2 layers
    assert all(torch.equal(drawn[name], expected[name]) for name in expected)
    assert any(float(v.abs().sum()) > 0 for v in drawn.values())  # (A is random; B starts at 0)


def test_what_cannot_be_read_shard_by_shard_loads_whole_and_says_why(tmp_path, capsys):
    from test_model_folders import write_tiny_gguf

    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")  # (skips without the `gguf` package)
    model = training_model(None, gguf, "cpu", FSDP_ONE)
    assert not any(p.is_meta for p in model.parameters())
    assert f"every rank loads the whole model, then shards it: {gguf} is a .gguf file" in capsys.readouterr().err

    given = tiny_model(build_char_tokenizer(), "llama", hidden_size=HIDDEN)
    assert training_model(given, None, "cpu", FSDP_ONE) is given
    assert "the model was handed in as an object" in capsys.readouterr().err
    assert training_model(given, None, "cpu", Cluster()) is given  # one process: nothing to say
    assert capsys.readouterr().err == ""


def test_a_hub_id_is_read_from_its_snapshot_in_the_local_cache(sharded_llama, tmp_path, monkeypatch):
    """The hub cache's layout (models--ORG--NAME/refs/main naming a snapshot folder), no network."""
    import shutil

    from huggingface_hub import constants

    cache = tmp_path / "hub"
    snapshot = cache / "models--tiny-org--llama" / "snapshots" / "0123abcd"
    shutil.copytree(sharded_llama, snapshot)
    (cache / "models--tiny-org--llama" / "refs").mkdir()
    (cache / "models--tiny-org--llama" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert sharded_source("tiny-org/llama") == (snapshot, "")
    model = training_model(None, "tiny-org/llama", "cpu", FSDP_ONE)
    assert model.name_or_path == "tiny-org/llama" and all(p.is_meta for p in model.parameters())
    folder, why = sharded_source("tiny-org/absent")
    assert folder is None and "tiny-org/absent is not in the local hub cache" in why


# ---------------------------------------------------------------- two ranks (torchrun)

LOAD_LINE = re.compile(r"each rank read its own rows of (\S+) \(.*\): (.*)")


def shares(output: str) -> dict[str, list[float]]:
    """The sharded start's line: what -> each rank's share (%) of the files' tensor bytes it read."""
    found = LOAD_LINE.search(output)
    assert found, output[-3000:]
    out = {}
    for part in found.group(2).split("; "):
        what, ranks = part.removeprefix("the ").split(": ")
        out[what] = [float(share) for share in re.findall(r"rank \d+ ([\d.]+)%", ranks)]
    return out


@pytest.mark.parametrize(
    "case",
    [
        pytest.param({"beta": 0.04}, id="tied-reference"),
        # LoRA over a sharded start also runs in test_distributed.py's fsdp-*-lora cases (from one file there)
        pytest.param(
            {"beta": 0.04, "lora": {"r": 4, "alpha": 8.0}, "gradient_checkpointing": True},
            id="lora",
            marks=[] if ALL else [pytest.mark.skip("GRPOKIT_DISTRIBUTED_ALL=1")],
        ),
    ],
)
def test_two_ranks_started_shard_by_shard_train_as_one_process(case, sharded_llama, tmp_path):
    """Neither rank held the whole model: each read about half of the files' bytes (its rows of every tensor, the
    reference's again), together all of them; the run equals one process started from the whole model."""
    config = write_config(tmp_path, sharded_llama, distributed="fsdp", **case)
    proc = launch(config)
    read = shares(proc.stdout + proc.stderr)
    assert list(read) == (["policy"] if "lora" in case else ["policy", "reference"])
    for each in read.values():
        assert len(each) == 2 and max(each) < 51 and sum(each) == pytest.approx(100, abs=0.02)
    split, whole = tmp_path / "run", one_process(config, tmp_path / "whole")
    assert completions(split) == completions(whole)
    assert max_relative_difference(weights(whole), load_file(sharded_llama_whole(sharded_llama))) > 1e-4  # trained
    assert max_relative_difference(weights(split), weights(whole)) <= 1e-5


def sharded_llama_whole(folder: Path) -> Path:
    """The sharded folder's tensors in one file beside it (what `weights` reads of a run's model)."""
    whole = folder.parent / "whole.safetensors"
    if not whole.exists():
        tensors = {}
        for path in weight_files(folder):
            tensors.update(load_file(path))
        save_file(tensors, whole)
    return whole


def test_fsdp_on_one_rank_shards_over_a_group_of_one_and_trains_as_without_it(sharded_llama, one_rank_group, tmp_path):
    """`torchrun --nproc_per_node 1` with `distributed: fsdp` (here: a process group of one made by the caller) is
    FSDP over one rank, as accelerate's FSDP on one GPU: the sharded start and FSDP's units, not a silent plain run
    (a GPU measures FSDP's own cost so); its steps are the plain run's (the same sums over one rank)."""
    from grpokit.config import GRPOConfig, load_yaml
    from grpokit.stages.grpo import GRPOTrainer

    assert Cluster.from_env("fsdp").sharded and not Cluster.from_env("ddp").sharded
    config = write_config(tmp_path, sharded_llama, beta=0.04, max_shard_size="40KB")
    cfg = load_yaml(GRPOConfig, config)
    trainer = GRPOTrainer(GRPOConfig(**{**cfg.__dict__, "output_dir": str(tmp_path / "fsdp"), "distributed": "fsdp"}))
    assert len(trainer.policy.fsdp_roots) == 2  # the policy and its reference, each read from the files
    trainer.train()
    plain = one_process(config, tmp_path / "plain")
    assert completions(tmp_path / "fsdp") == completions(plain)
    assert max_relative_difference(weights(plain), load_file(sharded_llama_whole(sharded_llama))) > 1e-4  # trained
    assert max_relative_difference(weights(tmp_path / "fsdp"), weights(plain)) <= 1e-5
    # the final model streamed tensor by tensor is cut into the files one process writes
    index = "model/model.safetensors.index.json"
    assert (
        json.loads((tmp_path / "fsdp" / index).read_text())["weight_map"]
        == json.loads((plain / index).read_text())["weight_map"]
    )
