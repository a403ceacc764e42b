"""The transformers.Trainer face of `grpokit.trl.GRPOTrainer`, written as TRL's documentation writes its examples:
`callbacks=` (transformers' TrainerCallback events, a callback that stops training), `trainer.state` with its
log_history, `train()`'s TrainOutput in TRL's unit (optimizer steps), `evaluate()`, `push_to_hub()` offline, and the
callback list's add / pop / remove."""

from __future__ import annotations

import pytest
from datasets import Dataset
from helpers import save_tiny, step_rows
from transformers import PrinterCallback, TrainerCallback

from grpokit.runtime.checkpoint import list_checkpoints
from grpokit.trl import GRPOConfig, GRPOTrainer


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return str(save_tiny(tmp_path_factory.mktemp("tiny") / "llama", "llama"))


TRAIN = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(4) for b in range(2)]  # 8 prompts


def reward_len(completions, **kwargs):
    return [-abs(20 - len(completion)) for completion in completions]


def small(output_dir, **fields) -> GRPOConfig:
    """TRL's fields at a tiny model's scale: 4 completions per step (2 prompts x 2), 4 tokens each."""
    values = {"output_dir": str(output_dir), "per_device_train_batch_size": 4, "num_generations": 2,
              "max_completion_length": 4, "max_steps": 2, "report_to": "none", "disable_tqdm": True}  # fmt: skip
    return GRPOConfig(**{**values, **fields})


def test_trl_quick_start_with_a_local_model_returns_train_output_in_optimizer_steps(model_path, tmp_path):
    """TRL's quick start (local model folder, a Dataset, a reward function). With num_iterations=2 each generation
    step takes 2 optimizer steps: TRL's max_steps=4 is 2 generation steps, and train() / state count 4, as TRL does
    (train() used to answer grpokit's 2)."""
    dataset = Dataset.from_list(TRAIN)
    training_args = small(tmp_path / "Qwen2-GRPO", max_steps=4, num_iterations=2, logging_steps=1)
    trainer = GRPOTrainer(model=model_path, reward_funcs=reward_len, args=training_args, train_dataset=dataset)
    result = trainer.train()

    global_step, training_loss, metrics = result  # TRL's TrainOutput is a named tuple
    assert global_step == 4 and metrics["global_step"] == 4 and trainer.state.global_step == 4
    assert trainer.state.max_steps == 4
    assert training_loss == pytest.approx(sum(r["loss"] for r in step_rows(tmp_path / "Qwen2-GRPO")) / 2)
    history = trainer.state.log_history
    assert [row["step"] for row in history] == [2, 4]  # one row per generation step, in optimizer steps
    assert [row["epoch"] for row in history] == [0.25, 0.5]  # 2 of the 8 prompts per step
    assert all(row["rewards/reward_len/mean"] <= 0 and "loss" in row for row in history)


class StopAfterTwoSteps(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 2:
            control.should_training_stop = True


class Recorder(TrainerCallback):
    """Each event with what a callback reads there."""

    def __init__(self):
        self.events = []
        self.args = []

    def on_init_end(self, args, state, control, **kwargs):
        self.events.append(("init_end", state.global_step))

    def on_train_begin(self, args, state, control, **kwargs):
        self.events.append(("train_begin", state.global_step, state.max_steps))

    def on_step_begin(self, args, state, control, **kwargs):
        self.events.append(("step_begin", state.global_step))

    def on_step_end(self, args, state, control, **kwargs):
        self.events.append(("step_end", state.global_step, sorted(k for k, v in kwargs.items() if v is not None)))
        if state.global_step == 1:
            control.should_save = True  # a checkpoint save_strategy="no" would not write

    def on_log(self, args, state, control, logs=None, **kwargs):
        kind = "eval" if "eval_reward_greedy" in logs else "train" if "loss" in logs else "other"
        self.events.append(("log", state.global_step, kind))

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.events.append(("evaluate", state.global_step, sorted(metrics)[:2]))

    def on_save(self, args, state, control, **kwargs):
        complete = [f"checkpoint-{step}" for step, _ in list_checkpoints(args.output_dir)]  # (grpokit's own check)
        self.events.append(("save", state.global_step, complete))

    def on_train_end(self, args, state, control, **kwargs):
        self.events.append(("train_end", state.global_step))
        self.args.append(args)


def test_a_callback_that_stops_training_ends_the_run_cleanly_after_that_step(model_path, tmp_path):
    out = tmp_path / "stopped"
    trainer = GRPOTrainer(
        model=model_path, reward_funcs=reward_len, args=small(out, max_steps=5, save_strategy="no"),
        train_dataset=TRAIN, callbacks=[StopAfterTwoSteps()],
    )  # fmt: skip
    result = trainer.train()
    assert trainer.state.global_step == 2 and result.global_step == 2
    assert [row["step"] for row in step_rows(out)] == [1, 2]
    assert (out / "checkpoint-2").is_dir() and (out / "model" / "config.json").is_file()  # as a last step leaves
    assert result.model_dir == out / "model" and trainer.state.log_history[-1]["step"] == 2


def test_callbacks_get_transformers_events_in_order_with_rows_metrics_and_checkpoints(model_path, tmp_path):
    args = small(tmp_path / "events", save_strategy="no")
    recorder = Recorder()
    trainer = GRPOTrainer(model=model_path, reward_funcs=reward_len, args=args, train_dataset=TRAIN,
                          eval_dataset=TRAIN[:2], callbacks=[recorder])  # fmt: skip
    trainer.train()
    ev = recorder.events
    assert ev[:2] == [("init_end", 0), ("train_begin", 0, 2)]
    eval_keys = ["eval_accuracy_greedy", "eval_accuracy_sampled"]
    assert ev[2:4] == [("log", 0, "eval"), ("evaluate", 0, eval_keys)]  # the starting model's evaluation
    given = ["lr_scheduler", "model", "optimizer", "processing_class"]  # the keywords transformers passes
    assert ev[4:8] == [("step_begin", 0), ("step_end", 1, given), ("log", 1, "train"), ("save", 1, ["checkpoint-1"])]
    assert ev[8:11] == [("step_begin", 1), ("step_end", 2, given), ("log", 2, "train")]
    assert ev[11] == ("save", 2, ["checkpoint-1", "checkpoint-2"])  # complete on disk when told
    assert ev[12:] == [("log", 2, "eval"), ("evaluate", 2, eval_keys), ("train_end", 2)]
    assert recorder.args == [args]  # the args the script passed
    history = trainer.state.log_history
    assert [(row["step"], "eval_reward_greedy" in row) for row in history] == [(0, True), (1, False), (2, False),
                                                                              (2, True)]  # fmt: skip


def test_evaluate_returns_eval_keys_and_without_an_eval_dataset_says_so(model_path, tmp_path):
    trainer = GRPOTrainer(model=model_path, reward_funcs=reward_len, args=small(tmp_path / "e"), train_dataset=TRAIN,
                          eval_dataset=TRAIN[:2])  # fmt: skip
    metrics = trainer.evaluate()
    assert {"eval_accuracy_greedy", "eval_reward_greedy", "eval_rewards/reward_len/mean_greedy"} <= metrics.keys()
    assert all(key.startswith("eval_") for key in metrics)
    assert trainer.state.log_history == [{**metrics, "epoch": 0.0, "step": 0}]
    no_eval = GRPOTrainer(model=model_path, reward_funcs=reward_len, args=small(tmp_path / "n"), train_dataset=TRAIN)
    with pytest.raises(ValueError, match=r"evaluation needs an eval_dataset, and the trainer has none"):
        no_eval.evaluate()


def test_push_to_hub_is_an_offline_error_naming_the_model_folder_and_how_to_push(model_path, tmp_path):
    trainer = GRPOTrainer(model=model_path, reward_funcs=reward_len, args=small(tmp_path / "p"), train_dataset=TRAIN)
    with pytest.raises(RuntimeError, match=r"does not upload: grpokit makes no network calls") as refused:
        trainer.push_to_hub()
    assert f"train() saves the model to {tmp_path / 'p' / 'model'}" in str(refused.value)
    assert "huggingface_hub.upload_folder(repo_id='YOUR_NAME/p'" in str(refused.value)
    assert trainer.is_world_process_zero() and trainer.model is trainer.trainer.policy.model
    assert trainer.processing_class is trainer.trainer.tokenizer


def test_callback_list_adds_pops_and_removes_as_transformers_and_names_a_callback_that_raises(model_path, tmp_path):
    from grpokit.stages.callbacks import CallbackError

    class Broken(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            raise KeyError("reward_std")

    with pytest.raises(TypeError, match=r"`callbacks` is a Broken; it takes a list of transformers.TrainerCallback"):
        GRPOTrainer(model=model_path, reward_funcs=reward_len, args=small(tmp_path / "x"), train_dataset=TRAIN,
                    callbacks=Broken())  # fmt: skip
    printer = PrinterCallback()
    trainer = GRPOTrainer(model=model_path, reward_funcs=reward_len, args=small(tmp_path / "c", max_steps=1),
                          train_dataset=TRAIN, callbacks=[printer, Broken])  # fmt: skip
    assert trainer.pop_callback(PrinterCallback) is printer and trainer.pop_callback(PrinterCallback) is None
    trainer.add_callback(printer)
    trainer.remove_callback(printer)
    with pytest.raises(ValueError, match=r"is not among the trainer's callbacks"):
        trainer.remove_callback(printer)
    assert [type(c) for c in trainer.callback_handler.callbacks] == [Broken]
    with pytest.raises(CallbackError, match=r"callback Broken.on_step_end raised KeyError: 'reward_std' \(at "
                                            r"global_step 1\)"):  # fmt: skip
        trainer.train()


def test_a_resumed_run_has_its_earlier_rows_in_log_history(model_path, tmp_path):
    def trainer(max_steps):
        args = small(tmp_path / "r", max_steps=max_steps, save_steps=1)
        return GRPOTrainer(model=model_path, reward_funcs=reward_len, args=args, train_dataset=TRAIN)

    first = trainer(2)
    first.train()
    resumed = trainer(3)
    resumed.train(resume_from_checkpoint=True)
    assert [row["step"] for row in resumed.state.log_history] == [1, 2, 3]
    assert resumed.state.log_history[:2] == first.state.log_history


def test_the_tail_of_trls_own_grpo_script_runs(model_path, tmp_path, capsys):
    """What trl/scripts/grpo.py calls after train(): accelerator.print (once, on the main process), save_model to
    output_dir, hub_model_id, end() (transformers >= 5.18)."""
    args = GRPOConfig(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, num_generations=2, max_completion_length=4,
        max_steps=1, use_cpu=True, report_to="none", save_strategy="no", hub_model_id="me/tiny-grpo",
    )  # fmt: skip
    trainer = GRPOTrainer(model=str(model_path), reward_funcs=lambda completions, **_: [1.0] * len(completions),
                          args=args, train_dataset=[{"prompt": f"{i}+{i}="} for i in range(4)])  # fmt: skip
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    capsys.readouterr()
    trainer.accelerator.print("Training completed.")
    assert capsys.readouterr().out == "Training completed.\n"
    accelerator = trainer.accelerator
    assert (accelerator.is_main_process, accelerator.process_index, accelerator.num_processes) == (True, 0, 1)
    trainer.save_model(args.output_dir)
    assert (tmp_path / "run" / "model" / "config.json").is_file()
    assert trainer.hub_model_id == "me/tiny-grpo"
    trainer.end()


def test_a_run_stopped_on_an_evaluation_step_evaluates_that_step_once(model_path, tmp_path):
    """A callback's stop at step 2 with an evaluation due at every step: the model of step 2 is evaluated once,
    not again as the run's final evaluation."""
    evaluated = []

    class CountEvaluations(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            evaluated.append(state.global_step)

    trainer = GRPOTrainer(
        model=model_path, reward_funcs=reward_len, eval_dataset=TRAIN[:2], train_dataset=TRAIN,
        args=small(tmp_path / "run", max_steps=5, save_strategy="no", eval_strategy="steps", eval_steps=1),
        callbacks=[StopAfterTwoSteps(), CountEvaluations()],
    )  # fmt: skip
    trainer.train()
    assert [row["step"] for row in trainer.trainer.eval_history] == [0, 1, 2]
    assert evaluated == [0, 1, 2]


def test_a_callbacks_evaluation_asked_on_another_rank_runs_on_this_one(model_path, tmp_path, monkeypatch):
    """Held-out evaluation is a collective under torchrun: a callback's should_evaluate is agreed over the ranks
    with the save and stop flags (`Cluster.max`), so an evaluation another rank's callback asks for after step 1
    runs here too (the cluster stands in for that rank's flag)."""
    from grpokit.runtime.distributed import Cluster

    def max_with_another_ranks_evaluation(self, values):
        return {**values, "eval": 1.0} if "eval" in values and trainer.state.global_step == 1 else dict(values)

    monkeypatch.setattr(Cluster, "max", max_with_another_ranks_evaluation)
    trainer = GRPOTrainer(
        model=model_path, reward_funcs=reward_len, eval_dataset=TRAIN[:2], train_dataset=TRAIN,
        args=small(tmp_path / "run", max_steps=2, save_strategy="no", eval_strategy="no"),
    )  # fmt: skip
    trainer.train()
    assert 1 in [row["step"] for row in trainer.trainer.eval_history]
