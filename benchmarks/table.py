"""The README's performance table, printed from the records benchmarks/vs_trl.py wrote (benchmarks/results/).

python benchmarks/table.py
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ORDER = ["smollm2-135m", "qwen2-34m", "tiny-qwen2-6m"]
SETTINGS = {
    "defaults": "both at their defaults",
    "gc-on": "gradient checkpointing on in both",
    "gc-off": "gradient checkpointing off in both",
    "trl-micro-8": "defaults; TRL forwards 8 completions at a time (x4 accumulation)",
}


def main() -> None:
    records = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("vs_trl-*.json"))]
    records.sort(key=lambda r: (ORDER.index(r["workload"]["name"]), list(SETTINGS).index(r["setting"])))
    header = ["workload", "setting", "step time grpokit / TRL", "ratio", "tokens/s grpokit / TRL"]
    print("| " + " | ".join(header + ["peak RSS grpokit / TRL", "ratio", "commit, date"]) + " |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in records:
        w, g, t, q = r["workload"], r["grpokit"], r["trl"], r["ratios"]
        shape = f"{w['name']}, {w['prompts']} x {w['generations']}, <= {w['max_completion']}"
        print(
            f"| {shape} | {SETTINGS[r['setting']]} | {g['median_step_s']:.2f} s / {t['median_step_s']:.2f} s "
            f"| {q['step_time']:.2f} | {g['tokens_per_s']:.0f} / {t['tokens_per_s']:.0f} "
            f"| {g['peak_rss_gb']:.2f} GB / {t['peak_rss_gb']:.2f} GB | {q['peak_rss']:.2f} "
            f"| {r['commit']}, {r['date'][:10]} |"
        )
    machines = {
        (r["machine"]["cpu"], r["machine"]["cores"], r["machine"]["torch"], r["machine"]["trl"]) for r in records
    }
    commits = sorted({r["commit"] for r in records})
    dates = sorted(r["date"][:10] for r in records)
    for cpu, cores, torch, trl in machines:
        print(f"\n{cpu}, {cores} cores, torch {torch}, TRL {trl}; commit {', '.join(commits)}; {dates[0]}..{dates[-1]}")


if __name__ == "__main__":
    main()
