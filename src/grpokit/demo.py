"""`grpokit demo`: GRPO makes a model better than the teacher it was fine-tuned on.

The teacher (the imperfect demonstrator) adds numbers column by column but forgets carries; SFT copies
its habit; GRPO with the gold checker as the only reward removes it. Every number in the table is
measured on held-out problems that neither stage trained on.

`grpokit demo --pipeline`: the whole alignment pipeline, and its classic failure. After SFT, a reward
model learns from preference labels with a verbosity bias (between answers of different length the
labeler prefers the longer one). GRPO against that reward model raises the proxy reward while gold
accuracy falls, and the reward-hacking monitor says so; GRPO against the gold checker, side by side,
gets better for real.

The reward model's pairs are the task's flawed preference pairs plus `verbosity_pairs`: the same labeler
comparing answers of every length the hacked run can write (0 characters up to its completion limit), in
any characters. Without them the model only ever compares 3-digit answers with 4-6-digit ones, and its
reward for anything else is an accident of training: measured at seeds 0-2, the EMPTY answer scored
+4.0 / +9.0 / +7.3, far above a correct answer (+1.1 / +0.8 / +2.0), so GRPO could as well learn to
answer nothing as to pad (it did at seed 0 on one machine); from 4 characters up the reward was flat, so
the length the policy settled at was left to chance; and with extra pairs of digits only, the policy at
seed 2 got stuck on 5-character answers with a letter inside ("19h10"), whose reward fell with every
digit added after it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grpokit.config import DemoConfig, GRPOConfig, RewardModelConfig, SFTConfig
from grpokit.core.types import TrainResult
from grpokit.data.tasks import AdditionTask, build_char_tokenizer, tiny_model
from grpokit.data.tasks.preferences import wrong_candidate
from grpokit.model.loading import resolve_device
from grpokit.report.runlog import read_metrics
from grpokit.runtime.checkpoint import PROVENANCE, OutputExistsError, seed_everything
from grpokit.runtime.machine import pin_threads
from grpokit.stages.grpo import GRPOTrainer
from grpokit.stages.sft import train_sft

VERBOSITY_PAIRS = 5000
"""--pipeline: `verbosity_pairs` added to the reward model's 20000 flawed preference pairs."""
PIPELINE_WARMUP_STEPS = 20
"""--pipeline: linear learning-rate warm-up of both GRPO runs. The table's "start" is the mean of the first 10
steps; without warm-up the run against the reward model had already left the SFT model there (its gold
accuracy fell from 48% to 4% by step 7 at seed 0: the reward model also pays for a bigger number, and a
forgotten carry always makes the sum smaller), so "start" showed 26% instead of the SFT model's 47%."""


@dataclass
class WarmStart:
    task: AdditionTask
    tokenizer: Any
    model: Any
    eval_rows: list[dict[str, str]]
    model_dir: Path
    folder: DemoFolder


class DemoFolder:
    """The demo's --output-dir. Its `.grpokit.json` (kind `demo`) records each entry the demo wrote there (a run by
    its run id, or a file), so that a later demo replaces those and nothing else: a run of yours trained into
    `sft/`, a link, or a folder that was there before is refused, untouched."""

    def __init__(self, out: Path):
        self.out = out
        try:
            record = json.loads((out / PROVENANCE).read_text())
        except (OSError, ValueError):
            record = {}
        self.entries: dict[str, str] = record.get("entries", {}) if record.get("kind") == "demo" else {}
        self.unrecorded = record.get("kind") == "demo" and "entries" not in record  # an older grpokit's demo

    def check(self) -> list[str]:
        """The entries an earlier demo wrote (to be replaced); anything else is an OutputExistsError."""
        earlier = sorted(p.name for p in self.out.iterdir() if not p.name.startswith(".")) if self.out.is_dir() else []
        for name in earlier:
            path, recorded = self.out / name, self.entries.get(name)
            theirs = (path / "run_id").read_text().strip() if (path / "run_id").is_file() else None
            if path.is_symlink() or recorded is None or recorded not in ("pending", "file", theirs):
                what = "a link" if path.is_symlink() else "not what a grpokit demo wrote there"
                if self.unrecorded and not path.is_symlink():
                    what = "which this folder's older demo record does not list (an older grpokit's demo)"
                raise OutputExistsError(
                    f"--output-dir {self.out} holds {name}, {what}: the demo replaces only its own earlier runs; "
                    "choose another --output-dir, or move it away"
                )
        return earlier

    def claim(self, name: str) -> Path:
        """OUT/name, recorded before the demo writes it (a demo stopped midway may replace it next time)."""
        self._save(name, "pending")
        return self.out / name

    def done(self, name: str) -> None:
        path = self.out / name
        self._save(name, (path / "run_id").read_text().strip() if (path / "run_id").is_file() else "file")

    def _save(self, name: str, value: str) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self.entries[name] = value
        (self.out / PROVENANCE).write_text(json.dumps({"kind": "demo", "entries": self.entries}))


def warm_start(cfg: DemoConfig, out: Path) -> WarmStart:
    """Tiny model + char tokenizer, fine-tuned on the carry-forgetting teacher; saved to OUT/sft/model."""
    seed_everything(cfg.seed)
    pin_threads(cfg.num_threads)  # before the tiny model is built; every stage's config carries it too
    folder = DemoFolder(out)
    earlier = folder.check()
    if earlier:  # the demo replaces its own runs (a fixed recipe), and says so
        print(f"replacing the earlier demo's runs in {out} ({', '.join(earlier)}); --output-dir DIR keeps them")
    device = resolve_device(cfg.device)
    task = AdditionTask(num_digits=cfg.num_digits, forget_carry=cfg.forget_carry)
    tokenizer = build_char_tokenizer()
    model = tiny_model(tokenizer, cfg.arch, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers, seed=cfg.seed)
    model = model.to(device)
    print(
        f"grpokit demo: {cfg.num_digits}-digit addition; the teacher forgets each carry with p={cfg.forget_carry}; "
        f"tiny {cfg.arch} with {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters on {device}"
    )
    sft_cfg = SFTConfig(
        output_dir=str(folder.claim("sft")),
        task="addition",
        task_num_digits=cfg.num_digits,
        forget_carry=cfg.forget_carry,
        max_steps=cfg.sft_steps,
        num_train_prompts=cfg.sft_examples,
        learning_rate=cfg.sft_learning_rate,
        max_completion_length=task.max_completion_chars + 1,
        **run_fields(cfg),
    )
    model_dir = train_sft(sft_cfg, model=model, tokenizer=tokenizer)  # its rows: the task's demonstrations
    folder.done("sft")
    eval_rows = task.rows(cfg.num_eval_prompts, split="eval", seed=cfg.seed)
    return WarmStart(task, tokenizer, model, eval_rows, model_dir, folder)


def run_fields(cfg: DemoConfig) -> dict[str, Any]:
    """What every stage of a demo runs with: the demo's seed, device, threads and progress bar, and its output
    folder replaced (the demo is a fixed recipe: running it again replaces its runs)."""
    return {"seed": cfg.seed, "device": cfg.device, "num_threads": cfg.num_threads, "progress": cfg.progress,
            "overwrite_output_dir": True}  # fmt: skip


def grpo_config(cfg: DemoConfig, output_dir: Path, **overrides: Any) -> GRPOConfig:
    values = {
        "output_dir": str(output_dir),
        "task": "addition",
        "task_num_digits": cfg.num_digits,
        "max_steps": cfg.grpo_steps,
        "learning_rate": cfg.grpo_learning_rate,
        "prompts_per_step": cfg.prompts_per_step,
        "num_generations": cfg.num_generations,
        "max_completion_length": cfg.num_digits + 2,  # digits + EOS
        "reward_funcs": ["accuracy"],
        "num_eval_prompts": cfg.num_eval_prompts,
        "eval_every": cfg.grpo_steps // 4,
        "eval_temperature": 1.0,
        **run_fields(cfg),
    }
    return GRPOConfig(**{**values, **overrides})


def reuse_or_warm_start(cfg: DemoConfig, out: Path, warm: WarmStart | None) -> WarmStart:
    """`warm` when given (a warm start `warm_start` made for this config and folder, reused: the tests share one
    SFT model across the demos), else a fresh one."""
    if warm is None:
        return warm_start(cfg, out)
    if warm.folder.out.resolve() != out.resolve():
        raise ValueError(f"the warm start given was made in {warm.folder.out}, not in this demo's {out}")
    return warm


def run_demo(cfg: DemoConfig, warm: WarmStart | None = None) -> dict[str, dict[str, float]]:
    """The demo: the warm start (`warm`, else SFT now), GRPO with the gold checker, the held-out table."""
    start = time.perf_counter()
    out = Path(cfg.output_dir)
    warm = reuse_or_warm_start(cfg, out, warm)
    teacher = warm.task.demonstrator_accuracy(warm.eval_rows, random.Random(cfg.seed))
    table = {"demonstrator": {"greedy": teacher, "sampled": teacher}}
    # The trainer scores the held-out rows before its first step (the SFT model) and after its last.
    engine = {"use_vllm": True, "vllm_mode": "colocate"} if cfg.use_vllm else {}
    result = GRPOTrainer(
        grpo_config(cfg, warm.folder.claim("grpo"), **engine), model=warm.model, tokenizer=warm.tokenizer,
        eval_dataset=warm.eval_rows,
    ).train()  # fmt: skip
    warm.folder.done("grpo")
    for name, row in (
        ("SFT on demonstrator", result.eval_history[0]),
        ("SFT + GRPO (gold reward)", result.eval_history[-1]),
    ):
        table[name] = {"greedy": row["eval/accuracy_greedy"], "sampled": row["eval/accuracy_sampled"]}

    through = ", GRPO sampling through vLLM" if cfg.use_vllm else ""
    print(f"\nheld-out accuracy on {len(warm.eval_rows)} problems (seed {cfg.seed}{through}):")
    print(f"{'':28s} {'greedy':>8s} {'sampled T=1':>12s}")
    for name, row in table.items():
        print(f"{name:28s} {row['greedy']:8.1%} {row['sampled']:12.1%}")
    print(f"\nplot:  {result.plot_path}\nmodel: {result.model_dir}\ntime:  {time.perf_counter() - start:.0f} s")
    if result.warnings:
        print("warnings raised during the GRPO run:")
    for warning in result.warnings:
        print(f"  {warning}")
    return table


def run_pipeline(cfg: DemoConfig, warm: WarmStart | None = None) -> dict[str, dict[str, Any]]:
    """SFT (or the warm start `warm`) -> reward model on flawed preferences -> GRPO against it (gold watched) and
    against gold."""
    from grpokit.stages.reward_model import reward_model_pairs, train_reward_model

    start = time.perf_counter()
    out = Path(cfg.output_dir)
    warm = reuse_or_warm_start(cfg, out, warm)
    max_completion_length = cfg.num_digits + 2 + cfg.extra_completion_tokens  # of both GRPO runs, EOS included
    rm_cfg = RewardModelConfig(
        model=str(warm.model_dir),
        output_dir=str(warm.folder.claim("reward_model")),
        task="addition",
        task_num_digits=cfg.num_digits,
        labeler_flaw="longer",
        # the flawed model only has to learn the labeler's length preference: the quicker recipe
        learning_rate=1e-3,
        batch_size=64,
        center_rewards_coefficient=0.0,
        max_steps=cfg.reward_model_steps,
        **run_fields(cfg),
    )
    flawed_pairs, clean_pairs = reward_model_pairs(rm_cfg)
    # every length the hacked run can write, up to a completion cut off at the limit (read with an EOS, like any),
    # in any of the characters it can write (at seed 2, with digits only, it got stuck on answers like "19h10")
    vocab = warm.tokenizer.get_vocab()
    chars = "".join(t for t in sorted(vocab, key=vocab.get) if t not in warm.tokenizer.all_special_tokens)
    extra_pairs = verbosity_pairs(
        warm.task, VERBOSITY_PAIRS, max_chars=max_completion_length, chars=chars, split="train", seed=cfg.seed
    )
    # the pairs are made: the run trains on them, and its config records no task that would have made others
    plain = dataclasses.replace(
        rm_cfg, task=None, task_num_digits=RewardModelConfig.task_num_digits, labeler_flaw="none"
    )
    rm = train_reward_model(plain, train_pairs=flawed_pairs + extra_pairs, eval_pairs=clean_pairs)
    warm.folder.done("reward_model")
    print(f"reward model (labels with a verbosity bias): {rm.eval_accuracy:.1%} pairwise accuracy on clean pairs")
    runs: dict[str, TrainResult] = {}
    for name, reward in (("reward model", str(rm.model_dir)), ("gold checker", "accuracy")):
        trainer_cfg = grpo_config(
            cfg,
            warm.folder.claim(run_name := "grpo_reward_model" if name == "reward model" else "grpo_gold"),
            reward_funcs=[reward],
            gold_reward="accuracy",
            monitor_window=cfg.monitor_window,
            max_completion_length=max_completion_length,
            max_steps=cfg.pipeline_grpo_steps,
            warmup_steps=PIPELINE_WARMUP_STEPS,
            eval_every=cfg.pipeline_grpo_steps // 4,
        )
        runs[name] = GRPOTrainer(
            trainer_cfg, model=copy.deepcopy(warm.model), tokenizer=warm.tokenizer, eval_dataset=warm.eval_rows
        ).train()
        warm.folder.done(run_name)

    table = {name: _run_row(result) for name, result in runs.items()}
    print(f"\nGRPO from the same SFT model, {cfg.pipeline_grpo_steps} steps each (seed {cfg.seed}):")
    header = ("trained on", "proxy reward", "gold acc (samples)", "held-out greedy", "length", "hacking monitor")
    print(" | ".join(f"{h:>18s}" for h in header))
    for name, row in table.items():
        cells = (
            name,
            f"{row['proxy_start']:+.2f} -> {row['proxy_end']:+.2f}",
            f"{row['gold_start']:.0%} -> {row['gold_end']:.0%}",
            f"{row['heldout_start']:.0%} -> {row['heldout_end']:.0%}",
            f"{row['length_start']:.1f} -> {row['length_end']:.1f}",
            "FIRED" if row["hacking_fired"] else "quiet",
        )
        print(" | ".join(f"{c:>18s}" for c in cells))
    for name, result in runs.items():
        print(f"\nmonitors, {name} run:")
        for line in result.monitor_summary:
            print(f"  {line}")
    plot = plot_pipeline(runs, warm.folder.claim("pipeline.png"))
    warm.folder.done("pipeline.png")
    print(f"\nplot:  {plot}\ntime:  {time.perf_counter() - start:.0f} s")
    return table


def verbosity_pairs(
    task: AdditionTask, n: int, *, max_chars: int, chars: str = "", split: str = "train", seed: int = 0
) -> list[dict[str, Any]]:
    """n preference pairs from the verbosity-biased labeler over answers of EVERY length 0..max_chars.

    Each pair draws two different lengths, uniformly, and one candidate of each length per problem: the
    correct answer or a `carry` / `digit` wrong candidate (half and half), cut to that length or padded
    with random digits; with `chars` (every character the policy can write), half the candidates then have
    one character, at a random position, replaced by one of those. The labeler's rule for answers of
    different length, the one that `preference_pairs(labeler_flaw="longer")` applies, picks the longer one
    as chosen, right or wrong. So the reward model learns "longer is better" over the whole range the policy
    can write, whatever characters it writes, not just "4-6 digits beat 3" (the only comparison in the
    task's pairs), and that range holds no length whose reward is left to chance. Same arguments, same pairs.
    """
    rng = random.Random(f"verbosity-pairs-{seed}")

    def candidate(row: dict[str, str], length: int) -> str:
        base = row["answer"]
        if rng.random() < 0.5:
            base = wrong_candidate(task, row["prompt"], rng.choice(["carry", "digit"]), rng)
        text = base[:length] + "".join(rng.choice("0123456789") for _ in range(length - len(base)))
        if chars and text and rng.random() < 0.5:
            i = rng.randrange(len(text))
            text = text[:i] + rng.choice(chars) + text[i + 1 :]
        return text

    pairs = []
    for row in task.rows(n, split=split, seed=seed):
        shorter, longer = sorted(rng.sample(range(max_chars + 1), 2))
        pairs.append(
            {
                "prompt": row["prompt"],
                "chosen": candidate(row, longer),
                "rejected": candidate(row, shorter),
                "kind": "verbosity",
                "answer": row["answer"],
            }
        )
    return pairs


def _run_row(result: TrainResult) -> dict[str, Any]:
    """First and last 10 steps of the trained-on reward, the gold reward on the same samples and length."""
    rows = [r for r in read_metrics(result.output_dir / "metrics.jsonl") if "reward" in r]

    def mean(key: str, part: list[dict]) -> float:
        return sum(r[key] for r in part) / len(part)

    head, tail = rows[:10], rows[-10:]
    return {
        "proxy_start": mean("reward", head),
        "proxy_end": mean("reward", tail),
        "gold_start": mean("gold/mean", head),
        "gold_end": mean("gold/mean", tail),
        "heldout_start": result.eval_history[0]["eval/accuracy_greedy"],
        "heldout_end": result.eval_history[-1]["eval/accuracy_greedy"],
        "length_start": mean("completions/mean_length", head),
        "length_end": mean("completions/mean_length", tail),
        "hacking_fired": "hacking" in result.monitor_fired,
    }


def plot_pipeline(runs: dict[str, TrainResult], path: Path) -> Path:
    panels = (
        ("reward", "trained-on (proxy) reward"),
        ("gold/mean", "gold accuracy on the training samples"),
        ("eval/accuracy_greedy", "held-out accuracy (greedy)"),
        ("completions/mean_length", "completion length (tokens)"),
    )

    def hacking_line(ax: Any, key: str) -> None:
        for result in runs.values():
            fired = result.monitor_fired.get("hacking")
            if fired and key == "gold/mean":
                step = int(fired.split(":")[0].removeprefix("step "))
                ax.axvline(step, color="red", ls="--", lw=1, label="hacking monitor fires")

    title = "GRPO against a flawed reward model vs against the gold checker"
    return plot_runs(runs, panels, path, title=title, label="GRPO on {}", legends=2, decorate=hacking_line, width=4.2)


def plot_runs(runs: dict[str, TrainResult], panels: tuple[tuple[str, str], ...], path: Path, *, title: str,
              label: str = "{}", legends: int = 1, decorate: Any = None, width: float = 4.4) -> Path:  # fmt: skip
    """One panel per (metric, title) of `panels`, a curve per run (`label` formatted with its name) read from its
    metrics.jsonl; `decorate(ax, metric)` adds to a panel; legends on the first `legends` panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), 3.4))
    for ax, (key, panel_title) in zip(axes, panels):
        for name, result in runs.items():
            points = [(r["step"], r[key]) for r in read_metrics(result.output_dir / "metrics.jsonl") if key in r]
            marker = "." if len(points) < 30 else None
            ax.plot([p[0] for p in points], [p[1] for p in points], label=label.format(name), marker=marker)
        if decorate is not None:
            decorate(ax, key)
        ax.set_title(panel_title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in axes[:legends]:
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
