"""Below the stages, a function says what it reads: no function or method in a module below the stage that owns a
config takes the whole config (a parameter named `cfg` or `config`, or one annotated with a stage's config class).
It takes the values it reads, named, or a small settings object its own module owns (`model.optim.OptimizerSettings`,
`rollout.sampler.SamplingParams`).

The scan is built with `ast`; it has a test on a small made-up source too, so a scanner that silently finds nothing
cannot make the real check pass."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIR = ROOT / "src" / "grpokit"

# The stages, the config and the entry points above them own a config or compose the stages, so they may read one
# (the layers are tests/test_structure.py's); every other module is below the stages.
ABOVE_THE_STAGES = {"grpokit", "grpokit.__main__", "grpokit.cli", "grpokit.demo", "grpokit.demo_tools", "grpokit.trl"}


def may_read_a_config(module: str) -> bool:
    return module in ABOVE_THE_STAGES or module.split(".")[1:2] in (["stages"], ["config"])


# What a whole config is called, as a parameter name or in an annotation.
CONFIG_PARAMETER_NAMES = {"cfg", "config"}
STAGE_CONFIG_CLASSES = {
    "RunConfig",
    "GRPOConfig",
    "PPOConfig",
    "SFTConfig",
    "RewardModelConfig",
    "EvalConfig",
    "DemoConfig",
    "InitConfig",
}


def module_name(path: Path, package_dir: Path) -> str:
    """Dotted module name of a file under `package_dir` (a package's __init__ is the package)."""
    parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def annotation_names(annotation: ast.expr | None) -> set[str]:
    """Every name an annotation mentions: `GRPOConfig`, `config.GRPOConfig`, `GRPOConfig | None`, and inside a
    quoted forward reference `"GRPOConfig"`."""
    if annotation is None:
        return set()
    names = set()
    for node in ast.walk(annotation):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names |= annotation_names(ast.parse(node.value, mode="eval").body)
    return names


def whole_config_parameters(source: str, filename: str, stage_functions: set[str] = frozenset()) -> list[str]:
    """`file:line: function(parameter)` for each parameter of a function or method (nested ones too) that names or
    is annotated with a whole config; the top-level functions named in `stage_functions` (and what they hold) are
    skipped."""
    tree = ast.parse(source, filename)
    skipped = {
        id(inner)
        for node in tree.body
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in stage_functions
        for inner in ast.walk(node)
    }
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) or id(node) in skipped:
            continue
        args = node.args
        every = [*args.posonlyargs, *args.args, *args.kwonlyargs, *filter(None, (args.vararg, args.kwarg))]
        name = getattr(node, "name", "<lambda>")
        for arg in every:
            mentioned = annotation_names(arg.annotation) & STAGE_CONFIG_CLASSES
            if arg.arg in CONFIG_PARAMETER_NAMES or mentioned:
                why = f": {', '.join(sorted(mentioned))}" if mentioned else ""
                found.append(f"{filename}:{arg.lineno}: {name}({arg.arg}{why})")
    return sorted(found, key=lambda s: int(s.split(":")[1]))


def test_whole_config_scan_on_made_up_source():
    """The scan finds each form it is meant to find (a name, an annotation plain, dotted, in a union, quoted, on a
    method, a keyword-only or nested function) and leaves settings objects and the skipped stage functions alone."""
    source = """\
from grpokit import config
from grpokit.config import GRPOConfig, LoRAConfig


def a(model, cfg, total_steps): ...
def b(model, *, settings: config.RunConfig | None = None): ...
def c(model, run: "SFTConfig"): ...
def d(model, lora: LoRAConfig, model_config, params: SamplingParams): ...
class Policy:
    def __init__(self, model, optim: GRPOConfig): ...
    def ok(self, learning_rate: float): ...
def e(**config): ...
def outer(x):
    def inner(config): ...
def train_stage(cfg: GRPOConfig):
    def inner(cfg): ...
"""
    found = whole_config_parameters(source, "m.py", stage_functions={"train_stage"})
    assert [f.split(":", 1)[1] for f in found] == [
        "5: a(cfg)",
        "6: b(settings: RunConfig)",
        "7: c(run: SFTConfig)",
        "10: __init__(optim: GRPOConfig)",
        "12: e(config)",
        "14: inner(config)",
    ], found


def test_no_function_below_the_stages_takes_a_whole_config():
    """A function that takes the whole config hides what it reads (a reader must search its body, and a field that
    means something else in another stage, PPO's beta, is read by mistake); it takes the values, named."""
    files = sorted(p for p in PACKAGE_DIR.rglob("*.py") if "__pycache__" not in p.parts)
    names = {module_name(p, PACKAGE_DIR): p for p in files}
    assert "grpokit.model.policy" in names and "grpokit.data.tasks.arithmetic" in names  # the walk found the package
    assert {"grpokit.stages.grpo", "grpokit.config", "grpokit.cli"} <= set(names)  # a layer renamed: rename it here
    found = []
    for name, path in names.items():
        if may_read_a_config(name):
            continue
        rel = f"src/{path.relative_to(PACKAGE_DIR.parent)}"
        found += whole_config_parameters(path.read_text(), rel)
    assert not found, "functions below the stages that take a whole config:\n" + "\n".join(found)
