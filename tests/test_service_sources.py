"""cerman end to end on containerd and archive checkpoints, with mount-namespace pools."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from containerd_env import CHECKPOINT_IMAGE, ContainerdEnv, containerd_missing_reason
from mnt_fixtures import load_expected
from service import FIXTURES, mounts_under, snapshot_namespaces

HOSTDATA = Path("/tmp/hostdata")
SNAPSHOT_TOOL = FIXTURES / "tools" / "mnt_snapshot.py"
CONTAINERD_PATHS = ("/dev", "/run", "/scratch", "/hostdata")
# The checkpoint records /proc/keys and /proc/timer_list as nosuid binds of the
# container's own /dev/null; the live snapshot shows the host's /dev/null instead.
RECORDED_MASKS = [
    {"flags": ["nosuid", "rw"], "fstype": "tmpfs", "mountpoint": "/proc/keys"},
    {"flags": ["nosuid", "rw"], "fstype": "tmpfs", "mountpoint": "/proc/timer_list"},
]

pytestmark = pytest.mark.skipif(containerd_missing_reason() is not None,
                                reason=containerd_missing_reason() or "")


@pytest.fixture
def hostdata():
    """The host directory the containerd fixture bind-mounts read-only at /hostdata."""
    created = not HOSTDATA.exists()
    if created:
        HOSTDATA.mkdir(mode=0o755)
        (HOSTDATA / "h.txt").write_text("host\n")
    try:
        yield HOSTDATA
    finally:
        if created:
            shutil.rmtree(HOSTDATA)


@pytest.fixture
def containerd():
    with ContainerdEnv() as env:
        yield env


def mnt_snapshot(lease, paths):
    result = subprocess.run(["nsenter", f"--mount={lease['path']}", sys.executable,
                             str(SNAPSHOT_TOOL), lease["rootfs"], *paths],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def expected_containerd_mounts():
    mounts = [mount for mount in load_expected("containerd")["mounts"]
              if mount["mountpoint"] not in ("/proc/keys", "/proc/timer_list")]
    return sorted(mounts + RECORDED_MASKS, key=lambda mount: mount["mountpoint"])


def containerd_config(cerman, containerd, pools):
    cerman.write_config("ck", pools=pools, source={
        "type": "containerd", "image": CHECKPOINT_IMAGE, "namespace": containerd.namespace,
        "address": str(containerd.address)})


def test_containerd_checkpoint_pools(cerman, containerd, hostdata):
    containerd_config(cerman, containerd, {"ipc": 1, "uts": 1, "mnt": 1})
    cerman.start()
    cerman.wait_pools_full("ck", types=("ipc", "uts", "mnt"), timeout=60)

    mnt = cerman.client.get("ck", "mnt")
    snapshot = mnt_snapshot(mnt, CONTAINERD_PATHS)
    assert snapshot["mounts"] == expected_containerd_mounts()
    assert snapshot["files"] == load_expected("containerd")["files"]
    assert mnt["rootfs"].startswith(str(cerman.state_dir))

    ipc = cerman.client.get("ck", "ipc")
    expected_ipc = json.loads((FIXTURES / "containerd" / "expected-ipc.json").read_text())
    uts = cerman.client.get("ck", "uts")
    assert snapshot_namespaces(ipc["path"], uts["path"]) == expected_ipc

    images = cerman.client.checkpoint_get("ck")["path"]
    assert (Path(images) / "inventory.img").exists()
    assert list(Path(images).glob("mountpoints-*.img"))

    bundle = Path(mnt["bundle"])
    cerman.client.put(mnt["lease"])
    assert not bundle.exists()
    assert not os.path.exists(mnt["path"])


def test_containerd_worker_kill_keeps_mnt(cerman, containerd, hostdata):
    containerd_config(cerman, containerd, {"mnt": 2})
    cerman.start()
    cerman.wait_pools_full("ck", types=("mnt",), timeout=60)
    leased = cerman.client.get("ck", "mnt")
    old_pid = cerman.worker_pid("ck")

    os.kill(old_pid, signal.SIGKILL)
    cerman.wait(lambda: cerman.worker_pid("ck") != old_pid, timeout=30, what="worker restarted")
    status = cerman.wait_pools_full("ck", types=("mnt",), timeout=60)

    assert status["pools"]["mnt"]["leased"] == 1
    assert mnt_snapshot(leased, ("/scratch",))["files"]["/scratch/data.txt"]["size"] == 13
    bundles = sorted(p.name for p in (cerman.state_dir / "bundles" / "ck").iterdir())
    pins = sorted(p.name for p in (cerman.run_dir / "ns" / "ck" / "mnt").iterdir())
    assert bundles == pins
    assert len(pins) == 3


def test_containerd_missing_image_reported(cerman, containerd):
    cerman.write_config("ck", pools={"ipc": 1}, source={
        "type": "containerd", "image": "no-such-checkpoint", "namespace": containerd.namespace,
        "address": str(containerd.address)})
    cerman.write_config("fixture")
    cerman.start()

    status = cerman.wait(lambda: (s := cerman.client.status("ck"))["state"] == "failed" and s,
                         what="containerd checkpoint failing")
    assert "no-such-checkpoint" in status["error"]
    cerman.wait_pools_full("fixture")


def unpack_base_image(work_dir):
    """Unpack the fixture's single-layer base image; return the layer directory."""
    from archive_helpers import unpack_oci_image

    layers = unpack_oci_image(FIXTURES / "containerd" / "ipcfixture-image.oci.tar", work_dir)
    assert len(layers) == 1
    return layers[0]


@pytest.fixture
def podman_run_files():
    """podman's per-container run files, which spec.dump names as bind sources."""
    from mnt_fixtures import PODMAN_USERDATA, write_podman_userdata

    userdata = Path("/run", PODMAN_USERDATA)
    if userdata.exists():
        pytest.skip(f"{userdata} exists on this host; the test would overwrite podman's files")
    created = userdata
    while not created.parent.exists():
        created = created.parent
    write_podman_userdata(userdata)
    try:
        yield userdata
    finally:
        shutil.rmtree(created)


PODMAN_ARCHIVE = FIXTURES / "podman" / "ipcfixture-checkpoint.tar.zst"
PODMAN_PATHS = ("/dev", "/run", "/scratch", "/etc")
# Files podman generates at start and the export does not carry: the fixture provides
# stand-ins, so only their presence is compared.
PODMAN_STAND_INS = ("/etc/hosts", "/etc/resolv.conf")
PODMAN_RUN_BINDS = ("/etc/hostname", "/etc/hosts", "/etc/resolv.conf", "/run/.containerenv")


def test_archive_checkpoint_pools(cerman, tmp_path, podman_run_files):
    base = unpack_base_image(tmp_path / "base")
    cerman.write_config("podman", pools={"ipc": 1, "uts": 1, "mnt": 1}, rootfs={"path": str(base)},
                        source={"type": "archive", "path": str(PODMAN_ARCHIVE)})
    cerman.start()
    cerman.wait_pools_full("podman", types=("ipc", "uts", "mnt"), timeout=60)

    ipc = cerman.client.get("podman", "ipc")
    uts = cerman.client.get("podman", "uts")
    expected_ipc = json.loads((FIXTURES / "podman" / "expected-ipc.json").read_text())
    assert snapshot_namespaces(ipc["path"], uts["path"]) == expected_ipc

    snapshot = mnt_snapshot(cerman.client.get("podman", "mnt"), PODMAN_PATHS)
    expected = load_expected("podman")
    run_fstype = subprocess.run(["findmnt", "-no", "FSTYPE", "-T", str(podman_run_files)],
                                capture_output=True, text=True).stdout.strip()
    for mount in expected["mounts"]:
        if mount["mountpoint"] in PODMAN_RUN_BINDS:
            mount["fstype"] = run_fstype
    assert snapshot["mounts"] == expected["mounts"]
    for path, entry in expected["files"].items():
        if path in PODMAN_STAND_INS:
            assert snapshot["files"][path]["type"] == entry["type"], path
        else:
            assert snapshot["files"].get(path) == entry, path


def test_archive_missing_bind_source_reported(cerman, tmp_path):
    base = unpack_base_image(tmp_path / "base")
    cerman.write_config("podman", pools={"ipc": 1, "mnt": 1}, rootfs={"path": str(base)},
                        source={"type": "archive", "path": str(PODMAN_ARCHIVE)})
    cerman.start()
    cerman.wait_pools_full("podman", types=("ipc",), timeout=60)

    status = cerman.wait(lambda: (s := cerman.client.status("podman"))["pools"]["mnt"]
                         ["last_error"] and s, what="mnt build attempted")
    assert "userdata" in status["pools"]["mnt"]["last_error"]
    assert list((cerman.state_dir / "bundles" / "podman").iterdir()) == []


def test_quit_removes_bundles_and_mounts(cerman, containerd, hostdata):
    containerd_config(cerman, containerd, {"mnt": 1})
    cerman.start()
    cerman.wait_pools_full("ck", types=("mnt",), timeout=60)
    cerman.client.get("ck", "mnt")

    cerman.stop()
    assert mounts_under(cerman.base) == []
    assert list((cerman.state_dir / "bundles" / "ck").iterdir()) == []


def hostile_archive(path, escape_name):
    """Write a checkpoint archive whose second entry points outside the target."""
    import io
    import tarfile

    with tarfile.open(path, "w") as archive:
        for name, data in (("checkpoint/inventory.img", b"x"), (escape_name, b"escaped\n")):
            entry = tarfile.TarInfo(name)
            entry.size = len(data)
            archive.addfile(entry, io.BytesIO(data))
    return path


def test_hostile_archive_rejected(cerman, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    archive = hostile_archive(tmp_path / "hostile.tar", f"../../../../../../..{outside}/escaped")
    cerman.write_config("hostile", pools={"ipc": 1}, source={"type": "archive", "path": str(archive)})
    cerman.write_config("fixture")
    cerman.start()

    status = cerman.wait(lambda: (s := cerman.client.status("hostile"))["state"] == "failed" and s,
                         what="hostile archive rejected")
    assert ".." in status["error"]
    assert str(archive) in status["error"]
    assert list(outside.iterdir()) == []
    assert not list((cerman.state_dir / "checkpoints").glob("hostile*/**/escaped"))
    cerman.wait_pools_full("fixture")


def test_put_keeps_bundle_for_joined_process(cerman, containerd, hostdata):
    containerd_config(cerman, containerd, {"mnt": 1})
    cerman.start()
    cerman.wait_pools_full("ck", types=("mnt",), timeout=60)
    lease = cerman.client.get("ck", "mnt")
    rootfs = lease["rootfs"]
    joined = subprocess.Popen(
        ["nsenter", f"--mount={lease['path']}", "sh", "-c",
         f"echo joined; read line; echo written after put > {rootfs}/after.txt && "
         f"cat {rootfs}/after.txt"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        # Put only after the process has entered the namespace, so that put finds it there.
        assert joined.stdout.readline() == "joined\n"
        cerman.client.put(lease["lease"])
        output, _ = joined.communicate("go\n", timeout=30)
    finally:
        if joined.poll() is None:
            joined.kill()
            joined.wait()

    assert output == "written after put\n"
    cerman.wait(lambda: not Path(lease["bundle"]).exists(), timeout=30,
                what="kept bundle removed after its last process exited")
