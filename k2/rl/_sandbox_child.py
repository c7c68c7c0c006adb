"""The process that builds the sandbox around untrusted code; ``k2.rl.sandbox.run`` starts it as
``python -I -S -B _sandbox_child.py STATUS_FD`` in a new session and sends it one JSON job on stdin.

It imports nothing outside the standard library (it runs with ``-I -S``) and reports to the parent as JSON lines on
``STATUS_FD``: ``{"ready": true}`` when the untrusted program starts, then ``{"returncode": n}`` or
``{"signal": n}``, or ``{"error": "..."}`` when the sandbox could not be built (the program never ran).

Isolated layout (``job["isolate"]``), three processes deep:

1. this process: when started as root it drops to a throw-away uid (``uid_base + pid``) so that the kernel's
   per-user process count applies (root ignores ``RLIMIT_NPROC``), then unshares user, mount, network, PID, IPC
   and UTS namespaces (mapping that uid to 0 inside) and forks;
2. PID 1 of the new PID namespace: builds a new root on tmpfs (read-only binds of ``/usr``, the Python
   installation and a few ``/etc`` files; fresh ``/dev`` nodes, ``/proc``, a size-capped ``/tmp`` and the
   size-capped working directory ``/sandbox``), ``pivot_root``s into it and detaches the old root, then forks the
   program and reaps everything until the program exits. When PID 1 exits the kernel kills every process left in
   the namespace, so nothing the program started can outlive it;
3. the program: enters a nested user namespace where it is uid 1000 (no capabilities after ``execve``; the
   mounts above are locked), sets its rlimits and runs ``python -I -B main.py``.

Without isolation (the caller's explicit opt-in) only step 3's rlimits apply, in a private temporary directory.
"""

import contextlib
import ctypes
import json
import os
import platform
import resource
import shutil
import signal
import sys
import tempfile

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC = 32, 1024, 2048, 4096, 16384
MS_PRIVATE, MS_RELATIME = 1 << 18, 1 << 21
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS = 1, 4, 38
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}
NEW_ROOT = "/tmp/newroot"
INNER_UID = 1000  # the program's uid inside its nested user namespace
ETC_FILES = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "passwd", "group", "nsswitch.conf")
ROOT_DIRS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32", "usr")
DEVICES = ("null", "zero", "full", "random", "urandom")

_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = [None if s is None else s.encode() for s in (source, target, fstype, data)]
    _check(_libc.mount(enc[0], enc[1], enc[2], ctypes.c_ulong(flags), enc[3]), f"mount {source} on {target}")


def _unshare(flags: int) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare")


def _prctl(option: int, value: int) -> None:
    _check(_libc.prctl(option, ctypes.c_ulong(value), 0, 0, 0), f"prctl {option}")


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _map_self(inner: int, outer: int) -> None:
    """Map this process's (outer) uid and gid to ``inner`` in the user namespace it has just entered."""
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"{inner} {outer} 1\n")
    _write("/proc/self/gid_map", f"{inner} {outer} 1\n")


def _locked_flags(path: str) -> int:
    """The per-mount flags a read-only remount inside a user namespace must keep (the kernel refuses to clear
    flags that a more privileged namespace set)."""
    st = os.statvfs(path)
    pairs = ((os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV), (os.ST_NOEXEC, MS_NOEXEC))
    pairs += ((os.ST_NOATIME, MS_NOATIME), (os.ST_NODIRATIME, MS_NODIRATIME), (os.ST_RELATIME, MS_RELATIME))
    return sum(ms for st_flag, ms in pairs if st.f_flag & st_flag)


def _bind_ro(source: str, target: str) -> None:
    if os.path.isdir(source):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        open(target, "a").close()
    _mount(source, target, None, MS_BIND | MS_REC)
    _mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | _locked_flags(target))


def _build_root(job: dict) -> None:
    """Build the new root under /tmp (a fresh tmpfs in this mount namespace) and pivot into it."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    if not os.path.isdir(NEW_ROOT):  # not staged by root: make a place for it
        handles = _open_binds(job)  # before the tmpfs covers /tmp: a virtual environment may live there
        _mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
        os.makedirs(NEW_ROOT)
        job["bind_sources"] = {path: f"/proc/self/fd/{fd}" for path, fd in handles.items()}
        job["bind_fds"] = list(handles.values())
    root = NEW_ROOT
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=16m,mode=755")
    for name in ROOT_DIRS:
        host = "/" + name
        if os.path.islink(host):
            os.symlink(os.readlink(host), root + host)
        elif os.path.isdir(host):
            _bind_ro(host, root + host)
    for name in ETC_FILES:
        if os.path.exists("/etc/" + name):
            _bind_ro("/etc/" + name, f"{root}/etc/{name}")
    os.makedirs(root + "/dev")
    for name in DEVICES:
        _bind_ro("/dev/" + name, f"{root}/dev/{name}")
    os.symlink("/proc/self/fd", root + "/dev/fd")
    size = f"size={job['disk_mb']}m"
    for path in ("/tmp", "/sandbox", "/dev/shm"):
        os.makedirs(root + path, exist_ok=True)
        _mount("tmpfs", root + path, "tmpfs", MS_NOSUID | MS_NODEV, f"{size},mode=777")
    # The Python installation (it may live under /root, or in a virtual environment under /tmp: bound after the
    # private /tmp so it stays visible, read-only).
    for path, source in job["bind_sources"].items():
        if not os.path.exists(root + path):
            _bind_ro(source, root + path)
    for fd in job.pop("bind_fds", ()):
        os.close(fd)
    os.makedirs(root + "/proc")
    _mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    with open(root + "/sandbox/main.py", "w") as f:
        f.write(job["source"])
    os.makedirs(root + "/.oldroot")
    os.chdir(root)
    number = SYS_PIVOT_ROOT.get(platform.machine())
    if number is None:
        raise OSError(f"pivot_root: unknown syscall number on {platform.machine()}")
    _check(_libc.syscall(number, b".", b".oldroot"), "pivot_root")
    _check(_libc.umount2(b"/.oldroot", MNT_DETACH), "umount old root")
    os.rmdir("/.oldroot")
    _mount(None, "/", None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)


def _set_limits(job: dict) -> None:
    cpu = int(job["cpu_s"])
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    mem = job["memory_mb"] * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    size = job["file_size_mb"] * 2**20
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    resource.setrlimit(resource.RLIMIT_NPROC, (job["max_processes"], job["max_processes"]))
    resource.setrlimit(resource.RLIMIT_NOFILE, (job["max_open_files"], job["max_open_files"]))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _exec_program(job: dict, status_fd: int, workdir: str) -> None:
    """In the forked child: final confinement, then ``execve`` the program (never returns)."""
    try:
        os.close(status_fd)
        os.setsid()  # its own session and group: killpg(0) from the program cannot reach the supervisor
        for sig in range(1, signal.NSIG):
            with contextlib.suppress(OSError, ValueError):
                signal.signal(sig, signal.SIG_DFL)
        if job["isolate"]:
            _prctl(PR_SET_DUMPABLE, 1)  # so this process may write its own uid_map after unsharing
            _unshare(CLONE_NEWUSER | CLONE_NEWNS)  # mounts become locked; uid 1000 loses every capability at exec
            _map_self(INNER_UID, 0)
        _set_limits(job)
        _prctl(PR_SET_NO_NEW_PRIVS, 1)
        os.chdir(workdir)
        stdin = os.memfd_create("stdin")
        os.write(stdin, job["stdin"].encode())
        os.lseek(stdin, 0, os.SEEK_SET)
        os.dup2(stdin, 0)
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "LANG": "C.UTF-8", "TMPDIR": "/tmp"}
        if not job["isolate"]:
            env["TMPDIR"] = workdir
        os.execve(job["python"], [job["python"], "-I", "-B", "main.py"], env)
    except BaseException as exc:
        os.write(2, f"k2 sandbox: could not start the program: {exc}\n".encode())
    os._exit(127)


def _kill_on_term(pid: int, group: bool) -> None:
    """The parent asks for the end of the run with SIGTERM (to this process, which nothing inside can reach): kill
    the child (or its process group) that this process has not reaped yet, so the id cannot have been reused."""

    def handler(signum, frame):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL) if group else os.kill(pid, signal.SIGKILL)

    signal.signal(signal.SIGTERM, handler)


def _supervise(job: dict, status_fd: int, workdir: str) -> int:
    """Fork the program, reap every child until it exits, report its exit status."""
    pid = os.fork()
    if pid == 0:
        _exec_program(job, status_fd, workdir)
    if not job["isolate"]:
        _kill_on_term(pid, group=True)
    os.write(status_fd, b'{"ready": true}\n')
    while True:
        try:
            done, status, usage = os.wait4(-1, 0)
        except ChildProcessError:
            return 0
        if done == pid:
            break
    report = {"signal": os.WTERMSIG(status)} if os.WIFSIGNALED(status) else {"returncode": os.WEXITSTATUS(status)}
    report["cpu_s"] = usage.ru_utime + usage.ru_stime
    report["max_rss_mb"] = usage.ru_maxrss / 1024
    os.write(status_fd, (json.dumps(report) + "\n").encode())
    return 0


def _init(job: dict, status_fd: int) -> int:
    """PID 1 of the sandbox's PID namespace."""
    for sig in range(1, signal.NSIG):  # PID 1 with default dispositions ignores signals sent from inside
        with contextlib.suppress(OSError, ValueError):
            signal.signal(sig, signal.SIG_DFL)
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    _build_root(job)
    _check(_libc.sethostname(b"sandbox", 7), "sethostname")
    _prctl(PR_SET_DUMPABLE, 0)  # the program runs as the same host uid: keep it from ptrace-ing or reading us
    return _supervise(job, status_fd, "/sandbox")


def _stage_as_root(job: dict) -> None:
    """Before dropping root: in a private mount namespace, bind the Python installation under a tmpfs at /tmp that
    the throw-away uid can traverse (``/root/.pyenv`` is a common home for it, and ``/root`` is closed to others)."""
    _unshare(CLONE_NEWNS)
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    handles = _open_binds(job)  # before the tmpfs covers /tmp: a virtual environment may live there
    _mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
    os.makedirs(NEW_ROOT)
    for i, (path, fd) in enumerate(handles.items()):
        staged = f"/tmp/stage/{i}"
        os.makedirs(staged)
        _mount(f"/proc/self/fd/{fd}", staged, None, MS_BIND | MS_REC)
        os.close(fd)
        job["bind_sources"][path] = staged


def _open_binds(job: dict) -> dict[str, int]:
    """An ``O_PATH`` descriptor of every directory to bind, so it can still be bound (through ``/proc/self/fd``)
    once a tmpfs covers the path it was reached by."""
    return {path: os.open(source, os.O_PATH | os.O_CLOEXEC) for path, source in job["bind_sources"].items()}


def _isolated(job: dict, status_fd: int) -> int:
    job["bind_sources"] = {path: path for path in job["binds"]}
    if os.geteuid() == 0:
        _stage_as_root(job)
        uid = job["uid_base"] + os.getpid()  # unique among live sandboxes, an uid no account uses
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        _prctl(PR_SET_DUMPABLE, 1)  # a uid change made us non-dumpable, which would lock /proc/self/uid_map
    outer = os.geteuid()
    _unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS)
    _map_self(0, outer)
    pid = os.fork()
    if pid == 0:
        try:
            code = _init(job, status_fd)
        except BaseException as exc:
            os.write(status_fd, (json.dumps({"error": f"{type(exc).__name__}: {exc}"}) + "\n").encode())
            code = 70
        os._exit(code)
    _kill_on_term(pid, group=False)  # PID 1's death makes the kernel kill the whole namespace
    _, status = os.waitpid(pid, 0)
    return os.WEXITSTATUS(status) if os.WIFEXITED(status) else 70


def _unisolated(job: dict, status_fd: int) -> int:
    workdir = tempfile.mkdtemp(prefix="k2-sandbox-")
    try:
        with open(os.path.join(workdir, "main.py"), "w") as f:
            f.write(job["source"])
        return _supervise(job, status_fd, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> int:
    status_fd = int(sys.argv[1])
    job = json.loads(sys.stdin.read())
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    try:
        return _isolated(job, status_fd) if job["isolate"] else _unisolated(job, status_fd)
    except BaseException as exc:
        os.write(status_fd, (json.dumps({"error": f"{type(exc).__name__}: {exc}"}) + "\n").encode())
        return 70


if __name__ == "__main__":
    sys.exit(main())
