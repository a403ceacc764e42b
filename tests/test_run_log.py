"""What a run logs: plain progress lines when the output is not a terminal, metrics.jsonl cut back to the checkpoint
on a resume (saying so, and keeping a line a user added), the sampled completions as TensorBoard text, and an
offline W&B run with the reward curve."""

from __future__ import annotations

import json

import pytest
from helpers import config, module_level_reward, save_tiny, step_rows, text_rows

from grpokit.report.runlog import PlainProgress, RunLog, progress
from grpokit.stages.grpo import GRPOTrainer


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "llama", "llama")


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


def test_progress_off_a_terminal_is_a_plain_line_every_tenth_of_the_run(capsys):
    bar = progress(range(1, 21), "grpo", initial=0, total=20)  # pytest's stderr is not a terminal
    assert isinstance(bar, PlainProgress)
    for step in bar:
        bar.set_postfix(reward=f"{step / 10:.3f}")
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(",")[0] for line in lines] == [f"grpo: step {s}/20" for s in range(2, 21, 2)]
    assert "\r" not in "".join(lines) and lines[-1].endswith("reward=2.000")


def test_a_resume_drops_later_metrics_rows_saying_so_and_keeps_lines_a_user_added(tmp_path):
    """Rows of steps after the checkpoint go (the resumed run logs them again), said with their count; a note added
    by hand is not a step row and stays."""
    out = tmp_path / "run"
    out.mkdir()
    rows = [json.dumps({"step": s, "loss": 0.1 * s}) for s in (1, 2, 3, 4)]
    (out / "metrics.jsonl").write_text("\n".join([rows[0], "# lr looked high here", *rows[1:], '{"step": 5, "lo'])
                                       + "\n")  # fmt: skip
    with pytest.warns(UserWarning, match=r"metrics\.jsonl: 2 row\(s\) of steps 3-4, logged after the checkpoint"):
        RunLog(out, tensorboard=False, resume_step=2).close()
    kept = (out / "metrics.jsonl").read_text().splitlines()
    assert kept == [rows[0], "# lr looked high here", rows[1]]  # the torn last line of a kill goes too


def test_tensorboard_gets_the_sampled_completions_as_text(tmp_path, model):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    GRPOTrainer(config(model, out, tensorboard=True, log_completions_every=1), train_dataset=text_rows()).train()
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert "completions/text_summary" in events.Tags()["tensors"]
    text = events.Tensors("completions/text_summary")[0].tensor_proto.string_val[0].decode()
    assert text.startswith("| prompt | completion | reward | advantage |") and "+" in text


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
