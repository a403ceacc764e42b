"""The group-size trade-off of GRPO on the demo task, at a fixed number of samples per step: a record, not a test.

    python benchmarks/group_size.py                                  # seeds 0 1, G in 2 4 8 16, 64 samples, 100 steps
    python benchmarks/group_size.py --seeds 0 --steps 30 --group-sizes 2 16

Small groups give noisy advantages (a mean and a std of 2 rewards) and many groups without reward spread; large
groups spend more samples on each prompt, so fewer prompts fit in a step of the same size. For each seed the demo's
SFT warm start runs once (`grpokit.demo.warm_start`), then for each G in --group-sizes, with S = --samples-per-step
samples per step (S / G prompts of G completions), from a copy of that same SFT model:

1. the gradient's noise at the start weights: K = --gradient-draws independent steps' worth of samples (the
   trainer's own prompt order, sampler and step seeds), each scored and turned into the step's loss as the
   trainer's update does (on-policy: ratio 1), its gradient taken but never applied. Reported: the mean gradient
   norm, the relative variance tr Cov(g) / ||mean g||^2 = mean_k ||g_k - gbar||^2 / ||gbar||^2 (noise per unit of
   signal in ONE step; it includes the 1/K share of the noise that is left in gbar, and a debiased figure beside
   it), and the advantages: mean A^2 over the rows of groups with spread, and the share of rows with A = 0;
2. GRPO training for --steps steps with the demo's settings (`grpokit.demo.grpo_config`): the share of groups with
   no reward spread (`frac_reward_zero_std`) over the first 10 steps and the whole run, held-out accuracy (the
   demo's 400 problems, greedy and sampled at T = 1) before and after, the median time per step and wall time.

It prints a markdown table and writes benchmarks/results/group-size-demo.json and a 2x2 plot beside it (.png).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
import vs_trl  # noqa: E402  (machine and commit, recorded as the other benchmarks record them)

from grpokit.config import DemoConfig  # noqa: E402
from grpokit.core import algo  # noqa: E402
from grpokit.demo import WarmStart, grpo_config, warm_start  # noqa: E402
from grpokit.report.runlog import read_metrics  # noqa: E402
from grpokit.stages.grpo import GRPOTrainer  # noqa: E402

DEFAULT_OUTPUT = ROOT / "benchmarks" / "results" / "group-size-demo.json"


def trainer_for(warm: WarmStart, demo: DemoConfig, out: Path, group_size: int, args) -> GRPOTrainer:
    """A GRPO trainer with the demo's settings on a fresh copy of the SFT model; only the batch shape changes."""
    cfg = grpo_config(
        demo,
        out,
        prompts_per_step=args.samples_per_step // group_size,
        num_generations=group_size,
        max_steps=args.steps,
        eval_every=max(args.steps // 4, 1),  # a short curve; evaluation is outside time/step
        save_every=0,  # the last step's checkpoint only: the runs are thrown away
        tensorboard=False,
        log_completions_every=0,
    )
    return GRPOTrainer(cfg, model=copy.deepcopy(warm.model), tokenizer=warm.tokenizer, eval_dataset=warm.eval_rows)


def step_gradient(trainer: GRPOTrainer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The next training step's rollout, rewards and loss gradient at the current weights, NOT applied: the
    trainer's own `sample` (its prompt order, its step's draws), then the loss of `_update`'s one on-policy pass
    (one process, no minibatches). -> (flat gradient, advantages (N,), flat groups (P,))."""
    cfg, G, policy = trainer.cfg, trainer.cfg.num_generations, trainer.policy
    batch = trainer.sample()
    rollout, mask, advantages = batch.rollout, batch.mask, batch.advantages
    normalizer = algo.step_normalizer(
        cfg.loss_type,
        batch.step_mask,
        generation_tokens=int(batch.step_mask.sum()),
        generation_sequences=batch.step_mask.shape[0],
        max_completion_length=cfg.max_completion_length,
    )
    ref_logp = policy.reference_logprobs(rollout)  # None at the demo's beta = 0
    params = policy.trainable_parameters()
    for idx in policy.micro_batches(rollout):
        logp, _ = policy.forward(rollout, idx)
        width = logp.shape[1]
        m = mask[idx, :width]
        token_loss, _ = algo.per_token_loss(
            logp,
            logp.detach(),  # on-policy, one pass: the old policy is the current one, as in the trainer
            advantages[idx],
            m,
            ref_logp=ref_logp[idx, :width] if ref_logp is not None else None,
            beta=cfg.beta,
            **cfg.surrogate(),
        )
        policy.backward(algo.aggregate_loss(token_loss, m, loss_type=cfg.loss_type, normalizer=normalizer))
    # a step whose groups are all flat leaves no gradient at all: that is a zero gradient, not a missing one
    grad = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
    for p in params:
        p.grad = None  # never stepped: the next draw starts from the same weights and no gradient
    return grad.double(), advantages.cpu(), algo.flat_groups(batch.total, batch.scorable, group_size=G)


def gradient_noise(trainer: GRPOTrainer, draws: int) -> dict[str, float]:
    """Noise-to-signal of the step gradient at the trainer's (start) weights, over `draws` independent steps."""
    t0 = time.perf_counter()
    grads, advs, flats = zip(*(step_gradient(trainer) for _ in range(draws)))
    g = torch.stack(grads)  # (K, params)
    gbar = g.mean(0)
    spread = (g - gbar).pow(2).sum(-1)  # (K,) ||g_k - gbar||^2
    trace_cov = float(spread.mean())  # the estimator, 1/K
    signal = float(gbar.pow(2).sum())
    # E||gbar||^2 = ||E g||^2 + tr Cov / K: remove that share to estimate the true signal (can go <= 0 when the
    # noise swamps it, then the debiased ratio is undefined)
    trace_cov_unbiased = float(spread.sum()) / (draws - 1)
    signal_debiased = signal - trace_cov_unbiased / draws
    A = torch.cat(advs)  # (K * N,)
    flat = torch.cat(flats)  # (K * P,)
    G = trainer.cfg.num_generations
    spread_rows = ~flat.repeat_interleave(G)  # rows of groups with reward spread
    return {
        "draws": draws,
        "grad_norm_mean": float(g.norm(dim=-1).mean()),
        "mean_grad_norm": signal**0.5,
        "trace_cov": trace_cov,
        "relative_variance": trace_cov / signal if signal > 0 else float("inf"),
        "relative_variance_debiased": trace_cov_unbiased / signal_debiased if signal_debiased > 0 else None,
        "cosine_to_mean": float(torch.nn.functional.cosine_similarity(g, gbar.expand_as(g), dim=-1).mean()),
        "adv_sq_mean_spread_groups": float(A[spread_rows].pow(2).mean()) if spread_rows.any() else 0.0,
        "adv_sq_mean_all_rows": float(A.pow(2).mean()),
        "adv_zero_share": float((A == 0).float().mean()),
        "flat_groups_start": float(flat.float().mean()),
        "wall_s": time.perf_counter() - t0,
    }


def train_run(trainer: GRPOTrainer) -> dict[str, float]:
    t0 = time.perf_counter()
    result = trainer.train()
    wall = time.perf_counter() - t0
    rows = [r for r in read_metrics(result.output_dir / "metrics.jsonl") if "frac_reward_zero_std" in r]

    def mean(key: str, part: list[dict]) -> float:
        return statistics.fmean(r[key] for r in part)

    before, after = result.eval_history[0], result.eval_history[-1]
    return {
        "steps": len(rows),
        "flat_groups_first10": mean("frac_reward_zero_std", rows[:10]),
        "flat_groups_run": mean("frac_reward_zero_std", rows),
        "flat_groups_last10": mean("frac_reward_zero_std", rows[-10:]),
        "train_reward_first10": mean("reward", rows[:10]),
        "train_reward_last10": mean("reward", rows[-10:]),
        "heldout_greedy_before": before["eval/accuracy_greedy"],
        "heldout_greedy_after": after["eval/accuracy_greedy"],
        "heldout_sampled_before": before["eval/accuracy_sampled"],
        "heldout_sampled_after": after["eval/accuracy_sampled"],
        "eval_curve": [
            {"step": e["step"], "greedy": e["eval/accuracy_greedy"], "sampled": e["eval/accuracy_sampled"]}
            for e in result.eval_history
        ],
        "median_step_s": statistics.median(r["time/step"] for r in rows),
        "train_wall_s": wall,  # evaluations and the final save included
    }


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # (panel, what it shows, log y): "flat" adds the whole run's share dashed, "accuracy" the SFT start dotted
    panels = (
        ("gradient", "gradient tr Cov / ||mean||^2 (start weights)", True),
        ("flat", "groups with no reward spread\n(solid: first 10 steps, dashed: whole run)", False),
        ("accuracy", "held-out greedy accuracy after GRPO\n(dotted: the SFT model)", False),
        ("time", "median time per step (s)", False),
    )
    value = {
        "gradient": lambda r: r["gradient"]["relative_variance"],
        "flat": lambda r: r["flat_groups_first10"],
        "accuracy": lambda r: r["heldout_greedy_after"],
        "time": lambda r: r["median_step_s"],
    }
    fig, axes = plt.subplots(2, 2, figsize=(9, 7))
    for ax, (kind, title, log_y) in zip(axes.flat, panels):
        for seed, runs in record["runs"].items():
            gs = sorted(int(g) for g in runs)
            line = ax.plot(gs, [value[kind](runs[str(g)]) for g in gs], marker="o", label=f"seed {seed}")[0]
            if kind == "flat":
                whole = [runs[str(g)]["flat_groups_run"] for g in gs]
                ax.plot(gs, whole, ls="--", marker="x", color=line.get_color())
            if kind == "accuracy":  # the same SFT model for every G of a seed
                ax.axhline(runs[str(gs[0])]["heldout_greedy_before"], color=line.get_color(), ls=":", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_xticks(gs, [str(g) for g in gs])
        if log_y:
            ax.set_yscale("log")
        ax.set_xlabel("group size G")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    c = record["config"]
    fig.suptitle(f"GRPO group size at {c['samples_per_step']} samples per step, {c['steps']} steps (demo task)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def markdown(record: dict) -> str:
    lines = [
        "| seed | G | prompts/step | grad rel. var | grad norm | flat groups first 10 / run "
        "| held-out greedy before -> after | sampled after | time/step |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for seed, runs in record["runs"].items():
        for g in sorted(runs, key=int):
            r = runs[g]
            lines.append(
                f"| {seed} | {g} | {r['prompts_per_step']} | {r['gradient']['relative_variance']:.2f} "
                f"| {r['gradient']['grad_norm_mean']:.3f} "
                f"| {r['flat_groups_first10']:.0%} / {r['flat_groups_run']:.0%} "
                f"| {r['heldout_greedy_before']:.1%} -> {r['heldout_greedy_after']:.1%} "
                f"| {r['heldout_sampled_after']:.1%} | {r['median_step_s'] * 1000:.0f} ms |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--samples-per-step", type=int, default=64, help="S: completions per step, for every G")
    parser.add_argument("--steps", type=int, default=100, help="GRPO steps of each run")
    parser.add_argument("--group-sizes", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--gradient-draws", type=int, default=16, help="K: steps' worth of samples per G")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--work-dir", type=Path, default=None, help="where the runs go (default: a temporary folder)")
    args = parser.parse_args()
    bad = [g for g in args.group_sizes if g < 2 or args.samples_per_step % g]
    if bad:
        parser.error(f"group sizes {bad}: each must be >= 2 and divide --samples-per-step {args.samples_per_step}")
    if args.gradient_draws < 2:
        parser.error("--gradient-draws must be >= 2 (a variance needs two draws)")
    torch.set_num_threads(args.threads)
    import transformers

    transformers.utils.logging.disable_progress_bar()  # a bar per saved model would bury the figures

    start = time.perf_counter()
    runs: dict[str, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or Path(tmp)
        for seed in args.seeds:
            demo = DemoConfig(seed=seed, output_dir=str(work / f"seed{seed}"), progress=False)
            t0 = time.perf_counter()
            warm = warm_start(demo, Path(demo.output_dir))
            sft_s = time.perf_counter() - t0
            runs[str(seed)] = {}
            for G in args.group_sizes:
                out = Path(demo.output_dir) / f"grpo-G{G}"
                # a trainer of its own for the probe, so that its draws leave the training run's prompt order alone
                probe = gradient_noise(trainer_for(warm, demo, out / "probe", G, args), args.gradient_draws)
                figures = train_run(trainer_for(warm, demo, out / "train", G, args))
                runs[str(seed)][str(G)] = {
                    "prompts_per_step": args.samples_per_step // G,
                    "gradient": probe,
                    **figures,
                    "sft_wall_s": sft_s,
                }
                g = probe
                print(
                    f"seed {seed} G {G:2d}: grad rel var {g['relative_variance']:.2f}, flat groups "
                    f"{figures['flat_groups_first10']:.0%} / {figures['flat_groups_run']:.0%}, held-out greedy "
                    f"{figures['heldout_greedy_before']:.1%} -> {figures['heldout_greedy_after']:.1%}, "
                    f"{figures['median_step_s'] * 1000:.0f} ms/step, {figures['train_wall_s']:.0f} s",
                    flush=True,
                )
    record = {
        "what": "GRPO group size G at a fixed number of samples per step on the demo task (tiny Llama, 2-digit "
        "addition, gold reward), from the demo's SFT warm start",
        "config": {
            "samples_per_step": args.samples_per_step,
            "steps": args.steps,
            "group_sizes": args.group_sizes,
            "seeds": args.seeds,
            "gradient_draws": args.gradient_draws,
            "learning_rate": DemoConfig.grpo_learning_rate,
            "loss_type": "grpo",
            "scale_rewards": "group",
            "heldout_problems": DemoConfig.num_eval_prompts,
        },
        "commit": vs_trl.commit(),
        "date": datetime.date.today().isoformat(),
        "machine": vs_trl.machine(),
        "total_wall_s": time.perf_counter() - start,
        "runs": runs,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=2) + "\n")
    plot(record, args.output.with_suffix(".png"))
    print("\n" + markdown(record))
    print(f"\nwrote {args.output} and {args.output.with_suffix('.png')} in {record['total_wall_s']:.0f} s")


if __name__ == "__main__":
    main()
