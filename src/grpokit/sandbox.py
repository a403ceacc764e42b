"""Untrusted code run in a sandbox (bubblewrap): `run`, the built-in `python` tool, the `code_tests` reward.

    from grpokit.sandbox import SandboxLimits, run, python
    run("print(2 + 2)").stdout                      # '4\n', in bwrap: no network, only /tmp writable, rlimits
    run(["sh", "-c", "ls /"], limits=SandboxLimits(wall_seconds=2))
    python("print(sum(range(10)))")                 # '45\n': the tool a model calls

The machinery is `grpokit.runtime.sandbox`; `code_tests_reward` (the built-in reward `code_tests`), `run_tests` and
`extract_code` are `grpokit.rewards.code`'s, imported on first use (they read the data layer, which imports torch).
docs/sandbox.md has the limits, the tests that show each one and the measured overhead.
"""

from grpokit.runtime import sandbox as _machinery
from grpokit.runtime.sandbox import *  # noqa: F403 (the face: the machinery's public names, listed once there)

__all__ = list(_machinery.__all__)

# not in __all__: importing them imports torch (through the data layer), which `import *` should not do
_REWARD_NAMES = ("code_tests_reward", "extract_code", "run_tests")


def __getattr__(name: str):
    if name in _REWARD_NAMES:
        from grpokit.rewards import code

        return getattr(code, name)
    raise AttributeError(f"module 'grpokit.sandbox' has no attribute {name!r}")
