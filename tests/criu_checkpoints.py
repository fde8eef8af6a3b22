"""Real CRIU checkpoints of processes with known SysV IPC and UTS state, made per test.

``make_ipc_checkpoint(workdir, scenario)`` starts ``fixtures/src/ipcgen.py SCENARIO``
in fresh IPC and UTS namespaces (``unshare --ipc --uts``), records the IPC/UTS snapshot
of the live process (``fixtures/tools/ipc_snapshot.py`` run through ``nsenter``) as
``expected``, and dumps the process with ``criu dump --shell-job``. A namespace built
from the images, or a restore of them, must reproduce ``expected`` exactly.

Everything lives under ``workdir``: the images, CRIU's log and nothing else. The
generator runs with ``/`` as its working directory and with stdio on /dev/null, so a
restore does not depend on ``workdir`` or on pipes to the test. The dumped binary is
the Python interpreter (``sys.executable``), so a restore on the same machine finds it
at the same path.

Scenarios (see ``ipcgen.py`` for the exact objects):

- ``sparse-ids``: ids with sequence numbers above 0 and gaps (objects created and
  removed first, two ids placed with ``kernel/*_next_id``), keyed and IPC_PRIVATE
  objects mixed, owner uid/gid 1000 with mode 0400, a zero-length message.
- ``large``: a 3 MiB + 4321 bytes segment with six scattered pages written, an untouched
  2 MiB segment and a set of 1000 semaphores. Its queue has messages of 8192, 8193,
  20000 and 65536 bytes, after kernel.msgmax was raised to 65536 and kernel.msgmnb to
  262144.
  CRIU 4.1.1 dumps messages up to the namespace's kernel.msgmax (it reads msgmax before
  copying them with MSG_COPY), but its restore rejects any message above 8192 bytes.
- ``empty``: no IPC objects; kernel.shm*, kernel.msg*, kernel.sem and fs.mqueue.*
  changed; domainname left at its default "(none)".
- ``many``: 48 segments, 48 queues and 48 semaphore sets.
"""

import contextlib
import ctypes
import json
import logging
import os
import selectors
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from workers import namespaces

log = logging.getLogger(__name__)

FIXTURES = Path(__file__).parent / "fixtures"
GENERATOR = FIXTURES / "src" / "ipcgen.py"
SNAPSHOT = FIXTURES / "tools" / "ipc_snapshot.py"

SCENARIOS = ("sparse-ids", "large", "empty", "many")

READY_TIMEOUT = 30.0
CRIU_TIMEOUT = 120.0


class CheckpointSetupError(RuntimeError):
    """Raised when a test checkpoint cannot be made. The message contains the tool output."""


class BuildFailed(AssertionError):
    """Raised when cerman's builder fails on a checkpoint: a test failure, not a setup error."""


@dataclass(frozen=True)
class Checkpoint:
    """A CRIU dump of one scenario.

    ``expected`` is the IPC/UTS snapshot of the live process just before the dump.
    ``pid`` is the dumped process id, which ``criu restore`` reuses.
    """

    images_dir: Path
    expected: dict
    scenario: str = ""
    pid: int = 0


def criu_binary():
    """Return the path of ``criu`` on PATH, or skip the calling test when there is none."""
    path = shutil.which("criu")
    if path is None:
        pytest.skip("criu is not on PATH; install CRIU 4.x to run checkpoint tests")
    return path


def make_ipc_checkpoint(workdir: Path, scenario: str, *, interpreter=None) -> Checkpoint:
    """Start the scenario's process, snapshot its namespaces and dump it into ``workdir/images``.

    ``interpreter`` is a copy of this Python binary to run the generator with (it finds
    its standard library through PYTHONHOME), so a test can move the dumped binary.
    The process is killed and reaped before this returns, also when a step fails.
    """
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; use one of {', '.join(SCENARIOS)}")
    criu = criu_binary()
    workdir = Path(workdir)
    images_dir = workdir / "images"
    images_dir.mkdir(parents=True)
    dump_log = workdir / "dump.log"

    env = dict(os.environ)
    if interpreter is not None:
        env["PYTHONHOME"] = sys.prefix
    command = ["unshare", "--ipc", "--uts", str(interpreter or sys.executable), str(GENERATOR),
               scenario]
    # Start a new session, because criu dump fails on a task whose session leader is
    # outside its pid namespace, as when the tests run in a pid namespace.
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, cwd="/", env=env,
                               start_new_session=True)
    try:
        pid = wait_ready(process, scenario)
        expected = snapshot_process(pid)
        dump(criu, pid, images_dir, dump_log)
    finally:
        stop(process)

    log.info("dumped scenario %s (pid %d) into %s", scenario, pid, images_dir)
    return Checkpoint(images_dir=images_dir, expected=expected, scenario=scenario, pid=pid)


def wait_ready(process, scenario):
    """Return the generator's pid once it prints its ready line."""
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    try:
        ready = selector.select(READY_TIMEOUT)
    finally:
        selector.close()
    line = process.stdout.readline() if ready else b""
    if not line:
        if process.poll() is None:
            process.kill()
        error = process.stderr.read().decode(errors="replace").strip()
        process.wait(timeout=30)
        raise CheckpointSetupError(
            f"ipcgen.py {scenario} did not report ready within {READY_TIMEOUT} s "
            f"(exit status {process.returncode}): {error or 'no stderr output'}")

    message = json.loads(line)
    # unshare(1) without --fork execs the generator, so the pids are the same.
    if message["pid"] != process.pid:
        raise CheckpointSetupError(
            f"ipcgen.py reported pid {message['pid']}, expected {process.pid}; "
            "unshare must exec the generator, not fork it")
    return process.pid


def snapshot_in(ns_args):
    """Return the ipc_snapshot.py result run through ``nsenter ns_args``."""
    command = ["nsenter", *ns_args, sys.executable, str(SNAPSHOT)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise CheckpointSetupError(
            f"{' '.join(command)} failed with status {result.returncode}: {result.stderr.strip()}")
    return json.loads(result.stdout)


def snapshot_process(pid):
    return snapshot_in(["-t", str(pid), "--ipc", "--uts"])


def snapshot_pinned(ipc_path, uts_path):
    """Return the snapshot taken through ``nsenter --ipc=IPC_PATH --uts=UTS_PATH``."""
    return snapshot_in([f"--ipc={ipc_path}", f"--uts={uts_path}"])


def dump(criu, pid, images_dir, dump_log):
    # CRIU resolves -o against the images directory unless the path is absolute.
    command = [criu, "dump", "-t", str(pid), "-D", str(images_dir), "--shell-job",
               "-v4", "-o", str(dump_log.absolute())]
    result = subprocess.run(command, capture_output=True, text=True, timeout=CRIU_TIMEOUT)
    if result.returncode != 0:
        raise CheckpointSetupError(
            f"criu dump of pid {pid} failed with status {result.returncode}; "
            f"last lines of {dump_log}:\n{tail(dump_log)}")


def tail(path, lines=20):
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as error:
        return f"(log unreadable: {error.strerror})"
    return "\n".join(text.splitlines()[-lines:])


def stop(process):
    """Kill the process if it still runs and reap it."""
    if process.poll() is None:
        process.kill()
    process.wait(timeout=30)
    for stream in (process.stdout, process.stderr):
        if stream is not None and not stream.closed:
            stream.close()


class RestoreError(RuntimeError):
    """Raised when ``criu restore`` fails. ``log_path`` names CRIU's log."""

    def __init__(self, message, log_path):
        super().__init__(message)
        self.log_path = Path(log_path)

    def log_text(self):
        return self.log_path.read_text(errors="replace")


def restore(checkpoint, workdir, join_ns=(), images_dir=None):
    """Run ``criu restore -d`` of ``checkpoint`` and return the restored pid.

    ``join_ns`` is a list of (type, nsfs path) pairs passed as ``--join-ns TYPE:PATH``.
    The restored process gets the dumped pid (CRIU 4.1.1 restores pids) and, since
    ``-d`` detaches it, becomes a child of the nearest subreaper: call this inside
    ``subreaper()`` and end the process with ``kill_restored``.
    """
    criu = criu_binary()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    restore_log = workdir / "restore.log"
    pidfile = workdir / "restore.pid"
    pidfile.unlink(missing_ok=True)

    command = [criu, "restore", "-D", str(images_dir or checkpoint.images_dir), "--shell-job",
               "-d", "--pidfile", str(pidfile), "-v4", "-o", str(restore_log)]
    for ns_type, path in join_ns:
        command += ["--join-ns", f"{ns_type}:{path}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=CRIU_TIMEOUT)
    if result.returncode != 0:
        # A task that CRIU forked before failing may be left to this subreaper, and
        # it occupies the dumped pid that the next restore needs.
        kill_restored(checkpoint.pid)
        raise RestoreError(
            f"criu restore of {checkpoint.images_dir} failed with status {result.returncode}; "
            f"last lines of {restore_log}:\n{tail(restore_log)}", restore_log)
    return int(pidfile.read_text())


PR_SET_CHILD_SUBREAPER = 36
PR_GET_CHILD_SUBREAPER = 37
_libc = ctypes.CDLL(None, use_errno=True)


@contextlib.contextmanager
def subreaper():
    """Make this process the subreaper of orphans created inside the block.

    ``criu restore -d`` leaves the restored process orphaned. Without a subreaper it
    goes to pid 1, which may not reap it, so a test could neither wait for it nor
    leave no zombie behind.
    """
    previous = ctypes.c_int()
    if _libc.prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(previous), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_GET_CHILD_SUBREAPER) failed")
    if _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")
    try:
        yield
    finally:
        _libc.prctl(PR_SET_CHILD_SUBREAPER, previous.value, 0, 0, 0)


def kill_restored(pid):
    """SIGKILL and reap ``pid`` if it is a child of this process (a restored process).

    A pid whose parent is another process was never restored here, or was reused
    after the restored process ended, so it is left alone.
    """
    if parent_pid(pid) != os.getpid():
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    os.waitpid(pid, 0)


def parent_pid(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except FileNotFoundError:
        return None


@contextlib.contextmanager
def built_namespaces(builder, images_dir, pin_dir, timeout=60.0):
    """Build IPC and UTS namespaces from ``images_dir`` with cerman's builder.

    Yields (ipc pin, uts pin), pinned under ``pin_dir``, which becomes a private
    mount. Unpins both and releases the mount afterwards, also when a build fails.
    """
    pin_dir = Path(pin_dir)
    pin_dir.mkdir(parents=True, exist_ok=True)
    pins = {ns_type: pin_dir / ns_type for ns_type in ("ipc", "uts")}
    namespaces.make_private_mount(pin_dir)
    try:
        for ns_type, pin in pins.items():
            response = builder.call({"op": "build", "type": ns_type, "images_dir": str(images_dir),
                                     "pin": str(pin)}, timeout)
            if not response.get("ok"):
                raise BuildFailed(
                    f"building the {ns_type} namespace of {images_dir} failed: {response['error']}")
        yield pins["ipc"], pins["uts"]
    finally:
        for pin in pins.values():
            if os.path.lexists(pin):
                namespaces.unpin(pin)
        namespaces.release_private_mount(pin_dir)
