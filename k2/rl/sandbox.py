"""A sandbox for untrusted Python: the code-execution half of the verifiable rewards gym (Kimi K2, arXiv 2507.20534
§3.2, runs unit tests in sandboxes; this is the single-machine version, one process tree per run).

``run(source, timeout_s=..., memory_mb=...)`` executes ``source`` as ``main.py`` with ``python -I`` and returns a
:class:`SandboxResult` whose ``status`` is one of

- ``passed``: exit status 0;
- ``failed``: a non-zero exit (an uncaught exception, a failed ``assert``, ``sys.exit(1)``, a write past the file
  size limit); ``reason`` is the last line of the traceback;
- ``timeout``: the wall-clock limit or the CPU-time limit was reached;
- ``memory``: the address-space limit was reached (``MemoryError``);
- ``crashed``: killed by a signal (segfault, abort, ...);
- ``refused``: the code did not run because the isolation could not be built (see below).

What holds (Linux; built with namespaces, no helper binaries — see ``_sandbox_child.py`` for the mechanics):
the supervisor gets its own session and process group, the program another one (so its ``killpg(0)`` cannot reach
the supervisor), inside new user, PID, mount, network, IPC and UTS namespaces. At the wall-clock limit the
supervisor kills the namespace's PID 1, and when PID 1 exits (limit or not) the kernel kills everything left, so
a child that outlives its parent or detaches with ``setsid`` cannot survive the run; ``run`` returns only after
that, then kills the supervisor's group as well. The code runs as a throw-away unprivileged uid
(when the caller is root, a fresh host uid per run; inside, uid 1000 without capabilities), so ``RLIMIT_NPROC``
caps the process count even on machines where everything runs as root. rlimits: CPU seconds, address space, file
size, processes, open files, no core files. Network: only a loopback device that is down (nothing on the host,
including its loopback, is reachable). File system: a new root holding read-only ``/usr``, the Python installation
and a handful of ``/etc`` files; ``/tmp`` and the working directory ``/sandbox`` are private size-capped tmpfs
mounts that vanish with the run; the project checkout, ``/root``, ``/home`` and every other path do not exist
inside. The environment is replaced (no tokens or keys leak through it) and stdout/stderr are capped.

What does not hold: the kernel is shared (a kernel exploit escapes any namespace sandbox; use VMs or gVisor for
hostile code at scale); CPU is not partitioned (a run can slow its neighbours until its limits end it); memory is
bounded per process by ``RLIMIT_AS`` (so at most ``max_processes * memory_mb`` in all) plus the tmpfs sizes, not by
a cgroup. When namespaces are unavailable (``unshare`` refused by the kernel or a container policy), ``run``
returns ``refused`` with the kernel's reason and logs a warning; ``allow_unisolated=True`` runs the code anyway with
only the session, rlimits and a temporary directory, which confines mistakes, not malice.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import selectors
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

STATUSES = ("passed", "failed", "timeout", "memory", "crashed", "refused")
UID_BASE = 2_000_000_000  # root's sandboxes run as UID_BASE + (pid of their supervisor): no account uses these
_CHILD = str(Path(__file__).with_name("_sandbox_child.py"))
_STOP_TIMEOUT_S = 5.0
_SETUP_TIMEOUT_S = 30.0  # building the namespaces and the new root (a loaded machine can be slow to start Python)


@dataclass(frozen=True)
class Limits:
    """Per-run resource limits (``cpu_s`` defaults to the wall-clock timeout, rounded up)."""

    max_processes: int = 32
    max_open_files: int = 64
    file_size_mb: int = 16
    disk_mb: int = 64  # size of each of the tmpfs mounts /sandbox and /tmp
    output_bytes: int = 64 * 1024  # per stream; the rest is read and dropped
    cpu_s: float | None = None


@dataclass(frozen=True)
class SandboxResult:
    status: str
    stdout: str
    stderr: str
    reason: str
    returncode: int | None = None
    signal: int | None = None
    wall_s: float = 0.0
    isolated: bool = True
    truncated: bool = False  # stdout or stderr went past Limits.output_bytes
    extra: dict = field(default_factory=dict)  # the program's CPU seconds and peak RSS, when it ran

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _python_dirs() -> list[str]:
    """Directories the sandboxed interpreter needs: its installation prefix(es) and the interpreter's directory."""
    exe_dir = os.path.dirname(os.path.realpath(sys.executable))
    dirs = {os.path.realpath(p) for p in (sys.base_prefix, sys.prefix, exe_dir)}
    kept = []
    for path in sorted(dirs):  # drop any directory already inside another one (and the too-broad system prefixes)
        if path in ("/", "/usr") or any(path.startswith(k + "/") for k in kept):
            continue
        kept.append(path)
    return kept


@functools.lru_cache(maxsize=1)
def isolation_error() -> str | None:
    """``None`` when sandboxes can be isolated on this machine, else the reason (probed once, by a real run)."""
    if sys.platform != "linux":
        return f"namespaces need Linux, this is {sys.platform}"
    result = _run("pass", timeout_s=10.0, memory_mb=256, stdin=None, limits=Limits(), isolate=True)
    if result.status == "passed":
        return None
    return result.reason or result.stderr.strip() or result.status


def run(
    source: str,
    *,
    timeout_s: float = 10.0,
    memory_mb: int = 512,
    stdin: str | None = None,
    limits: Limits | None = None,
    allow_unisolated: bool = False,
) -> SandboxResult:
    """Run ``source`` as a Python program in a fresh sandbox; see the module docstring for the statuses and what
    the sandbox guarantees. ``timeout_s`` counts from the program's start (sandbox set-up is not charged)."""
    limits = limits or Limits()
    error = isolation_error()
    if error is None:
        return _run(source, timeout_s=timeout_s, memory_mb=memory_mb, stdin=stdin, limits=limits, isolate=True)
    if not allow_unisolated:
        message = f"k2 sandbox: refusing to run untrusted code without isolation ({error})"
        log.error(message)
        return SandboxResult("refused", "", "", message, isolated=False)
    log.warning("k2 sandbox: running WITHOUT isolation (allow_unisolated=True): %s", error)
    return _run(source, timeout_s=timeout_s, memory_mb=memory_mb, stdin=stdin, limits=limits, isolate=False)


class _Capped:
    def __init__(self, cap: int) -> None:
        self.cap, self.chunks, self.size, self.truncated = cap, [], 0, False

    def add(self, data: bytes) -> None:
        room = self.cap - self.size
        if len(data) > room:
            self.truncated = True
            data = data[: max(room, 0)]
        self.chunks.append(data)
        self.size += len(data)

    def text(self) -> str:
        return b"".join(self.chunks).decode("utf-8", errors="replace")


def _run(
    source: str, *, timeout_s: float, memory_mb: int, stdin: str | None, limits: Limits, isolate: bool
) -> SandboxResult:
    job = {
        "source": source,
        "stdin": stdin or "",
        "isolate": isolate,
        "python": sys.executable,  # a venv interpreter keeps its venv (its prefix is bound too)
        "binds": _python_dirs(),
        "uid_base": UID_BASE,
        "memory_mb": int(memory_mb),
        "cpu_s": max(1, math.ceil(limits.cpu_s if limits.cpu_s is not None else timeout_s)),
        "file_size_mb": limits.file_size_mb,
        "disk_mb": limits.disk_mb,
        "max_processes": limits.max_processes,
        "max_open_files": limits.max_open_files,
    }
    status_r, status_w = os.pipe()
    start = time.monotonic()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-B", _CHILD, str(status_w)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=(status_w,),
            start_new_session=True,
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
        )
    finally:
        os.close(status_w)
    try:
        proc.stdin.write(json.dumps(job).encode())
        proc.stdin.close()
    except BrokenPipeError:
        pass
    out, err = _Capped(limits.output_bytes), _Capped(limits.output_bytes)
    status_lines: list[dict] = []
    timed_out = _collect(proc, status_r, out, err, status_lines, timeout_s)
    with contextlib.suppress(ProcessLookupError):  # the supervisor is not reaped yet: its group id is still its own
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    wall = time.monotonic() - start
    report: dict = {}
    for line in status_lines:
        report.update(line)
    stdout, stderr = out.text(), err.text()
    truncated = out.truncated or err.truncated
    common = {"wall_s": wall, "isolated": isolate, "truncated": truncated}
    if "error" in report:
        message = f"k2 sandbox: could not build the sandbox: {report['error']}"
        log.error(message)
        return SandboxResult("refused", stdout, stderr, message, **common)
    status, reason = _classify(report, stderr, timed_out, timeout_s, job["cpu_s"])
    usage = {key: report[key] for key in ("cpu_s", "max_rss_mb") if key in report}
    return SandboxResult(
        status,
        stdout,
        stderr,
        reason,
        returncode=report.get("returncode"),
        signal=report.get("signal"),
        extra=usage,
        **common,
    )


def _collect(
    proc: subprocess.Popen, status_r: int, out: _Capped, err: _Capped, status_lines: list[dict], timeout_s: float
) -> bool:
    """Read the three pipes until the supervisor closes its status pipe (the sandbox is gone) or time runs out;
    returns whether the program hit the wall-clock limit."""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ, out)
    sel.register(proc.stderr, selectors.EVENT_READ, err)
    status_file = os.fdopen(status_r, "rb", buffering=0)
    sel.register(status_file, selectors.EVENT_READ, None)
    pending = b""
    deadline = time.monotonic() + _SETUP_TIMEOUT_S
    ready = timed_out = stopping = False
    status_open = True
    try:
        while sel.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if status_open and not stopping:
                    # The program (or the set-up) overran: the supervisor kills the sandbox's PID 1 (or the program's
                    # group) and exits once the namespace is empty, which closes the status pipe.
                    timed_out = ready
                    if not ready:
                        status_lines.append({"error": "the sandbox did not start in time"})
                    proc.send_signal(signal.SIGTERM)
                    stopping = True
                    deadline = time.monotonic() + _STOP_TIMEOUT_S
                    continue
                break  # still open after the stop (a wedged supervisor): the caller kills the group
            for key, _ in sel.select(remaining):
                data = os.read(key.fd, 65536)
                if key.data is not None:
                    if data:
                        key.data.add(data)
                    else:
                        sel.unregister(key.fileobj)
                    continue
                if not data:
                    sel.unregister(status_file)
                    status_open = False
                    deadline = min(deadline, time.monotonic() + _STOP_TIMEOUT_S)  # the sandbox is gone
                    continue
                pending += data
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    msg = json.loads(line)
                    status_lines.append(msg)
                    if msg.get("ready") and not ready:
                        ready = True
                        deadline = time.monotonic() + timeout_s
    finally:
        sel.close()
        status_file.close()
    return timed_out


def _last_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def _classify(report: dict, stderr: str, timed_out: bool, timeout_s: float, cpu_s: int) -> tuple[str, str]:
    last = _last_line(stderr)
    if timed_out:
        return "timeout", f"wall-clock limit of {timeout_s:g} s reached"
    sig = report.get("signal")
    if sig == signal.SIGXCPU or (sig == signal.SIGKILL and report.get("cpu_s", 0.0) >= cpu_s):
        return "timeout", f"CPU-time limit of {cpu_s} s reached ({signal.Signals(sig).name})"
    if last.startswith("MemoryError") or "MemoryError" in last.split(":")[0]:
        return "memory", "address-space limit reached (MemoryError)"
    if sig is not None:
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        return "crashed", f"killed by signal {name}"
    code = report.get("returncode")
    if code is None:
        return "crashed", "the sandbox supervisor exited without reporting"
    if code == 0:
        return "passed", ""
    return "failed", last or f"exit status {code}"
