"""Helpers for tests that build real namespaces: children, snapshots, pin cleanup.

Run as a script, this module is the child of ``populate_in_child``: it reads a
pickled request on stdin, unshares IPC and UTS namespaces, populates them and prints
the ``ipc_snapshot.py`` JSON of the result (or the error) on stdout.
"""

import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
IPC_UTS_IMAGES = FIXTURES / "criu-ipc-uts" / "images"
IPC_UTS_EXPECTED = FIXTURES / "criu-ipc-uts" / "expected.json"
SNAPSHOT_TOOL = FIXTURES / "tools" / "ipc_snapshot.py"


def child_env():
    """Return an environment in which ``python -m workers...`` imports this checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def populate_in_child(ipc_image=None, uts_image=None):
    """Populate fresh IPC and UTS namespaces in a child; return its snapshot or error."""
    request = pickle.dumps({"ipc": ipc_image, "uts": uts_image})
    result = subprocess.run([sys.executable, __file__], input=request, capture_output=True,
                            env=child_env(), cwd=REPO, timeout=60)
    if result.returncode not in (0, 1):
        raise AssertionError(f"child failed with {result.returncode}: {result.stderr.decode()}")
    return json.loads(result.stdout)


def snapshot_pinned(ipc_pin, uts_pin):
    """Return the ``ipc_snapshot.py`` JSON of pinned IPC and UTS namespaces."""
    result = subprocess.run(["nsenter", f"--ipc={ipc_pin}", f"--uts={uts_pin}",
                             sys.executable, str(SNAPSHOT_TOOL)],
                            capture_output=True, text=True, check=True, timeout=60)
    return json.loads(result.stdout)


def expected_snapshot():
    return json.loads(IPC_UTS_EXPECTED.read_text())


def mount_points():
    with open("/proc/self/mountinfo") as file:
        return [line.split()[4] for line in file]


def mounts_under(directory):
    """Return the mount points at or below ``directory``."""
    directory = os.path.realpath(directory)
    return [point for point in mount_points()
            if point == directory or point.startswith(directory + "/")]


def cleanup_mounts(directory):
    """Detach every mount at or below ``directory``, deepest first, then remove it."""
    from workers import namespaces

    for point in sorted(set(mounts_under(directory)), key=len, reverse=True):
        while point in mount_points():
            namespaces.umount(point, namespaces.MNT_DETACH)
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def scratch_dir():
    """A temporary directory whose mounts and files are removed after the test."""
    directory = tempfile.mkdtemp(prefix="cerman-test-")
    try:
        yield Path(directory)
    finally:
        cleanup_mounts(directory)


@pytest.fixture
def pin_dir(scratch_dir):
    """A private bind-mounted directory for pins, released after the test."""
    from workers import namespaces

    directory = scratch_dir / "ns"
    namespaces.make_private_mount(directory)
    yield directory


def set_ipc_var_field(images_dir, field_number, value):
    """Rewrite one single-byte varint field of the ``ipcns-var`` entry in place.

    Used to make checkpoint variants (for example shm_rmid_forced=1, field 9 of
    ``ipc_var_entry``) from the real fixture without a protobuf writer.
    """
    (path,) = Path(images_dir).glob("ipcns-var-*.img")
    data = bytearray(path.read_bytes())
    position, end = 12, 12 + int.from_bytes(data[8:12], "little")
    while position < end:
        key, position = _varint(data, position)
        number, wire_type = key >> 3, key & 7
        if number == field_number:
            assert wire_type == 0
            assert data[position] < 0x80
            assert value < 0x80
            data[position] = value
            path.write_bytes(bytes(data))
            return
        position = _skip(data, position, wire_type)
    raise AssertionError(f"{path}: field {field_number} not found")


def _varint(data, position):
    result = shift = 0
    while True:
        byte = data[position]
        position += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return result, position


def _skip(data, position, wire_type):
    if wire_type == 0:
        return _varint(data, position)[1]
    if wire_type == 1:
        return position + 8
    if wire_type == 5:
        return position + 4
    if wire_type == 2:
        length, position = _varint(data, position)
        return position + length
    raise AssertionError(f"unexpected wire type {wire_type}")


def _child_main():
    sys.path.insert(0, str(SNAPSHOT_TOOL.parent))
    import ipc_snapshot

    from workers import namespaces
    from workers.ipc_builder import populate_ipc
    from workers.uts_builder import populate_uts

    request = pickle.loads(sys.stdin.buffer.read())
    namespaces.unshare(namespaces.CLONE_NEWIPC | namespaces.CLONE_NEWUTS)
    try:
        if request["ipc"] is not None:
            populate_ipc(request["ipc"])
        if request["uts"] is not None:
            populate_uts(request["uts"])
    except Exception as error:
        print(json.dumps({"error": {"type": type(error).__name__, "message": str(error),
                                    "errno": getattr(error, "errno", None)}}))
        return 1
    print(json.dumps({"snapshot": ipc_snapshot.snapshot()}))
    return 0


if __name__ == "__main__":
    sys.exit(_child_main())
