"""Run untrusted, model-generated Python (MBPP-style pass@1) in an isolated child process.

Threat model
------------
The code under test is written by a language model: usually harmless, sometimes buggy in
ways that hurt the host (infinite loops, runaway memory, huge output, fork loops, file
deletion, network access), and in principle adversarial.  The goal is to protect the
*host and the caller*: the evaluating process must never crash, hang or raise because of a
sample, and a sample must not modify files outside its scratch directory, reach the
network, or leave processes behind.

Layers (outermost first; each one is reported in ``SandboxResult.isolation`` and by
:func:`isolation_report`):

1. **Separate process.**  Every sample runs in its own interpreter started with
   ``python -I`` (isolated mode: no ``PYTHON*`` variables, no user site, no script dir on
   ``sys.path``), a minimal environment, ``start_new_session=True`` (own process group) and
   no inherited file descriptors except its stdin/stdout and a result channel.  The
   privileged set-up happens in a short-lived *launcher* (this file run as a script) that
   ``exec``\\ s the sandboxed interpreter; ``preexec_fn`` is deliberately not used, because a
   ``preexec_fn`` that deadlocks in a multi-threaded parent (PyTorch, tokenizers) would hang
   ``Popen`` itself, i.e. the caller.
2. **Privilege drop** (when the caller is root).  Root ignores ``RLIMIT_NPROC`` and file
   permissions, so the launcher switches to a fresh, otherwise unused uid/gid drawn from a
   private range (``65534``/nobody if the range is not mapped in this user namespace),
   clears supplementary groups and sets ``PR_SET_NO_NEW_PRIVS``.  Because the uid is
   private to one sample, ``RLIMIT_NPROC`` counts only that sample's processes and every
   process it leaves behind can be found and killed by uid, even ones that escaped the
   process group with ``setsid()``.  The sandbox cannot signal or ptrace the caller.
3. **Kernel resource limits** (``setrlimit``): ``RLIMIT_AS`` (memory), ``RLIMIT_CPU``,
   ``RLIMIT_NPROC`` (fork bombs), ``RLIMIT_FSIZE`` (file and output size),
   ``RLIMIT_NOFILE`` and ``RLIMIT_CORE = 0``.  The sandbox cannot raise them.
4. **Namespaces** (when permitted, normally as root): a new *network* namespace (only a
   downed loopback: no connection can leave the process, not even to 127.0.0.1), a new
   *IPC* namespace (System V / POSIX IPC objects die with the sample), a new *PID* namespace
   (the sample is its pid 1 and, with the mount namespace, gets its own ``/proc``: it sees no
   host process, not even their ``/proc/<pid>/cmdline``; every process it starts dies with it;
   where ``unshare(CLONE_NEWPID)`` is refused, or without the mount namespace, host processes
   stay visible in ``/proc`` and the report says so) and a new *mount*
   namespace in which the whole file system is remounted read-only and ``nosuid``
   (recursively, via ``mount_setattr``), ``/tmp``, ``/var/tmp``, ``/dev/shm``, ``/run``,
   ``/root`` and ``/home`` are covered by empty tmpfs (other samples' and users' files are
   invisible there), the interpreter's installation is bound back in read-only if it lived
   under one of them, and the working directory is a fresh, size- and inode-limited tmpfs
   owned by the sandbox uid: the only writable place.
5. **Wall-clock limit**: the parent polls the child and, on timeout or after a normal exit,
   ``SIGKILL``\\ s the whole process group and then every process still running under the
   sandbox uid.
6. **Fall-backs** when a kernel layer is not available (e.g. not root and no unprivileged
   user namespaces): a non-removable ``sys.addaudithook`` guard in the harness refuses
   sockets, subprocesses and ``ctypes``.  This guard is *best effort only*: an audit hook is
   not a security boundary.  Without the mount namespace, file-system protection reduces to
   ordinary permissions of the sandbox uid (world-writable directories such as ``/tmp``
   stay writable); without the privilege drop (caller not root) the sample runs as the
   caller's own user and could signal the caller's processes or write to its files.

What is *not* guaranteed
------------------------
* Confidentiality: world-readable files outside the hidden directories (e.g. the project
  tree, data sets) can be read.
* Metric integrity against deliberately adversarial code: the harness reports success with a
  random token the code never sees directly, so ``sys.exit(0)``/``os._exit(0)`` before the
  tests, a crash or a premature return never count as a pass, but code that walks the
  interpreter's frames can find the token, and code can always special-case the test inputs.
* Kernel or interpreter exploits, CPU-cache side channels, and total memory of a fork tree
  (``RLIMIT_AS`` is per process; ``RLIMIT_NPROC`` bounds the number of processes).
* Descendants of a sample outlive the wall-clock limit only while ``run_untrusted`` runs;
  if the *caller* is killed mid-sample, the sandbox's main process dies with it
  (``PR_SET_PDEATHSIG``) but a forked, sleeping grandchild can survive until the next
  clean-up (CPU-bound ones die at ``RLIMIT_CPU``).

Any failure — syntax error, exception, assertion error, early exit, timeout, signal, set-up
failure of the sandbox itself — yields ``passed=False``; ``run_untrusted`` never raises for
problems of the sample and never hangs the caller beyond ``timeout_s`` plus start-up time.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import resource
import signal
import stat
import sys
import time

# Everything the launcher needs must be imported above this line: once it has hidden
# directories such as /root in its mount namespace, new imports may no longer be possible.

_LAUNCH_FLAG = "--gem-sandbox-launch"

# Private uid/gid range for sandboxes (well above any normal system or user id).
_UID_BASE = 0x6A000000
_UID_SPAN = 1 << 20
_NOBODY = 65534

_STARTUP_LIMIT_S = 20.0  # how long the two interpreter start-ups may take at most
_RESULT_FD = 3  # fd number of the result channel inside the sandbox
_STATUSES = ("passed", "failed", "timeout", "error", "killed")

# Linux constants (stable ABI).
_CLONE_NEWNS = 0x00020000
_CLONE_NEWUTS = 0x04000000
_CLONE_NEWIPC = 0x08000000
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWPID = 0x20000000
_CLONE_NEWNET = 0x40000000
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REC, _MS_PRIVATE = 2, 4, 8, 1 << 14, 1 << 18
_AT_FDCWD = -100
_AT_RECURSIVE = 0x8000
_OPEN_TREE_CLONE = 1
_OPEN_TREE_CLOEXEC = 0o2000000
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
_MOUNT_ATTR_RDONLY, _MOUNT_ATTR_NOSUID = 0x1, 0x2
_SYS_OPEN_TREE, _SYS_MOVE_MOUNT, _SYS_MOUNT_SETATTR = 428, 429, 442  # same on all arches
_PR_SET_PDEATHSIG, _PR_SET_NO_NEW_PRIVS = 1, 38

_HIDE_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run", "/root", "/home")


# ---------------------------------------------------------------------------------------
# Code that runs inside the sandbox (as the unprivileged uid), passed with ``python -I -c``.
# It reads {token, setup, code, tests} from stdin (a root-only file, replaced by /dev/null
# right away), runs setup, then the solution, then each test in one namespace, and writes
# one JSON line carrying the token to fd 3.  Module functions are bound to locals first so
# that a solution monkeypatching ``os``/``json`` cannot break the reporting by accident.
# ---------------------------------------------------------------------------------------
_HARNESS_SRC = r'''
def _gem_harness():
    import builtins, json, linecache, os, sys, traceback
    _write, _exit, _dumps, _fmt, _rfd = os.write, os._exit, json.dumps, traceback.format_exception_only, 3
    _out, _err, _tb_print_exc = sys.stdout, sys.stderr, traceback.print_exc

    def _print_exc():
        try:
            _tb_print_exc()
        except BaseException:  # e.g. output file already at RLIMIT_FSIZE
            pass
    with open(0, "rb", closefd=False) as f:
        data = json.loads(f.read())
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    token = data.pop("token")
    if len(sys.argv) > 1 and sys.argv[1] == "net_guard":
        blocked = ("socket.", "ctypes.", "subprocess.", "os.exec", "os.posix_spawn", "os.spawn",
                   "os.system", "pty.spawn", "_posixsubprocess")
        def _guard(event, args):
            if event.startswith(blocked):
                raise PermissionError("blocked in sandbox: " + event)
        sys.addaudithook(_guard)

    def finish(status, detail):
        for s in (_out, _err):
            try:
                s.flush()
            except BaseException:
                pass
        try:
            _write(_rfd, (_dumps({"token": token, "status": status, "detail": detail[:4000]}) + "\n").encode())
        finally:
            _exit(0)

    def describe(e):
        try:
            return "".join(_fmt(type(e), e)).strip()[:1000]
        except BaseException:
            return type(e).__name__

    def run(src, name):
        linecache.cache[name] = (len(src), None, src.splitlines(True), name)
        exec(compile(src, name, "exec"), g)

    g = {"__name__": "__sandbox__", "__builtins__": builtins}
    _write(_rfd, b"S")  # started: the parent's timeout clock starts now
    try:
        if data["setup"]:
            run(data["setup"], "<setup>")
    except BaseException as e:
        _print_exc()
        finish("error", "setup raised " + describe(e))
    try:
        run(data["code"], "<solution>")
    except SystemExit as e:
        finish("failed", "solution exited (SystemExit %r) before the tests ran" % (e.code,))
    except BaseException as e:
        _print_exc()
        finish("error", "solution raised " + describe(e))
    for i, t in enumerate(data["tests"]):
        try:
            run(t, "<test %d>" % i)
        except AssertionError as e:
            msg = describe(e)
            finish("failed", "test %d failed: %s%s" % (i, t.strip()[:300],
                   "" if msg == "AssertionError" else " (" + msg + ")"))
        except SystemExit as e:
            finish("failed", "SystemExit %r during test %d" % (e.code, i))
        except BaseException as e:
            _print_exc()
            finish("error", "test %d raised %s" % (i, describe(e)))
    finish("passed", "%d tests passed" % len(data["tests"]))

_gem_harness()
'''


class SandboxResult:
    """Outcome of one sandboxed sample.

    ``passed`` is True only if the harness ran every test after the solution and reported
    success with the run's secret token.  ``status`` is one of ``passed``, ``failed``
    (an assertion failed or the code exited early), ``timeout`` (wall clock or CPU limit),
    ``error`` (syntax error, exception, memory error, sandbox set-up failure, no report) or
    ``killed`` (terminated by a signal, e.g. a resource limit).  ``detail`` is a short
    human-readable explanation ending in the active isolation layers, ``output`` the
    captured stdout+stderr (capped), ``isolation`` the layers the launcher established.
    """

    __slots__ = ("passed", "status", "detail", "duration_s", "output", "isolation")

    def __init__(self, passed: bool, status: str, detail: str, duration_s: float,
                 output: str = "", isolation: dict | None = None):
        assert status in _STATUSES, status
        self.passed = bool(passed)
        self.status = status
        self.detail = detail
        self.duration_s = float(duration_s)
        self.output = output
        self.isolation = dict(isolation or {})

    def __repr__(self) -> str:
        return (f"SandboxResult(passed={self.passed}, status={self.status!r}, "
                f"detail={self.detail!r}, duration_s={self.duration_s:.3f})")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SandboxResult):
            return NotImplemented
        return all(getattr(self, k) == getattr(other, k) for k in self.__slots__)


# ---------------------------------------------------------------------------------------
# Host facts (computed once per process)
# ---------------------------------------------------------------------------------------
_HOST: dict | None = None
_MOUNT_NS_BROKEN = False  # set when the launcher could not build the mount namespace


def _is_under(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def _first_closed_ancestor(path: str) -> str | None:
    """The outermost ancestor (or path itself) that others cannot traverse, if any."""
    cur = "/"
    for part in [p for p in path.split("/") if p]:
        cur = os.path.join(cur, part)
        try:
            if not os.stat(cur).st_mode & stat.S_IXOTH:
                return cur
        except OSError:
            return cur
    return None


def _id_mapped(ident: int, map_path: str) -> bool:
    try:
        with open(map_path) as f:
            for line in f:
                inside, _outside, count = (int(x) for x in line.split())
                if inside <= ident < inside + count:
                    return True
    except (OSError, ValueError):
        return False
    return False


def _interpreter(python: str | None) -> tuple[str, list[str]]:
    if python:
        exe = os.path.realpath(python)
        return exe, [os.path.dirname(os.path.dirname(exe))]
    exe = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    prefixes = {os.path.realpath(sys.base_prefix), os.path.realpath(sys.base_exec_prefix)}
    if not any(_is_under(exe, p) for p in prefixes):
        prefixes.add(os.path.dirname(os.path.dirname(exe)))
    # drop prefixes nested in another one
    out = sorted(p for p in prefixes if not any(q != p and _is_under(p, q) for q in prefixes))
    return exe, out


def _host() -> dict:
    global _HOST
    if _HOST is None:
        root = os.geteuid() == 0
        private = root and all(_id_mapped(i, f"/proc/self/{m}_map")
                               for i in (_UID_BASE, _UID_BASE + _UID_SPAN - 1) for m in ("uid", "gid"))
        _HOST = {"root": root, "private_ids": private}
    return _HOST


# ---------------------------------------------------------------------------------------
# Process bookkeeping via /proc
# ---------------------------------------------------------------------------------------
def _procs_of_uid(uid: int, include_zombies: bool = True) -> list[tuple[int, int]]:
    """(pid, threads) of every process whose real uid is ``uid``."""
    found = []
    try:
        names = os.listdir("/proc")
    except OSError:
        return found
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status", "rb") as f:
                text = f.read()
        except OSError:
            continue
        ruid = threads = state = None
        for line in text.split(b"\n"):
            if line.startswith(b"Uid:"):
                ruid = int(line.split()[1])
            elif line.startswith(b"Threads:"):
                threads = int(line.split()[1])
            elif line.startswith(b"State:"):
                state = line.split()[1:2]
        if ruid == uid and (include_zombies or state not in ([b"Z"], [b"X"])):
            found.append((int(name), threads or 1))
    return found


def sandbox_processes(uid: int) -> list[int]:
    """Pids of live (non-zombie) processes running under ``uid`` (for tests and audits)."""
    return [pid for pid, _ in _procs_of_uid(uid, include_zombies=False)]


def _kill_uid(uid: int, budget_s: float = 5.0) -> int:
    """SIGKILL every process of ``uid`` until none is left (or the budget is spent)."""
    killed = 0
    end = time.monotonic() + budget_s
    quiet_rounds = 0
    while time.monotonic() < end and quiet_rounds < 2:
        pids = [p for p, _ in _procs_of_uid(uid, include_zombies=False)]
        if not pids:
            quiet_rounds += 1
            continue
        quiet_rounds = 0
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except OSError:
                pass
        time.sleep(0.005)
    return killed


def _allocate_ids() -> tuple[int, int, bool]:
    """(uid, gid, private): a fresh id no process currently uses, or nobody."""
    host = _host()
    if not host["root"]:
        return os.getuid(), os.getgid(), False
    if host["private_ids"]:
        for _ in range(8):
            ident = _UID_BASE + int.from_bytes(os.urandom(4), "little") % _UID_SPAN
            if not _procs_of_uid(ident):
                return ident, ident, True
    return _NOBODY, _NOBODY, False


# ---------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------
def run_untrusted(code: str, tests: list[str], setup: str = "", timeout_s: float = 5.0,
                  memory_mb: int = 512, *, max_processes: int = 32, max_file_mb: int = 16,
                  workdir_mb: int = 64, output_limit: int = 10_000,
                  python: str | None = None) -> SandboxResult:
    """Execute ``setup``, then ``code``, then each assertion in ``tests`` in a sandbox.

    All three run in one fresh namespace (``__name__ == "__sandbox__"``, so
    ``if __name__ == "__main__":`` blocks of the solution do not run, as in the reference
    MBPP/HumanEval evaluators).  The sample passes only if every test ran without raising
    and the harness reported back afterwards; exiting early (``sys.exit``/``os._exit``),
    crashing, or running out of time or memory is a failure.

    ``timeout_s`` is the wall-clock budget from the moment the harness starts executing
    code (interpreter start-up is not charged, but is capped separately); ``RLIMIT_CPU`` is
    ``ceil(timeout_s) + 1`` seconds per process.  ``memory_mb`` bounds each process's
    address space, ``max_processes`` the number of tasks (processes and threads) of the
    sample, ``max_file_mb`` any file it writes (including its output), ``workdir_mb`` its
    scratch tmpfs.  At most ``output_limit`` characters of output are kept (head and tail).
    ``python`` selects the interpreter run in the sandbox (default: this one's base
    interpreter, without the virtual environment's packages).

    Never raises for anything the sample does; raises ``TypeError``/``ValueError`` only for
    malformed arguments.  See the module docstring for the threat model.
    """
    if not isinstance(code, str) or not isinstance(setup, str):
        raise TypeError("code and setup must be str")
    if isinstance(tests, str) or not all(isinstance(t, str) for t in tests):
        raise TypeError("tests must be a list of str")
    if not (timeout_s > 0 and memory_mb > 0 and max_processes > 0 and max_file_mb > 0):
        raise ValueError("limits must be positive")
    t0 = time.monotonic()
    try:
        return _run(code, list(tests), setup, float(timeout_s), int(memory_mb), int(max_processes),
                    int(max_file_mb), int(workdir_mb), int(output_limit), python, t0)
    except Exception as exc:  # the sandbox machinery itself failed: still a non-pass
        return SandboxResult(False, "error", f"sandbox internal error: {exc!r}", time.monotonic() - t0)


def pass_at_1(samples) -> float:
    """Mean pass rate.

    ``samples`` is an iterable whose items are either ``SandboxResult``/bool (one sample
    per problem) or sequences of them (n samples per problem; the problem contributes the
    unbiased pass@1 estimate c/n).  Raises ``ValueError`` if there is nothing to average.
    """
    def ok(x) -> float:
        return float(x.passed if isinstance(x, SandboxResult) else bool(x))

    scores = []
    for item in samples:
        if isinstance(item, (SandboxResult, bool, int)):
            scores.append(ok(item))
        else:
            group = list(item)
            if not group:
                raise ValueError("a problem has no samples")
            scores.append(sum(ok(x) for x in group) / len(group))
    if not scores:
        raise ValueError("pass_at_1 of no samples")
    return sum(scores) / len(scores)


def isolation_report(refresh: bool = False) -> dict:
    """Which isolation layers are effective on this machine (probes once, then cached).

    Returns the launcher's record, e.g. ``{"uid": ..., "private_uid": True, "privileges":
    "dropped", "network": "netns", "ipc": "ipcns", "filesystem": "mountns-readonly",
    "no_new_privs": True, "rlimits": {...}}`` plus ``probe_status`` of a trivial sample.
    """
    global _REPORT
    if _REPORT is None or refresh:
        res = run_untrusted("pass", ["assert True"], timeout_s=10)
        _REPORT = dict(res.isolation, probe_status=res.status, probe_detail=res.detail)
    return dict(_REPORT)


_REPORT: dict | None = None


# ---------------------------------------------------------------------------------------
# Parent side
# ---------------------------------------------------------------------------------------
def _minimal_env(workdir: str) -> dict:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir,
            "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}


def _read_capped(fd: int, limit: int) -> str:
    size = os.fstat(fd).st_size
    if size <= limit:
        data = os.pread(fd, size, 0)
        return data.decode("utf-8", "replace")
    half = max(limit // 2, 1)
    head = os.pread(fd, half, 0).decode("utf-8", "replace")
    tail = os.pread(fd, half, size - half).decode("utf-8", "replace")
    return f"{head}\n...[{size - 2 * half} bytes omitted]...\n{tail}"


def _isolation_summary(iso: dict) -> str:
    if not iso:
        return "isolation: unknown (launcher did not report)"
    parts = [f"uid={iso.get('uid')}" + ("" if iso.get("private_uid") else "(shared)"),
             f"priv={iso.get('privileges')}", f"net={iso.get('network')}", f"pid={iso.get('pid')}",
             f"fs={iso.get('filesystem')}", "rlimits" if iso.get("rlimits") else "no-rlimits"]
    return "isolation: " + ", ".join(parts)


def _wait_exit(pid: int, res_fd: int, timeout_s: float, t0: float) -> bool:
    """Poll until ``pid`` exits (not reaped) or its time is up; True on timeout."""
    hard_deadline = t0 + timeout_s + _STARTUP_LIMIT_S
    code_deadline = None
    delay = 0.001
    while True:
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return False
        except ChildProcessError:
            return False
        now = time.monotonic()
        if code_deadline is None and os.fstat(res_fd).st_size > 0:
            code_deadline = now + timeout_s
        if now >= hard_deadline or (code_deadline is not None and now >= code_deadline):
            return True
        time.sleep(delay)
        delay = min(delay * 2, 0.02)


def _run(code, tests, setup, timeout_s, memory_mb, max_processes, max_file_mb, workdir_mb,
         output_limit, python, t0) -> SandboxResult:
    global _MOUNT_NS_BROKEN
    import shutil
    import subprocess
    import tempfile
    from secrets import token_hex

    host = _host()
    exe, prefixes = _interpreter(python)
    base = tempfile.mkdtemp(prefix="gem-sandbox-")
    fds: list[int] = []
    try:
        os.chmod(base, 0o711)  # traversable, not listable: the root-only files stay private
        work = os.path.join(base, "work")
        os.mkdir(work, 0o700)
        uid, gid, private = _allocate_ids()
        drop = host["root"]
        if drop:
            os.chown(work, uid, gid)
        use_mountns = drop and not _MOUNT_NS_BROKEN

        hide, expose = [], []
        if use_mountns:
            hide = [d for d in _HIDE_DIRS if os.path.isdir(d) and not os.path.islink(d)]
            for p in prefixes:
                closed = _first_closed_ancestor(p)
                if closed and not any(_is_under(closed, h) for h in hide):
                    hide.append(closed)
            expose = [p for p in prefixes if any(_is_under(p, h) for h in hide)]

        if drop and not use_mountns:
            closed = _first_closed_ancestor(exe) or _first_closed_ancestor(work)
            if closed:
                return SandboxResult(
                    False, "error",
                    f"sandbox unusable: {closed!r} is not traversable by the unprivileged sandbox uid and "
                    "no mount namespace is available to expose the interpreter/workdir; pass python= an "
                    "interpreter installed in a world-readable location",
                    time.monotonic() - t0, "", {"filesystem": "permissions-only", "error": "interpreter not accessible"})
        token = token_hex(16)
        stdin_path = os.path.join(base, "stdin.json")
        with open(os.open(stdin_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            json.dump({"token": token, "setup": setup, "code": code, "tests": tests}, f)

        def private_file(name: str) -> int:
            fd = os.open(os.path.join(base, name), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            fds.append(fd)
            return fd

        out_fd, res_fd, rep_fd = private_file("output"), private_file("result"), private_file("report")
        nproc_extra = 0 if private else sum(t for _, t in _procs_of_uid(uid))
        cfg = {
            "python": exe, "harness": _HARNESS_SRC, "workdir": work, "env": _minimal_env(work),
            "uid": uid, "gid": gid, "private_uid": private, "drop": drop,
            "mountns": use_mountns, "hide": hide, "expose": expose, "workdir_mb": workdir_mb,
            "result_fd": res_fd, "report_fd": rep_fd,
            "rlimits": {
                "AS": memory_mb * 2**20,
                "CPU": [math.ceil(timeout_s) + 1, math.ceil(timeout_s) + 2],
                "NPROC": max_processes + nproc_extra,
                "FSIZE": max_file_mb * 2**20,
                "NOFILE": 64,
                "CORE": 0,
            },
        }
        with open(stdin_path, "rb") as fin:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", os.path.abspath(__file__), _LAUNCH_FLAG, json.dumps(cfg)],
                stdin=fin, stdout=out_fd, stderr=subprocess.STDOUT, pass_fds=(res_fd, rep_fd),
                close_fds=True, start_new_session=True, cwd="/", env=_minimal_env(work))
        try:
            timed_out = _wait_exit(proc.pid, res_fd, timeout_s, t0)
        finally:
            # The unreaped leader keeps the process-group id alive, so this cannot hit a
            # recycled pid; then sweep the private uid for escapees (setsid, orphans).
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
            if private:
                _kill_uid(uid)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:  # pragma: no cover - unkillable (D state)
                pass
        rc = proc.returncode

        try:
            iso = json.loads(os.pread(rep_fd, 1 << 16, 0) or b"{}")
        except ValueError:
            iso = {}
        output = _read_capped(out_fd, output_limit)
        raw = os.pread(res_fd, 1 << 16, 0)
        duration = time.monotonic() - t0

        if rc == 3 and iso.get("stage") == "mountns" and use_mountns:
            # This kernel/container cannot build the mount namespace: disable it and retry.
            _MOUNT_NS_BROKEN = True
            return _run(code, tests, setup, timeout_s, memory_mb, max_processes, max_file_mb,
                        workdir_mb, output_limit, python, t0)

        status, detail = _classify(timed_out, rc, raw, token, iso, timeout_s)
        return SandboxResult(status == "passed", status, f"{detail} [{_isolation_summary(iso)}]",
                             duration, output, iso)
    finally:
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(base, ignore_errors=True)


def _classify(timed_out: bool, rc: int | None, raw: bytes, token: str, iso: dict,
              timeout_s: float) -> tuple[str, str]:
    if timed_out:
        return "timeout", f"wall-clock limit of {timeout_s:g}s exceeded"
    if raw[:1] == b"S":
        try:
            msg = json.loads(raw[1:].decode("utf-8", "replace").strip().splitlines()[-1])
        except (ValueError, IndexError):
            msg = None
        if isinstance(msg, dict) and msg.get("token") == token and msg.get("status") in _STATUSES:
            return msg["status"], str(msg.get("detail", ""))
        if msg is not None or len(raw) > 1:
            return "error", "result channel corrupted (no valid report carrying the run token)"
    if rc is not None and rc < 0:
        sig = -rc
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        if sig == signal.SIGXCPU:
            return "timeout", "CPU time limit exceeded (SIGXCPU)"
        why = {signal.SIGKILL: "memory/CPU limit or external kill", signal.SIGXFSZ: "file size limit",
               signal.SIGSEGV: "segmentation fault"}.get(sig, "signal")
        return "killed", f"terminated by {name} ({why})"
    if raw[:1] != b"S" and iso.get("error"):
        return "error", f"sandbox set-up failed at stage {iso.get('stage')!r}: {iso['error']}"
    return "error", f"exited with code {rc} before reporting a result"


# ---------------------------------------------------------------------------------------
# Launcher (runs as the caller's user, usually root, in the new session; execs the harness)
# ---------------------------------------------------------------------------------------
class _StageError(Exception):
    def __init__(self, stage: str, exit_code: int, msg: str):
        super().__init__(msg)
        self.stage, self.exit_code = stage, exit_code


def _libc_call(fn, *args) -> int:
    ret = fn(*args)
    if ret == -1:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def _launcher_main(cfg: dict) -> None:  # pragma: no cover - runs in the child
    rep: dict = {"stage": "start", "uid": cfg["uid"], "private_uid": cfg["private_uid"]}
    rep_fd = cfg["report_fd"]

    def write_report() -> None:
        data = json.dumps(rep).encode()
        os.ftruncate(rep_fd, 0)
        os.pwrite(rep_fd, data, 0)

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        L = ctypes.c_long

        class _MountAttr(ctypes.Structure):
            _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                        ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]

        def unshare(flags: int) -> bool:
            return libc.unshare(ctypes.c_int(flags)) == 0

        def mount(src, target, fstype, flags, data) -> None:
            enc = (lambda s: None if s is None else os.fsencode(s))
            _libc_call(libc.mount, enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data))

        def mount_setattr(path: str, flags: int, set_: int, clr: int) -> None:
            attr = _MountAttr(set_, clr, 0, 0)
            _libc_call(libc.syscall, L(_SYS_MOUNT_SETATTR), L(_AT_FDCWD), ctypes.c_char_p(os.fsencode(path)),
                       L(flags), ctypes.byref(attr), L(ctypes.sizeof(attr)))

        # dup the result channel to fd 3 (limits below may be lower than the parent's fds)
        os.dup2(cfg["result_fd"], _RESULT_FD)
        if cfg["result_fd"] != _RESULT_FD:
            os.close(cfg["result_fd"])
        os.umask(0o022)

        # 1. namespaces (each optional; unshare failure leaves no state behind)
        rep["stage"] = "namespaces"
        net = unshare(_CLONE_NEWNET)
        if not net and not cfg["drop"]:
            net = unshare(_CLONE_NEWUSER | _CLONE_NEWNET)  # unprivileged user namespace
        rep["network"] = "netns" if net else "audit-hook guard (no netns: %s)" % os.strerror(ctypes.get_errno())
        rep["ipc"] = "ipcns" if unshare(_CLONE_NEWIPC) else "shared"
        unshare(_CLONE_NEWUTS)
        # PID namespace: only children enter it, so the launcher forks; the child is the sample's
        # pid 1 (and gets its own /proc below), the launcher waits and exits as it did.
        pidns = unshare(_CLONE_NEWPID)
        rep["pid"] = "pidns" if pidns else "shared (no pid namespace: %s)" % os.strerror(ctypes.get_errno())
        if pidns:
            libc.prctl(_PR_SET_PDEATHSIG, L(signal.SIGKILL), L(0), L(0), L(0))  # dies with the caller
            child = os.fork()
            if child:
                status = os.waitpid(child, 0)[1]
                if os.WIFSIGNALED(status):
                    signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
                    os.kill(os.getpid(), os.WTERMSIG(status))
                os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 4)
            if not cfg["mountns"]:
                rep["pid"] = "pidns (host processes still visible in /proc: no mount namespace)"

        # 2. mount namespace: read-only world, hidden scratch dirs, private tmpfs workdir
        rep["filesystem"] = "permissions-only" if cfg["drop"] else "none (same user as caller)"
        if cfg["mountns"]:
            rep["stage"] = "mountns"
            if not unshare(_CLONE_NEWNS):
                raise _StageError("mountns", 3, "unshare(CLONE_NEWNS): " + os.strerror(ctypes.get_errno()))
            try:
                mount(None, "/", None, _MS_REC | _MS_PRIVATE, None)
                trees = []
                for p in cfg["expose"]:
                    fd = _libc_call(libc.syscall, L(_SYS_OPEN_TREE), L(_AT_FDCWD), ctypes.c_char_p(os.fsencode(p)),
                                    L(_OPEN_TREE_CLONE | _OPEN_TREE_CLOEXEC | _AT_RECURSIVE))
                    trees.append((p, fd))
                for d in cfg["hide"]:
                    mount("tmpfs", d, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=1m,nr_inodes=1024,mode=0755")
                for p, fd in trees:
                    os.makedirs(p, exist_ok=True)
                    _libc_call(libc.syscall, L(_SYS_MOVE_MOUNT), L(fd), ctypes.c_char_p(b""), L(_AT_FDCWD),
                               ctypes.c_char_p(os.fsencode(p)), L(_MOVE_MOUNT_F_EMPTY_PATH))
                    os.close(fd)
                if pidns:  # this namespace's processes only: no host process's cmdline or environ
                    mount("proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, None)
                os.makedirs(cfg["workdir"], exist_ok=True)
                mount("tmpfs", cfg["workdir"], "tmpfs", _MS_NOSUID | _MS_NODEV,
                      "size=%dm,nr_inodes=4096,mode=0700,uid=%d,gid=%d" % (cfg["workdir_mb"], cfg["uid"], cfg["gid"]))
                mount_setattr("/", _AT_RECURSIVE, _MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID, 0)
                mount_setattr(cfg["workdir"], 0, 0, _MOUNT_ATTR_RDONLY)
            except OSError as e:
                raise _StageError("mountns", 3, repr(e)) from e
            rep["filesystem"] = "mountns-readonly"
            rep["hidden"] = cfg["hide"]

        # 3. resource limits (lowering is always allowed; never exceed the current hard limit)
        rep["stage"] = "rlimits"
        applied = {}
        for name, value in cfg["rlimits"].items():
            which = getattr(resource, "RLIMIT_" + name)
            soft, hard = (value, value) if isinstance(value, int) else value
            _cur_soft, cur_hard = resource.getrlimit(which)
            if cur_hard != resource.RLIM_INFINITY:
                soft, hard = min(soft, cur_hard), min(hard, cur_hard)
            resource.setrlimit(which, (soft, hard))
            applied[name] = soft
        rep["rlimits"] = applied

        # 4. drop privileges (mandatory when root: refuse to run untrusted code as root)
        rep["stage"] = "privileges"
        if cfg["drop"]:
            os.setgroups([])
            os.setresgid(cfg["gid"], cfg["gid"], cfg["gid"])
            os.setresuid(cfg["uid"], cfg["uid"], cfg["uid"])
            if os.getresuid() != (cfg["uid"],) * 3 or os.getresgid() != (cfg["gid"],) * 3:
                raise _StageError("privileges", 4, "uid/gid not switched")
            try:
                os.setuid(0)
            except PermissionError:
                pass
            else:
                raise _StageError("privileges", 4, "could regain root after dropping privileges")
            rep["privileges"] = "dropped"
        else:
            rep["privileges"] = "unchanged (caller is not root)"
        rep["no_new_privs"] = libc.prctl(_PR_SET_NO_NEW_PRIVS, L(1), L(0), L(0), L(0)) == 0
        libc.prctl(_PR_SET_PDEATHSIG, L(signal.SIGKILL), L(0), L(0), L(0))  # after setuid (reset by it)

        rep["stage"] = "exec"
        write_report()
        os.set_inheritable(rep_fd, False)  # closes at exec; still usable if exec fails
        os.chdir(cfg["workdir"])
        argv = [cfg["python"], "-I", "-c", cfg["harness"]] + ([] if net else ["net_guard"])
        os.execve(cfg["python"], argv, cfg["env"])
    except _StageError as e:
        rep["stage"], rep["error"] = e.stage, str(e)
        code = e.exit_code
    except BaseException as e:
        rep["error"] = repr(e)
        code = 4
    try:
        write_report()
    finally:
        os._exit(code)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == _LAUNCH_FLAG:
    _launcher_main(json.loads(sys.argv[2]))
