"""cerman on checkpoints that containerd, runc and CRIU make during the test.

Each scenario runs once per module. A container from the fixture base image, in a
private containerd, changes its root filesystem, so that a deleted base-image file
leaves a whiteout in the rw layer. The fixture snapshots the live container's mounts,
files, tmpfs options and IPC/UTS state, checkpoints it with
``ctr containers checkpoint --rw --image --task`` and serves the checkpoint image with
cerman. The namespaces that cerman leases must snapshot as the live container did.

The file snapshots leave out /proc and /sys, because in a leased mount namespace they
show the host's processes and devices until a restore mounts its own (README, "Limits").

NOTE: for the same reason /dev/mqueue in a leased namespace lists the host IPC
namespace's POSIX message queues, while the container's is empty. The comparison of
/dev therefore holds only on a host without such queues.
"""

import contextlib
import gzip
import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from containerd_env import BASE_IMAGE, ContainerdEnv, containerd_missing_reason
from service import (FIXTURES, IPC_SNAPSHOT_TOOL, CermanService, mounts_under,
                     snapshot_namespaces)

MNT_SNAPSHOT_TOOL = FIXTURES / "tools" / "mnt_snapshot.py"
FIXTURE_ENTRY = FIXTURES / "src" / "fixture-entry"
READY_TIMEOUT = 30.0
CHECKPOINT_IMAGE = "ck-fresh"
RW_LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"

pytestmark = [
    pytest.mark.containerd,
    pytest.mark.criu,
    pytest.mark.skipif(containerd_missing_reason() is not None,
                       reason=containerd_missing_reason() or ""),
    pytest.mark.skipif(shutil.which("criu") is None,
                       reason="criu is not on PATH; install CRIU 4.x"),
]


class LiveContainer:
    """A container task started with ``ctr run -d``, its stdout written to a log file."""

    def __init__(self, env, name, log_path):
        self.env = env
        self.name = name
        self.log_path = log_path
        self.pid = None

    def run(self, options, script):
        self.env.ctr("run", "-d", "--log-uri", f"file://{self.log_path}", *options,
                     BASE_IMAGE, self.name, "sh", "-c", script)
        self.wait_ready()
        return self

    def task(self):
        """Return the task's pid and status as ``ctr tasks list`` shows them."""
        for line in self.env.ctr("tasks", "list").stdout.splitlines()[1:]:
            name, pid, status = line.split()
            if name == self.name:
                return int(pid), status
        raise AssertionError(f"no task {self.name}; output: {self.log_text()!r}")

    def log_text(self):
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_ready(self):
        """Wait until ``ipcstate``, which both scenarios' scripts exec last, prints
        "ready" (every IPC object exists). Then record the task's pid."""
        deadline = time.monotonic() + READY_TIMEOUT
        while "ready" not in self.log_text():
            pid, status = self.task()
            if status == "STOPPED" or time.monotonic() > deadline:
                raise AssertionError(f"container {self.name} is {status} and printed no "
                                     f"'ready' (waited at most {READY_TIMEOUT:.0f} s); "
                                     f"output: {self.log_text()!r}")
            time.sleep(0.1)
        self.pid, status = self.task()
        assert status == "RUNNING", f"task {self.name} is {status}"

    def mnt_snapshot(self, paths):
        return run_json([sys.executable, str(MNT_SNAPSHOT_TOOL), f"/proc/{self.pid}/root",
                         *paths])

    def ipc_snapshot(self):
        return run_json(["nsenter", "-t", str(self.pid), "--ipc", "--uts", sys.executable,
                         str(IPC_SNAPSHOT_TOOL)])

    def mountinfo(self):
        return Path(f"/proc/{self.pid}/mountinfo").read_text()

    def checkpoint(self, image):
        self.env.ctr("containers", "checkpoint", "--rw", "--image", "--task", self.name, image)


def run_json(command):
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"{command}: {result.stderr}"
    return json.loads(result.stdout)


def lease_mnt_snapshot(lease, paths):
    return run_json(["nsenter", f"--mount={lease['path']}", sys.executable,
                     str(MNT_SNAPSHOT_TOOL), lease["rootfs"], *paths])


def lease_mountinfo(lease):
    result = subprocess.run(["nsenter", f"--mount={lease['path']}", "cat",
                             "/proc/self/mountinfo"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def tmpfs_options(mountinfo, root):
    """Return the superblock options (size, mode, uid, ...) of the tmpfs mounts at or
    below ``root`` in a mountinfo text, keyed by mount point relative to ``root``."""
    root = root.rstrip("/")
    options = {}
    for line in mountinfo.splitlines():
        fields = line.split()
        point = fields[4]
        separator = fields.index("-")
        if fields[separator + 1] != "tmpfs":
            continue
        if point == root or point.startswith(root + "/"):
            options[point[len(root):] or "/"] = fields[separator + 3]
    return options


def rw_layer_names(env, image):
    """Return the entry names of the checkpoint image's rw layer, without "./"."""
    digest = next(line.split()[2] for line in env.ctr("images", "list").stdout.splitlines()
                  if line.split()[0] == image)
    index = json.loads(env.ctr("content", "get", digest).stdout)
    layer = next(entry for entry in index["manifests"] if entry["mediaType"] == RW_LAYER_TYPE)
    blob = subprocess.run(["ctr", "--address", str(env.address), "--namespace", env.namespace,
                           "content", "get", layer["digest"]],
                          capture_output=True, check=True, timeout=60).stdout
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob))) as tar:
        return {name.removeprefix("./") for name in tar.getnames()}


@dataclass
class Served:
    """Snapshots of the live container and of cerman's leases, and the rw layer's
    entry names."""

    live_mnt: dict
    live_ipc: dict
    lease_mnt: dict
    lease_ipc: dict
    rw_layer: set
    live_tmpfs: dict
    lease_tmpfs: dict


@contextlib.contextmanager
def checkpoint_served(work_dir, options, script, paths):
    """Run, snapshot and checkpoint a container, then snapshot cerman's leases.

    Leaving removes the container, its task, containerd, cerman and their mounts, also
    when a step failed. After that, no mount may remain below either directory.
    """
    cerman = CermanService(work_dir / "cerman")
    with ContainerdEnv() as env:
        containerd_dir = env.base_dir
        try:
            container = LiveContainer(env, "live", work_dir / "live.log").run(options, script)
            live_mnt = container.mnt_snapshot(paths)
            live_ipc = container.ipc_snapshot()
            live_tmpfs = tmpfs_options(container.mountinfo(), "/")
            container.checkpoint(CHECKPOINT_IMAGE)
            rw_layer = rw_layer_names(env, CHECKPOINT_IMAGE)

            cerman.write_config("fresh", pools={"ipc": 1, "uts": 1, "mnt": 1}, source={
                "type": "containerd", "image": CHECKPOINT_IMAGE, "namespace": env.namespace,
                "address": str(env.address)})
            cerman.start()
            cerman.wait_pools_full("fresh", types=("ipc", "uts", "mnt"), timeout=90)
            mnt = cerman.client.get("fresh", "mnt")
            lease_mnt = lease_mnt_snapshot(mnt, paths)
            lease_tmpfs = tmpfs_options(lease_mountinfo(mnt), mnt["rootfs"])
            ipc = cerman.client.get("fresh", "ipc")
            uts = cerman.client.get("fresh", "uts")
            lease_ipc = snapshot_namespaces(ipc["path"], uts["path"])
            yield Served(live_mnt, live_ipc, lease_mnt, lease_ipc, rw_layer, live_tmpfs,
                         lease_tmpfs)
        finally:
            cerman.cleanup()
    assert mounts_under(work_dir) + mounts_under(containerd_dir) == []


def sha256(data):
    return hashlib.sha256(data).hexdigest()


# The fixture's entrypoint after two changes to the base image, with a tmpfs and a
# read-only bind of a host directory.
ENTRY_PATHS = ("/bin", "/etc", "/dev", "/run", "/scratch", "/hostdata")
ENTRY_APPENDED = b"# changed before the checkpoint\n"
ENTRY_SCRIPT = ("busybox rm /bin/ipcmk && "
                f"echo '{ENTRY_APPENDED.decode().strip()}' >> /bin/fixture-entry && "
                "exec /bin/fixture-entry")


@pytest.fixture(scope="module")
def entry(tmp_path_factory):
    work_dir = tmp_path_factory.mktemp("entry")
    hostdata = work_dir / "hostdata"
    hostdata.mkdir()
    (hostdata / "h.txt").write_text("host data\n")
    options = ["--mount", "type=tmpfs,src=tmpfs,dst=/scratch,options=size=16m",
               "--mount", f"type=bind,src={hostdata},dst=/hostdata,options=rbind:ro"]
    with checkpoint_served(work_dir, options, ENTRY_SCRIPT, ENTRY_PATHS) as served:
        yield served


def test_entry_rw_layer_whiteout(entry):
    assert "bin/.wh.ipcmk" in entry.rw_layer


def test_entry_mounts(entry):
    assert entry.lease_mnt["mounts"] == entry.live_mnt["mounts"]


def test_entry_files(entry):
    assert entry.lease_mnt["files"] == entry.live_mnt["files"]


def test_entry_deleted_file(entry):
    assert "/bin/ipcmk" not in entry.lease_mnt["files"]


def test_entry_changed_file(entry):
    expected = sha256(FIXTURE_ENTRY.read_bytes() + ENTRY_APPENDED)
    assert entry.lease_mnt["files"]["/bin/fixture-entry"]["sha256"] == expected


def test_entry_tmpfs_options(entry):
    assert entry.lease_tmpfs == entry.live_tmpfs


def test_entry_ipc_uts(entry):
    assert entry.lease_ipc == entry.live_ipc


# A shell script of the test's own. It sets a hostname, deletes a base-image directory
# and writes files of every kind, with odd modes and owners, to the rw layer and to a
# tmpfs. That tmpfs has size, mode and owner options and a mount point the image lacks.
# A single host file is bound read-only, and a writable host directory is bound with
# nosuid, nodev and noexec. The script remounts /proc/sys read-write, which CRIU
# records, so that ipcstate can set the IPC sysctls.
FILES_PATHS = ("/bin", "/etc", "/tmp", "/var", "/srv", "/dev", "/run", "/shared")
FILES_HOSTNAME = "fresh-files"
FILES_SCRIPT = f"""set -e
hostname {FILES_HOSTNAME}
busybox rm -r /tmp
busybox mkdir -p /var/lib/app
cd /var/lib/app
echo owned > owned
busybox chown 4321:8765 owned
busybox chmod 640 owned
busybox ln owned owned.hard
busybox ln -s ../../../etc/app.conf conf.link
busybox mkfifo -m 600 pipe
cd /srv/spool
echo secret > secret
busybox chown 1234:5678 secret
busybox chmod 600 secret
busybox ln secret secret.hard
busybox ln -s /etc/app.conf abs.link
busybox ln -s missing dangling
busybox mkfifo -m 640 pipe
busybox mkdir -m 1777 sticky
busybox touch sticky/inner
echo x > setuid
busybox chmod 4755 setuid
busybox touch none
busybox chmod 000 none
busybox head -c 100000 /dev/urandom > random
busybox truncate -s 1M sparse
echo spaced > 'name with space'
busybox mkdir -p deep/a/b/c
echo leaf > deep/a/b/c/leaf
echo note > /dev/shm/note
busybox chmod 606 /dev/shm/note
echo written > /shared/from-container
mount -o remount,bind,rw /proc/sys
exec /bin/ipcstate --sysctl
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    work_dir = tmp_path_factory.mktemp("files")
    host = work_dir / "host"
    (host / "shared").mkdir(parents=True)
    (host / "app.conf").write_text("setting = 1\n")
    options = ["--cap-add", "CAP_SYS_ADMIN",
               "--mount", "type=tmpfs,src=tmpfs,dst=/srv/spool,"
                          "options=size=4m:mode=700:uid=1000:gid=1000",
               "--mount", f"type=bind,src={host / 'app.conf'},dst=/etc/app.conf,"
                          "options=rbind:ro",
               "--mount", f"type=bind,src={host / 'shared'},dst=/shared,"
                          "options=rbind:rw:nosuid:nodev:noexec"]
    with checkpoint_served(work_dir, options, FILES_SCRIPT, FILES_PATHS) as served:
        yield served


def test_files_rw_layer_whiteout(files):
    assert ".wh.tmp" in files.rw_layer


def test_files_mounts(files):
    assert files.lease_mnt["mounts"] == files.live_mnt["mounts"]


def test_files_files(files):
    assert files.lease_mnt["files"] == files.live_mnt["files"]


def test_files_deleted_directory(files):
    assert files.lease_mnt["files"]["/tmp"] is None


def test_files_tmpfs_options(files):
    assert files.lease_tmpfs == files.live_tmpfs


def test_files_ipc_uts(files):
    assert files.lease_ipc == files.live_ipc


def test_files_hostname(files):
    assert files.lease_ipc["hostname"] == FILES_HOSTNAME


def test_files_sysctls(files):
    assert files.lease_ipc["sysctl"]["kernel/msgmax"] == "16384"
