"""The package's shape, checked from source: every module imports alone, the import graph has no cycle and follows
the layer order (a lower layer never imports a higher one), the GRPO stage stays short enough to read in one sitting,
no test patches a private name, and the config's `Literal` choices (and their field docstrings) match algo's
registries, so a loss type, advantage scale, KL estimator, importance level or reward aggregation added to algo
can be chosen from YAML and is named in the CLI help.

The import graph and the private-patch scan are built with `ast`; each has a test on a small made-up input too,
so a scanner that silently finds nothing cannot make the real checks pass."""

from __future__ import annotations

import ast
import os
import re
import signal
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from grpokit import config
from grpokit.config import GRPOConfig
from grpokit.core import algo

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE_DIR = SRC / "grpokit"
TESTS_DIR = ROOT / "tests"
TRAINER_MAX_LINES = 320
IMPORT_WORKERS = 2  # the machine has 2 cores; more processes would only contend for them


# ---------------------------------------------------------------- module discovery and the static import graph


def package_modules(package_dir: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under `package_dir` (a package's __init__ is the package)."""
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imported_modules(tree: ast.AST, name: str, is_package: bool, known: set[str]) -> set[str]:
    """The modules of `known` that the module `name` imports anywhere in its file (top level, functions,
    TYPE_CHECKING blocks alike: a function-level import still ties the two modules together)."""
    package = name if is_package else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: level 1 is the importer's own package, each further level one up
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets.add(module)
            # `from grpokit.core import algo` imports the submodule grpokit.core.algo; names that are not modules drop
            # out below
            targets.update(f"{module}.{alias.name}" for alias in node.names)
    # Importing a.b.c first runs a and a.b, so `from grpokit.data.tasks.preferences import x` imports
    # grpokit.data.tasks
    # (whose __init__ imports every task module). The importer's own ancestors are left out: they are already
    # initialised whenever the importer runs, so they add no import-time dependency.
    with_parents = set()
    for target in targets:
        parts = target.split(".")
        with_parents.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    own_ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 2)}
    return (with_parents & known) - own_ancestors


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports."""
    modules = package_modules(package_dir)
    known = set(modules)
    return {
        name: imported_modules(ast.parse(path.read_text(), str(path)), name, path.name == "__init__.py", known)
        for name, path in modules.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle as a chain [a, b, ..., a], or None. Depth-first in sorted order, so the answer is deterministic."""
    visiting: list[str] = []
    done: set[str] = set()

    def visit(node: str) -> list[str] | None:
        visiting.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt in visiting:
                return visiting[visiting.index(nxt) :] + [nxt]
            if nxt not in done:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        visiting.pop()
        done.add(node)
        return None

    for node in sorted(graph):
        if node not in done:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


# ---------------------------------------------------------------- the private-patch scan


def _root_name(node: ast.AST) -> str | None:
    """`a` for `a`, `a.b.c`, `a(...).b`, `a[0].b`; None when the chain starts at a literal or anything else."""
    while isinstance(node, (ast.Attribute, ast.Call, ast.Subscript)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else None


def _foreign_names(tree: ast.AST, local_modules: set[str]) -> set[str]:
    """Names that certainly do not hold grpokit objects: bound by importing a third-party or standard module, or
    assigned from a literal or from such a name. Everything else (grpokit imports, test helpers, fixtures,
    parameters) may be a grpokit object and is treated as one, so the scan errs towards reporting."""
    foreign, maybe_grpokit = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                bound = alias.asname or top
                (maybe_grpokit if top == "grpokit" or top in local_modules else foreign).add(bound)
        elif isinstance(node, ast.ImportFrom):
            top = (node.module or "").split(".")[0]
            for alias in node.names:
                bound = alias.asname or alias.name
                local = node.level or top == "grpokit" or top in local_modules
                (maybe_grpokit if local else foreign).add(bound)
    # Assignments propagate: `head = torch.nn.Linear(...)` is foreign, `t = GRPOTrainer(...)` is not. Two passes
    # let a name assigned from an earlier-assigned name settle.
    for _ in range(2):
        for node in ast.walk(tree):
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                root = _root_name(node.value)
                source_foreign = root is None or (root in foreign and root not in maybe_grpokit)
                for target in targets:
                    for sub in ast.walk(target):
                        if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store):  # not `head` in `head._y =`
                            (foreign if source_foreign else maybe_grpokit).add(sub.id)
    return foreign - maybe_grpokit  # a name bound both ways anywhere in the file counts as possibly grpokit


def private_patches(source: str, filename: str, local_modules: set[str] = frozenset()) -> list[str]:
    """`file:line: what` for each patch of a private name: `monkeypatch.setattr(obj, "_x", ...)`,
    `mp.setattr("grpokit.mod._x", ...)`, `setattr(obj, "_x", ...)` on a (possibly) grpokit object, and any
    assignment to an attribute starting with "_" (`trainer._optimizer_step = ...`) on anything."""
    tree = ast.parse(source, filename)
    foreign = _foreign_names(tree, set(local_modules))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            is_setattr = (isinstance(func, ast.Name) and func.id == "setattr") or (
                isinstance(func, ast.Attribute) and func.attr == "setattr"
            )
            if not is_setattr or not node.args:
                continue
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):  # monkeypatch's dotted form
                owner, _, attr = first.value.rpartition(".")
                if attr.startswith("_") and owner.split(".")[0] == "grpokit":
                    found.append(f"{filename}:{node.lineno}: setattr of {first.value!r}")
                continue
            name_node = node.args[1] if len(node.args) > 1 else None
            name_node = name_node or next((kw.value for kw in node.keywords if kw.arg == "name"), None)
            if (
                isinstance(name_node, ast.Constant)
                and isinstance(name_node.value, str)
                and name_node.value.startswith("_")
                and _root_name(first) not in foreign
            ):
                found.append(f"{filename}:{node.lineno}: setattr of {name_node.value!r} on {ast.unparse(first)}")
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for sub in ast.walk(target):
                    if isinstance(sub, ast.Attribute) and isinstance(sub.ctx, ast.Store) and sub.attr.startswith("_"):
                        found.append(f"{filename}:{sub.lineno}: assignment to {ast.unparse(sub)}")
    return sorted(set(found), key=lambda s: int(s.split(":")[1]))


def field_docstrings(path: Path, class_name: str) -> dict[str, str]:
    """Field -> docstring in a dataclass: a string statement right after an annotated assignment is that
    field's docstring (the convention config.py follows and the CLI help is built from)."""
    tree = ast.parse(path.read_text(), str(path))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name)
    docs = {}
    for stmt, nxt in zip(cls.body, cls.body[1:]):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[stmt.target.id] = nxt.value.value
    return docs


# ---------------------------------------------------------------- 1. every module imports alone


# The child processes of the test below are forked from one interpreter that has imported torch, transformers'
# model and trainer machinery (and with it peft) and nothing of grpokit: each child imports one module before any
# other grpokit module, as a fresh interpreter would, and the third-party imports, nearly all of each module's
# import time (46 s of 49 s of CPU over the package), are paid once instead of once per module. What a child checks
# is grpokit's own imports: a grpokit module or a name it uses but never imports still fails (transformers loads
# its names on first use anyway, so an import forgotten in grpokit is not hidden by its being loaded here).
IMPORT_ALONE = """
import importlib, os, sys, traceback

import torch  # where nearly every module's import starts
import transformers.modeling_utils  # the models (tasks, critic, sampler): torch._dynamo, torch.distributed.tensor
import transformers.trainer_utils  # TrainerState (progress, callbacks): peft

assert not [name for name in sys.modules if name.split(".")[0] == "grpokit"]  # no grpokit module before a child's

workers, errors, names = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
running = {}


def reap():
    pid, status = os.wait()
    name, code = running.pop(pid), os.waitstatus_to_exitcode(status)
    if code != 0 and not os.path.exists(os.path.join(errors, name)):  # killed, or exited without a traceback
        with open(os.path.join(errors, name), "w") as f:
            f.write(f"exit status {code}")


for name in names:
    if len(running) >= workers:
        reap()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            importlib.import_module(name)
        except BaseException:
            with open(os.path.join(errors, name), "w") as f:
                f.write(traceback.format_exc())
            code = 1
        os._exit(code)
    running[pid] = name
while running:
    reap()
"""


def test_every_module_imports_alone_in_a_fresh_interpreter(tmp_path):
    """A module that only imports because some other module happened to be imported first breaks the first user
    who imports it directly; a process per module in which no other grpokit module was imported first catches a
    missing import or an import-order cycle."""
    modules = sorted(package_modules(PACKAGE_DIR))
    assert "grpokit.stages.grpo" in modules and "grpokit.data.tasks.arithmetic" in modules  # the walk found the package
    # PYTHONPATH puts this checkout's src first: the code under test is this tree, whatever is installed.
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])),
    }
    errors, empty = tmp_path / "errors", tmp_path / "cwd"
    errors.mkdir()
    empty.mkdir()  # the working directory: nothing in it can shadow a module
    cmd = [sys.executable, "-c", IMPORT_ALONE, str(IMPORT_WORKERS), str(errors), *modules]
    proc = subprocess.Popen(
        cmd, cwd=empty, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        _, err = proc.communicate(timeout=1800)  # a hang guard only, far above any real import
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the forking process and its children
        _, err = proc.communicate()
    assert proc.returncode == 0, f"the importing process (exit {proc.returncode}):\n{err.strip()}"
    failures = [f"{path.name}:\n{path.read_text().strip()}" for path in sorted(errors.iterdir())]
    assert not failures, "modules that fail to import alone:\n\n" + "\n\n".join(failures)


# ---------------------------------------------------------------- 2. the import graph


def test_import_graph_builder_on_a_made_up_package(tmp_path):
    """The graph builder sees every import form the real checks rely on (function-level, `from pkg import mod`,
    `import pkg.sub.mod`, relative at levels 1 and 2, a package's __init__ via its submodule) and the cycle
    finder reports a real chain; otherwise the checks below could pass on an empty graph."""
    files = {
        "fake/__init__.py": "",
        "fake/a.py": "import os\n\ndef f():\n    from fake import b\n",
        "fake/b.py": "import fake.sub.c\n",
        "fake/sub/__init__.py": "from .c import thing\n",
        "fake/sub/c.py": "from ..a import f\nthing = 1\n",
        "fake/sub/d.py": "from . import c\nfrom fake.sub.c import thing\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    graph = import_graph(tmp_path / "fake")
    assert graph == {
        "fake": set(),
        "fake.a": {"fake.b"},
        "fake.b": {"fake.sub", "fake.sub.c"},  # importing fake.sub.c runs fake/sub/__init__ first
        "fake.sub": {"fake.sub.c"},
        "fake.sub.c": {"fake.a"},
        "fake.sub.d": {"fake.sub.c"},  # its own package fake.sub is already initialised: no edge
    }
    cycle = find_cycle(graph)
    assert cycle == ["fake.a", "fake.b", "fake.sub", "fake.sub.c", "fake.a"]
    graph["fake.sub.c"] = set()
    assert find_cycle(graph) is None


def test_import_graph_has_no_cycle():
    """A cycle makes import order matter (a half-initialised module, an ImportError from one entry point but not
    another) and means two modules can no longer be understood apart; function-level imports count too, since
    they are usually how a cycle gets hidden rather than removed."""
    cycle = find_cycle(import_graph(PACKAGE_DIR))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# The package's layers, lowest first (docs/architecture.md draws them): a module imports modules of its own layer
# and of the layers before it, never of a later one. The entry points (the package's face, the command line, the
# demo, the TRL-named facade) sit above every layer.
LAYERS = ("core", "runtime", "model", "data", "rewards", "rollout", "report", "config", "stages")
ENTRY_POINTS = {
    "grpokit",
    "grpokit.__main__",
    "grpokit.cli",
    "grpokit.demo",
    "grpokit.demo_tools",
    "grpokit.sandbox",
    "grpokit.trl",
}


def layer_of(module: str) -> int | None:
    """A module's layer as its place in LAYERS (the entry points: len(LAYERS)); None: in no layer."""
    if module in ENTRY_POINTS:
        return len(LAYERS)
    parts = module.split(".")
    if len(parts) >= 2 and parts[0] == "grpokit" and parts[1] in LAYERS:
        return LAYERS.index(parts[1])
    return None


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """`importer -> imported` for every import of a later layer's module, and every module in no layer."""
    found = [f"{name} is in no layer" for name in sorted(graph) if layer_of(name) is None]
    for name in sorted(graph):
        for target in sorted(graph[name]):
            if layer_of(name) is not None and layer_of(target) is not None and layer_of(target) > layer_of(name):
                found.append(f"{name} ({LAYERS[layer_of(name)]}) -> {target}")
    return found


def test_layer_rule_on_a_made_up_graph():
    """The rule reports an upward import and a module outside the layers, and passes a downward one; otherwise the
    check below could pass on a graph it cannot read."""
    graph = {
        "grpokit.core.algo": set(),
        "grpokit.model.policy": {"grpokit.core.algo", "grpokit.stages.grpo"},
        "grpokit.stages.grpo": {"grpokit.model.policy", "grpokit.core.algo"},
        "grpokit.cli": {"grpokit.stages.grpo"},
        "grpokit.stray": set(),
    }
    assert layer_violations(graph) == [
        "grpokit.stray is in no layer",
        "grpokit.model.policy (model) -> grpokit.stages.grpo",
    ]


def test_no_module_imports_a_later_layer():
    """A lower layer that imports a higher one inverts the layering: the model would depend on a stage, and a change
    to a stage could break what every stage builds on. Function-level imports count (they hide the dependency, they
    do not remove it)."""
    graph = import_graph(PACKAGE_DIR)
    assert {layer_of(name) for name in graph} >= set(range(len(LAYERS) + 1))  # the walk found every layer
    violations = layer_violations(graph)
    assert not violations, "imports against the layer order " + " < ".join(LAYERS) + ":\n" + "\n".join(violations)


# ---------------------------------------------------------------- 3. the trainer stays short


def test_grpo_stage_is_at_most_320_lines():
    """The training loop must stay readable in one sitting; growth belongs in algo, policy, sampler or data."""
    lines = len((PACKAGE_DIR / "stages" / "grpo.py").read_text().splitlines())
    assert lines <= TRAINER_MAX_LINES, f"src/grpokit/stages/grpo.py has {lines} lines; at most {TRAINER_MAX_LINES}"


# ---------------------------------------------------------------- 4. tests patch only public names


def test_private_patch_scan_on_made_up_source():
    """The scan finds each form it is meant to find and leaves public names and non-grpokit objects alone."""
    source = """\
import torch
import grpokit.core.algo
from grpokit.stages import grpo as trainer
from grpokit.stages.grpo import GRPOTrainer
from helpers import config


def test_x(monkeypatch, some_fixture):
    t = GRPOTrainer(config())
    head = torch.nn.Linear(2, 2)
    calls = []
    monkeypatch.setattr(trainer, "_optimizer_step", None)
    monkeypatch.setattr(grpokit.core.algo, "aggregate_loss", None)
    monkeypatch.setattr("grpokit.stages.grpo._helper", None)
    monkeypatch.setattr("grpokit.stages.grpo.helper", None)
    monkeypatch.setattr("os._exit", None)
    monkeypatch.setattr(torch.utils, "_private", None)
    monkeypatch.setattr(head, "_hook", None)
    monkeypatch.setattr(calls, "_x", None)
    setattr(t, "_x", 1)
    with monkeypatch.context() as mp:
        mp.setattr(t.policy, "_step", None)
    monkeypatch.setattr(some_fixture, name="_y", value=None)
    t._optimizer_step = None
    t.public = 1
    x, head._y = 1, 2
    t.policy._n += 1
"""
    found = private_patches(source, "t.py", local_modules={"helpers"})
    assert [f.split(":")[1] for f in found] == ["12", "14", "20", "22", "23", "24", "26", "27"], found


def test_no_test_patches_a_private_name():
    """A test that patches a private name pins an implementation detail: it breaks on a harmless refactor and
    passes on a broken public path. Tests go through public seams (the Sampler, reward functions, algo's
    registries) instead."""
    test_files = sorted(p for p in TESTS_DIR.glob("*.py") if p.name != Path(__file__).name)
    assert test_files
    local_modules = {p.stem for p in test_files}  # helpers.py, conftest.py: they hand out grpokit objects
    found = []
    for path in test_files:
        found += private_patches(path.read_text(), f"tests/{path.name}", local_modules)
    assert not found, "tests patch private names:\n" + "\n".join(found)


# ---------------------------------------------------------------- 5. config choices == algo registries

# (GRPOConfig field, the config module's Literal alias or None for an inline Literal, algo's registry)
CHOICE_FIELDS = [
    ("loss_type", "LossType", "LOSS_TYPES"),
    ("scale_rewards", "ScaleRewards", "ADVANTAGE_SCALES"),
    ("kl_estimator", "KLEstimator", "KL_ESTIMATORS"),
    ("importance_level", "ImportanceLevel", "IMPORTANCE_LEVELS"),
    ("reward_aggregation", None, "REWARD_AGGREGATIONS"),
]


@pytest.mark.parametrize(("field", "alias", "registry"), CHOICE_FIELDS)
def test_config_literal_choices_equal_algo_registry(field, alias, registry):
    """YAML and CLI values are checked against the Literal, and algo dispatches on its registry: if they differ,
    a new choice in algo cannot be selected, or a choice validates and then fails minutes into a run."""
    hint = typing.get_type_hints(GRPOConfig)[field]
    assert typing.get_origin(hint) is typing.Literal, f"GRPOConfig.{field} is {hint}, not a Literal"
    if alias is not None:
        # The field must use the module's alias, and the alias is what other code (and this test) names.
        assert hint == getattr(config, alias)
        assert set(typing.get_args(getattr(config, alias))) == set(getattr(algo, registry))
    assert set(typing.get_args(hint)) == set(getattr(algo, registry))


@pytest.mark.parametrize(("field", "registry"), [(f, r) for f, _, r in CHOICE_FIELDS])
def test_field_docstring_names_every_choice(field, registry):
    """The CLI help is the field docstring: each choice must be named there, or users cannot find it."""
    doc = field_docstrings(PACKAGE_DIR / "config" / "__init__.py", "GRPOConfig").get(field)
    assert doc, f"GRPOConfig.{field} has no docstring"
    # word boundaries, so `grpo` is not found inside `dr_grpo`
    missing = [name for name in getattr(algo, registry) if not re.search(rf"\b{re.escape(name)}\b", doc)]
    assert not missing, f"GRPOConfig.{field} docstring does not mention {missing}: {doc!r}"
