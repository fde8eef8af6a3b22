"""IPC and UTS population in fresh namespaces of a child process."""

import dataclasses
import errno
import hashlib

import pytest

from cerman.errors import PoolError
from nshelpers import IPC_UTS_IMAGES, expected_snapshot, populate_in_child, scratch_dir  # noqa: F401
from workers.criu.images import read_ipc_namespace, read_uts_namespace
from workers.criu.model import (IpcDesc, IpcNamespaceImage, Message, MessageQueue,
                                SemaphoreSet, ShmChunk, ShmSegment)
from workers.ipc_builder import check_ipc_image


@pytest.fixture(scope="module")
def fixture_image():
    return read_ipc_namespace(IPC_UTS_IMAGES)


def desc(key, ipc_id, mode, **ids):
    owner = {"uid": 0, "gid": 0, "cuid": 0, "cgid": 0, **ids}
    return IpcDesc(key=key, mode=mode, id=ipc_id, **owner)


def empty_image(fixture_image, **objects):
    return IpcNamespaceImage(ns_id=1, sysctls=fixture_image.sysctls, **objects)


def test_fixture_matches_expected(fixture_image):
    result = populate_in_child(fixture_image, read_uts_namespace(IPC_UTS_IMAGES))
    assert result.get("snapshot") == expected_snapshot()


def test_exact_id_with_sequence(fixture_image):
    ipc_id = 3 * 32768 + 7
    image = empty_image(fixture_image, sem=(SemaphoreSet(desc(0x51, ipc_id, 0o600), (1,)),))
    snapshot = populate_in_child(image)["snapshot"]
    assert snapshot["sem"][0]["semid"] == ipc_id


def test_owner_and_mode_set(fixture_image):
    image = empty_image(fixture_image, sem=(
        SemaphoreSet(desc(0x52, 0, 0o604, uid=1000, gid=1001), (1,)),))
    row = populate_in_child(image)["snapshot"]["sem"][0]
    assert (row["uid"], row["gid"], row["perms"]) == ("1000", "1001", "604")


def test_negative_key_kept(fixture_image):
    image = empty_image(fixture_image, msg=(MessageQueue(desc(0xFFFFFFF0, 0, 0o600), 16384),))
    snapshot = populate_in_child(image)["snapshot"]
    assert snapshot["msg"][0]["key"] == str(0xFFFFFFF0 - (1 << 32))


def test_message_above_msgmax_sent(fixture_image):
    text = bytes(range(256)) * 50
    sysctls = dataclasses.replace(fixture_image.sysctls, msgmax=8192, msgmnb=16384)
    queue = MessageQueue(desc(0x53, 0, 0o600), 100, (Message(5, text), Message(1, b"x")))
    image = IpcNamespaceImage(ns_id=1, sysctls=sysctls, msg=(queue,))
    snapshot = populate_in_child(image)["snapshot"]
    # msgrcv(MSG_COPY) cannot copy a message above msgmax, so the snapshot shows only
    # its size in cbytes and the message after it.
    assert snapshot["msg"][0]["qnum"] == 2
    assert snapshot["msg"][0]["cbytes"] == len(text) + 1
    assert snapshot["msg"][0]["messages"][1] == {
        "type": 1, "size": 1, "sha256": hashlib.sha256(b"x").hexdigest()}
    assert snapshot["sysctl"]["kernel/msgmax"] == "8192"
    assert snapshot["sysctl"]["kernel/msgmnb"] == "16384"


def test_unaligned_segment_tail_written(fixture_image, scratch_dir):
    pages = scratch_dir / "pages-1.img"
    pages.write_bytes(b"\xab" * 300)
    size = 4096 * 2 + 123
    segment = ShmSegment(desc(0x54, 0, 0o600), size, (ShmChunk(size - 100, pages, 200, 100),))
    snapshot = populate_in_child(empty_image(fixture_image, shm=(segment,)))["snapshot"]
    expected = bytes(size - 100) + b"\xab" * 100
    assert snapshot["shm"][0]["sha256"] == hashlib.sha256(expected).hexdigest()


def test_truncated_chunk_file_fails(fixture_image, scratch_dir):
    pages = scratch_dir / "pages-1.img"
    pages.write_bytes(b"\xab" * 10)
    segment = ShmSegment(desc(0x55, 0, 0o600), 4096, (ShmChunk(0, pages, 0, 4096),))
    error = populate_in_child(empty_image(fixture_image, shm=(segment,)))["error"]
    assert error["type"] == "ImageError"
    assert str(pages) in error["message"]


def test_semaphore_out_of_range_fails(fixture_image):
    image = empty_image(fixture_image, sem=(SemaphoreSet(desc(0x56, 0, 0o600), (40000,)),))
    error = populate_in_child(image)["error"]
    assert error["type"] == "ImageError"


def test_duplicate_id_rejected(fixture_image):
    # The kernel (6.18) allocates the next free index when next_id's is taken.
    image = empty_image(fixture_image, sem=(SemaphoreSet(desc(0x57, 4, 0o600), (1,)),
                                            SemaphoreSet(desc(0x58, 4, 0o600), (1,))))
    error = populate_in_child(image)["error"]
    assert error["type"] == "NamespaceError"
    assert error["errno"] == errno.EINVAL
    assert "returned id 5" in error["message"]


def test_duplicate_key_keeps_errno(fixture_image):
    image = empty_image(fixture_image, sem=(SemaphoreSet(desc(0x59, 0, 0o600), (1,)),
                                            SemaphoreSet(desc(0x59, 1, 0o600), (1,))))
    error = populate_in_child(image)["error"]
    assert error["errno"] == errno.EEXIST


def test_rmid_forced_with_shm_rejected(fixture_image):
    sysctls = dataclasses.replace(fixture_image.sysctls, shm_rmid_forced=1)
    image = dataclasses.replace(fixture_image, sysctls=sysctls)
    with pytest.raises(PoolError, match="set kernel.shm_rmid_forced=0 in the container"):
        check_ipc_image(image)


def test_rmid_forced_without_shm_applied(fixture_image):
    sysctls = dataclasses.replace(fixture_image.sysctls, shm_rmid_forced=1)
    image = dataclasses.replace(fixture_image, sysctls=sysctls, shm=())
    snapshot = populate_in_child(image)["snapshot"]
    assert snapshot["sysctl"]["kernel/shm_rmid_forced"] == "1"
    assert len(snapshot["msg"]) == 1
