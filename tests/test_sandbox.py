"""Hostile and benign samples for gem.sandbox.

Every hostile sample must end quickly (well under 15 s), must not pass, and must leave
the host untouched: no files changed outside the sandbox, no network connection made,
no process left behind.
"""

from __future__ import annotations

import concurrent.futures
import glob
import os
import socket
import sys
import tempfile
import threading
import time

import pytest

if not sys.platform.startswith("linux"):
    pytest.skip("the sandbox relies on Linux process and namespace APIs", allow_module_level=True)

from gem.sandbox import SandboxResult, isolation_report, pass_at_1, run_untrusted, sandbox_processes

FAST = 15.0  # seconds any single sample may take, hostile ones included


@pytest.fixture(scope="module")
def iso() -> dict:
    report = isolation_report()
    assert report["probe_status"] == "passed", report
    return report


def _check(r: SandboxResult, passed: bool) -> None:
    assert r.passed is passed, r
    assert r.duration_s < FAST, r


def _assert_no_leftovers(r: SandboxResult) -> None:
    """No process may survive under the sample's private uid."""
    if r.isolation.get("private_uid"):
        assert sandbox_processes(r.isolation["uid"]) == []


# --------------------------------------------------------------------------- benign samples
def test_correct_solution_passes(iso):
    r = run_untrusted("def add(a, b):\n    return a + b\n", ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"])
    _check(r, True)
    assert r.status == "passed"
    assert "isolation:" in r.detail


def test_wrong_solution_fails(iso):
    r = run_untrusted("def add(a, b):\n    return a - b\n", ["assert add(1, 2) == 3"])
    _check(r, False)
    assert r.status == "failed"
    assert "add(1, 2) == 3" in r.detail


def test_setup_and_tests_share_namespace_with_solution(iso):
    r = run_untrusted("def hyp(a, b):\n    return math.hypot(a, b)\n", ["assert hyp(3, 4) == 5.0"], setup="import math")
    _check(r, True)


def test_syntax_error_is_error(iso):
    r = run_untrusted("def f(:\n    return 1\n", ["assert f() == 1"])
    _check(r, False)
    assert r.status == "error"
    assert "SyntaxError" in r.detail


def test_exception_in_tests_is_error(iso):
    r = run_untrusted("def f(x):\n    return 1 / x\n", ["assert f(0) == 0"])
    _check(r, False)
    assert r.status == "error"
    assert "ZeroDivisionError" in r.detail


def test_main_block_of_solution_does_not_run(iso):
    code = "def f():\n    return 1\nif __name__ == '__main__':\n    input()\n"
    _check(run_untrusted(code, ["assert f() == 1"]), True)


def test_scratch_directory_is_writable_and_private(iso):
    code = (
        "import os\n"
        "with open('scratch.txt', 'w') as fh:\n    fh.write('hello')\n"
        "def f():\n    return open('scratch.txt').read()\n"
    )
    _check(run_untrusted(code, ["assert f() == 'hello'", "assert os.getcwd() != '/'"]), True)


# --------------------------------------------------------------------------- early exits
def test_sys_exit_before_tests_does_not_pass(iso):
    r = run_untrusted("import sys\nsys.exit(0)\n", ["assert False"])
    _check(r, False)
    assert r.status == "failed"


def test_os_exit_before_tests_does_not_pass(iso):
    r = run_untrusted("import os\nos._exit(0)\n", ["assert False"])
    _check(r, False)
    assert r.status == "error"


def test_forged_success_output_does_not_pass(iso):
    code = "import os\nprint('passed')\nos.write(3, b'S{\"status\": \"passed\", \"token\": \"guess\"}\\n')\nos._exit(0)\n"
    r = run_untrusted(code, ["assert False"])
    _check(r, False)


# --------------------------------------------------------------------------- resource abuse
def test_infinite_loop_times_out(iso):
    t0 = time.monotonic()
    r = run_untrusted("while True:\n    pass\n", ["assert True"], timeout_s=1.0)
    _check(r, False)
    assert r.status == "timeout"
    assert time.monotonic() - t0 < 1.0 + 10
    _assert_no_leftovers(r)


def test_sleep_times_out(iso):
    r = run_untrusted("import time\ntime.sleep(60)\n", ["assert True"], timeout_s=1.0)
    _check(r, False)
    assert r.status == "timeout"


def test_huge_allocation_fails(iso):
    r = run_untrusted("b = bytearray(50 * 2**30)\n", ["assert len(b) > 0"])
    _check(r, False)
    assert r.status in ("error", "killed")


def test_fork_bomb_is_contained_and_cleaned_up(iso):
    code = (
        "import os\n"
        "while True:\n"
        "    try:\n"
        "        os.fork()\n"
        "    except OSError:\n"
        "        pass\n"
    )
    r = run_untrusted(code, ["assert True"], timeout_s=2.0, max_processes=16)
    _check(r, False)
    assert r.status in ("timeout", "killed", "error")
    _assert_no_leftovers(r)


def test_fork_bomb_escaping_the_process_group_is_cleaned_up(iso):
    if not iso.get("private_uid"):
        pytest.skip("needs a private sandbox uid (run as root)")
    code = (
        "import os\n"
        "while True:\n"
        "    try:\n"
        "        if os.fork() == 0:\n"
        "            os.setsid()\n"
        "    except OSError:\n"
        "        pass\n"
    )
    r = run_untrusted(code, ["assert True"], timeout_s=2.0, max_processes=16)
    _check(r, False)
    _assert_no_leftovers(r)


def test_daemonised_sleeper_is_killed_after_a_passing_sample(iso):
    if not iso.get("private_uid"):
        pytest.skip("needs a private sandbox uid (run as root)")
    code = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        time.sleep(1000)\n"
        "    os._exit(0)\n"
        "def f():\n    return 1\n"
    )
    r = run_untrusted(code, ["assert f() == 1"])
    _check(r, True)  # the sample itself is correct ...
    _assert_no_leftovers(r)  # ... but its background process must not survive


def test_thread_bomb_is_limited(iso):
    code = "import threading, time\nfor _ in range(10_000):\n    threading.Thread(target=time.sleep, args=(30,), daemon=True).start()\n"
    r = run_untrusted(code, ["assert True"], timeout_s=2.0, max_processes=16)
    _check(r, False)
    _assert_no_leftovers(r)


def test_output_is_capped(iso):
    r = run_untrusted("while True:\n    print('y' * 1000)\n", ["assert True"], timeout_s=2.0, output_limit=2000)
    _check(r, False)
    assert len(r.output) <= 2000 + 100


# --------------------------------------------------------------------------- file system
def _protected_dir(tmp_path, mode: int):
    d = tmp_path / "protected"
    d.mkdir()
    os.chmod(d, mode)
    sentinel = d / "sentinel.txt"
    sentinel.write_text("keep me")
    os.chmod(sentinel, 0o644)
    if os.geteuid() == 0:
        os.chown(d, 0, 0)
        os.chown(sentinel, 0, 0)
    return d, sentinel


_FILE_ATTACK = """
import os, shutil
target = {target!r}
succeeded = []
for name, attempt in [
    ("remove", lambda: os.remove(target)),
    ("overwrite", lambda: open(target, "w").write("pwned")),
    ("write-next-to", lambda: open(os.path.join(os.path.dirname(target), "new.txt"), "w").write("x")),
    ("chmod", lambda: os.chmod(target, 0o777)),
    ("rmtree", lambda: shutil.rmtree(os.path.dirname(target))),
]:
    try:
        attempt()
        succeeded.append(name)
    except OSError:
        pass
"""


@pytest.mark.parametrize("mode", [0o755, 0o777])
def test_cannot_modify_files_outside_sandbox(iso, tmp_path, mode):
    if iso.get("privileges") != "dropped" and iso.get("filesystem") != "mountns-readonly":
        pytest.skip("not root: the sample runs as the owner of the test's files")
    d, sentinel = _protected_dir(tmp_path, mode)
    before = os.stat(sentinel)
    # The sample "passes" only if some attack worked, so a pass would be a failure of the sandbox.
    r = run_untrusted(_FILE_ATTACK.format(target=str(sentinel)), ["assert succeeded, 'all attacks failed'"])
    _check(r, False)
    assert sentinel.read_text() == "keep me"
    after = os.stat(sentinel)
    assert (after.st_mode, after.st_uid, after.st_mtime_ns) == (before.st_mode, before.st_uid, before.st_mtime_ns)
    assert sorted(p.name for p in d.iterdir()) == ["sentinel.txt"]


def test_world_writable_tmp_is_not_writable(iso):
    if iso.get("filesystem") != "mountns-readonly":
        pytest.skip("only the mount-namespace layer protects world-writable directories")
    name = f"gem-sandbox-probe-{os.getpid()}-{time.monotonic_ns()}"
    path = os.path.join(tempfile.gettempdir(), name)
    code = f"open({path!r}, 'w').write('x')\nopen('/var/tmp/{name}', 'w').write('x')\n"
    r = run_untrusted(code, ["assert True"])
    _check(r, False)
    assert not os.path.exists(path) and not os.path.exists(f"/var/tmp/{name}")


def test_root_home_is_hidden(iso):
    if iso.get("filesystem") != "mountns-readonly":
        pytest.skip("needs the mount-namespace layer")
    r = run_untrusted("import os\nentries = os.listdir('/root')\n", ["assert entries == [] or entries == ['.pyenv']"])
    assert r.status in ("passed", "error"), r  # hidden (tmpfs) or unreadable; never the real home


def test_scratch_dirs_are_removed(iso):
    pattern = os.path.join(tempfile.gettempdir(), "gem-sandbox-*")
    before = set(glob.glob(pattern))
    run_untrusted("open('f', 'w').write('x' * 1000)\n", ["assert True"])
    assert set(glob.glob(pattern)) - before == set()


# --------------------------------------------------------------------------- network and host
def test_socket_to_localhost_is_blocked(iso):
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.1)
    port = srv.getsockname()[1]
    connections: list = []
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, addr = srv.accept()
            except (socket.timeout, OSError):
                continue
            connections.append(addr)
            conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        code = (
            "import socket\n"
            f"s = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
            "s.sendall(b'hello')\n"
        )
        r = run_untrusted(code, ["assert True"], timeout_s=3.0)
        time.sleep(0.3)
    finally:
        stop.set()
        t.join(timeout=5)
        srv.close()
    _check(r, False)
    assert connections == []


def test_cannot_signal_the_caller(iso):
    if iso.get("privileges") != "dropped":
        pytest.skip("without a privilege drop the sample runs as the caller's user")
    # The caller's own pid: in a PID namespace (getppid() is 0 there) it does not exist for the
    # sample; without one, the privilege drop forbids signalling it.
    r = run_untrusted(f"import os\nos.kill({os.getpid()}, 0)\n", ["assert True"])
    _check(r, False)
    assert ("ProcessLookupError" if iso.get("pid") == "pidns" else "PermissionError") in r.detail


def test_isolation_report_on_root(iso):
    if os.geteuid() != 0:
        pytest.skip("root-only layers")
    assert iso["privileges"] == "dropped"
    assert iso["rlimits"]["NPROC"] >= 1 and iso["rlimits"]["CORE"] == 0
    assert iso["network"] in ("netns",) or iso["network"].startswith("audit-hook")


def test_concurrent_samples(iso):
    jobs = [("def f():\n    return 1\n", ["assert f() == 1"], True),
            ("def f():\n    return 2\n", ["assert f() == 1"], False),
            ("while True:\n    pass\n", ["assert True"], False),
            ("def f(:\n", ["assert True"], False)] * 2
    with concurrent.futures.ThreadPoolExecutor(4) as ex:
        results = list(ex.map(lambda j: run_untrusted(j[0], j[1], timeout_s=1.5), jobs))
    assert [r.passed for r in results] == [j[2] for j in jobs]


# --------------------------------------------------------------------------- API helpers
def test_argument_validation():
    with pytest.raises(TypeError):
        run_untrusted("x = 1", "assert x == 1")  # tests must be a list, not a string
    with pytest.raises(ValueError):
        run_untrusted("x = 1", [], timeout_s=0)


def test_pass_at_1():
    ok = SandboxResult(True, "passed", "", 0.0)
    bad = SandboxResult(False, "failed", "", 0.0)
    assert pass_at_1([ok, bad, bad, ok]) == 0.5
    assert pass_at_1([True, False]) == 0.5
    assert pass_at_1([[ok, bad], [ok, ok]]) == pytest.approx(0.75)  # per-problem c/n, then mean
    with pytest.raises(ValueError):
        pass_at_1([])


def test_audit_hook_network_guard_fallback(tmp_path):
    """The in-process fall-back (used when no network namespace can be created) refuses sockets."""
    import json
    import subprocess

    from gem.sandbox import _HARNESS_SRC

    payload = tmp_path / "payload.json"
    result = tmp_path / "result"
    code = "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\n"
    payload.write_text(json.dumps({"token": "tok", "setup": "", "code": code, "tests": ["assert True"]}))
    with open(payload, "rb") as fin:
        subprocess.run(["/bin/sh", "-c", 'exec "$0" -I -c "$1" net_guard 3>"$2"', sys.executable, _HARNESS_SRC,
                        str(result)], stdin=fin, capture_output=True, timeout=30, check=False)
    raw = result.read_bytes()
    assert raw[:1] == b"S"
    msg = json.loads(raw[1:])
    assert msg["token"] == "tok" and msg["status"] == "error"
    assert "blocked in sandbox" in msg["detail"]
