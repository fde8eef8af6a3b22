"""The builder process: namespaces built from real CRIU images, pins, errors."""

import errno
import os
import shutil
import subprocess

import pytest

from nshelpers import (IPC_UTS_IMAGES, expected_snapshot, mount_points, pin_dir,  # noqa: F401
                       scratch_dir, set_ipc_var_field, snapshot_pinned)
from workers import namespaces
from workers.builder_client import BuilderProcess

# Field number of shm_rmid_forced in CRIU's ipc_var_entry (images/ipc-var.proto).
IPC_VAR_SHM_RMID_FORCED = 9


@pytest.fixture
def builder():
    process = BuilderProcess()
    process.start()
    try:
        yield process
    finally:
        process.stop()


def build(builder, kind, pin, images_dir=IPC_UTS_IMAGES, **extra):
    return builder.call({"op": "build", "type": kind, "images_dir": str(images_dir),
                         "pin": str(pin), **extra}, timeout=60)


@pytest.fixture
def images_copy(scratch_dir):
    copy = scratch_dir / "images"
    shutil.copytree(IPC_UTS_IMAGES, copy)
    return copy


def test_build_matches_expected(builder, pin_dir):
    assert build(builder, "ipc", pin_dir / "ipc")["ok"]
    assert build(builder, "uts", pin_dir / "uts")["ok"]
    assert snapshot_pinned(pin_dir / "ipc", pin_dir / "uts") == expected_snapshot()


def test_pin_survives_builder_exit(builder, pin_dir):
    build(builder, "ipc", pin_dir / "ipc")
    build(builder, "uts", pin_dir / "uts")
    builder.stop()
    assert namespaces.is_pinned(pin_dir / "ipc", "ipc")
    assert snapshot_pinned(pin_dir / "ipc", pin_dir / "uts") == expected_snapshot()


def test_builder_exits_on_stdin_close(builder):
    builder.stop()
    assert builder._process.returncode == 0


def test_unpin_removes_mount(builder, pin_dir):
    build(builder, "ipc", pin_dir / "ipc")
    namespaces.unpin(pin_dir / "ipc")
    assert str(pin_dir / "ipc") not in mount_points()


def test_response_reports_pin_and_time(builder, pin_dir):
    response = build(builder, "uts", pin_dir / "uts")
    assert response["pin"] == str(pin_dir / "uts")
    assert response["seconds"] > 0


def test_corrupt_image_error_response(builder, pin_dir, images_copy):
    shm_image = next(images_copy.glob("ipcns-shm-*.img"))
    shm_image.write_bytes(shm_image.read_bytes()[:30])
    response = build(builder, "ipc", pin_dir / "ipc", images_copy)
    assert response["error"]["code"] == "image"
    assert not os.path.lexists(pin_dir / "ipc")
    assert builder.call({"op": "ping"})["ok"]


def test_missing_ipc_images_pool_error(builder, pin_dir, images_copy):
    for path in images_copy.glob("ipcns-*.img"):
        path.unlink()
    response = build(builder, "ipc", pin_dir / "ipc", images_copy)
    assert response["error"]["code"] == "pool"


def test_rmid_forced_rejected(builder, pin_dir, images_copy):
    set_ipc_var_field(images_copy, IPC_VAR_SHM_RMID_FORCED, 1)
    response = build(builder, "ipc", pin_dir / "ipc", images_copy)
    assert response["error"]["code"] == "pool"
    assert "kernel.shm_rmid_forced=0" in response["error"]["message"]
    assert not os.path.lexists(pin_dir / "ipc")


def test_existing_pin_keeps_errno(builder, pin_dir):
    (pin_dir / "ipc").write_text("")
    response = build(builder, "ipc", pin_dir / "ipc")
    assert response["error"]["code"] == "namespace"
    assert response["error"]["errno"] == errno.EEXIST


def test_timeout_kills_and_cleans(builder, pin_dir):
    response = build(builder, "uts", pin_dir / "uts", timeout=0)
    assert response["error"]["errno"] == errno.ETIMEDOUT
    assert not os.path.lexists(pin_dir / "uts")
    assert str(pin_dir / "uts") not in mount_points()


def test_invalid_line_error_response(builder):
    builder._process.stdin.write(b"not json\n")
    builder._process.stdin.flush()
    response = builder.call({"op": "ping"})
    assert response["ok"]
    assert builder.read_responses()[0]["error"]["code"] == "request"


def test_unknown_op_rejected(builder):
    response = builder.call({"op": "explode", "type": "ipc"})
    assert response["error"]["code"] == "request"


def test_uts_reset_restores_hostname(builder, pin_dir):
    pin = pin_dir / "uts"
    build(builder, "uts", pin)
    subprocess.run(["nsenter", f"--uts={pin}", "hostname", "changed"], check=True)
    response = builder.call({"op": "reset", "type": "uts", "images_dir": str(IPC_UTS_IMAGES),
                             "pin": str(pin)})
    hostname = subprocess.run(["nsenter", f"--uts={pin}", "hostname"], check=True,
                              capture_output=True, text=True).stdout.strip()
    assert response["ok"]
    assert hostname == "fixture-host"


def test_reset_unpinned_path_rejected(builder, pin_dir):
    (pin_dir / "plain").write_text("")
    response = builder.call({"op": "reset", "type": "uts", "images_dir": str(IPC_UTS_IMAGES),
                             "pin": str(pin_dir / "plain")})
    assert response["error"]["errno"] == errno.EINVAL


def test_concurrent_builds_all_answered(builder, pin_dir):
    ids = {builder.submit({"op": "build", "type": "ipc", "images_dir": str(IPC_UTS_IMAGES),
                           "pin": str(pin_dir / f"ipc{index}")}) for index in range(6)}
    responses = []
    for _ in range(600):
        if len(responses) == len(ids):
            break
        subprocess.run(["sleep", "0.05"])
        responses += builder.read_responses()
    assert {response["id"] for response in responses} == ids
    assert all(response["ok"] for response in responses)
