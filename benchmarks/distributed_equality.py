"""A real model on 2 ranks under `distributed: fsdp` (the sharded start) against one process: a record, not a test.

    python benchmarks/distributed_equality.py --model-path /path/to/SmolLM2-135M-Instruct

tests/test_distributed.py checks the equality on tiny models; this runs the same comparison on a model folder of
your choice: `grpokit train` of the built-in addition task, 3 steps of 2 prompts x 4 completions (<= 24 tokens), beta
0.04 (the reference read from the files too), a graded reward that differs inside every group (tests/helpers.py
`digit_share`: a sparse one leaves steps whose gradient is 0 in exact arithmetic, and AdamW turns their rounding
noise into full-size steps that differ between any two summation orders), once in one process and once under
`torchrun --nproc_per_node 2`; the completions compared and the final weights, max over tensors of
max |a - b| / max |b|. It prints the figures and writes benchmarks/results/distributed-equality-NAME.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    from test_distributed import completions, max_relative_difference, weights

    grpokit = str(Path(sys.executable).with_name("grpokit"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    env["OMP_NUM_THREADS"] = "1"
    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        for name, launch in (
            ("one-process", [grpokit]),
            ("fsdp-2-ranks", ["torchrun", "--standalone", "--nproc_per_node", "2", grpokit]),
        ):
            values = {
                "model": str(args.model_path), "output_dir": f"{tmp}/{name}", "task": "addition",
                "reward_funcs": ["helpers:digit_share"], "max_steps": args.steps, "prompts_per_step": 2,
                "num_generations": 4, "max_completion_length": 24, "num_train_prompts": 32, "num_eval_prompts": 0,
                "beta": 0.04, "log_completions_every": 1, "save_every": 0, "progress": False, "tensorboard": False,
                "seed": 0, "distributed": "fsdp",
            }  # fmt: skip
            config = Path(tmp) / f"{name}.yaml"
            config.write_text(yaml.safe_dump(values))
            if launch[0] == "torchrun":
                launch[0] = str(Path(sys.executable).with_name("torchrun"))
            proc = subprocess.run([*launch, "train", str(config)], env=env, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
            runs[name] = Path(tmp) / name
            print(name, "done", flush=True)
        one, split = runs["one-process"], runs["fsdp-2-ranks"]
        start = weights_of(args.model_path)
        record = {
            "what": "2-rank fsdp (sharded start) against one process, final weights and completions",
            "model": str(args.model_path), "config": values, "commit": git("rev-parse", "--short", "HEAD"),
            "date": datetime.date.today().isoformat(),
            "same_completions": completions(one) == completions(split),
            "completions": len(completions(one)),
            "max_relative_difference": max_relative_difference(weights(split), weights(one)),
            "moved_from_start": max_relative_difference(weights(one), start),
        }  # fmt: skip
    print(json.dumps(record, indent=2))
    out = ROOT / "benchmarks" / "results" / f"distributed-equality-{args.model_path.name}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


def weights_of(folder: Path) -> dict:
    from grpokit.runtime.weight_files import read_weight_files

    return {name: tensor.float() for name, tensor in read_weight_files(folder)}


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()


if __name__ == "__main__":
    main()
