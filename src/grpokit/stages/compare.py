"""`grpokit compare CONFIG.yaml`: GRPO and PPO with a critic on the same model, data and machine, side by side.

The config is a GRPO config; PPO runs with the same fields (its own, `gamma`, `lam`, `vf_coef`, ..., at their
defaults), in OUTPUT_DIR/grpo and OUTPUT_DIR/ppo. Each method trains in a fresh process of its own, so that one's
peak cannot hide in the other's: the peak is the process's high-water mark (max RSS on a CPU, the most memory
allocated on CUDA), loading included. Its breakdown is counted from the tensors at the end of the run (`Policy.
memory_mb`): the policy's weights, gradients and AdamW moments; the reference; the critic's weights, gradients and
moments; on a CPU also the process before any model loaded (interpreter, torch, transformers); the rest of the
peak is activations and temporaries (and, on a CPU, what the allocator kept of them).

The run folders follow `grpokit train`'s rules: a comparison already in OUTPUT_DIR is refused (naming the folder)
unless `--resume-from-checkpoint latest` (each method continues its own latest checkpoint; one not started yet
starts; one that finished is not run again: its figures, kept in OUTPUT_DIR/.METHOD-report.json until
comparison.json is written, are its whole run's) or `--overwrite-output-dir`. SIGINT / SIGTERM to `grpokit compare`
go to the method's process, which finishes its step and writes a checkpoint as `grpokit train` does; the comparison
then says what was kept and how to resume. A worker dies with its parent (SIGTERM, so it checkpoints), never left
running alone.

Written to OUTPUT_DIR: comparison.json (both methods' figures, the machine, the commit, the date), comparison.png
(held-out accuracy against samples seen and against training wall time, and the memory breakdown), and the same
table printed.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import resource
import signal
import socket
import statistics
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from grpokit.runtime.checkpoint import RunDirectory, TrainingInterrupted, list_checkpoints
from grpokit.runtime.distributed import Cluster
from grpokit.stages.setup import run_directory

METHODS = ("grpo", "ppo")
REPORT = "comparison.json"
PLOT = "comparison.png"
PARENT_PID = "GRPOKIT_COMPARE_PARENT"  # the worker's parent: a worker whose parent is gone stops


class ComparisonFailed(RuntimeError):
    """A method's process failed; its own error was printed above."""

    def __init__(self, method: str, returncode: int):
        self.method = method
        if returncode == 0:  # it ended early without an error of its own (something in it called os._exit(0))
            self.exit_code = 1
            super().__init__(
                f"the {method} run ended (exit status 0) without writing its report: something in its process ended "
                "it early, with no error; the next method did not run"
            )
            return
        self.exit_code = returncode if returncode > 0 else 128 - returncode  # killed by a signal: the shell's code
        how = f"exit status {returncode}" if returncode >= 0 else f"killed by {signal.Signals(-returncode).name}"
        super().__init__(f"the {method} run failed ({how}); its error is above, the next method did not run")


class ComparisonInterrupted(TrainingInterrupted):
    """SIGINT / SIGTERM stopped the comparison; the message says what each method kept."""

    def __init__(self, signum: int, kept: str):
        self.signum, self.step, self.checkpoint = signum, None, None
        Exception.__init__(self, f"stopped by {signal.Signals(signum).name}: {kept}")


def _rss_mb() -> float:
    """This process's resident memory now (Linux /proc; elsewhere its high-water mark so far)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return _peak_rss_mb()


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def method_config(grpo: Any, method: str) -> Any:
    """The config `method` runs: the GRPO config itself, or a PPOConfig with the same fields, each in its own
    folder under the comparison's output_dir. Resuming `latest`, a method whose folder holds no run yet (the
    comparison stopped before it began) starts fresh."""
    from grpokit.config import PPOConfig

    out = str(Path(grpo.output_dir) / method)
    changes: dict[str, Any] = {"output_dir": out}
    if (
        grpo.resume_from_checkpoint == "latest"
        and not RunDirectory(out, settings=None, resume_from=None, overwrite=False, keep=0).holds_run()
    ):
        changes["resume_from_checkpoint"] = None  # a method the interrupted comparison never started starts now
    if method == "grpo":
        return dataclasses.replace(grpo, **changes)
    fields = {f.name: getattr(grpo, f.name) for f in dataclasses.fields(grpo)}
    return PPOConfig(**{**fields, **changes})


def report_file(output_dir: str | Path, method: str) -> Path:
    """Where `method`'s process writes its figures; kept until comparison.json is written."""
    return Path(output_dir) / f".{method}-report.json"


def finished_report(grpo: Any, method: str) -> dict[str, Any] | None:
    """Resuming `latest`: the figures of a method the interrupted comparison had finished (its report kept, its
    folder holding its final model), which is not run again: a second process would find nothing to resume, and
    its peak memory and wall time would describe no step."""
    path = report_file(grpo.output_dir, method)
    if grpo.resume_from_checkpoint != "latest" or not (Path(grpo.output_dir) / method / "model").is_dir():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # absent or cut short: the method's folder says it finished, `plan` says more
        return None


def check_comparison(grpo: Any) -> None:
    """Before anything is written or run: both methods' configs are valid (a PPO-only refusal shows before GRPO's
    run, not after it) and both run folders can be used as `grpokit train` would use them (fresh, resumed with
    `latest`, or replaced with overwrite_output_dir); the error names the folder."""
    from grpokit.config import ConfigError

    if grpo.resume_from_checkpoint not in (None, "latest"):
        raise ConfigError(
            f"config field `resume_from_checkpoint` is {grpo.resume_from_checkpoint!r}: a comparison continues each "
            "method from its own latest checkpoint; use `latest`"
        )
    for method in METHODS:
        cfg = method_config(grpo, method)
        cfg.validate()
        if finished_report(grpo, method) is None:  # a finished method's folder is only read
            run_directory(cfg).plan()


def worker(method: str, config_path: str, report_path: str) -> None:
    """One method's run in this (fresh) process; its figures to `report_path` as JSON. Under torchrun every rank's
    worker runs it (the ranks joined in a process group of their own), and rank 0 writes the figures, with each
    rank's peak memory; the breakdown is the rank with the highest peak's."""
    import torch  # noqa: F401  (loaded before the baseline: torch and transformers are the runtime, not the method)
    import transformers  # noqa: F401

    from grpokit.config import load_yaml
    from grpokit.stages.grpo import GRPOTrainer
    from grpokit.stages.loop import leaving_cluster
    from grpokit.stages.ppo import PPOTrainer

    before_models_mb = _rss_mb()
    from grpokit.config import GRPOConfig

    cfg = method_config(load_yaml(GRPOConfig, config_path), method)
    trainer = (PPOTrainer if method == "ppo" else GRPOTrainer)(cfg)
    with leaving_cluster(trainer.cluster):  # a rank failing alone leaves at once (the others' collective fails)
        report = method_report(trainer, cfg, method, before_models_mb)
    if trainer.cluster.is_main:
        Path(report_path).write_text(json.dumps(report, indent=1))


def method_report(trainer: Any, cfg: Any, method: str, before_models_mb: float) -> dict[str, Any]:
    """`trainer`'s run and its figures (`worker`): on every rank; what every rank measured, gathered."""
    import torch

    from grpokit.report.runlog import read_metrics

    on_cuda = trainer.device.type == "cuda"
    result = trainer.train()
    if on_cuda:
        peak, runtime = torch.cuda.max_memory_allocated(trainer.device) / 2**20, 0.0
    else:
        peak, runtime = _peak_rss_mb(), before_models_mb
    policy = trainer.policy.memory_mb()
    critic = trainer.critic.memory_mb() if method == "ppo" else {"weights": 0.0, "gradients": 0.0, "optimizer": 0.0}
    parts = {
        "policy_weights_mb": policy["weights"],
        "policy_gradients_mb": policy["gradients"],
        "policy_optimizer_mb": policy["optimizer"],
        "reference_mb": policy["reference"],
        "critic_weights_mb": critic["weights"],
        "critic_gradients_mb": critic["gradients"],
        "critic_optimizer_mb": critic["optimizer"],
        "runtime_mb": runtime,
    }
    parts["activations_and_other_mb"] = peak - sum(parts.values())
    ranks = trainer.cluster.gather_objects([(peak, parts, critic)])  # rank r's at [r]
    if not trainer.cluster.is_main:
        return {}
    peak, parts, critic = max(ranks, key=lambda r: r[0])
    rows = read_metrics(Path(result.output_dir) / "metrics.jsonl")
    train_rows = [r for r in rows if r.get("time/step") is not None]
    step_times = [r["time/step"] for r in train_rows]
    clock, elapsed = {0: 0.0}, 0.0
    for r in train_rows:  # training wall time at the end of each step, evaluation left out
        elapsed += r["time/step"]
        clock[int(r["step"])] = elapsed
    samples_per_step = cfg.prompts_per_step * cfg.num_generations
    curve = [
        {
            "step": int(e["step"]),
            "samples": int(e["step"]) * samples_per_step,
            "train_time_s": clock.get(int(e["step"]), elapsed),
            "accuracy_greedy": e.get("eval/accuracy_greedy"),
            "accuracy_sampled": e.get("eval/accuracy_sampled"),
        }
        for e in result.eval_history
    ]
    return {
        "peak_memory_mb": peak,  # the highest rank's (under torchrun), and its breakdown
        "peak_memory_mb_per_rank": [r[0] for r in ranks],
        "ranks": len(ranks),
        "peak_kind": "max allocated (CUDA)" if on_cuda else "max RSS",
        "step_time_s": statistics.median(step_times[1:] or step_times),  # the first step warms up
        "critic_memory_mb": critic["weights"] + critic["gradients"] + critic["optimizer"],
        "breakdown": parts,
        "steps": len(step_times),
        "samples_per_step": samples_per_step,
        "accuracy": curve,
        "final_accuracy_greedy": curve[-1]["accuracy_greedy"] if curve else None,
        "device": str(trainer.device),
    }


def run_comparison(grpo_cfg: Any, config_path: Path, cluster: Cluster | None = None) -> dict[str, Any]:
    """Both methods, one fresh process each (GRPO first), then the table, comparison.json and comparison.png.

    Under torchrun (`cluster`: this launch's ranks, joined) every rank runs this: each method runs in a fresh
    process per rank, those processes joined in a process group of their own (a new rendezvous port chosen by rank
    0 for each method, so that the second method's group never meets the first's), and rank 0 reads the reports
    and writes the record; the other ranks return {}."""
    cluster = cluster or Cluster()
    main = cluster.is_main
    check_comparison(grpo_cfg)
    out = Path(grpo_cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    reports: dict[str, Any] = {}
    with ForwardedSignals() as signals:
        for method in METHODS:
            report_path = report_file(out, method)
            done = cluster.broadcast(finished_report(grpo_cfg, method) if main else None)  # (rank 0 reads the files)
            if done is not None:
                if main:
                    print(f"grpokit compare: {method} finished before the interruption; its figures are kept")
                reports[method] = done
                continue
            if main:
                report_path.unlink(missing_ok=True)  # an earlier comparison's
            # the CLI's own error reporting in the method's process (`_compare_worker`)
            command = [sys.executable, "-m", "grpokit.cli", "compare", "--worker", method, str(config_path),
                       str(report_path)]  # fmt: skip
            env = {**os.environ, PARENT_PID: str(os.getpid()), **worker_rendezvous(cluster)}
            # a session of its own: a terminal's Ctrl-C reaches this process alone, which passes it on once
            worker = subprocess.Popen(command, env=env, start_new_session=True)
            if main:
                print(f"grpokit compare: {method} in its own process (pid {worker.pid}) -> {out / method}", flush=True)
            code = signals.wait(worker)
            if signals.received is not None:
                raise ComparisonInterrupted(signals.received, kept(grpo_cfg, reports, method))
            if code != 0 or (main and not report_path.is_file()):
                raise ComparisonFailed(method, code)
            reports[method] = json.loads(report_path.read_text()) if main else {}  # the file stays: a resume
            # after an interruption in a later method takes this method's figures from it instead of running it
    if not main:
        return {}
    record = {**reports, "config": str(config_path), **provenance()}
    record["grpo_saves_mb"] = reports["ppo"]["peak_memory_mb"] - reports["grpo"]["peak_memory_mb"]
    (out / REPORT).write_text(json.dumps(record, indent=1))
    for method in METHODS:
        report_file(out, method).unlink(missing_ok=True)  # in comparison.json now
    print(table(record))
    plot_comparison(record, out / PLOT)
    print(f"\n{out / REPORT}\n{out / PLOT}")
    return record


def worker_rendezvous(cluster: Cluster) -> dict[str, str]:
    """Under torchrun, the environment that joins one method's worker processes (one per rank) in a process group
    of their own: a port free on rank 0's machine, where rank 0's worker then holds the group's store (not
    torchrun's own store, where an earlier method's group left its keys). One process: nothing."""
    if not cluster.active:
        return {}
    port = None
    if cluster.is_main:
        with socket.socket() as probe:
            probe.bind(("", 0))
            port = probe.getsockname()[1]
    return {"MASTER_PORT": str(cluster.broadcast(port)), "TORCHELASTIC_USE_AGENT_STORE": "False"}


class ForwardedSignals:
    """While a method's process runs, SIGINT / SIGTERM to this process are passed on to it (it checkpoints and
    exits), and remembered so that no further method starts."""

    def __init__(self):
        self.received: int | None = None
        self.worker: subprocess.Popen | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> ForwardedSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._forward)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _forward(self, signum: int, frame: Any) -> None:
        self.received = signum
        if self.worker is not None and self.worker.poll() is None:
            self.worker.send_signal(signum)  # a second one stops the worker at once, as in `grpokit train`

    def wait(self, worker: subprocess.Popen) -> int:
        self.worker = worker
        if self.received is not None and worker.poll() is None:  # it came between two methods
            worker.send_signal(self.received)
        return worker.wait()


def kept(grpo_cfg: Any, reports: dict[str, Any], stopped: str) -> str:
    """What each method of an interrupted comparison has on disk."""
    parts = []
    for method in METHODS:
        folder = Path(grpo_cfg.output_dir) / method
        checkpoints = list_checkpoints(folder)
        if method in reports:
            parts.append(f"{method} finished ({folder})")
        elif method == stopped and checkpoints:
            step, path = checkpoints[-1]
            parts.append(f"{method} stopped after step {step} of {grpo_cfg.max_steps} (checkpoint: {path})")
        elif method == stopped:
            parts.append(f"{method} stopped before its first checkpoint")
        else:
            parts.append(f"{method} not started")
    return "; ".join(parts)


def stop_with_parent() -> None:
    """This worker gets SIGTERM (and checkpoints) when the `grpokit compare` process that started it dies."""
    parent = int(os.environ.get(PARENT_PID, "0"))
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    else:  # no parent-death signal: watch the parent instead

        def watch() -> None:
            while os.getppid() == parent:
                threading.Event().wait(1.0)
            os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=watch, daemon=True).start()
    if parent and os.getppid() != parent:  # it died before the line above took effect
        os.kill(os.getpid(), signal.SIGTERM)


def provenance() -> dict[str, str]:
    """The machine, the commit (`-dirty` when src/ has changes) and the date of a record."""
    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    if git("status", "--porcelain", "src"):
        commit += "-dirty"
    cpu = platform.processor() or platform.machine()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        names = [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")]
        cpu = f"{names[0]} x {len(names)}" if names else cpu
    except OSError:
        pass
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return {"machine": cpu, "commit": commit, "date": now}


def table(record: dict[str, Any]) -> str:
    """Markdown: one column per method, the peak and its parts, step time, final accuracy."""
    g, p = record["grpo"], record["ppo"]
    lines = ["| | GRPO | PPO (critic) |", "| --- | ---: | ---: |"]

    def row(name: str, a: Any, b: Any, unit: str = "MB", digits: int = 0) -> None:
        def fmt(x: Any) -> str:
            return "-" if x is None else f"{x:,.{digits}f}{' ' + unit if unit else ''}"

        lines.append(f"| {name} | {fmt(a)} | {fmt(b)} |")

    row(f"peak memory ({g['peak_kind']})", g["peak_memory_mb"], p["peak_memory_mb"])
    for key in g["breakdown"]:
        row("- " + key.removesuffix("_mb").replace("_", " "), g["breakdown"][key], p["breakdown"][key], digits=1)
    row("critic (weights + gradients + AdamW)", g["critic_memory_mb"], p["critic_memory_mb"], digits=1)
    row("time per step (median)", g["step_time_s"], p["step_time_s"], unit="s", digits=2)
    ga, pa = g["final_accuracy_greedy"], p["final_accuracy_greedy"]
    row("held-out greedy accuracy, end", ga and 100 * ga, pa and 100 * pa, unit="%", digits=1)
    lines.append(
        f"\nGRPO's peak is {record['grpo_saves_mb']:,.0f} MB below PPO's; the critic's state alone is "
        f"{p['critic_memory_mb']:,.0f} MB ({record['machine']}, commit {record['commit']}, {record['date']})"
    )
    return "\n".join(lines)


def plot_comparison(record: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_samples, by_time, memory) = plt.subplots(1, 3, figsize=(17, 4.4), width_ratios=(1, 1, 0.8))
    for method, color in zip(METHODS, ("tab:blue", "tab:orange")):
        curve = [c for c in record[method]["accuracy"] if c["accuracy_greedy"] is not None]
        label = "GRPO" if method == "grpo" else "PPO (critic)"
        acc = [100 * c["accuracy_greedy"] for c in curve]
        by_samples.plot([c["samples"] for c in curve], acc, "o-", color=color, label=label)
        by_time.plot([c["train_time_s"] for c in curve], acc, "o-", color=color, label=label)
    for ax, xlabel in ((by_samples, "completions sampled"), (by_time, "training wall time (s, evaluation left out)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("held-out greedy accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    parts = list(record["grpo"]["breakdown"])
    bottom = [0.0, 0.0]
    for i, key in enumerate(parts):
        heights = [max(record[m]["breakdown"][key], 0.0) for m in METHODS]
        memory.bar(["GRPO", "PPO (critic)"], heights, bottom=bottom, label=key.removesuffix("_mb"), color=f"C{i}")
        bottom = [b + h for b, h in zip(bottom, heights)]
    memory.set_ylabel(f"MB ({record['grpo']['peak_kind']} = the bar's height)")
    memory.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))  # beside the bars, not over them
    fig.suptitle(f"GRPO vs PPO with a critic: {record['config']} ({record['commit']}, {record['date']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
