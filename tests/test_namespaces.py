"""Namespace primitives on the real kernel: errors, private mounts, pins."""

import errno
import os
import subprocess

import pytest

from cerman.errors import NamespaceError
from nshelpers import mount_points, pin_dir, scratch_dir  # noqa: F401 (fixtures)
from workers import namespaces


@pytest.fixture
def ipc_process():
    """A process in its own IPC and UTS namespaces, killed after the test."""
    process = subprocess.Popen(["unshare", "--ipc", "--uts", "sleep", "600"])
    try:
        # unshare(1) execs sleep after unsharing, so wait until the namespace differs.
        for _ in range(500):
            if os.readlink(f"/proc/{process.pid}/ns/ipc") != os.readlink("/proc/self/ns/ipc"):
                break
            subprocess.run(["sleep", "0.01"])
        yield process
    finally:
        process.kill()
        process.wait()


def test_unshare_invalid_flag_keeps_errno():
    with pytest.raises(NamespaceError) as raised:
        namespaces.unshare(0x1)
    assert raised.value.errno == errno.EINVAL


def test_mount_missing_target_names_path(scratch_dir):
    target = scratch_dir / "missing"
    with pytest.raises(NamespaceError) as raised:
        namespaces.mount("tmpfs", target, "tmpfs")
    assert raised.value.errno == errno.ENOENT
    assert raised.value.target == str(target)
    assert str(target) in str(raised.value)


def test_umount_not_mounted_keeps_errno(scratch_dir):
    with pytest.raises(NamespaceError) as raised:
        namespaces.umount(scratch_dir)
    assert raised.value.errno == errno.EINVAL


def test_setns_regular_file_rejected(scratch_dir):
    path = scratch_dir / "plain"
    path.write_text("")
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(NamespaceError) as raised:
            namespaces.setns(fd, namespaces.CLONE_NEWIPC)
    finally:
        os.close(fd)
    assert raised.value.errno == errno.EINVAL


def test_private_mount_idempotent(scratch_dir):
    directory = scratch_dir / "ns"
    namespaces.make_private_mount(directory)
    namespaces.make_private_mount(directory)
    assert mount_points().count(str(directory)) == 1


def test_private_mount_is_private(pin_dir):
    with open("/proc/self/mountinfo") as file:
        entries = [line.split() for line in file if line.split()[4] == str(pin_dir)]
    optional_fields = entries[-1][6:entries[-1].index("-")]
    assert optional_fields == []


def test_private_mount_released(scratch_dir):
    directory = scratch_dir / "ns"
    namespaces.make_private_mount(directory)
    namespaces.release_private_mount(directory)
    assert str(directory) not in mount_points()


def test_release_with_pin_inside_busy(pin_dir, ipc_process):
    namespaces.pin(f"/proc/{ipc_process.pid}/ns/ipc", pin_dir / "ipc")
    try:
        with pytest.raises(NamespaceError) as raised:
            namespaces.release_private_mount(pin_dir)
        assert raised.value.errno == errno.EBUSY
    finally:
        namespaces.unpin(pin_dir / "ipc")


def test_pin_outlives_process(pin_dir, ipc_process):
    inode = os.stat(f"/proc/{ipc_process.pid}/ns/ipc").st_ino
    pin = pin_dir / "ipc"
    namespaces.pin(f"/proc/{ipc_process.pid}/ns/ipc", pin)
    try:
        ipc_process.kill()
        ipc_process.wait()
        assert namespaces.is_pinned(pin, "ipc")
        assert os.stat(pin).st_ino == inode
        assert subprocess.run(["nsenter", f"--ipc={pin}", "true"]).returncode == 0
    finally:
        namespaces.unpin(pin)


def test_is_pinned_checks_type(pin_dir, ipc_process):
    pin = pin_dir / "uts"
    namespaces.pin(f"/proc/{ipc_process.pid}/ns/uts", pin)
    try:
        assert namespaces.is_pinned(pin, "uts")
        assert not namespaces.is_pinned(pin, "ipc")
    finally:
        namespaces.unpin(pin)


def test_is_pinned_plain_file_false(pin_dir):
    path = pin_dir / "plain"
    path.write_text("")
    assert not namespaces.is_pinned(path)


def test_is_pinned_missing_false(pin_dir):
    assert not namespaces.is_pinned(pin_dir / "missing")


def test_unpin_leaves_no_mount(pin_dir, ipc_process):
    pin = pin_dir / "ipc"
    namespaces.pin(f"/proc/{ipc_process.pid}/ns/ipc", pin)
    namespaces.unpin(pin)
    assert str(pin) not in mount_points()
    assert not pin.exists()


def test_unpin_stacked_pins(pin_dir, ipc_process):
    pin = pin_dir / "ipc"
    namespaces.pin(f"/proc/{ipc_process.pid}/ns/ipc", pin)
    namespaces.mount(f"/proc/{ipc_process.pid}/ns/ipc", pin, None, namespaces.MS_BIND)
    namespaces.unpin(pin)
    assert str(pin) not in mount_points()


def test_unpin_missing_is_noop(pin_dir):
    namespaces.unpin(pin_dir / "missing")
    assert not (pin_dir / "missing").exists()


def test_pin_existing_path_untouched(pin_dir, ipc_process):
    path = pin_dir / "taken"
    path.write_text("keep")
    with pytest.raises(NamespaceError) as raised:
        namespaces.pin(f"/proc/{ipc_process.pid}/ns/ipc", path)
    assert raised.value.errno == errno.EEXIST
    assert path.read_text() == "keep"


def test_pin_failure_leaves_nothing(pin_dir):
    pin = pin_dir / "ipc"
    with pytest.raises(NamespaceError) as raised:
        namespaces.pin("/proc/self/ns/no-such-type", pin)
    assert raised.value.errno == errno.ENOENT
    assert not os.path.lexists(pin)
