"""What a run leaves on disk: metrics.jsonl, completions.jsonl, TensorBoard events and a PNG of the curves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Panels, in this order, each with the curves it overlays; a panel appears when the run logged one.
PLOT_PANELS = (
    (("reward/mean",), "reward (mean)"),
    (("gold/mean",), "gold reward (watched, not trained on)"),
    (("eval/accuracy_greedy", "eval/accuracy_sampled"), "held-out accuracy"),
    (("frac_zero_std_groups",), "groups with zero reward spread"),
    (("kl",), "KL to reference"),
    (("entropy",), "entropy (nats/token)"),
    (("diversity",), "distinct completions per group"),
    (("completion_length",), "completion length (tokens)"),
    (("clip_frac/total",), "clipped token fraction"),
    (("grad_norm",), "grad norm"),
)


class RunLog:
    """Appends one JSON row per step; mirrors scalars to TensorBoard."""

    def __init__(self, output_dir: str | Path, *, tensorboard: bool = True, config: Any = None):
        """Creates the run directory; `config` (a dataclass) is written to config.yaml, resolved."""
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        if config is not None:
            from grpokit.config import save_yaml

            save_yaml(config, self.dir / "config.yaml")
        self.metrics_path = self.dir / "metrics.jsonl"
        self.completions_path = self.dir / "completions.jsonl"
        self.metrics_path.write_text("")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.dir / "tensorboard"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self._tb is not None:
            for key, value in metrics.items():
                self._tb.add_scalar(key, value, step)

    def log_completions(self, step: int, samples: list[dict[str, Any]]) -> None:
        with self.completions_path.open("a") as f:
            for sample in samples:
                f.write(json.dumps({"step": step, **sample}) + "\n")

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_curves(rows: list[dict[str, float]], path: str | Path, title: str = "") -> Path | None:
    """One panel per logged curve of PLOT_PANELS; returns the PNG path (None when nothing to plot)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on training machines
    import matplotlib.pyplot as plt

    panels = [(keys, label) for keys, label in PLOT_PANELS if any(k in r for k in keys for r in rows)]
    if not panels:
        return None
    cols = min(len(panels), 4)
    n_rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(n_rows, cols, figsize=(4 * cols, 3 * n_rows), squeeze=False)
    for ax, (keys, label) in zip(axes.flat, panels):
        for key in keys:
            points = [(r["step"], r[key]) for r in rows if key in r]
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
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)
