"""`grpokit demo --tools`: GRPO teaches a tiny model to call a calculator, and the loss mask is why it can.

The task (`data.tasks.tool_arithmetic`): additions of two 5-digit numbers, too long for the tiny model to do in its
head, and a calculator in the tag protocol (`rollout.environments.TagSyntax`): the model writes
`<calc>62345+67890</calc>`, its turn stops there, the environment appends `<result>130235</result>` (inserted
tokens) and the model writes the answer and EOS. The demonstrator of the SFT data calls the calculator in a fraction
`tool_rate` of its rows and guesses (a sum with forgotten carries) in the others; SFT copies both habits, so the SFT
model guesses more often than it calls. GRPO with the gold checker on the final answer (the text after the last
`</result>`) as the only reward then makes it call the calculator on (nearly) every problem.

The control run is the same GRPO run with `mask_inserted_tokens: false`: the calculator's output tokens are trained
on as if the model had written them, each with the advantage of its whole transcript. The table reports what that
does to the tool-call rate, the accuracy and the model's own writing of `<result>` tags.

SFT trains on the demonstrator's turns (`ToolAdditionTask.turn_rows`): a call is two SFT rows, the call after the
problem and the answer after the problem, the call and the calculator's result, so the result is context and never
a target, as the loss mask makes it in the rollouts (an SFT row is prompt and completion text, with no mask inside
the completion: a row per turn is how the result stays out of the loss). `tools_sft_by_turn: false` trains on whole
transcripts instead.
"""

from __future__ import annotations

import copy
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grpokit.config import DemoConfig, GRPOConfig, SFTConfig
from grpokit.core.types import TrainResult
from grpokit.data.tasks import ToolAdditionTask, build_char_tokenizer, tiny_model
from grpokit.data.tasks.tokenizer import DEFAULT_CHARS
from grpokit.data.tasks.tool_arithmetic import CALL_OPEN, RESULT_OPEN
from grpokit.demo import DemoFolder, grpo_config, plot_runs, run_fields
from grpokit.model.loading import resolve_device
from grpokit.rollout.environments import calc, environment_maker
from grpokit.rollout.evaluate import sample_batches
from grpokit.rollout.multiturn import MultiTurnSampler, TurnLimits
from grpokit.rollout.sampler import KVCacheSampler
from grpokit.runtime.checkpoint import seed_everything
from grpokit.runtime.machine import pin_threads
from grpokit.stages.compare import provenance
from grpokit.stages.grpo import GRPOTrainer
from grpokit.stages.sft import train_sft

MAX_TURNS = 2
"""A call, then the answer: the demonstrations' two turns (a second call in the answer's turn ends the row)."""
TOOL_TIMEOUT = 10.0
"""Seconds a calculator call may take (it takes microseconds; the limit is the run's default)."""
WARMUP_STEPS = 5
"""Linear learning-rate warm-up of both GRPO runs: the SFT model's first steps change it most."""
RUNS = {"grpo": ("SFT + GRPO", True), "grpo_unmasked": ("SFT + GRPO, tool output not masked", False)}
"""The two GRPO runs: folder -> (the table's name, mask_inserted_tokens)."""


@dataclass
class ToolsWarmStart:
    """The tools demo's SFT model, with what every later part of the demo reads."""

    task: ToolAdditionTask
    tokenizer: Any
    model: Any
    eval_rows: list[dict[str, str]]
    folder: DemoFolder
    sft_seconds: float


def tools_task(cfg: DemoConfig) -> ToolAdditionTask:
    digits, forget, rate = cfg.tools_num_digits, cfg.tools_forget_carry, cfg.tool_rate
    return ToolAdditionTask(num_digits=digits, forget_carry=forget, tool_rate=rate)


def tools_warm_start(cfg: DemoConfig, out: Path) -> ToolsWarmStart:
    """Tiny model + char tokenizer (with `<`, `>`), fine-tuned on the demonstrator's whole transcripts."""
    start = time.perf_counter()
    seed_everything(cfg.seed)
    pin_threads(cfg.num_threads)
    folder = DemoFolder(out)
    earlier = folder.check()
    if earlier:
        print(f"replacing the earlier demo's runs in {out} ({', '.join(earlier)}); --output-dir DIR keeps them")
    task = tools_task(cfg)
    tokenizer = build_char_tokenizer(DEFAULT_CHARS + task.chars)
    model = tiny_model(tokenizer, cfg.arch, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers, seed=cfg.seed)
    model = model.to(resolve_device(cfg.device))
    problems = task.rows(cfg.sft_examples, split="train", seed=cfg.seed)
    rng = random.Random(cfg.seed)
    if cfg.tools_sft_by_turn:  # one row per model turn: the result is context
        rows = task.turn_rows(problems, rng)
    else:
        rows = [{**row, "completion": task.demonstrate(row, rng)} for row in problems]
    called = sum(row["completion"].startswith(CALL_OPEN) for row in rows) / len(problems)
    print(
        f"grpokit demo --tools: {task.num_digits}-digit addition with a calculator (<calc>A+B</calc>); the "
        f"demonstrator calls it in {called:.0%} of its {len(problems)} problems and guesses in the others; tiny "
        f"{cfg.arch} with {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters"
    )
    sft_cfg = SFTConfig(
        output_dir=str(folder.claim("sft")),
        task=None,  # the rows are the tools task's demonstrations by turn, made above with its tool_rate
        max_steps=cfg.tools_sft_steps,
        learning_rate=cfg.sft_learning_rate,
        max_completion_length=task.max_completion_chars + 1,
        **run_fields(cfg),
    )
    train_sft(sft_cfg, model=model, tokenizer=tokenizer, rows=rows)
    folder.done("sft")
    eval_rows = task.rows(cfg.num_eval_prompts, split="eval", seed=cfg.seed)
    return ToolsWarmStart(task, tokenizer, model, eval_rows, folder, time.perf_counter() - start)


def tools_grpo_config(cfg: DemoConfig, task: ToolAdditionTask, output_dir: Path, *, mask: bool) -> GRPOConfig:
    return grpo_config(
        cfg,
        output_dir,
        task="tool_addition",
        task_num_digits=task.num_digits,
        tools=["calc"],
        tool_format="tags",
        max_turns=MAX_TURNS,
        tool_timeout=TOOL_TIMEOUT,
        mask_inserted_tokens=mask,
        max_steps=cfg.tools_grpo_steps,
        learning_rate=cfg.tools_grpo_learning_rate,
        warmup_steps=WARMUP_STEPS,
        prompts_per_step=cfg.tools_prompts_per_step,
        num_generations=cfg.num_generations,
        max_completion_length=task.max_completion_chars + 1,  # the demonstrator's transcript + EOS
        eval_every=max(1, cfg.tools_grpo_steps // 4),
    )  # (the demo's reward, accuracy: the task's gold checker, here on the final answer; its held-out evaluation)


def tool_figures(model: Any, task: ToolAdditionTask, tokenizer: Any, rows: list[dict[str, str]], *, seed: int) -> (
    dict[str, float]
):  # fmt: skip
    """Held-out figures of `model` with the calculator, greedy and sampled at T = 1 (each row seeded by its place):
    `calls_MODE` (rows with a call), `accuracy_MODE` (the gold checker on the final answer), `cut_MODE` (rows that
    reached max_completion_length without EOS), `imitated_MODE` (rows where the model wrote a `<result>` tag
    itself)."""
    make = environment_maker([calc], None, tool_format="tags", timeout=TOOL_TIMEOUT)
    limits = TurnLimits(max_turns=MAX_TURNS, step_timeout=TOOL_TIMEOUT)
    sampler = MultiTurnSampler(KVCacheSampler(tokenizer), tokenizer, make, limits)
    sampler.update_weights(model)
    out: dict[str, float] = {}
    for mode, temperature in (("greedy", 0.0), ("sampled", 1.0)):
        texts, calls, cut, imitated = [], [], [], []
        for _, _, rollout, batch_texts in sample_batches(
            sampler, tokenizer, [r["prompt"] for r in rows], temperature=temperature,
            max_new_tokens=task.max_completion_chars + 1, seed=seed, rows=rows,
        ):  # fmt: skip
            texts += batch_texts
            calls += [bool(e.tool_calls) for e in rollout.episodes]
            cut += rollout.truncated.tolist()
            imitated += [any(k == "model" and RESULT_OPEN in text for k, text in e.pieces) for e in rollout.episodes]
        out[f"calls_{mode}"] = sum(calls) / len(rows)
        out[f"accuracy_{mode}"] = sum(task.is_correct(t, r["answer"]) for t, r in zip(texts, rows)) / len(rows)
        out[f"cut_{mode}"] = sum(cut) / len(rows)
        out[f"imitated_{mode}"] = sum(imitated) / len(rows)
    return out


def run_tools_demo(cfg: DemoConfig, warm: ToolsWarmStart | None = None) -> dict[str, dict[str, float]]:
    """SFT on the demonstrator (or the warm start `warm`, made by `tools_warm_start` for this folder), GRPO with the
    tool output masked, the unmasked control; the held-out table, printed and written to OUT/tools_table.json."""
    start = time.perf_counter()
    out = Path(cfg.output_dir)
    if warm is None:
        warm = tools_warm_start(cfg, out)
    elif warm.folder.out.resolve() != out.resolve():
        raise ValueError(f"the warm start given was made in {warm.folder.out}, not in this demo's {out}")
    task, rows = warm.task, warm.eval_rows
    demo_rng = random.Random(cfg.seed)
    demonstrations = [task.demonstrate(r, demo_rng) for r in rows]
    teacher = {
        "calls": sum(d.startswith("<") for d in demonstrations) / len(rows),
        "accuracy": sum(task.is_correct(d, r["answer"]) for d, r in zip(demonstrations, rows)) / len(rows),
    }
    table: dict[str, dict[str, float]] = {
        "demonstrator": {f"{k}_{m}": v for k, v in teacher.items() for m in ("greedy", "sampled")}
    }
    table["SFT on demonstrator"] = tool_figures(warm.model, task, warm.tokenizer, rows, seed=cfg.seed)
    times = {"sft": warm.sft_seconds}
    runs: dict[str, TrainResult] = {}
    for folder_name, (name, mask) in RUNS.items():
        run_start = time.perf_counter()
        model = copy.deepcopy(warm.model)  # each run from the same SFT model, trained in place
        config = tools_grpo_config(cfg, task, warm.folder.claim(folder_name), mask=mask)
        runs[name] = GRPOTrainer(config, model=model, tokenizer=warm.tokenizer, eval_dataset=rows).train()
        warm.folder.done(folder_name)
        table[name] = tool_figures(model, task, warm.tokenizer, rows, seed=cfg.seed)
        times[folder_name] = time.perf_counter() - run_start

    print(f"\nheld-out, {len(rows)} problems (seed {cfg.seed}), greedy | sampled at T=1: rows with a calculator call,")
    print("accuracy; of the sampled rows, those cut at max_completion_length and those with a <result> the model wrote")
    columns = ("calls_greedy", "accuracy_greedy", *(f"{k}_sampled" for k in ("calls", "accuracy", "cut", "imitated")))
    header = ("calls", "accuracy", "| calls", "accuracy", "cut", "own <result>")
    print(f"{'':36s}" + "".join(f"{h:>13s}" for h in header))
    for name, row in table.items():
        cells = [f"{row[key]:.1%}" if key in row else "-" for key in columns]
        cells[2] = "| " + cells[2]
        print(f"{name:36s}" + "".join(f"{c:>13s}" for c in cells))
    plot = plot_tools(runs, warm.folder.claim("tools.png"))
    warm.folder.done("tools.png")
    times["total"] = time.perf_counter() - start  # (the SFT run's included when it ran here)
    record = {"seed": cfg.seed, "eval_problems": len(rows), "table": table, "seconds": times, "config": _config(cfg),
              **provenance()}  # fmt: skip
    (warm.folder.claim("tools_table.json")).write_text(json.dumps(record, indent=1) + "\n")
    warm.folder.done("tools_table.json")
    print(f"\nplot:  {plot}\ntable: {out / 'tools_table.json'}")
    print("time:  " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))
    return table


def _config(cfg: DemoConfig) -> dict[str, Any]:
    keys = ("seed", "arch", "hidden_size", "num_layers", "tools_num_digits", "tool_rate", "tools_forget_carry",
            "sft_examples", "tools_sft_by_turn", "tools_sft_steps", "sft_learning_rate", "tools_grpo_steps",
            "tools_grpo_learning_rate", "tools_prompts_per_step", "num_generations", "num_threads")  # fmt: skip
    return {k: getattr(cfg, k) for k in keys}


def plot_tools(runs: dict[str, TrainResult], path: Path) -> Path:
    panels = (
        ("tools/rows_with_calls", "rows with a calculator call (training samples)"),
        ("reward", "reward (gold checker, training samples)"),
        ("eval/accuracy_greedy", "held-out accuracy (greedy)"),
    )
    title = "GRPO with a calculator: the tool's output masked from the loss, and not"
    return plot_runs(runs, panels, path, title=title)
