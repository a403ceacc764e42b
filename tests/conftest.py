"""Shared fixtures: the offline small world (character tokenizer, tiny models, the addition task)."""

from __future__ import annotations

import json

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


def pytest_collection_modifyitems(items):
    """The tests that wait for the whole demo (`demo_runs`) go last: the rest of the suite runs while it trains."""
    items.sort(key=lambda item: "demo_runs" in item.fixturenames)  # stable: the order is otherwise the same


@pytest.fixture(scope="session", autouse=True)
def demo_background(request, tmp_path_factory):
    """The demo's runs (`tests/demo_runs.py`: its warm start, `run_demo`, `run_pipeline`; about 210 s on one core),
    started in a process of their own before the first test when the session holds a test that needs them, so that
    they train while the suite runs; None otherwise."""
    from demo_runs import Background

    uses = {name for item in request.session.items for name in item.fixturenames}
    if not uses & {"demo_warm_start", "demo_runs"}:
        yield None
        return
    background = Background(tmp_path_factory.mktemp("demo"), tables="demo_runs" in uses)
    yield background
    background.close()


@pytest.fixture(scope="session")
def demo_runs(demo_background):
    """The demo's runs, made by the background process: `.table("demo")` / `.table("pipeline")` (what `run_demo` /
    `run_pipeline` returned; each waits until it is made) and `.out`, the demo's output folder."""
    return demo_background


@pytest.fixture(scope="session")
def demo_warm_start(demo_background):
    """The demo's SFT warm start (the tests that start from it: PPO on the demo task, the reward model's 90%), made
    once by the background process: `(config, fresh)`, where `fresh()` is the warm start with its own copy of the
    model, loaded from the folder the warm start saved it to (the same weights to the bit, in train mode as SFT
    leaves it), and its held-out rows. Do not write into the config's folder."""
    from demo_runs import config
    from transformers import AutoModelForCausalLM

    from grpokit.demo import DemoFolder, WarmStart

    demo_background.wait("warm")
    cfg = config(demo_background.root)
    task = AdditionTask(num_digits=cfg.num_digits, forget_carry=cfg.forget_carry)
    tokenizer, model_dir = build_char_tokenizer(), demo_background.out / "sft" / "model"
    eval_rows = json.loads((demo_background.root / "eval_rows.json").read_text())

    def fresh():
        model = AutoModelForCausalLM.from_pretrained(model_dir).train()
        return WarmStart(task, tokenizer, model, eval_rows, model_dir, DemoFolder(demo_background.out))

    return cfg, fresh
