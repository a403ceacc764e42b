"""Exact resume and faults (DESIGN invariant 8), through the CLI as a user meets them: kills, signals and the runs
compared with them in subprocesses; a refusal that needs no process of its own (the second run into a locked folder,
a fresh run into a folder holding a run, a changed config) through the CLI's entry point in this process.

N straight steps equal k steps + a real `kill -9` + resume + N - k steps: the same final parameters and
optimizer state (torch.equal) and the same metrics rows (times aside), for GRPO full fine-tune (with the
checkpoint on an epoch boundary of the prompt order), GRPO with LoRA, and SFT. SIGINT / SIGTERM finish the
step, checkpoint and exit 130 / 143; a locked folder is refused; an interrupted checkpoint is never loaded;
a kill during a model save leaves the old or the new folder, whole; a second signal stops at once, saying
which checkpoint was kept (in process).

The children learn where the run stands from their own output (a reward function that prints a line per
step, or the progress bar), so no test sleeps.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import read_jsonl, save_tiny
from safetensors.torch import load_file

from grpokit.runtime.checkpoint import RunDirectory, RunDirectoryError, write_checkpoint

TIMES = re.compile(r"^time/|^tokens_per_s$")
PROBE = '''
import sys

calls = 0


def graded(prompts, completions, **_):
    """A reward with a spread in every group; prints one line per step so the test knows where the run is."""
    global calls
    calls += 1
    print(f"scored {calls}", flush=True)
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) + 0.05 * len(c) for c in completions]
'''


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A saved tiny Llama, the printing reward module, and the environment the children run in."""
    root = tmp_path_factory.mktemp("resume")
    (root / "probe_rewards.py").write_text(PROBE)
    model = save_tiny(root / "tiny", "llama")
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    return {"root": root, "model": model, "env": env}


def grpo_yaml(world, name: str, **overrides) -> Path:
    values = {
        "model": str(world["model"]),
        "task": "addition",
        "output_dir": str(world["root"] / name),
        "max_steps": 6,
        "prompts_per_step": 2,
        "num_generations": 4,
        "max_completion_length": 6,
        "num_train_prompts": 4,  # 2 steps an epoch: checkpoint-2 falls exactly on the epoch boundary
        "num_eval_prompts": 0,
        "learning_rate": 1e-3,
        "reward_funcs": ["probe_rewards:graded"],
        "progress": False,
        "tensorboard": False,
        "save_every": 2,
        "seed": 0,
        **overrides,
    }
    path = world["root"] / f"{name}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def cli(world, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "grpokit.cli", *args], env=world["env"], capture_output=True, text=True, timeout=300
    )


def in_process(world, capsys, monkeypatch, *args: str) -> subprocess.CompletedProcess:
    """`cli`'s command through the CLI's entry point `grpokit.cli.main` in this process, for a command that needs no
    process of its own (no kill, no signal, no comparison of its numbers with a child's): the same exit code, stdout
    and stderr, the probe rewards importable as in the children, and no second interpreter to start."""
    from grpokit.cli import main

    monkeypatch.syspath_prepend(str(world["root"]))
    capsys.readouterr()  # what this test printed before is not the command's
    returncode = main(list(args))
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(["grpokit", *args], returncode, captured.out, captured.err)


def start(world, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "grpokit.cli", *args],
        env=world["env"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_line(proc: subprocess.Popen, line: str) -> None:
    """Read the child's stdout until `line` (it blocks on the pipe: no sleeping, no polling)."""
    seen = []
    for out in proc.stdout:
        seen.append(out.strip())
        if out.strip() == line:
            return
    proc.wait()
    raise AssertionError(
        f"the child ended (rc {proc.returncode}) before printing {line!r}: {seen[-5:]}\n{proc.stderr.read()}"
    )


def final_state(run_dir: Path, step: int):
    """(weights, optimizer state, metrics rows without times) of a finished run's checkpoint-STEP."""
    folder = run_dir / f"checkpoint-{step}"
    weights_file = (
        "adapter_model.safetensors" if (folder / "adapter_model.safetensors").exists() else "model.safetensors"
    )
    state = torch.load(folder / "trainer_state.pt", weights_only=True)
    rows = [{k: v for k, v in r.items() if not TIMES.search(k)} for r in read_jsonl(run_dir / "metrics.jsonl")]
    return load_file(folder / weights_file), state["policy"]["optimizer"], rows


def assert_same_run(a: Path, b: Path, step: int, *, rows_from: int = 0) -> None:
    """Equal final weights and optimizer state, and equal metrics rows from step `rows_from` on."""
    w_a, opt_a, rows_a = final_state(a, step)
    w_b, opt_b, rows_b = final_state(b, step)
    assert w_a.keys() == w_b.keys() and w_a
    for name in w_a:
        assert torch.equal(w_a[name], w_b[name]), name
    assert opt_a["param_groups"] == opt_b["param_groups"]
    assert opt_a["state"].keys() == opt_b["state"].keys() and opt_a["state"]
    for i, s in opt_a["state"].items():
        for key, value in s.items():
            assert torch.equal(value, opt_b["state"][i][key]), (i, key)
    rows_a, rows_b = [r for r in rows_a if r["step"] >= rows_from], [r for r in rows_b if r["step"] >= rows_from]
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b]  # every step once, in order
    assert rows_a == rows_b


def initial_weights(world) -> dict[str, torch.Tensor]:
    return load_file(world["model"] / "model.safetensors")


@pytest.fixture(scope="module")
def straight_full(world):
    """GRPO full fine-tune, 6 steps without interruption."""
    result = cli(world, "train", str(grpo_yaml(world, "straight_full")))
    assert result.returncode == 0, result.stderr
    return world["root"] / "straight_full"


def kill_and_resume(world, config: Path, *, after_line: str, command: str = "train") -> subprocess.CompletedProcess:
    proc = start(world, command, str(config))
    wait_for_line(proc, after_line)
    proc.kill()  # SIGKILL: no handler, no cleanup
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return cli(world, command, str(config), "--resume-from-checkpoint", "latest")


# ---------------------------------------------------------------- kill -9 and resume == straight


def test_grpo_full_kill9_on_an_epoch_boundary_resumes_to_the_straight_run(world, straight_full):
    config = grpo_yaml(world, "killed_full")
    run_dir = world["root"] / "killed_full"
    resumed = kill_and_resume(world, config, after_line="scored 3")  # step 3 was running; checkpoint-2 is the last
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(straight_full, run_dir, 6)
    trained, initial = final_state(run_dir, 6)[0], initial_weights(world)
    assert any(not torch.equal(trained[k], initial[k]) for k in trained)  # the runs really trained


def test_grpo_lora_kill9_resumes_to_the_straight_run(world):
    lora = {"lora": {"r": 4, "alpha": 8.0}, "beta": 0.04, "num_train_prompts": 6, "learning_rate": 1e-2}
    straight = cli(world, "train", str(grpo_yaml(world, "straight_lora", **lora)))
    assert straight.returncode == 0, straight.stderr
    config = grpo_yaml(world, "killed_lora", **lora)
    resumed = kill_and_resume(world, config, after_line="scored 4")  # checkpoint-2 then an epoch end at step 3
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(world["root"] / "straight_lora", world["root"] / "killed_lora", 6)
    weights = final_state(world["root"] / "killed_lora", 6)[0]
    assert weights and all(".lora_" in k for k in weights)  # the checkpoint holds the adapter alone
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in weights.items())


def sft_yaml(world, name: str) -> Path:
    values = {
        "model": str(world["model"]),
        "task": "addition",
        "output_dir": str(world["root"] / name),
        "max_steps": 60,
        "batch_size": 16,
        "num_train_prompts": 200,
        "max_completion_length": 4,
        "save_every": 10,
        "progress": True,
        "seed": 0,
    }
    path = world["root"] / f"{name}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def test_sft_kill9_resumes_to_the_straight_run(world):
    straight = cli(world, "sft", str(sft_yaml(world, "straight_sft")))
    assert straight.returncode == 0, straight.stderr
    config = sft_yaml(world, "killed_sft")
    proc = start(world, "sft", str(config))
    # the progress bar (stderr) says how many steps are done; past 10, checkpoint-10 is on disk
    buffer, done = "", 0
    while not 11 <= done < 60:
        chunk = proc.stderr.read(64)
        assert chunk, f"SFT ended before step 11 was seen (rc {proc.wait()})"
        buffer += chunk
        counts = [int(n) for n in re.findall(r"(\d+)/60", buffer)]
        done = max(counts, default=0)
    proc.kill()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    resumed = cli(world, "sft", str(config), "--resume-from-checkpoint", "latest")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(world["root"] / "straight_sft", world["root"] / "killed_sft", 60)


# ---------------------------------------------------------------- SIGINT / SIGTERM


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_checkpoints_exits_and_resumes_to_the_straight_run(world, straight_full, signum, code):
    name = f"signal_{signum}"
    config = grpo_yaml(world, name, save_every=0)  # no periodic checkpoint: the signal's is the only one
    proc = start(world, "train", str(config))
    wait_for_line(proc, "scored 3")
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == code, stderr
    run_dir = world["root"] / name
    assert [p.name for p in run_dir.glob("checkpoint-*")] == ["checkpoint-3"]  # the step in flight finished
    assert f"resume with: grpokit train {config} --resume-from-checkpoint latest" in stderr
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2, 3]
    resumed = cli(world, "train", str(config), "--resume-from-checkpoint", "latest")
    assert resumed.returncode == 0, resumed.stderr
    weights, straight = final_state(run_dir, 6)[0], final_state(straight_full, 6)[0]
    assert all(torch.equal(weights[k], straight[k]) for k in straight)


# ---------------------------------------------------------------- the run directory


def test_a_second_run_into_a_locked_folder_is_refused(world, capsys, monkeypatch):
    config = grpo_yaml(world, "locked", max_steps=100_000, save_every=0)  # still running when the others try
    first = start(world, "train", str(config))
    try:
        wait_for_line(first, "scored 1")
        for extra in ([], ["--resume-from-checkpoint", "latest"], ["--overwrite-output-dir"]):
            second = in_process(world, capsys, monkeypatch, "train", str(config), *extra)
            assert second.returncode == 2
            assert "is in use by a running run" in second.stderr and f"pid {first.pid}" in second.stderr
        assert first.poll() is None  # the first run was not disturbed
    finally:
        first.kill()
        first.wait()


def test_a_fresh_run_into_a_folder_holding_a_run_is_refused_or_replaced(
    world, straight_full, tmp_path, capsys, monkeypatch
):
    copy = shutil.copytree(straight_full, tmp_path / "copy")
    config = grpo_yaml(world, "unused", output_dir=str(copy), max_steps=2)
    refused = in_process(world, capsys, monkeypatch, "train", str(config))
    assert refused.returncode == 2
    assert "holds another run" in refused.stderr and "--overwrite-output-dir" in refused.stderr
    assert len(read_jsonl(copy / "metrics.jsonl")) == 6  # nothing touched
    replaced = in_process(world, capsys, monkeypatch, "train", str(config), "--overwrite-output-dir")
    assert replaced.returncode == 0, replaced.stderr
    assert [r["step"] for r in read_jsonl(copy / "metrics.jsonl")] == [1, 2]  # its own rows only
    assert sorted(p.name for p in copy.glob("checkpoint-*")) == ["checkpoint-2"]


def test_resuming_with_a_changed_config_names_the_fields(world, straight_full, tmp_path, capsys, monkeypatch):
    copy = shutil.copytree(straight_full, tmp_path / "copy")
    config = grpo_yaml(world, "unused", output_dir=str(copy), learning_rate=5e-4, max_steps=8)
    result = in_process(world, capsys, monkeypatch, "train", str(config), "--resume-from-checkpoint", "latest")
    assert result.returncode == 2
    assert "`learning_rate` 0.001 -> 0.0005" in result.stderr
    assert "`max_steps` 6" not in result.stderr  # a longer run is a resume, not a different one


def test_an_interrupted_checkpoint_is_never_loaded(world, straight_full, tmp_path, capsys, monkeypatch):
    run_dir = shutil.copytree(straight_full, tmp_path / "run")
    newest = run_dir / "checkpoint-6"
    # what a kill in the middle of writing leaves: a truncated file and no marker
    state_file = newest / "trainer_state.pt"
    state_file.write_bytes(state_file.read_bytes()[:100])
    (newest / "checkpoint_complete.json").unlink()
    config = grpo_yaml(world, "unused", output_dir=str(run_dir))

    explicit = in_process(world, capsys, monkeypatch, "train", str(config), "--resume-from-checkpoint", str(newest))
    assert explicit.returncode == 2 and "incomplete" in explicit.stderr and str(newest) in explicit.stderr

    latest = cli(world, "train", str(config), "--resume-from-checkpoint", "latest")
    assert latest.returncode == 0, latest.stderr
    assert "`latest` is checkpoint-4: the newer checkpoint-6 is incomplete" in latest.stderr  # said, not skipped
    assert latest.stdout.count("scored") == 2  # steps 5 and 6 again: it resumed from checkpoint-4
    assert_same_run(straight_full, run_dir, 6)


SAVER = """
import os
import sys
import traceback

from grpokit.data.tasks import build_char_tokenizer, tiny_model
from grpokit.runtime.checkpoint import save_model


class Announcing:
    \"\"\"A model saying when a save reaches its weights: the folder is prepared, the weights not yet written.\"\"\"

    def __init__(self, model):
        self.model = model

    def __getattr__(self, name):
        return getattr(self.model, name)

    def save_pretrained(self, *args, **kwargs):
        print(f"weights {i}", flush=True)
        return self.model.save_pretrained(*args, **kwargs)


path, tokenizer = sys.argv[1], build_char_tokenizer()
versions = [Announcing(tiny_model(tokenizer, "llama", hidden_size=256, num_layers=4, seed=s)) for s in (1, 2)]
# One saving process per line read, forked from this one: each kill costs a fork, not an interpreter importing torch.
for _ in sys.stdin:
    pid = os.fork()
    if pid == 0:
        try:
            print(f"saver {os.getpid()}", flush=True)
            for i in range(1000):
                print(f"saving {i}", flush=True)
                save_model(versions[i % 2], tokenizer, path, overwrite=True)  # replacing its own model folder
        except BaseException:
            traceback.print_exc()
        os._exit(1)  # only a kill may end a saver
    _, status = os.waitpid(pid, 0)
    print(f"ended {os.waitstatus_to_exitcode(status)}", flush=True)
"""


def read_until(proc: subprocess.Popen, line: str) -> str:
    """The saver process's next line starting with `line` (blocking on the pipe); an `ended` line before it means
    the saver died of something other than the test's kill."""
    seen = []
    for out in proc.stdout:
        seen.append(out.strip())
        if out.startswith(line):
            return out.strip()
        if out.startswith("ended"):
            break
    raise AssertionError(f"no {line!r} line from the saver: {seen[-5:]}")


def test_a_kill_during_a_model_save_leaves_the_old_or_the_new_model_whole(world, tmp_path):
    """kill -9 of a process replacing its model folder, as save number k begins and as save k writes its weights.
    A kill as a save begins usually lands before the save has written anything (the test wakes on the line first):
    with a save that empties the folder and writes into it, 9 such kills in 100 broke the folder (measured); every
    kill as the weights are written broke it."""
    from transformers import AutoModelForCausalLM

    from grpokit.data.tasks import build_char_tokenizer, tiny_model

    tokenizer = build_char_tokenizer()
    versions = [tiny_model(tokenizer, "llama", hidden_size=256, num_layers=4, seed=s).state_dict() for s in (1, 2)]
    path = tmp_path / "model"
    script = tmp_path / "saver.py"
    script.write_text(SAVER)
    outcomes = []
    proc = subprocess.Popen(
        [sys.executable, str(script), str(path)], env=world["env"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        for kill_at in [f"{where} {k}" for where in ("saving", "weights") for k in (1, 2, 3, 5, 8, 13)]:
            proc.stdin.write("save\n")  # a new saver process, forked: it saves, alternating the versions
            proc.stdin.flush()
            saver = int(read_until(proc, "saver ").split()[1])
            read_until(proc, kill_at + "\n")
            os.kill(saver, signal.SIGKILL)
            assert read_until(proc, "ended") == f"ended {-signal.SIGKILL}"  # it died of the kill
            loaded = AutoModelForCausalLM.from_pretrained(path).state_dict()
            matches = [all(torch.equal(loaded[k], v[k]) for k in v) for v in versions]
            assert sum(matches) == 1, f"kill at {kill_at!r}: the model folder is neither version"
            outcomes.append(matches.index(True))
            assert not [p for p in tmp_path.iterdir() if p.name.startswith("model") and p != path]
    finally:
        proc.stdin.close()  # the saver process's loop ends
        proc.wait()
    assert len(outcomes) == 12
    assert proc.returncode == 0


# ---------------------------------------------------------------- in process: a crash, and the reward model


@pytest.mark.parametrize("overrides", [{}, {"beta": 0.1, "ref_sync_every": 3}], ids=["beta0", "synced-reference"])
def test_an_exception_mid_run_leaves_the_last_checkpoint_and_resumes(tmp_path, overrides):
    from helpers import config, with_digit_share

    from grpokit.data.tasks import build_char_tokenizer, tiny_model
    from grpokit.rewards.functions import RewardError
    from grpokit.stages.grpo import GRPOTrainer

    def run(out, reward_funcs, **run_overrides):
        tokenizer = build_char_tokenizer()
        model = tiny_model(tokenizer, "llama", hidden_size=32, seed=0)
        cfg = config("in-memory", out, max_steps=6, save_every=2, **overrides, **run_overrides)
        return GRPOTrainer(cfg, model=model, tokenizer=tokenizer, reward_funcs=reward_funcs)

    calls = []

    def backend_goes_away(prompts, completions, **columns):  # a reward server that dies at step 5
        calls.append(1)
        if len(calls) == 5:
            raise ConnectionError("reward backend unreachable")
        return with_digit_share()[1][1](prompts, completions, **columns)

    crashed = tmp_path / "crashed"
    with pytest.raises(RewardError, match="`graded` raised ConnectionError"):
        run(crashed, [("graded", backend_goes_away)]).train()
    assert sorted(p.name for p in crashed.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert [r["step"] for r in read_jsonl(crashed / "metrics.jsonl")] == [1, 2, 3, 4]

    graded = [("graded", with_digit_share()[1][1])]
    run(crashed, graded, resume_from_checkpoint="latest").train()
    run(tmp_path / "straight", graded).train()
    assert_same_run(tmp_path / "straight", crashed, 6)


def test_reward_model_resume_extends_to_the_straight_run(tmp_path):
    from grpokit.config import RewardModelConfig
    from grpokit.data.tasks import build_char_tokenizer, tiny_model
    from grpokit.runtime.checkpoint import save_model
    from grpokit.stages.reward_model import train_reward_model

    tokenizer = build_char_tokenizer()
    lm = save_model(tiny_model(tokenizer, "llama", hidden_size=32, seed=0), tokenizer, tmp_path / "lm")

    def train(name: str, max_steps: int, **overrides):
        return train_reward_model(
            RewardModelConfig(
                model=str(lm),
                output_dir=str(tmp_path / name),
                task="addition",
                max_completion_length=6,
                num_train_pairs=100,  # 3.1 epochs of 32 pairs: the order reshuffles inside the run
                num_eval_pairs=50,
                batch_size=32,
                max_steps=max_steps,
                warmup_steps=0,
                lr_schedule="constant",  # so that 5 + 5 steps follow the schedule of 10
                save_every=5,
                progress=False,
                **overrides,
            )
        )

    straight = train("straight", 10)
    train("extended", 5)
    extended = train("extended", 10, resume_from_checkpoint="latest")
    assert extended.eval_accuracy == straight.eval_accuracy
    # the 5-step run logged its last step (5), which the straight run does not: rows compared from step 6
    assert_same_run(tmp_path / "straight", tmp_path / "extended", 10, rows_from=6)


# ---------------------------------------------------------------- a second signal


def test_a_second_signal_says_what_was_kept_before_it_stops(tmp_path, capsys):
    """The second SIGTERM stops at once, as the first one's message says; it used to stop without a word."""
    out = tmp_path / "run"
    out.mkdir()
    rd = RunDirectory(out, settings=None, resume_from=None, overwrite=False, keep=0)
    write_checkpoint(out, 3, lambda folder: (folder / "trainer_state.pt").write_bytes(b"x"), keep=0)
    received = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        rd._install_signal_handlers()
        rd._on_signal(signal.SIGTERM, None)
        rd._on_signal(signal.SIGTERM, None)  # the handler before grpokit's gets it: here, the list
    finally:
        signal.signal(signal.SIGTERM, previous)
    err = capsys.readouterr().err
    assert received == [signal.SIGTERM]
    assert "SIGTERM again: stopping at once; the newest complete checkpoint is" in err and "checkpoint-3" in err


def _without_field(folder: Path, name: str) -> None:
    """The run's config.yaml and its checkpoint's record as a grpokit without field `name` wrote them."""
    saved = yaml.safe_load((folder / "config.yaml").read_text())
    del saved[name]
    (folder / "config.yaml").write_text(yaml.safe_dump(saved))
    for record_file in folder.glob("checkpoint-*/run_record.json"):
        record = json.loads(record_file.read_text())
        del record["config"][name]
        record.pop("defaults", None)
        record_file.write_text(json.dumps(record))


def test_a_checkpoint_from_before_a_field_existed_resumes_at_its_default(qwen2_path, tmp_path):
    """A checkpoint written by a grpokit that had no `adam_epsilon` resumes when the field is at its default (which
    does what that grpokit did) and is refused, naming it, when it is set to something else."""
    from helpers import config

    from grpokit.stages.grpo import GRPOTrainer

    out = tmp_path / "run"
    GRPOTrainer(config(qwen2_path, out, max_steps=1, save_every=1)).train()
    _without_field(out, "adam_epsilon")
    with pytest.raises(RunDirectoryError, match="adam_epsilon"):
        GRPOTrainer(config(qwen2_path, out, max_steps=2, resume_from_checkpoint="latest", adam_epsilon=1e-6))
    result = GRPOTrainer(config(qwen2_path, out, max_steps=2, resume_from_checkpoint="latest")).train()
    assert result.global_step == 2
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r] == [1, 2]
