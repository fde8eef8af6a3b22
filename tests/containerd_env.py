"""A private containerd for tests, with the checkpoint fixtures imported.

``ContainerdEnv`` starts the containerd found on PATH with its own config. Its
``root``, ``state``, ``temp``, the opt plugin's path and the gRPC and ttrpc sockets
all live under one temporary directory. The CRI plugin is disabled, so containerd
listens on those two unix sockets only.

Leaving the context, also when the body raised, deletes every task and container
through ``ctr`` and stops containerd. It then kills any shim of this instance that
is still alive, detaches every mount under the directory (snapshot and temporary
mounts included) and removes the directory.

NOTE: containerd 1.6 puts a running task's shim socket under /run/containerd/s, its
runc state under /run/containerd/runc and ctr's fifos under /run/containerd/fifo,
whatever the config says. Deleting the task removes them, and a shim killed because
deletion failed can leave them behind.

Usage::

    with ContainerdEnv() as env:
        env.ctr("images", "ls")
"""

import ctypes
import itertools
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psutil

log = logging.getLogger(__name__)

FIXTURE_DIR = Path(__file__).parent / "fixtures" / "containerd"
BASE_ARCHIVE = FIXTURE_DIR / "ipcfixture-image.oci.tar"
CHECKPOINT_ARCHIVE = FIXTURE_DIR / "ck-ipcfixture.oci.tar"
BASE_IMAGE = "docker.io/library/ipcfixture:latest"
CHECKPOINT_IMAGE = "ck-ipcfixture"

START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
MNT_DETACH = 2
CGROUP_ROOT = Path("/sys/fs/cgroup")
RUNC_STATE_ROOT = Path("/run/containerd/runc")

_instance_numbers = itertools.count()

_libc = ctypes.CDLL(None, use_errno=True)

CONFIG_TEMPLATE = """\
version = 2
root = "{root}"
state = "{state}"
temp = "{temp}"
disabled_plugins = [
  "io.containerd.grpc.v1.cri",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
]

[grpc]
  address = "{address}"
  tcp_address = ""

[ttrpc]
  address = "{address}.ttrpc"

[debug]
  address = ""

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
"""


def containerd_missing_reason():
    """Return why ContainerdEnv cannot run here, or None when containerd and ctr exist."""
    for binary in ("containerd", "ctr"):
        if shutil.which(binary) is None:
            return f"{binary} is not on PATH; install Debian's containerd package"
    return None


class ContainerdEnv:
    """A containerd process with a private root, state and socket under a temp dir.

    ``import_fixtures`` imports the base image, then the checkpoint image without
    unpacking, and tags the checkpoint as ``ck-ipcfixture``.
    """

    def __init__(self, namespace=None, import_fixtures=True):
        # runc names cgroups and its state directories after the namespace, so each
        # instance gets its own unless the caller chooses one.
        self.namespace = namespace or f"cerman-test-{os.getpid()}-{next(_instance_numbers)}"
        self._namespaces_used = set()
        self.import_fixtures = import_fixtures
        self.base_dir = None
        self.address = None
        self.process = None
        self._log_file = None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb):
        self.stop()

    @property
    def log_path(self):
        return self.base_dir / "containerd.log"

    def ctr(self, *args, check=True):
        """Run ``ctr`` against this containerd and return the CompletedProcess (text)."""
        command = ["ctr", "--address", str(self.address), "--namespace", self.namespace,
                   *[str(arg) for arg in args]]
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed with exit code "
                               f"{result.returncode}: {result.stderr.strip()}")
        return result

    def start(self):
        self.base_dir = Path(tempfile.mkdtemp(prefix="cerman-containerd-"))
        try:
            self._launch()
            self._wait_ready()
            if self.import_fixtures:
                self._import_fixtures()
        except BaseException:
            self.stop()
            raise

    def _launch(self):
        self.address = self.base_dir / "containerd.sock"
        for name in ("root", "state", "temp", "opt"):
            (self.base_dir / name).mkdir()
        config_path = self.base_dir / "config.toml"
        config_path.write_text(CONFIG_TEMPLATE.format(
            root=self.base_dir / "root", state=self.base_dir / "state",
            temp=self.base_dir / "temp", opt=self.base_dir / "opt", address=self.address))

        self._log_file = open(self.log_path, "wb")
        # A session of its own keeps a Ctrl-C meant for pytest from reaching containerd
        # before stop() can shut it down in order.
        self.process = subprocess.Popen(
            ["containerd", "--config", str(config_path)],
            stdin=subprocess.DEVNULL, stdout=self._log_file, stderr=subprocess.STDOUT,
            start_new_session=True)
        log.info("started containerd pid %d with socket %s", self.process.pid, self.address)

    def _wait_ready(self):
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"containerd exited with code {self.process.returncode} "
                                   f"during start-up; log:\n{self._log_tail()}")
            if self._socket_accepts() and self.ctr("version", check=False).returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"containerd did not answer 'ctr version' within "
                                   f"{START_TIMEOUT:.0f} s; log:\n{self._log_tail()}")
            time.sleep(0.05)

    def _socket_accepts(self):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(self.address))
            except OSError:
                return False
        return True

    def _import_fixtures(self):
        self.ctr("images", "import", BASE_ARCHIVE)
        self.ctr("images", "import", "--no-unpack", CHECKPOINT_ARCHIVE)

        # ctr names an imported index without a full reference "import-<date>:<tag>",
        # with the date of the import.
        names = self.ctr("images", "ls", "--quiet").stdout.split()
        imported = [name for name in names
                    if name.startswith("import-") and name.endswith(":" + CHECKPOINT_IMAGE)]
        if len(imported) != 1:
            raise RuntimeError(f"expected one import-<date>:{CHECKPOINT_IMAGE} image after "
                               f"importing {CHECKPOINT_ARCHIVE}, found {names}")
        self.ctr("images", "tag", imported[0], CHECKPOINT_IMAGE)

    def _log_tail(self, lines=20):
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self):
        """Stop containerd and its shims, detach mounts, remove the directory."""
        if self.base_dir is None:
            return
        try:
            self._delete_tasks()
            self._stop_containerd()
            self._kill_shims()
        finally:
            self._remove_namespace_dirs()
            self._detach_mounts()
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None
            shutil.rmtree(self.base_dir, ignore_errors=True)
            log.info("removed containerd directory %s", self.base_dir)
            self.base_dir = None

    def _delete_tasks(self):
        """Delete tasks and containers in every namespace, so runc and the shims clean up."""
        if self.process is None or self.process.poll() is not None:
            return
        listed = self.ctr("namespaces", "list", "--quiet", check=False)
        self._namespaces_used.update(listed.stdout.split())
        for namespace in listed.stdout.split():
            scoped = ContainerdEnv(namespace=namespace)
            scoped.address = self.address
            for task in scoped.ctr("tasks", "list", "--quiet", check=False).stdout.split():
                result = scoped.ctr("tasks", "delete", "--force", task, check=False)
                if result.returncode != 0:
                    log.warning("failed to delete task %s in namespace %s: %s", task, namespace,
                                result.stderr.strip())
            for container in scoped.ctr("containers", "list", "--quiet",
                                        check=False).stdout.split():
                scoped.ctr("containers", "delete", container, check=False)

    def _remove_namespace_dirs(self):
        """Remove the empty per-namespace cgroups and runc state directories.

        runc 1.1 leaves the parent cgroup ``/<namespace>`` of a deleted container
        behind. rmdir removes only empty directories, so nothing in use is touched.
        """
        candidates = [RUNC_STATE_ROOT / namespace for namespace in self._namespaces_used]
        for namespace in self._namespaces_used:
            candidates.append(CGROUP_ROOT / namespace)
            candidates.extend(CGROUP_ROOT.glob(f"*/{namespace}"))
        for directory in candidates:
            try:
                directory.rmdir()
            except FileNotFoundError:
                continue
            except OSError as error:
                log.warning("failed to remove %s: %s", directory, error)

    def _stop_containerd(self):
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            log.warning("containerd pid %d ignored SIGTERM for %.0f s; killing it",
                        self.process.pid, STOP_TIMEOUT)
            self.process.kill()
            self.process.wait()
        log.info("stopped containerd pid %d", self.process.pid)

    def _kill_shims(self):
        """Kill shims started for this containerd, and their children first.

        A shim daemonizes away from containerd but keeps ``-address SOCKET`` on its
        command line, which identifies the shims of this instance.
        """
        address = str(self.address)
        for process in psutil.process_iter(["pid", "cmdline"]):
            cmdline = process.info["cmdline"] or []
            if not cmdline or "containerd-shim" not in os.path.basename(cmdline[0]):
                continue
            if address not in cmdline:
                continue
            try:
                victims = process.children(recursive=True) + [process]
                for victim in victims:
                    victim.kill()
                psutil.wait_procs(victims, timeout=STOP_TIMEOUT)
            except psutil.NoSuchProcess:
                continue
            log.info("killed shim pid %d of containerd at %s", process.pid, address)

    def _detach_mounts(self):
        """Detach every mount at or below the directory, deepest first."""
        prefix = str(self.base_dir)
        for mount_point in reversed(_mount_points()):
            if mount_point != prefix and not mount_point.startswith(prefix + "/"):
                continue
            if _libc.umount2(mount_point.encode(), MNT_DETACH) != 0:
                error = ctypes.get_errno()
                log.warning("failed to detach %s: [errno %d] %s", mount_point, error,
                            os.strerror(error))


def _mount_points():
    """Return this mount namespace's mount points in mount order."""
    points = []
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            # Field 5 is the mount point with space, tab, newline and backslash
            # written as octal escapes.
            field = line.split()[4]
            points.append(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field))
    return points
