"""Watching the reward signal: a run that cannot learn, or learns the wrong thing, says so while it runs.

GRPO changes the optimization, not the reward: a learned reward model with a blind spot gets exploited
exactly as under PPO (Gao et al. 2023, "Scaling Laws for Reward Model Overoptimization"). The monitors
read the per-step metrics and warn, once each, with the figures that triggered them:

- no learning signal: most groups have identical rewards for every completion, over the run's first few steps
  (a run that starts there rarely leaves it: say so before the user waits for nothing) or over the window; only
  where advantages are relative to the group (GRPO): PPO's come from its critic, so a flat group still has them;
- truncation: most completions hit the length limit;
- mode collapse: the completions of a group are all alike and the entropy is ~0; and a cliff: entropy or
  within-group diversity falling most of the way within a few steps (one wild update does that);
- unscored steps: every reward function returned None for every completion;
- dynamic sampling's cap: a step that still lacked groups with reward spread after its last allowed round trained
  flat groups in their place;
- truncated completions: the first step where some hit max_completion_length without EOS (with counts);
- length drift: completion length moved far from where the run started;
- KL drift: the policy is far from its reference;
- reward hacking: the trained-on (proxy) reward rises while a gold reward watched beside it does not.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field


def group_diversity(completions: list[str], group_size: int) -> float:
    """Mean over groups of (distinct completions / group size): 1 all different, 1/G all the same."""
    groups = [completions[i : i + group_size] for i in range(0, len(completions), group_size)]
    return sum(len(set(g)) / len(g) for g in groups) / len(groups)


def pearson(x: list[float], y: list[float]) -> float:
    """Correlation of two equal-length series; 0 when either is constant."""
    mx, my = statistics.fmean(x), statistics.fmean(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return sxy / (sxx * syy) ** 0.5 if sxx > 0 and syy > 0 else 0.0


def no_signal_message(flat: float, over: str, metrics: dict[str, float]) -> str:
    """The no-signal warning: the fraction measured, what it means, and what changes it."""
    reward = metrics.get("reward")
    mean = f" (this step's mean reward {reward:.3g})" if reward is not None and math.isfinite(reward) else ""
    return (
        f"{flat:.0%} of groups [frac_reward_zero_std] over {over} had the same reward for every completion{mean}: "
        "their advantages are 0, so they teach nothing (no learning signal). More completions per group (raise "
        "num_generations) or a higher temperature make a differing one likelier; a reward with partial credit "
        "separates near misses; if every completion fails, warm-start the model (SFT first) or give easier prompts; "
        "if every one succeeds, give harder prompts."
    )


@dataclass
class SignalMonitor:
    """Feeds on each step's metrics dict; a monitor whose metrics are absent stays silent."""

    window: int = 10  # short window: signal, truncation, collapse, KL
    long_window: int = 50  # drift and reward hacking compare the halves of this many steps
    max_zero_std_frac: float = 0.9  # no signal: more than this fraction of groups flat over `window` steps ...
    early_steps: int = 3  # ... or at least `early_zero_std_frac` of them over the run's first this many steps
    early_zero_std_frac: float = 0.55  # see _check_signal: 65% fires, the demos (<= 41%) stay quiet
    # GRPO: a group's advantages are its rewards minus the group's mean, so a flat group's are 0. PPO's are the
    # critic's (reward minus value, through GAE): a flat group still has them, so the no-signal warning's claim
    # would be false there and it stays silent (the fraction is still logged, as a figure)
    group_advantages: bool = True
    max_truncated_frac: float = 0.5
    collapse_diversity_margin: float = 0.05  # collapsed: diversity <= 1/G + margin ...
    collapse_max_entropy: float = 0.02  # ... and entropy below this (nats/token)
    cliff_steps: int = 5  # a cliff: within this many steps ...
    cliff_entropy_drop: float = 0.75  # ... entropy lost this fraction of its level
    cliff_min_entropy_drop: float = 0.5  # ... and at least this many nats/token
    cliff_diversity_drop: float = 0.5  # ... or within-group diversity fell by this much (of 1)
    max_length_drift: float = 0.5  # relative change of the mean completion length
    max_kl: float = 1.0  # nats/token
    hacking_min_proxy_rise: float = 1.0  # proxy gain between window halves, in proxy stds over the window
    hacking_max_gold_gain: float = 0.01  # gold gain (accuracy fraction) at or below which gold "stalls"
    warnings: list[str] = field(default_factory=list)
    fired: dict[str, str] = field(default_factory=dict)
    latest: dict[str, str] = field(default_factory=dict)
    _series: dict[str, deque] = field(default_factory=dict)
    _length_baseline: float | None = None

    def _push(self, key: str, metrics: dict[str, float], size: int) -> deque | None:
        if key not in metrics or not math.isfinite(metrics[key]):  # NaN: nothing measured this step
            return self._series.get(key) if key in metrics else None
        values = self._series.setdefault(key, deque(maxlen=size))
        values.append(metrics[key])
        return values

    def _raise(self, kind: str, step: int, message: str, new: list[str]) -> None:
        self.latest[kind] = message
        if kind not in self.fired:
            self.fired[kind] = f"step {step}: {message}"
            new.append(self.fired[kind])

    def update(self, step: int, metrics: dict[str, float], *, group_size: int = 8) -> list[str]:
        """Feed one step's metrics; returns the warnings first raised at this step (usually none).
        Adds its own figures (monitor/...) to `metrics`."""
        new: list[str] = []
        full = self.window
        self._check_signal(step, metrics, new)
        truncated = self._push("completions/clipped_ratio", metrics, full)
        if (
            truncated is not None
            and len(truncated) == full
            and (m := statistics.fmean(truncated)) > self.max_truncated_frac
        ):
            self._raise(
                "truncation",
                step,
                f"{m:.0%} [completions/clipped_ratio] of completions hit max_completion_length "
                "without EOS: raise max_completion_length, or set mask_truncated_completions / add the "
                "`overlong` reward.",
                new,
            )
        diversity, entropy = self._push("diversity", metrics, full), self._push("entropy", metrics, full)
        if diversity is not None and entropy is not None and len(diversity) == full:
            d, h = statistics.fmean(diversity), statistics.fmean(entropy)
            if d <= 1 / group_size + self.collapse_diversity_margin and h < self.collapse_max_entropy:
                self._raise(
                    "collapse",
                    step,
                    f"mode collapse: within-group diversity {d:.2f} (1/G = "
                    f"{1 / group_size:.2f}) and entropy {h:.3f} nats/token over the last {full} steps: "
                    "every prompt gets the same completion, so groups carry no signal.",
                    new,
                )
        self._check_cliff(step, group_size, new)
        if metrics.get("rewards/scored_frac", 1.0) == 0:
            self._raise(
                "unscored",
                step,
                "no completion got a reward: every reward function returned None for every sample, so the "
                "step had no learning signal (`reward` is logged as null); check what the functions apply to",
                new,
            )
        if (flat := metrics.get("dynamic_sampling/flat_trained", 0.0)) > 0:
            rounds = metrics.get("dynamic_sampling/rounds", float("nan"))
            self._raise(
                "dynamic_sampling_cap",
                step,
                f"dynamic sampling reached its cap (max_dynamic_sampling_rounds: {rounds:.0f} generation rounds) with "
                f"{flat:.0f} of the step's groups still without reward spread: the step trained them as they are, "
                "advantage 0 [dynamic_sampling/flat_trained]. More rounds, more completions per prompt "
                "(num_generations), a higher temperature or prompts nearer the model's level make a group with "
                "spread likelier.",
                new,
            )
        gold = metrics.get("gold/mean", 0.0)
        if gold is None or gold != gold:  # NaN: every gold score was None
            self._raise(
                "gold_unscored",
                step,
                "the gold_reward returned None for every sample: `gold/mean` is null and the reward-hacking monitor "
                "has nothing to compare the training reward with; check what the gold function applies to",
                new,
            )
        if (cut := metrics.get("completions/clipped_count", 0)) > 0 and metrics.get("completions/clipped_ratio", 0) > 0:
            self._raise(
                "first_truncated",
                step,
                f"{cut:.0f} of the step's {round(cut / metrics['completions/clipped_ratio'])} completions "
                "reached max_completion_length without EOS: they end there and are rewarded as they are "
                "(mask_truncated_completions leaves them out of the loss)",
                new,
            )
        kl = self._push("kl", metrics, full)
        if kl is not None and len(kl) == full and (m := statistics.fmean(kl)) > self.max_kl:
            self._raise(
                "kl",
                step,
                f"KL to the reference {m:.2f} nats/token over the last {full} steps "
                f"(threshold {self.max_kl}): raise beta or lower the learning rate.",
                new,
            )
        self._check_length(step, metrics, new)
        self._check_hacking(step, metrics, new)
        self.warnings.extend(new)
        return new

    def _check_signal(self, step: int, metrics: dict[str, float], new: list[str]) -> None:
        """Groups whose completions all got the same reward have advantage 0 and add nothing to the gradient. Over
        the first `early_steps` steps a lower bar than the window's: a run that starts with most groups flat learns
        from the few others at best (50-94% flat all run long, 65% over its first 3 steps, taught the README's
        100-step SFT model nothing in `grpokit train examples/grpo_jsonl.yaml`), and saying so at step 3 saves the
        wait; healthy starts sit well under the bar (the demo's 31-41%, its pipeline's 16-44%). Only the start:
        late in a run that learned, most groups are flat because they are solved (the demo's GRPO run reaches 74%
        over 3 steps near its end at seed 0), which the window's higher bar leaves alone."""
        if not self.group_advantages:
            return
        zero_std = self._push("frac_reward_zero_std", metrics, self.window)
        if zero_std is None:
            return
        # at step `early_steps` (<= window) the window holds the run's first steps, when each of them was measured
        at_start = step == self.early_steps and len(zero_std) == step
        if at_start and (m := statistics.fmean(zero_std)) >= self.early_zero_std_frac:
            self._raise("no_signal", step, no_signal_message(m, f"the first {step} steps", metrics), new)
        if len(zero_std) == self.window and (m := statistics.fmean(zero_std)) > self.max_zero_std_frac:
            self._raise("no_signal", step, no_signal_message(m, f"the last {self.window} steps", metrics), new)

    def _check_cliff(self, step: int, group_size: int, new: list[str]) -> None:
        """Entropy or diversity lost most of its level within `cliff_steps` steps: not a drift but one update
        (a learning rate far too high, say) pushing the policy onto one answer."""
        span = self.cliff_steps + 1
        entropy = list(self._series.get("entropy", ()))[-span:]
        diversity = list(self._series.get("diversity", ()))[-span:]
        if len(entropy) >= 2:
            before, now = max(entropy[:-1]), entropy[-1]
            if before - now >= max(self.cliff_entropy_drop * before, self.cliff_min_entropy_drop):
                self._raise(
                    "collapse_cliff",
                    step,
                    f"entropy fell off a cliff: {before:.2f} -> {now:.2f} nats/token within {len(entropy) - 1} "
                    "steps; one update moved the policy onto a few answers (learning_rate too high?)",
                    new,
                )
        if len(diversity) >= 2:
            before, now = max(diversity[:-1]), diversity[-1]
            if before - now >= self.cliff_diversity_drop and now <= 1 / group_size + self.collapse_diversity_margin:
                self._raise(
                    "collapse_cliff",
                    step,
                    f"within-group diversity fell off a cliff: {before:.2f} -> {now:.2f} (1/G = {1 / group_size:.2f})"
                    f" within {len(diversity) - 1} steps: every group now repeats one completion",
                    new,
                )

    def _check_length(self, step: int, metrics: dict[str, float], new: list[str]) -> None:
        lengths = self._push("completions/mean_length", metrics, self.long_window)
        if lengths is None or len(lengths) < self.long_window:
            return
        current = statistics.fmean(lengths)
        if self._length_baseline is None:  # the first full window is the reference point
            self._length_baseline = current
        drift = (current - self._length_baseline) / max(self._length_baseline, 1e-8)
        metrics["monitor/length_drift"] = drift
        if abs(drift) > self.max_length_drift and abs(current - self._length_baseline) >= 1.0:
            self._raise(
                "length",
                step,
                f"completion length {self._length_baseline:.1f} -> {current:.1f} tokens "
                f"({drift:+.0%}) since the start: a length exploit of the reward, or a collapse.",
                new,
            )

    def _check_hacking(self, step: int, metrics: dict[str, float], new: list[str]) -> None:
        proxy = self._push("reward", metrics, self.long_window)
        gold = self._push("gold/mean", metrics, self.long_window)
        if proxy is None or gold is None or len(proxy) < self.long_window:
            return
        half = self.long_window // 2
        p, g = list(proxy), list(gold)
        proxy_gain = statistics.fmean(p[half:]) - statistics.fmean(p[:half])
        gold_gain = statistics.fmean(g[half:]) - statistics.fmean(g[:half])
        proxy_rise = proxy_gain / (statistics.pstdev(p) + 1e-8)
        corr = pearson(p, g)
        metrics["monitor/proxy_gold_corr"] = corr
        figures = (
            f"proxy reward {proxy_gain:+.2f} while gold accuracy {100 * gold_gain:+.0f} points over the last "
            f"{self.long_window} steps (correlation {corr:+.2f})"
        )
        self.latest.setdefault("hacking", figures)
        if proxy_rise > self.hacking_min_proxy_rise and gold_gain <= self.hacking_max_gold_gain:
            self._raise("hacking", step, f"{figures}: likely reward hacking.", new)
        elif "hacking" not in self.fired:
            self.latest["hacking"] = figures

    def state_dict(self) -> dict:
        """Everything the monitors remember (windows, baseline, what fired), for a checkpoint."""
        return {
            "warnings": list(self.warnings),
            "fired": dict(self.fired),
            "latest": dict(self.latest),
            "series": {k: [list(v), v.maxlen] for k, v in self._series.items()},
            "length_baseline": self._length_baseline,
        }

    def load_state_dict(self, state: dict) -> None:
        self.warnings = list(state["warnings"])
        self.fired = dict(state["fired"])
        self.latest = dict(state["latest"])
        self._series = {k: deque(values, maxlen=maxlen) for k, (values, maxlen) in state["series"].items()}
        self._length_baseline = state["length_baseline"]

    def summary(self) -> list[str]:
        """One line per monitor that has seen its metrics: FIRED with the first warning, or its last figures."""
        lines = [f"{kind}: FIRED at {message}" for kind, message in self.fired.items()]
        if "hacking" not in self.fired and "hacking" in self.latest:
            lines.append(f"hacking: quiet ({self.latest['hacking']})")
        return lines
