"""What a run leaves on disk: metrics.jsonl, completions.jsonl, TensorBoard events and a PNG of the curves."""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

# Panels, in this order, each with the curves it overlays; a panel appears when the run logged one.
PLOT_PANELS = (
    (("reward",), "reward (mean)"),
    (("gold/mean",), "gold reward (watched, not trained on)"),
    (("eval/accuracy_greedy", "eval/accuracy_sampled"), "held-out accuracy"),
    (("frac_reward_zero_std",), "groups with zero reward spread"),
    (("kl",), "KL to reference"),
    (("entropy",), "entropy (nats/token)"),
    (("diversity",), "distinct completions per group"),
    (("completions/mean_length",), "completion length (tokens)"),
    (("clip_ratio/region_mean",), "clipped token fraction"),
    (("grad_norm",), "grad norm"),
)


class RunLog:
    """Appends one JSON row per step; mirrors scalars to TensorBoard."""

    def __init__(
        self,
        output_dir: str | Path,
        *,
        tensorboard: bool = True,
        record: dict[str, Any] | None = None,
        wandb_project: str | None = None,
        resume_step: int | None = None,
    ):
        """Opens the run directory's logs. A fresh run (`resume_step` None) starts them empty and writes `record`
        (the resolved config, as plain values) to config.yaml; a resumed one keeps what was logged up to
        `resume_step` (its checkpoint) and drops the rest, so every step appears once, and TensorBoard purges the
        same steps. `wandb_project`: also mirror the figures to that W&B project (with `record` as its config)."""
        from grpokit.runtime.checkpoint import writing

        self.dir = Path(output_dir)
        self.metrics_path = self.dir / "metrics.jsonl"
        self.completions_path = self.dir / "completions.jsonl"
        with writing(self.dir):  # a refused write: a WriteError naming the folder, not a traceback
            self.dir.mkdir(parents=True, exist_ok=True)
            if resume_step is None:
                if record is not None:
                    import yaml

                    (self.dir / "config.yaml").write_text(yaml.safe_dump(record, sort_keys=False))
                self.metrics_path.write_text("")
                self.completions_path.unlink(missing_ok=True)
            else:
                _keep_rows(self.metrics_path, lambda row: _logged_before(row, resume_step))
                _keep_rows(self.completions_path, lambda row: row["step"] <= resume_step, say=False)
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resume_step is None else resume_step + 1
            self._tb = SummaryWriter(log_dir=str(self.dir / "tensorboard"), purge_step=purge)
        self._wandb = None
        if wandb_project is not None:
            self._wandb = _wandb_run(self.dir, wandb_project, record or {}, resumed=resume_step is not None)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """One strict-JSON row: a metric that has no value this step (NaN: nothing was scored) is null."""
        from grpokit.runtime.checkpoint import writing

        row = strict({"step": step, **metrics})
        with writing(self.metrics_path), self.metrics_path.open("a") as f:
            f.write(json.dumps(row, allow_nan=False) + "\n")
        scalars = {key: value for key, value in row.items() if key != "step" and value is not None}
        if self._tb is not None and not (self.dir / "tensorboard").is_dir():
            from grpokit.runtime.checkpoint import RunDirectoryError

            self._tb = None  # nothing left to flush into
            raise RunDirectoryError(
                f"{self.dir / 'tensorboard'} was deleted or moved while the run was writing it: the run stops "
                "(its checkpoints and metrics.jsonl stay where they are)"
            )
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def log_completions(self, step: int, samples: list[dict[str, Any]]) -> None:
        from grpokit.runtime.checkpoint import writing

        rows = [strict({"step": step, **sample}) for sample in samples]
        with writing(self.completions_path), self.completions_path.open("a") as f:
            for row in rows:
                f.write(json.dumps(row, allow_nan=False) + "\n")
        columns = [key for key in rows[0] if key != "step"] if rows else []
        if self._tb is not None and rows:  # a Markdown table, which TensorBoard's text tab renders
            cells = [[str(row[c]).replace("|", "\\|").replace("\n", " ") for c in columns] for row in rows]
            table = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
            self._tb.add_text("completions", "\n".join(table + ["| " + " | ".join(c) + " |" for c in cells]), step)
        if self._wandb is not None and rows:
            import wandb

            self._wandb.log(
                {"completions": wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])}, step=step
            )

    def close(self) -> None:
        if self._tb is not None and self.dir.is_dir():  # a deleted folder: nothing to flush into
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _wandb_run(folder: Path, project: str, record: dict[str, Any], *, resumed: bool) -> Any:
    """A W&B run whose files live in the run directory; a resumed run continues the same W&B run (its id is kept
    in `wandb-run-id`)."""
    import uuid

    import wandb

    id_file = folder / "wandb-run-id"
    run_id = id_file.read_text().strip() if resumed and id_file.is_file() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id + "\n")
    return wandb.init(project=project, id=run_id, resume="allow", dir=str(folder), config=record)


def progress(steps: range, desc: str, *, initial: int, total: int, enabled: bool = True) -> Any:
    """A tqdm bar on a terminal; anywhere else (a log file, a cluster job) `PlainProgress`, since a bar's
    carriage-return redraws would make up most of the log."""
    from tqdm.auto import tqdm

    if enabled and not sys.stderr.isatty():
        return PlainProgress(steps, desc, total=total)
    return tqdm(steps, desc, initial=initial, total=total, disable=not enabled, dynamic_ncols=True)


class PlainProgress:
    """What a bar shows, as one plain line on stderr every tenth of the run (and after the last step)."""

    def __init__(self, steps: range, desc: str, *, total: int):
        self.steps, self.desc, self.total = steps, desc, total
        self.every = max(1, total // 10)
        self.figures: dict[str, Any] = {}

    def __iter__(self):
        start = time.perf_counter()
        for step in self.steps:
            yield step
            if step % self.every == 0 or step == self.total:
                figures = "".join(f", {key}={value}" for key, value in self.figures.items())
                elapsed = time.perf_counter() - start
                print(f"{self.desc}: step {step}/{self.total}, {elapsed:.0f} s{figures}", file=sys.stderr, flush=True)

    def set_postfix(self, **figures: Any) -> None:
        self.figures = figures

    def write(self, text: str) -> None:
        print(text, flush=True)

    def close(self) -> None:
        pass


def strict(row: dict[str, Any]) -> dict[str, Any]:
    """NaN and inf become None (null): JSON has no such numbers, and strict parsers reject Python's NaN."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}


def _logged_before(row: dict[str, Any], step: int) -> bool:
    """Whether a row was logged before a checkpoint at `step` was written: the step rows up to it, but not
    the final evaluation logged after the last step (eval keys only), which the resumed run repeats."""
    eval_only = all(key == "step" or key.startswith("eval/") for key in row)
    return row["step"] < step or (row["step"] == step and not eval_only)


def _keep_rows(path: Path, keep: Any, *, say: bool = True) -> None:
    """Rewrite a JSONL file with the rows `keep` accepts, saying how many rows of later steps a resume drops (the
    resumed run logs those steps again). A torn last line (a kill mid-write) is dropped; any other line that is not
    a step row of grpokit's (a note added by hand) is kept as it is."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept, dropped = [], []
    for number, line in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines) - 1 and line.lstrip().startswith("{"):
                continue  # the half-written row of a killed run (a note of yours is kept)
            row = None
        is_step_row = isinstance(row, dict) and isinstance(row.get("step"), int)
        if not is_step_row or keep(row):
            kept.append(line + "\n")
        else:
            dropped.append(row["step"])
    if dropped and say:
        low, high = min(dropped), max(dropped)
        steps = f"step {low}" if low == high else f"steps {low}-{high}"
        warnings.warn(
            f"{path}: {len(dropped)} row(s) of {steps}, logged after the checkpoint this run resumes, are dropped: "
            "the resumed run logs those steps again",
            stacklevel=3,
        )
    from grpokit.runtime.checkpoint import atomic_file

    with atomic_file(path) as tmp:
        tmp.write_text("".join(kept))


def read_metrics(path: str | Path) -> list[dict[str, float]]:
    """The step rows of a metrics.jsonl file (a line that is not a JSON object, such as a note added by hand or the
    torn last line of a kill, is not a step row)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows


def plot_curves(rows: list[dict[str, float]], path: str | Path, title: str = "") -> Path | None:
    """One panel per logged curve of PLOT_PANELS; returns the PNG path (None when nothing to plot)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on training machines
    import matplotlib.pyplot as plt

    panels = [(keys, label) for keys, label in PLOT_PANELS if any(r.get(k) is not None for k in keys for r in rows)]
    if not panels:
        return None
    cols = min(len(panels), 4)
    n_rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(n_rows, cols, figsize=(4 * cols, 3 * n_rows), squeeze=False)
    for ax, (keys, label) in zip(axes.flat, panels):
        for key in keys:
            points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            ax.plot(
                [p[0] for p in points],
                [p[1] for p in points],
                marker="." if len(points) < 30 else None,
                label=key.rsplit("/", 1)[-1],
            )
        if len(keys) > 1:
            ax.legend(fontsize=8)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    from grpokit.runtime.checkpoint import writing

    try:
        with writing(path):
            fig.savefig(path, dpi=90)
    finally:
        plt.close(fig)
    return Path(path)
