"""Cases the second hostile round left (docs/reliability.md listed them) and the third round found, each fixed at its
root: nothing a run does or skips goes unsaid."""

from __future__ import annotations

import json
import re
import signal

import pytest
from helpers import cli_run, config, save_tiny, tiny_run_args

from grpokit.checkpoint import RunDirectory, write_checkpoint
from grpokit.runlog import RunLog

cli = cli_run


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "llama", "llama")


def test_resume_and_overwrite_together_are_refused_naming_both(model, tmp_path, capsys):
    """`--resume-from-checkpoint latest --overwrite-output-dir`: one keeps the run, the other replaces it; the resume
    used to win without a word."""
    out = tmp_path / "run"
    assert cli(capsys, "train", *tiny_run_args(model, out, "--save-every", "1"))[0] == 0
    before = sorted(p.name for p in out.iterdir())
    rc, err = cli(
        capsys,
        "train",
        *tiny_run_args(
            model, out, "--max-steps", "2", "--resume-from-checkpoint", "latest", "--overwrite-output-dir"
        ),  # fmt: skip
    )
    assert rc == 2 and "config field `overwrite_output_dir`" in err and "resume_from_checkpoint ('latest')" in err, err
    assert sorted(p.name for p in out.iterdir()) == before


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


def test_a_tokenizer_object_with_another_vocabulary_than_the_models_is_refused(model, tmp_path):
    """Same size, other ids (another model's tokenizer): every shape check passed and each id read as another
    character. A tokenizer with tokens added after (a pad token) still passes."""
    from grpokit.modeling import ModelFolderError, load_tokenizer
    from grpokit.tasks.tokenizer import DEFAULT_CHARS, build_char_tokenizer
    from grpokit.trainer import GRPOTrainer

    permuted = build_char_tokenizer(DEFAULT_CHARS[::-1])
    assert len(permuted) == len(load_tokenizer(model))
    with pytest.raises(ModelFolderError, match=r"config field `model`: the tokenizer saved in .* is not the "
                                               r"`tokenizer` passed in: \d+ tokens have another id"):  # fmt: skip
        GRPOTrainer(config(model, tmp_path / "run", max_steps=1), tokenizer=permuted)
    from transformers import AutoModelForCausalLM

    own = load_tokenizer(model)
    own.add_special_tokens({"additional_special_tokens": ["<tool>"]})
    grown = AutoModelForCausalLM.from_pretrained(model)
    grown.resize_token_embeddings(len(own))
    trainer = GRPOTrainer(config(model, tmp_path / "run2", max_steps=1), model=grown, tokenizer=own)
    assert trainer.tokenizer is own


def test_a_positional_only_reward_parameter_is_named_as_such(tmp_path):
    """`def posonly(completions, /, **kw)`: it said grpokit "does not pass" completions, which it does."""
    from grpokit.rewards import RewardError
    from grpokit.trainer import GRPOTrainer

    def posonly(completions, /, **kwargs):
        return [0.0] * len(completions)

    with pytest.raises(RewardError, match=r"takes 'completions' as a positional-only parameter \(before `/`\)"):
        GRPOTrainer(config("never-loaded", tmp_path / "run"), reward_funcs=[posonly])


def test_csv_cells_are_read_as_the_text_written(tmp_path):
    """The answer `060` used to arrive as the number 60, so every right completion "060" scored 0."""
    from grpokit.data import load_rows

    data = tmp_path / "add.csv"
    data.write_text("prompt,answer,note\n41+19=,060,\n1+1=,2,1e3\nN/A?,NA,null\n")
    assert list(load_rows(str(data), field="train_data")) == [
        {"prompt": "41+19=", "answer": "060", "note": ""},
        {"prompt": "1+1=", "answer": "2", "note": "1e3"},
        {"prompt": "N/A?", "answer": "NA", "note": "null"},  # not a missing value: the text written
    ]


@pytest.mark.parametrize("command", ["init", "fetch-model", "train"])
def test_a_folder_name_too_long_in_bytes_is_refused_not_a_traceback(tmp_path, capsys, model, command):
    """200 x `é` is 200 characters but 400 bytes, past a file system's 255: the check counted characters; init and
    fetch-model had no check (an OSError traceback)."""
    out = tmp_path / ("é" * 200)
    argv = {
        "init": ["init", "--output-dir", out],
        "fetch-model": ["fetch-model", "smollm2", out],
        "train": ["train", *tiny_run_args(model, out)],
    }[command]
    rc, err = cli(capsys, *argv)
    assert rc == 2 and "has a folder name of 400 bytes: keep names under 215" in err and "Traceback" not in err, err


def test_a_reward_model_object_in_reward_funcs_is_refused_naming_what_to_pass(model, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from grpokit.arguments import ArgumentError
    from grpokit.trainer import GRPOTrainer

    scorer = AutoModelForSequenceClassification.from_pretrained(model, num_labels=1)
    with pytest.raises(ArgumentError, match=r"`reward_funcs\[1\]` is a LlamaForSequenceClassification model object: "
                                            r"grpokit loads a reward model from its folder"):  # fmt: skip
        GRPOTrainer(config(model, tmp_path / "run"), reward_funcs=["accuracy", scorer])
    assert not (tmp_path / "run").exists()


def test_eval_data_and_an_eval_dataset_together_are_refused_and_a_task_beside_rows_is_said(model, tmp_path):
    from grpokit.config import ConfigError
    from grpokit.data import InputWarning
    from grpokit.trainer import GRPOTrainer

    rows = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(4)]
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = config(model, tmp_path / "run", eval_data=str(data), num_eval_prompts=4)
    with pytest.raises(ConfigError, match=r"`eval_data` is set \(.*eval\.jsonl'\) but `eval_dataset` was passed in"):
        GRPOTrainer(cfg, eval_dataset=rows)
    with pytest.warns(InputWarning, match=r"`train_dataset` passed in: these are the training rows; the config's "
                                          r"task 'addition' gives only its checker"):  # fmt: skip
        GRPOTrainer(config(model, tmp_path / "run2"), train_dataset=rows)


def test_train_returns_trl_figures_and_the_adapter_names_trainer_members_it_lacks(model, tmp_path):
    from grpokit.trl import GRPOConfig, GRPOTrainer

    def length(completions, **_):
        return [float(len(c)) for c in completions]

    args = GRPOConfig(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=4, num_generations=2,
                      max_completion_length=4, use_cpu=True, report_to="none", save_strategy="no")  # fmt: skip
    trainer = GRPOTrainer(str(model), length, args=args, train_dataset=[{"prompt": f"{i}+1="} for i in range(8)])
    result = trainer.train()
    logged = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert result.global_step == 2 and result.training_loss == pytest.approx(sum(logged) / 2)
    assert result.metrics == {"train_loss": result.training_loss, "global_step": 2}
    with pytest.raises(AttributeError, match=r"has no `log_metrics` \(a transformers.Trainer member the adapter"):
        trainer.log_metrics("train", result.metrics)
    with pytest.raises(AttributeError, match=r"object has no attribute 'no_such_thing'"):
        trainer.no_such_thing  # noqa: B018


# ---------------------------------------------------------------- what a reward does to the process


def _score(fn, **inputs):
    from grpokit.rewards import score

    batch = {"prompts": ["p", "p"], "completions": ["a", "bb"], **inputs}
    return score([(fn.__name__, fn), ], batch, timeout=None)  # fmt: skip


def test_a_reward_calling_os_exit_stops_the_run_naming_it(tmp_path):
    """It ended the process with exit code 0: nothing saved, nothing said."""
    import os

    from grpokit.rewards import RewardError

    def quits(completions, **_):
        os._exit(0)

    real_exit = os._exit
    with pytest.raises(RewardError, match=r"reward function `quits` called os\._exit\(0\), which would end the run"):
        _score(quits)
    assert os._exit is real_exit


def test_a_reward_that_changes_the_umask_is_undone_and_said(tmp_path):
    """`os.umask(0o777)` wrote the final model unreadable (mode 000), with no word."""
    import os

    from grpokit.rewards import RewardWarning

    def hides(completions, **_):
        os.umask(0o777)
        return [1.0] * len(completions)

    before = os.umask(0o022)
    os.umask(before)
    with pytest.warns(RewardWarning, match=r"`hides` changed the file-creation mask \(umask\) to 777; grpokit set it"):
        _score(hides)
    now = os.umask(before)
    assert now == before


def test_a_reward_that_closes_stdout_is_named(monkeypatch):
    import io
    import sys

    from grpokit.rewards import RewardError

    monkeypatch.setattr(sys, "stdout", io.StringIO())

    def closes(completions, **_):
        sys.stdout.close()
        return [1.0] * len(completions)

    with pytest.raises(RewardError, match=r"reward function `closes` closed sys\.stdout"):
        _score(closes)


# ---------------------------------------------------------------- models and samplers handed in


def test_a_classifier_or_a_frozen_model_as_the_policy_is_refused_naming_model(model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from grpokit.arguments import ArgumentError
    from grpokit.trainer import GRPOTrainer

    classifier = AutoModelForSequenceClassification.from_pretrained(model, num_labels=1)
    with pytest.raises(ArgumentError, match=r"`model` is a LlamaForSequenceClassification, which has no language-"):
        GRPOTrainer(config(model, tmp_path / "run"), model=classifier)
    frozen = AutoModelForCausalLM.from_pretrained(model).requires_grad_(False)
    with pytest.raises(ArgumentError, match=r"`model` \(LlamaForCausalLM\) has no parameter that requires grad"):
        GRPOTrainer(config(model, tmp_path / "run"), model=frozen)
    from grpokit.config import LoRAConfig

    lora = GRPOTrainer(config(model, tmp_path / "run", lora=LoRAConfig(r=2, alpha=4.0)), model=frozen)  # adapters
    assert any(p.requires_grad for p in lora.policy.model.parameters())


class FailingEngine:
    """A sampler whose engine dies when the weights are pushed after the first update."""

    def __init__(self, inner):
        self.inner, self.pushes = inner, 0

    def update_weights(self, model):
        self.pushes += 1
        if self.pushes > 1:
            raise RuntimeError("engine crashed")
        self.inner.update_weights(model)

    def generate(self, *args, **kwargs):
        return self.inner.generate(*args, **kwargs)


def test_a_sampler_whose_update_weights_fails_is_named(model, tmp_path):
    from helpers import RecordingSampler

    from grpokit.sampler import SamplerError
    from grpokit.trainer import GRPOTrainer

    trainer = GRPOTrainer(config(model, tmp_path / "run", max_steps=2), sampler=FailingEngine(RecordingSampler()))
    with pytest.raises(SamplerError, match=r"`sampler` \(FailingEngine\)\.update_weights raised RuntimeError: engine"):
        trainer.train()


# ---------------------------------------------------------------- data and paths


def test_reward_model_pairs_with_a_blank_chosen_are_said_and_an_unused_margin_column_refused(model, tmp_path):
    from grpokit.config import RewardModelConfig
    from grpokit.data import DataError, InputWarning
    from grpokit.reward_model import train_reward_model

    cfg = RewardModelConfig(model=str(model), output_dir=str(tmp_path / "rm"), task=None, max_steps=1, progress=False)
    pairs = [{"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": "x"} for i in range(4)]
    blank = [pairs[0], {**pairs[1], "chosen": " "}, *pairs[2:]]
    with pytest.raises(DataError, match=r"has a `margin` column, which TRL's RewardTrainer subtracts in its loss"):
        train_reward_model(cfg, train_pairs=[{**p, "margin": 5.0} for p in pairs])
    assert not (tmp_path / "rm").exists()
    with pytest.warns(InputWarning, match=r"1 of 4 pairs have a blank 'chosen' completion \(first: row 1\)"):
        train_reward_model(cfg, train_pairs=blank)


def test_a_csv_column_named_twice_is_refused(tmp_path):
    from grpokit.data import DataError, load_rows

    data = tmp_path / "dup.csv"
    data.write_text("prompt,answer,answer\n1+1=,2,x\n")
    with pytest.raises(DataError, match=r"dup\.csv has the column 'answer' twice: rename one"):
        load_rows(str(data), field="train_data")


@pytest.mark.parametrize("field", ["model", "eval_data", "reward_funcs"])
def test_a_path_starting_with_a_tilde_in_yaml_is_refused_naming_the_field(model, tmp_path, capsys, field):
    """`model: ~/tiny` in a YAML file read as a folder named `~`: "does not exist", with no field named."""
    import yaml

    values = {"model": str(model), "task": "addition", "output_dir": str(tmp_path / "out"), field: "~/somewhere"}
    if field == "reward_funcs":
        values[field] = ["accuracy", "~/rm"]
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(values))
    rc, err = cli(capsys, "train", path)
    where = "reward_funcs[1]" if field == "reward_funcs" else field
    assert rc == 2 and f"config field `{where}` is '~/" in err and "`~` is not expanded here" in err, err


# ---------------------------------------------------------------- run folders


@pytest.fixture(scope="module")
def two_step_run(model, tmp_path_factory):
    """A two-step run with checkpoint-1, checkpoint-2 and its model, made once; tests copy it."""
    from grpokit.cli import main

    out = tmp_path_factory.mktemp("run") / "r"
    assert main(["train", *tiny_run_args(str(model), str(out), "--max-steps", "2", "--save-every", "1")]) == 0
    return out


def test_a_renamed_copy_of_a_checkpoint_is_neither_resumed_nor_pruned(two_step_run, model, tmp_path, capsys):
    """A backup of checkpoint-1 named checkpoint-100: `latest` took it as step 100 ("past max_steps")."""
    import shutil

    out = shutil.copytree(two_step_run, tmp_path / "r")
    shutil.copytree(out / "checkpoint-1", out / "checkpoint-100")
    with pytest.warns(UserWarning, match=r"checkpoint-100 in .* records another step in its checkpoint_complete"):
        rc, err = cli(capsys, "train", *tiny_run_args(model, out, "--max-steps", "3", "--save-every", "1",
                                                       "--resume-from-checkpoint", "latest"))  # fmt: skip
    assert rc == 0, err
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-100", "checkpoint-2", "checkpoint-3"]
    rc, err = cli(capsys, "train", *tiny_run_args(model, out, "--max-steps", "4",
                                                   "--resume-from-checkpoint", out / "checkpoint-100"))  # fmt: skip
    assert rc == 2 and "checkpoint_complete.json records step 1, not the step its name says" in err, err


def test_a_protected_file_is_named_not_its_writable_folder(two_step_run, model, tmp_path, capsys):
    import shutil
    import subprocess

    out = shutil.copytree(two_step_run, tmp_path / "r")
    if subprocess.run(["chattr", "+a", str(out / "metrics.jsonl")], capture_output=True).returncode != 0:
        pytest.skip("chattr +a is not allowed here")
    try:
        rc, err = cli(capsys, "train", *tiny_run_args(model, out, "--max-steps", "3",
                                                       "--resume-from-checkpoint", "latest"))  # fmt: skip
    finally:
        subprocess.run(["chattr", "-a", str(out / "metrics.jsonl")], check=True)
    assert rc == 2 and f"could not write {out / 'metrics.jsonl'}: operation not permitted" in err, err


def test_trl_save_model_replaces_only_what_this_trainer_saved(two_step_run, model, tmp_path):
    """save_model("runA/model") replaced another run's trained model (and a reward model, a tokenizer's folder)."""
    import shutil

    from grpokit.checkpoint import OutputExistsError
    from grpokit.trl import GRPOConfig, GRPOTrainer

    other = shutil.copytree(two_step_run, tmp_path / "other")
    before = (other / "model" / "model.safetensors").read_bytes()
    args = GRPOConfig(output_dir=str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=4,
                      num_generations=2, max_completion_length=4, use_cpu=True, report_to="none",
                      save_strategy="no")  # fmt: skip
    trainer = GRPOTrainer(str(model), "accuracy", args=args,
                          train_dataset=[{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(8)])  # fmt: skip
    trainer.train()
    with pytest.raises(OutputExistsError, match=r"holds a model folder grpokit wrote for something else"):
        trainer.save_model(str(other / "model"))
    assert (other / "model" / "model.safetensors").read_bytes() == before
    mine = trainer.save_model(str(tmp_path / "export"))
    assert trainer.save_model(str(tmp_path / "export")) == mine  # its own save, saved again as TRL scripts do


def test_trl_train_resume_false_starts_fresh_whatever_the_args_say(model, tmp_path):
    """args.resume_from_checkpoint=True and train(resume_from_checkpoint=False): the call's False was ignored and the
    run resumed; in TRL the call decides."""
    from grpokit.checkpoint import RunDirectoryError
    from grpokit.trl import GRPOConfig, GRPOTrainer

    def fields(**changes):
        base = {"output_dir": str(tmp_path / "r"), "max_steps": 1, "per_device_train_batch_size": 4,
                "num_generations": 2, "max_completion_length": 4, "use_cpu": True, "report_to": "none",
                "save_steps": 1}  # fmt: skip
        return {**base, **changes}

    rows = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(8)]
    GRPOTrainer(str(model), "accuracy", args=GRPOConfig(**fields()), train_dataset=rows).train()
    args = GRPOConfig(**fields(max_steps=2, resume_from_checkpoint=True))
    trainer = GRPOTrainer(str(model), "accuracy", args=args, train_dataset=rows)
    with pytest.raises(RunDirectoryError, match=r"holds an earlier run .*: continue it with trainer\.train\(resume_"):
        trainer.train(resume_from_checkpoint=False)  # a fresh run, as TRL reads False: refused over a run
    assert trainer.train().global_step == 2  # None: what the args ask, a resume


def test_a_critic_sharing_the_policys_weights_is_refused(model, tmp_path):
    from transformers import AutoModelForCausalLM

    from grpokit.arguments import ArgumentError
    from grpokit.config import PPOConfig
    from grpokit.critic import ValueModel
    from grpokit.ppo import PPOTrainer

    policy = AutoModelForCausalLM.from_pretrained(model)
    cfg = PPOConfig(model=str(model), task="addition", output_dir=str(tmp_path / "ppo"), max_steps=1, progress=False)
    with pytest.raises(ArgumentError, match=r"`critic` shares \d+ weight tensors with the policy"):
        PPOTrainer(cfg, model=policy, critic=ValueModel(policy.get_decoder()))


def test_a_peft_model_with_more_lora_asked_or_a_ppo_config_for_grpo_is_refused(model, tmp_path):
    """A PeftModel plus `lora`: both adapter sets trained and model/ held neither whole; a PPOConfig handed to the
    GRPO trainer trained GRPO while config.yaml recorded the critic's fields."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from grpokit.arguments import ArgumentError
    from grpokit.config import LoRAConfig, PPOConfig
    from grpokit.trainer import GRPOTrainer

    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model), PeftLoraConfig(r=4, target_modules=["q_proj"])
    )
    with pytest.raises(ArgumentError, match=r"`model` is a PeftModel\w* \(it carries LoRA adapters already\)"):
        GRPOTrainer(config(model, tmp_path / "run", lora=LoRAConfig(r=8, alpha=8.0)), model=peft_model)
    ppo = PPOConfig(model=str(model), task="addition", output_dir=str(tmp_path / "run"), vf_coef=0.5)
    with pytest.raises(ArgumentError, match=r"`config` is a PPOConfig, not a GRPOConfig: .* \(PPOTrainer for a PPO"):
        GRPOTrainer(ppo)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", ["train", "sft", "eval"])
def test_an_incomplete_checkpoint_as_the_model_is_refused(two_step_run, model, tmp_path, capsys, command):
    """A checkpoint without its marker (a kill mid-write) loaded as `--model` by train, sft and eval, no word."""
    import shutil

    broken = shutil.copytree(two_step_run / "checkpoint-2", tmp_path / "checkpoint-2")
    (broken / "checkpoint_complete.json").unlink()
    argv = {
        "train": ["train", *tiny_run_args(broken, tmp_path / "out")],
        "sft": ["sft", "--model", broken, "--task", "addition", "--output-dir", tmp_path / "out", "--max-steps", "1"],
        "eval": ["eval", "--model", broken, "--num-eval-prompts", "2"],
    }[command]
    rc, err = cli(capsys, *argv)
    assert rc == 2 and f"config field `model`: {broken} is an incomplete checkpoint" in err, err


def test_a_function_of_yours_named_as_a_built_in_reward_is_recorded_as_yours(model, tmp_path):
    """A script's `accuracy` (a length reward) was recorded as `accuracy`, so a resume with the built-in passed."""
    from grpokit.trainer import GRPOTrainer

    script = {"__name__": "__main__"}  # a function as a script defines it: module __main__, qualname accuracy
    exec("def accuracy(completions, **_):\n    return [float(len(c)) for c in completions]\n", script)
    accuracy = script["accuracy"]
    trainer = GRPOTrainer(config(model, tmp_path / "run"), reward_funcs=[accuracy, "accuracy"])
    assert (
        trainer.cfg.reward_funcs[0] == "__main__:" + accuracy.__qualname__ and trainer.cfg.reward_funcs[1] != "accuracy"
    )


def test_chat_messages_written_as_json_text_in_a_csv_cell_are_said(tmp_path):
    from grpokit.data import scan_prompts
    from grpokit.tasks.tokenizer import build_char_tokenizer

    rows = [{"prompt": json.dumps([{"role": "user", "content": "1+1="}])}, {"prompt": "2+2="}]
    scan = scan_prompts(build_char_tokenizer(), rows, "prompt", 256, "train data")
    assert any("1 of 2 prompts are text that reads as chat messages in JSON (first: row 0" in w for w in scan.warnings)


def test_eval_with_both_a_task_and_eval_data_is_refused(model, tmp_path, capsys):
    """`--task addition --eval-data F` scored F and ignored the task, with no word."""
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(4)))
    rc, err = cli(capsys, "eval", "--model", model, "--task", "addition", "--eval-data", data)
    assert rc == 2 and "config field `task` ('addition') and `eval_data`" in err and "give one" in err, err


def test_trl_max_steps_rounded_up_to_whole_generation_steps_is_said(model, tmp_path):
    from grpokit.data import InputWarning
    from grpokit.trl import GRPOConfig

    args = GRPOConfig(output_dir=str(tmp_path / "r"), max_steps=3, num_iterations=2, per_device_train_batch_size=4,
                      num_generations=2)  # fmt: skip
    with pytest.warns(InputWarning, match=r"`max_steps` = 3 optimizer steps is not a whole number of generation steps "
                                          r"\(2 optimizer steps each.*grpokit runs 2, 4 optimizer steps"):  # fmt: skip
        assert args.to_grpokit().max_steps == 2


def test_a_peft_model_copying_a_tied_module_is_refused_before_training(model, tmp_path):
    """modules_to_save=["lm_head"] over tied embeddings: both steps trained, then the final save failed."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from grpokit.arguments import ArgumentError
    from grpokit.trainer import GRPOTrainer

    base = AutoModelForCausalLM.from_pretrained(model)
    if not base.config.tie_word_embeddings:
        pytest.skip("the tiny model's embeddings are not tied")
    lora = PeftLoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    with pytest.raises(ArgumentError, match=r"modules_to_save \(lm_head\) copy a module of a model with tied"):
        GRPOTrainer(config(model, tmp_path / "run"), model=get_peft_model(base, lora))


def test_the_demo_replaces_only_its_own_earlier_runs(tmp_path, capsys):
    """Runs of your own in D/sft and D/grpo were replaced by `grpokit demo --output-dir D`, no flag asked."""
    mine = tmp_path / "d" / "sft"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("my run")
    rc, err = cli(capsys, "demo", "--output-dir", tmp_path / "d", "--sft-steps", "1", "--grpo-steps", "1")
    assert rc == 2 and "holds sft, not what a grpokit demo wrote there" in err, err
    assert (mine / "notes.txt").read_text() == "my run"


def test_a_gold_reward_that_scores_nothing_is_said():
    """`gold/mean` null every step, and no word: the hacking monitor watched nothing."""
    from grpokit.monitor import SignalMonitor

    monitor = SignalMonitor()
    warned = monitor.update(1, {"reward": 1.0, "gold/mean": float("nan")}, group_size=2)
    assert any("the gold_reward returned None for every sample" in w for w in warned)
    assert not SignalMonitor().update(1, {"reward": 1.0, "gold/mean": 0.5}, group_size=2)


def test_a_comparison_worker_that_ends_with_status_0_and_no_report_is_said():
    from grpokit.compare import ComparisonFailed

    failed = ComparisonFailed("grpo", 0)
    assert failed.exit_code == 1 and "ended (exit status 0) without writing its report" in str(failed)


def test_a_checkpoint_from_a_copy_of_the_run_is_not_continued_with_a_gap(two_step_run, model, tmp_path, capsys):
    """Two copies share a run id; a later checkpoint of one, copied into the other, was continued: its record read
    steps 1, 2, 5, 6."""
    import shutil

    x1, x2 = shutil.copytree(two_step_run, tmp_path / "x1"), shutil.copytree(two_step_run, tmp_path / "x2")
    rc, err = cli(capsys, "train", *tiny_run_args(model, x1, "--max-steps", "3", "--save-every", "1",
                                                   "--resume-from-checkpoint", "latest"))  # fmt: skip
    assert rc == 0, err
    shutil.copytree(x1 / "checkpoint-3", x2 / "checkpoint-3")
    rc, err = cli(capsys, "train", *tiny_run_args(model, x2, "--max-steps", "4", "--save-every", "1",
                                                   "--resume-from-checkpoint", "latest"))  # fmt: skip
    assert rc == 2 and "metrics.jsonl stops at step 2, before the checkpoint's step 3" in err, err


def test_eval_every_with_no_held_out_row_names_num_eval_prompts(model, tmp_path, capsys):
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(4)))
    rc, err = cli(capsys, "train", *tiny_run_args(model, tmp_path / "out", "--eval-data", data, "--eval-every", "1",
                                                   "--num-eval-prompts", "0"))  # fmt: skip
    assert rc == 2 and "`eval_every` is 1, but num_eval_prompts is 0" in err, err


def test_a_module_shadowing_the_standard_library_is_named_at_start(tmp_path):
    """`calendar.py` in a folder on PYTHONPATH (as the README's `module:function` rewards suggest): a traceback
    from inside huggingface_hub's import."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "calendar.py").write_text("def score(completions, **kw):\n    return [0.0] * len(completions)\n")
    src = str(Path(__file__).parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{tmp_path}"}
    proc = subprocess.run([sys.executable, "-m", "grpokit.cli", "train", "--model", "m"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert f"{tmp_path / 'calendar.py'} shadows the standard library module 'calendar'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_numbers_that_cannot_train_in_sft_name_the_step_and_what_was_kept(model, tmp_path, capsys):
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "completion": str(i + 1)}) + "\n" for i in range(4)))
    with pytest.warns(UserWarning, match=r"`learning_rate` is 1e\+30: an AdamW step moves each weight"):
        rc, err = cli(capsys, "sft", "--model", model, "--train-data", data, "--output-dir", tmp_path / "out",
                      "--max-steps", "3", "--batch-size", "2", "--learning-rate", "1e30", "--weight-decay", "0",
                      "--warmup-steps", "0", "--no-progress")  # fmt: skip
    assert rc == 3 and re.search(
        r"stopped: step \d \(learning rate [\d.]+e\+\d+\): .*nothing of this step was saved", err
    )


def test_eval_task_digits_with_eval_data_and_chat_prompts_without_a_user_turn_are_said(model, tmp_path, capsys):
    from grpokit.data import scan_prompts
    from grpokit.tasks.tokenizer import build_char_tokenizer

    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(4)))
    rc, err = cli(capsys, "eval", "--model", model, "--eval-data", data, "--task-num-digits", "3")
    assert rc == 2 and "config field `task_num_digits` is 3, but it shapes the built-in task's rows" in err, err
    rows = [{"prompt": [{"role": "system", "content": "add"}]}, {"prompt": [{"role": "user", "content": "1+1="}]}]
    scan = scan_prompts(build_char_tokenizer(), rows, "prompt", 256, "train data")
    assert any("1 of 2 chat prompts have no user message (first: row 0)" in w for w in scan.warnings)


@pytest.mark.parametrize("what", ["folder", "lock"])
def test_a_run_whose_folder_or_lock_goes_away_stops_by_name(model, tmp_path, what):
    """The output folder deleted mid-run: a raw errno and a TensorBoard thread's traceback. Its `.lock` deleted: a
    second run wrote into the same folder (metrics.jsonl read steps [117, 1, 2])."""
    import shutil

    from grpokit.checkpoint import RunDirectoryError
    from grpokit.trainer import GRPOTrainer

    out = tmp_path / "run"
    calls = []

    def meddles(completions, **_):
        calls.append(1)
        if len(calls) == 2:  # during step 2
            shutil.rmtree(out) if what == "folder" else (out / ".lock").unlink()
        return [float(len(c)) for c in completions]

    trainer = GRPOTrainer(config(model, out, max_steps=3, tensorboard=True), reward_funcs=[meddles])
    expected = (
        "was deleted or moved while the run was writing it" if what == "folder" else "this run's lock, was deleted"
    )
    with pytest.raises(RunDirectoryError, match=expected):
        trainer.train()
    assert len(calls) == 2


def test_model_destinations_of_init_are_checked_like_run_folders(two_step_run, tmp_path, capsys, monkeypatch):
    """init wrote inside a run's checkpoint, made a folder named `~`, and renamed its model over the working
    folder (`--output-dir .` / `''`)."""
    monkeypatch.chdir(tmp_path)
    for target, said in [
        (two_step_run / "checkpoint-1" / "sub", "lies inside"),
        ("~/m", "`~` is not expanded here"),
        (".", "the working folder"),
        ("", "give the folder to write"),
    ]:
        rc, err = cli(capsys, "init", "--output-dir", target)
        assert rc == 2 and said in err, (target, err)
    assert not (two_step_run / "checkpoint-1" / "sub").exists() and not (tmp_path / "~").exists()


def test_pruning_keeps_a_checkpoint_a_link_points_to_and_never_takes_a_copy_named_checkpoint_01(
    two_step_run, model, tmp_path, capsys
):
    import shutil

    out = shutil.copytree(two_step_run, tmp_path / "r", symlinks=True)
    (out / "checkpoint-best").symlink_to("checkpoint-1")
    shutil.copytree(out / "checkpoint-2", out / "checkpoint-02")
    with pytest.warns(UserWarning, match=r"checkpoint-1 is kept past save_total_limit: a link in .* points to it"):
        args = [
            "--max-steps",
            "4",
            "--save-every",
            "1",
            "--save-total-limit",
            "1",
            "--resume-from-checkpoint",
            "latest",
        ]
        rc, err = cli(capsys, "train", *tiny_run_args(model, out, *args))
    assert rc == 0, err
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [
        "checkpoint-02",
        "checkpoint-1",
        "checkpoint-4",
        "checkpoint-best",
    ]
    assert (out / "checkpoint-best").resolve() == (out / "checkpoint-1").resolve()


def test_a_final_model_that_failed_to_write_is_written_by_the_resume_it_prints(two_step_run, model, tmp_path, capsys):
    """The resume printed after a refused final save was refused as "a finished run" (model/ was step 2's)."""
    import shutil
    import subprocess

    out = shutil.copytree(two_step_run, tmp_path / "r")
    if subprocess.run(["chattr", "+i", str(out / "model")], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not allowed here")
    try:
        args = tiny_run_args(model, out, "--max-steps", "3", "--save-every", "1", "--resume-from-checkpoint", "latest")
        rc, err = cli(capsys, "train", *args)
    finally:
        subprocess.run(["chattr", "-i", str(out / "model")], check=True)
    assert rc == 2 and "the final model was not written" in err, err
    rc, err = cli(capsys, "train", *args)
    assert rc == 0, err
    assert (out / "model" / ".grpokit.json").stat().st_mtime >= (out / "checkpoint-3").stat().st_mtime


# ---------------------------------------------------------------- the verification round's findings


def test_a_reward_that_closes_a_file_descriptor_or_switches_off_grad_is_named_or_undone(capfd):
    """`os.close(1)` ended in tqdm's EBADF traceback; `torch.set_grad_enabled(False)` in the backward's."""
    import os

    import torch

    from grpokit.rewards import RewardError, RewardWarning

    def no_grad(completions, **_):
        torch.set_grad_enabled(False)
        return [1.0] * len(completions)

    with pytest.warns(RewardWarning, match=r"`no_grad` changed torch's grad mode; grpokit set it back"):
        _score(no_grad)
    assert torch.is_grad_enabled()

    def closes_fd(completions, **_):
        os.close(1)
        return [1.0] * len(completions)

    with pytest.raises(RewardError, match=r"reward function `closes_fd` closed file descriptor 1 \(stdout\)"):
        _score(closes_fd)
    os.fstat(1)  # open again
    print("still writes")
    assert "still writes" in capfd.readouterr().out


def test_verification_round_api_cases(model, tmp_path):
    """A reward-model object in a (name, model) pair; TrainResult unpacked as TRL's TrainOutput; the task beside
    train_pairs said; a frozen model with `lora` as a dict names the dict, not the frozen model."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from grpokit.arguments import ArgumentError
    from grpokit.config import ConfigError, RewardModelConfig
    from grpokit.data import InputWarning
    from grpokit.reward_model import train_reward_model
    from grpokit.trainer import GRPOTrainer
    from grpokit.types import TrainResult

    scorer = AutoModelForSequenceClassification.from_pretrained(model, num_labels=1)
    with pytest.raises(ArgumentError, match=r"`reward_funcs\[0\]` = \('rm', a LlamaForSequenceClassification model"):
        GRPOTrainer(config(model, tmp_path / "run"), reward_funcs=[("rm", scorer)])
    result = TrainResult(tmp_path, tmp_path, None, {}, [], [], [], {}, 3, 0.25)
    global_step, training_loss, metrics = result
    assert (global_step, training_loss, metrics) == (3, 0.25, {"train_loss": 0.25, "global_step": 3})
    pairs = [{"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": "x"} for i in range(4)]
    cfg = RewardModelConfig(model=str(model), output_dir=str(tmp_path / "rm"), task="addition", max_steps=1,
                            num_eval_pairs=4, progress=False)  # fmt: skip
    with pytest.warns(InputWarning, match=r"`train_pairs` passed in: these are the training pairs; the config's task"):
        train_reward_model(cfg, train_pairs=pairs)
    frozen = AutoModelForCausalLM.from_pretrained(model).requires_grad_(False)
    with pytest.raises(ConfigError, match=r"lora"):
        GRPOTrainer(config(model, tmp_path / "run3", lora={"r": 4, "alpha": 8.0}), model=frozen)


def test_trl_save_model_may_replace_a_save_of_the_same_run_only(model, tmp_path):
    """A run's own `save_model("final")`, saved again after a resume, was refused as another run's model; a save of
    an earlier run that a new one replaced in the same output_dir (overwrite_output_dir) is another run's."""
    from grpokit.checkpoint import OutputExistsError
    from grpokit.trl import GRPOConfig, GRPOTrainer

    rows = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(8)]

    def trainer(**changes):
        args = {"output_dir": str(tmp_path / "r"), "max_steps": 1, "per_device_train_batch_size": 4,
                "num_generations": 2, "max_completion_length": 4, "use_cpu": True, "report_to": "none",
                "save_steps": 1, **changes}  # fmt: skip
        return GRPOTrainer(str(model), "accuracy", args=GRPOConfig(**args), train_dataset=rows)

    first = trainer()
    first.train()
    saved = first.save_model(str(tmp_path / "final"))
    resumed = trainer(max_steps=2)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.save_model(str(tmp_path / "final")) == saved
    replaced = trainer(overwrite_output_dir=True)
    replaced.train()
    with pytest.raises(OutputExistsError, match=r"also an earlier run replaced in this output_dir"):
        replaced.save_model(str(tmp_path / "final"))


def test_a_model_folder_named_with_a_leading_tilde_trains(model, tmp_path, capsys, monkeypatch):
    """`~tiny` that exists is a folder's name (no user called tiny): it crashed in the run's fingerprints."""
    import shutil

    monkeypatch.chdir(tmp_path)
    shutil.copytree(model, tmp_path / "~tiny")
    rc, err = cli(capsys, "train", *tiny_run_args("~tiny", tmp_path / "out"))
    assert rc == 0, err


def test_final_round_cases(model, tmp_path):
    """A sampler whose generate raises is named (with the step); TrainResult reads as TRL's TrainOutput tuple; a
    reward model's task beside both pair sets is said."""
    import dataclasses

    from helpers import RecordingSampler

    from grpokit.config import RewardModelConfig
    from grpokit.data import InputWarning
    from grpokit.reward_model import train_reward_model
    from grpokit.sampler import SamplerError
    from grpokit.trainer import GRPOTrainer
    from grpokit.types import TrainResult

    class DiesAtStep2(RecordingSampler):
        def generate(self, *args, **kwargs):
            if len(self.rollouts) == 1:
                raise RuntimeError("engine died")
            return super().generate(*args, **kwargs)

    trainer = GRPOTrainer(config(model, tmp_path / "run", max_steps=3, save_every=1), sampler=DiesAtStep2())
    stop = r"step 2 .*`sampler` \(DiesAtStep2\)\.generate raised RuntimeError: engine died; nothing of this step"
    with pytest.raises(SamplerError, match=stop):
        trainer.train()
    result = TrainResult(tmp_path, tmp_path, None, {}, [], [], [], {}, 3, 0.25)
    assert result[0] == 3 and len(result) == 3 and result._asdict()["training_loss"] == 0.25
    assert dataclasses.is_dataclass(result)
    pairs = [{"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": "x"} for i in range(4)]
    cfg = RewardModelConfig(model=str(model), output_dir=str(tmp_path / "rm"), task="addition", max_steps=1,
                            progress=False)  # fmt: skip
    with pytest.warns(InputWarning, match=r"gives nothing \(both pair sets were passed in\): leave it out"):
        train_reward_model(cfg, train_pairs=pairs, eval_pairs=pairs)


def test_a_link_to_a_file_inside_a_checkpoint_protects_it(two_step_run, model, tmp_path, capsys):
    import shutil

    out = shutil.copytree(two_step_run, tmp_path / "r", symlinks=True)
    (out / "marks").mkdir()
    (out / "marks" / "w1.safetensors").symlink_to("../checkpoint-1/model.safetensors")
    args = ["--max-steps", "4", "--save-every", "1", "--save-total-limit", "1", "--resume-from-checkpoint", "latest"]
    with pytest.warns(UserWarning, match=r"checkpoint-1 is kept past save_total_limit: a link"):
        rc, err = cli(capsys, "train", *tiny_run_args(model, out, *args))
    assert rc == 0 and (out / "marks" / "w1.safetensors").resolve().is_file(), err
