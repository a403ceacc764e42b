"""Shared fixtures: the offline small world (character tokenizer, tiny models, the addition task)."""

from __future__ import annotations

import pytest
import torch

from grpokit.data.tasks import AdditionTask, build_char_tokenizer, tiny_model


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """Tiny models run faster on one intra-op thread, and far faster when another process shares the cores. A
    stage without `num_threads` takes the count the process started with (`machine.STARTING_THREADS`): one here."""
    from grpokit.runtime import machine

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setattr(machine, "STARTING_THREADS", 1, raising=False)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def char_tokenizer():
    """The default character tokenizer (<pad>=0, <eos>=1, <bos>=2, left padding). Do not mutate it."""
    return build_char_tokenizer()


@pytest.fixture
def tiny_llama(char_tokenizer):
    """A fresh 2-layer Llama (hidden 64), seed 0, in train mode."""
    return tiny_model(char_tokenizer, "llama", seed=0)


@pytest.fixture
def tiny_qwen2(char_tokenizer):
    """A fresh 2-layer Qwen2 (hidden 64), seed 0, in train mode."""
    return tiny_model(char_tokenizer, "qwen2", seed=0)


@pytest.fixture
def addition_task():
    """Two-digit addition with a demonstrator that forgets each carry half the time."""
    return AdditionTask(num_digits=2, forget_carry=0.5)


@pytest.fixture(scope="module")
def qwen2_path(tmp_path_factory):
    """A tiny Qwen2 and the char tokenizer saved in `save_pretrained` form (hidden 32), per test module."""
    from helpers import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny") / "qwen2", "qwen2")


@pytest.fixture(scope="session")
def demo_warm_start(tmp_path_factory):
    """The demo's SFT warm start (about 50 s on 2 cores), made once for the tests that start from it (the demo, its
    pipeline, PPO on the demo task): `(config, fresh)`, where `fresh()` is the warm start with its own copy of the
    model, which training changes in place. Every demo test writes into the config's one folder (distinct runs)."""
    import copy
    import dataclasses

    from grpokit.config import DemoConfig
    from grpokit.demo import warm_start

    folder = tmp_path_factory.mktemp("demo")
    cfg = DemoConfig(output_dir=str(folder), progress=False)
    warm = warm_start(cfg, folder)
    return cfg, lambda: dataclasses.replace(warm, model=copy.deepcopy(warm.model))
