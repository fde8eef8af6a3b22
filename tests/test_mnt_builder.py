"""Mount namespaces built from the real containerd and podman checkpoint fixtures must
show what the live containers showed (``expected-mnt.json``), seen through
``nsenter --mount`` and ``mnt_snapshot.py``.
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from cerman.errors import NamespaceError, PoolError, SourceError
from mnt_fixtures import (load_expected, namespace_child, prepare_containerd_fixture,
                          prepare_podman_fixture, provide_podman_run_files, snapshot)
from workers import namespaces
from workers.criu.model import MountEntry
from workers.mnt_builder import populate_mnt, release_bundle, tree_order
from workers.mount_calls import resolve_inside
from workers.sources.model import PreparedCheckpoint

HOSTDATA = Path("/tmp/hostdata")
CONTAINERD_PATHS = ("/dev", "/run", "/scratch", "/hostdata")
PODMAN_PATHS = ("/dev", "/run", "/scratch", "/etc")

# The checkpoint records /proc/keys and /proc/timer_list as binds of /null of the
# container's /dev tmpfs, both nosuid, and the builder reproduces that record (the
# podman snapshot agrees). The containerd snapshot instead shows binds of the host's
# /dev/null (devtmpfs) with nosuid on /proc/keys only. NOTE: the snapshot's origin
# (the live container or one restored by runc) is not verified.
CONTAINERD_RECORDED_MASKS = [
    {"flags": ["nosuid", "rw"], "fstype": "tmpfs", "mountpoint": "/proc/keys"},
    {"flags": ["nosuid", "rw"], "fstype": "tmpfs", "mountpoint": "/proc/timer_list"},
]

# The podman export does not carry podman's generated /etc/hosts and /etc/resolv.conf;
# the test provides stand-ins, so their contents differ from the live container's.
PODMAN_STAND_INS = ("/etc/hosts", "/etc/resolv.conf")


def new_bundle(state_dir, checkpoint, name="b1"):
    bundle = state_dir / "bundles" / checkpoint / name
    bundle.mkdir(parents=True)
    return bundle


def nsenter(nsfs_path, *command):
    return subprocess.run(["nsenter", f"--mount={nsfs_path}", *command],
                          capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def hostdata():
    """The host directory that the containerd fixture bind-mounts read-only at /hostdata."""
    created = not HOSTDATA.exists()
    if created:
        HOSTDATA.mkdir(mode=0o755)
        (HOSTDATA / "h.txt").write_text("host\n")
        (HOSTDATA / "h.txt").chmod(0o644)
    try:
        yield HOSTDATA
    finally:
        if created:
            shutil.rmtree(HOSTDATA)


@pytest.fixture(scope="module")
def containerd_prepared(tmp_path_factory):
    return prepare_containerd_fixture(tmp_path_factory.mktemp("containerd") / "prepared")


@pytest.fixture(scope="module")
def podman_prepared(tmp_path_factory):
    return prepare_podman_fixture(tmp_path_factory.mktemp("podman") / "prepared")


@pytest.fixture(scope="module")
def containerd_snapshot(containerd_prepared, hostdata, tmp_path_factory):
    state_dir = tmp_path_factory.mktemp("containerd-state")
    bundle = new_bundle(state_dir, containerd_prepared.name)
    try:
        with namespace_child(populate_mnt, containerd_prepared, bundle) as (nsfs, rootfs):
            yield snapshot(nsfs, rootfs, CONTAINERD_PATHS)
    finally:
        release_bundle(bundle, state_dir=state_dir)


def build_podman(prepared, bundle, run_dir):
    provide_podman_run_files(run_dir)
    return populate_mnt(prepared, bundle)


@pytest.fixture(scope="module")
def podman_snapshot(podman_prepared, tmp_path_factory):
    state_dir = tmp_path_factory.mktemp("podman-state")
    bundle = new_bundle(state_dir, podman_prepared.name)
    run_dir = state_dir / "run"
    try:
        with namespace_child(build_podman, podman_prepared, bundle, run_dir) as (nsfs, rootfs):
            yield snapshot(nsfs, rootfs, PODMAN_PATHS)
    finally:
        release_bundle(bundle, state_dir=state_dir)
        shutil.rmtree(run_dir, ignore_errors=True)


def test_containerd_mounts_match_live(containerd_snapshot):
    expected = [mount for mount in load_expected("containerd")["mounts"]
                if mount["mountpoint"] not in ("/proc/keys", "/proc/timer_list")]
    expected = sorted(expected + CONTAINERD_RECORDED_MASKS, key=lambda m: m["mountpoint"])
    assert containerd_snapshot["mounts"] == expected


def test_containerd_files_match_live(containerd_snapshot):
    assert containerd_snapshot["files"] == load_expected("containerd")["files"]


def test_podman_mounts_match_live(podman_snapshot):
    assert podman_snapshot["mounts"] == load_expected("podman")["mounts"]


def test_podman_files_match_live(podman_snapshot):
    expected = load_expected("podman")["files"]
    files = dict(podman_snapshot["files"])
    for path in PODMAN_STAND_INS:
        for key in ("sha256", "size"):
            files[path].pop(key)
            expected[path].pop(key)
    assert files == expected


def test_masked_file_is_null_device(containerd_prepared, hostdata, tmp_path):
    bundle = new_bundle(tmp_path, containerd_prepared.name)
    try:
        with namespace_child(populate_mnt, containerd_prepared, bundle) as (nsfs, rootfs):
            result = nsenter(nsfs, "stat", "-c", "%F %t:%T", str(rootfs / "proc/keys"))
    finally:
        release_bundle(bundle, state_dir=tmp_path)
    assert result.stdout.strip() == "character special file 1:3"


def test_spec_readonly_path_is_readonly(containerd_prepared, hostdata, tmp_path):
    bundle = new_bundle(tmp_path, containerd_prepared.name)
    try:
        with namespace_child(populate_mnt, containerd_prepared, bundle) as (nsfs, rootfs):
            result = nsenter(nsfs, "touch", str(rootfs / "hostdata" / "new"))
    finally:
        release_bundle(bundle, state_dir=tmp_path)
    assert "Read-only file system" in result.stderr


def test_missing_bind_source_names_mount(containerd_prepared, tmp_path):
    spec = tmp_path / "spec.json"
    text = containerd_prepared.spec_path.read_text()
    spec.write_text(text.replace('"/tmp/hostdata"', f'"{tmp_path / "absent"}"'))
    prepared = PreparedCheckpoint(name=containerd_prepared.name,
                                  images_dir=containerd_prepared.images_dir,
                                  rootfs_layers=containerd_prepared.rootfs_layers,
                                  spec_path=spec)
    bundle = new_bundle(tmp_path, prepared.name)
    try:
        with pytest.raises(SourceError) as raised:
            with namespace_child(populate_mnt, prepared, bundle):
                pass
    finally:
        release_bundle(bundle, state_dir=tmp_path)
    message = str(raised.value)
    assert "bind mount /hostdata" in message
    assert str(tmp_path / "absent") in message
    assert "restoring host must provide" in message


def test_whiteout_hides_lower_file(containerd_prepared, hostdata, tmp_path):
    whiteouts = tmp_path / "whiteouts"
    (whiteouts / "bin").mkdir(parents=True)
    os.mknod(whiteouts / "bin" / "busybox", 0o600 | 0o020000, os.makedev(0, 0))
    prepared = PreparedCheckpoint(name=containerd_prepared.name,
                                  images_dir=containerd_prepared.images_dir,
                                  rootfs_layers=(whiteouts, *containerd_prepared.rootfs_layers),
                                  spec_path=containerd_prepared.spec_path)
    bundle = new_bundle(tmp_path, prepared.name)
    try:
        with namespace_child(populate_mnt, prepared, bundle) as (nsfs, rootfs):
            hidden = nsenter(nsfs, "test", "-e", str(rootfs / "bin/busybox"))
            parent_visible = nsenter(nsfs, "test", "-e", str(rootfs / "bin"))
    finally:
        release_bundle(bundle, state_dir=tmp_path)
    assert (containerd_prepared.rootfs_layers[-1] / "bin/busybox").exists()
    assert hidden.returncode == 1
    assert parent_visible.returncode == 0


def test_no_rootfs_layers_rejected(containerd_prepared, tmp_path):
    prepared = PreparedCheckpoint(name="bare", images_dir=containerd_prepared.images_dir,
                                  spec_path=containerd_prepared.spec_path)
    bundle = new_bundle(tmp_path, prepared.name)
    try:
        with pytest.raises(PoolError, match="no root filesystem"):
            with namespace_child(populate_mnt, prepared, bundle):
                pass
    finally:
        release_bundle(bundle, state_dir=tmp_path)


def mount_entry(mnt_id, parent, mountpoint, root_dev, root="/", ext_key=None):
    return MountEntry(fstype=5, mnt_id=mnt_id, root_dev=root_dev, parent_mnt_id=parent,
                      flags=0, root=root, mountpoint=mountpoint, source="tmpfs",
                      ext_key=ext_key)


def test_tree_order_parent_first():
    prepared = PreparedCheckpoint(name="order", images_dir=Path("/nonexistent"))
    entries = [mount_entry(3, 2, "/a/b", 30), mount_entry(2, 1, "/a", 20),
               mount_entry(1, 0, "/", 10)]
    order = [entry.mnt_id for entry in tree_order(entries, prepared)]
    assert order == [1, 2, 3]


def test_tree_order_bind_after_source():
    prepared = PreparedCheckpoint(name="order", images_dir=Path("/nonexistent"))
    # CRIU 4.1.1 order: the bind of /dev's /null under /proc is listed before /dev.
    entries = [mount_entry(5, 2, "/proc/keys", 70, root="/null", ext_key="/dev/null"),
               mount_entry(3, 1, "/dev", 70), mount_entry(2, 1, "/proc", 69),
               mount_entry(1, 0, "/", 10)]
    order = [entry.mnt_id for entry in tree_order(entries, prepared)]
    assert order.index(5) > order.index(3)


def test_resolve_inside_absolute_symlink(tmp_path):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "escape").symlink_to("/tmp")
    assert resolve_inside(tmp_path, "/etc/escape/x") == tmp_path / "tmp" / "x"


def test_resolve_inside_dotdot_stops_at_root(tmp_path):
    (tmp_path / "run").symlink_to("../../../var/run")
    assert resolve_inside(tmp_path, "/run/app") == tmp_path / "var" / "run" / "app"


def test_resolve_inside_symlink_loop(tmp_path):
    (tmp_path / "run").symlink_to("/run")
    with pytest.raises(ValueError, match="symlinks"):
        resolve_inside(tmp_path, "/run/app")


def test_release_bundle_removes_bundle(tmp_path):
    bundle = new_bundle(tmp_path, "ck")
    (bundle / "upper" / "etc").mkdir(parents=True)
    os.mknod(bundle / "upper" / "etc" / "gone", 0o600 | 0o020000, os.makedev(0, 0))
    release_bundle(bundle, state_dir=tmp_path)
    assert not bundle.exists()


def test_release_bundle_rejects_outside_path(tmp_path):
    outside = tmp_path / "elsewhere" / "ck" / "b1"
    outside.mkdir(parents=True)
    with pytest.raises(PoolError, match="not a directory under"):
        release_bundle(outside, state_dir=tmp_path)
    assert outside.exists()


def mount_and_release(bundle, state_dir, source):
    (bundle / "rootfs").mkdir()
    namespaces.mount(source, bundle / "rootfs", None, namespaces.MS_BIND)
    release_bundle(bundle, state_dir=state_dir)


def test_release_bundle_rejects_mounted_bundle(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    (source / "keep").write_text("kept\n")
    bundle = new_bundle(tmp_path, "ck")
    try:
        with pytest.raises(NamespaceError, match="mounts inside"):
            with namespace_child(mount_and_release, bundle, tmp_path, source):
                pass
    finally:
        release_bundle(bundle, state_dir=tmp_path)
    assert (source / "keep").exists()
