"""Habits users bring from TRL and from other command-line tools: reward functions called by keyword with
TRL's arguments (conversational completions for chat prompts), `reward_funcs` as a function, a list or pairs,
`--version`, a reward module beside the config, plain progress lines when the output is not a terminal."""

from __future__ import annotations

import json
import re
import sys

import pytest
from helpers import config, save_tiny, step_rows

from grpokit import __version__
from grpokit.cli import main
from grpokit.rewards import RewardError, import_reward
from grpokit.runlog import PlainProgress, progress
from grpokit.trainer import GRPOTrainer


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"grpokit {__version__}"


def test_a_reward_module_in_the_working_folder_imports_without_pythonpath(tmp_path, monkeypatch):
    (tmp_path / "my_rewards_beside_config.py").write_text("def short(prompts, completions, **_):\n    return [0.0]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    fn = import_reward("my_rewards_beside_config:short")
    assert fn.__name__ == "short" and sys.path[-1] == str(tmp_path)  # appended: installed packages win


def test_progress_off_a_terminal_is_a_plain_line_every_tenth_of_the_run(capsys):
    bar = progress(range(1, 21), "grpo", initial=0, total=20)  # pytest's stderr is not a terminal
    assert isinstance(bar, PlainProgress)
    for step in bar:
        bar.set_postfix(reward=f"{step / 10:.3f}")
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(",")[0] for line in lines] == [f"grpo: step {s}/20" for s in range(2, 21, 2)]
    assert "\r" not in "".join(lines) and lines[-1].endswith("reward=2.000")


# ---------------------------------------------------------------- reward functions as TRL calls them


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "llama", "llama")


def text_rows(n=8):
    return [{"prompt": f"{i}+{i}=", "answer": str(2 * i)} for i in range(n)]


def test_a_reward_gets_each_argument_by_its_name(tmp_path, model):
    seen = {}

    def f(completions, prompts, **kw):  # TRL's order does not matter: names do
        seen.update(completions=completions, prompts=prompts, **kw)
        return [float(len(c)) for c in completions]

    trainer = GRPOTrainer(config(model, tmp_path / "run", max_steps=1), reward_funcs=f, train_dataset=text_rows())
    trainer.step()
    rows = {r["prompt"]: r["answer"] for r in text_rows()}
    assert all(p in rows for p in seen["prompts"])  # the prompts, not the completions
    assert all(isinstance(c, str) for c in seen["completions"])
    assert [rows[p] for p in seen["prompts"]] == seen["answer"]  # every data column, lined up
    decoded = trainer.tokenizer.batch_decode(seen["completion_ids"], skip_special_tokens=True)
    assert [d.strip() for d in decoded] == [c.strip() for c in seen["completions"]]
    assert seen["raw_prompts"] == seen["prompts"] and len(seen["truncated"]) == len(seen["completions"])


def test_chat_prompts_give_conversational_completions(tmp_path, model):
    seen = {}

    def reward_len(completions, **kwargs):  # TRL's documented conversational reward
        seen.update(completions=completions, **kwargs)
        return [-abs(4 - len(c[0]["content"])) for c in completions]

    rows = [{"prompt": [{"role": "user", "content": f"{i}+{i}="}], "answer": str(2 * i)} for i in range(8)]
    trainer = GRPOTrainer(config(model, tmp_path / "run", max_steps=1), reward_funcs=[reward_len], train_dataset=rows)
    metrics, _ = trainer.step()
    assert all(c[0]["role"] == "assistant" and isinstance(c[0]["content"], str) for c in seen["completions"])
    assert all(isinstance(p, list) and p[0]["role"] == "user" for p in seen["prompts"])
    assert seen["rendered_prompts"][0] == trainer.tokenizer.apply_chat_template(
        seen["prompts"][0], tokenize=False, add_generation_prompt=True
    )
    assert "rewards/reward_len/mean" in metrics


def test_reward_funcs_as_a_function_a_list_or_pairs_and_names_made_unique(tmp_path, model):
    def ones(completions, **_):
        return [1.0] * len(completions)

    for funcs, names in [
        (ones, ["ones"]),
        ([ones, ones], ["ones", "ones_2"]),
        ([("custom", ones), "format"], ["custom", "format"]),
    ]:
        trainer = GRPOTrainer(config(model, tmp_path / "run"), reward_funcs=funcs, train_dataset=text_rows())
        assert trainer.rewards.names == names


def test_a_reward_that_cannot_be_called_by_keyword_is_refused_before_work(tmp_path):
    def positional(p, c):
        return [0.0] * len(c)

    with pytest.raises(RewardError, match=r"reward function `positional` takes 'p', which grpokit does not pass"):
        GRPOTrainer(config("never-loaded", tmp_path / "run"), reward_funcs=[positional], train_dataset=text_rows())


def test_a_reward_without_kwargs_gets_only_what_it_names(tmp_path, model):
    def exact(completions, answer):
        return [float(c.strip() == a) for c, a in zip(completions, answer)]

    metrics, _ = GRPOTrainer(config(model, tmp_path / "run"), reward_funcs=exact, train_dataset=text_rows()).step()
    assert 0.0 <= metrics["rewards/exact/mean"] <= 1.0


# ---------------------------------------------------------------- the native Python API


def module_level_reward(completions, **_):
    """Importable as test_habits:module_level_reward, so the saved config can name it."""
    return [float(len(c)) for c in completions]


def test_the_python_api_takes_a_path_a_dataset_and_a_function_and_records_them(tmp_path, model):
    import datasets
    import yaml

    from grpokit import GRPOConfig
    from grpokit import GRPOTrainer as TopLevelTrainer

    cfg = GRPOConfig(
        output_dir=str(tmp_path / "run"),
        max_steps=1,
        prompts_per_step=2,
        num_generations=2,
        max_completion_length=4,
        num_eval_prompts=2,
        progress=False,
        tensorboard=False,
    )
    trainer = TopLevelTrainer(
        cfg,
        model=str(model),
        reward_funcs=module_level_reward,
        train_dataset=datasets.Dataset.from_list(text_rows()),
        eval_dataset=text_rows(2),
    )
    trainer.train()
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["model"] == str(model) and saved["task"] is None and saved["train_data"] is None
    assert saved["reward_funcs"] == ["test_habits:module_level_reward"]
    assert cfg.model == "" and cfg.reward_funcs == ["accuracy"]  # the caller's config is left as it was


def test_a_model_object_without_a_tokenizer_says_to_pass_one(tmp_path):
    from grpokit.tasks import build_char_tokenizer, tiny_model

    in_memory = tiny_model(build_char_tokenizer(), "llama", hidden_size=32, seed=0)
    with pytest.raises(ValueError, match=r"without `tokenizer=`.*pass tokenizer="):
        GRPOTrainer(config("", tmp_path / "run"), model=in_memory, reward_funcs=module_level_reward)


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
    from grpokit.data import DataError, load_rows

    if not offline:
        with pytest.raises(DataError, match="config field `train_data`: the data set 'some-org/some-data'"):
            load_rows("some-org/some-data", field="train_data")


# ---------------------------------------------------------------- logging


def wandb_history(path):
    """The history rows of an offline `.wandb` file: W&B's log of protobuf Records in 32 KiB blocks, each
    record cut into chunks with a 7-byte header (crc32, length, kind: 1 full, 2 first, 3 middle, 4 last)."""
    import json
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, chunks, rows = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (kind == 0 and length == 0):  # the padded tail of a block
            pos += left
            continue
        chunks, pos = chunks + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(chunks)
            chunks = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows


def test_wandb_offline_writes_a_run_folder_with_the_reward_curve(tmp_path, model, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    cfg = config(model, out, max_steps=3, wandb=True, log_completions_every=1)
    GRPOTrainer(cfg, reward_funcs=module_level_reward, train_dataset=text_rows()).train()
    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    history = wandb_history(run_file)
    logged = [(h["_step"], h["reward"]) for h in history if "reward" in h]
    assert logged == [(r["step"], r["reward"]) for r in step_rows(out)] and len(logged) == 3
    assert any("completions/nrows" in h for h in history)  # the sampled completions, as a table


def test_tensorboard_gets_the_sampled_completions_as_text(tmp_path, model):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    GRPOTrainer(config(model, out, tensorboard=True, log_completions_every=1), train_dataset=text_rows()).train()
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert "completions/text_summary" in events.Tags()["tensors"]
    text = events.Tensors("completions/text_summary")[0].tensor_proto.string_val[0].decode()
    assert text.startswith("| prompt | completion | reward | advantage |") and "+" in text


# ---------------------------------------------------------------- evaluation with the user's rewards


def test_eval_reports_each_reward_mean_greedy_and_sampled(tmp_path, model):
    from grpokit.evaluate import completions_for

    eval_rows = [{"prompt": f"{i}+{i}="} for i in range(6)]  # no `answer`: accuracy has nothing to check
    cfg = config(model, tmp_path / "run", num_eval_prompts=6)
    trainer = GRPOTrainer(cfg, reward_funcs=module_level_reward, train_dataset=text_rows(), eval_dataset=eval_rows)
    result = trainer.evaluate(0)
    assert not any("accuracy" in key for key in result)
    greedy = completions_for(
        trainer.sampler, trainer.tokenizer, [r["prompt"] for r in eval_rows], temperature=0.0,
        max_new_tokens=cfg.max_completion_length, seed=cfg.seed,
    )  # fmt: skip
    expected = sum(len(c) for c in greedy) / len(greedy)
    assert result["eval/rewards/module_level_reward/mean_greedy"] == pytest.approx(expected)
    assert result["eval/reward_greedy"] == pytest.approx(expected)  # one function, weight 1
    assert "eval/rewards/module_level_reward/mean_sampled" in result and "eval/reward_sampled" in result


def test_grpokit_eval_takes_any_data_file_and_reward_functions(tmp_path, model, capsys):
    data = tmp_path / "held_out.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in text_rows(4)))
    assert main(["eval", "--model", str(model), "--eval-data", str(data), "--reward-funcs", "format"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"held_out.jsonl held-out accuracy, greedy: \d+\.\d% of 4", out), out
    assert re.search(r"held_out.jsonl held-out rewards/format, sampled \(T=1\): [01]\.\d{4} \(mean of 4\)", out), out
