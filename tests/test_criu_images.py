"""The CRIU image reader, on real images from CRIU 4.1.1, containerd and podman."""

import json
import os
import shutil
import struct

import pytest

from cerman.errors import ImageError
from tests import criu_checkpoints
from tests.criu_image_helpers import (
    FIXTURES,
    IPC_UTS_IMAGES,
    U32,
    assemble_segment,
    bytes_field,
    copy_ipc_uts_images,
    drop_field,
    entry_offsets,
    extract_containerd_images,
    extract_podman_images,
    frame,
    image_head,
    ipc_snapshot,
    podman_export_member,
    split_entries,
    varint_field,
)
from workers.criu import images, protobuf
from workers.criu.protobuf import DecodeError, Field, MessageType

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
FSTYPE_PROC, FSTYPE_SYSFS, FSTYPE_TMPFS, FSTYPE_DEVPTS, FSTYPE_MQUEUE, FSTYPE_OVERLAYFS = 1, 2, 5, 6, 14, 17


@pytest.fixture(scope="module")
def containerd_images(tmp_path_factory):
    return extract_containerd_images(tmp_path_factory.mktemp("containerd") / "images")


@pytest.fixture(scope="module")
def podman_images(tmp_path_factory):
    return extract_podman_images(tmp_path_factory.mktemp("podman") / "images")


@pytest.fixture(params=["criu-ipc-uts", "containerd", "podman"])
def source(request):
    """``(images_dir, expected IPC/UTS snapshot)`` of each checkpoint fixture."""
    if request.param == "criu-ipc-uts":
        return IPC_UTS_IMAGES, json.loads((FIXTURES / "criu-ipc-uts" / "expected.json").read_text())
    images_dir = request.getfixturevalue(f"{request.param}_images")
    return images_dir, json.loads((FIXTURES / request.param / "expected-ipc.json").read_text())


@pytest.fixture
def ipc_images(tmp_path):
    """A writable copy of the criu-ipc-uts images."""
    return copy_ipc_uts_images(tmp_path / "images")


# protobuf wire format


def test_varint_multibyte():
    assert protobuf.read_varint(b"\x96\x01", 0) == (150, 2)


def test_varint_max_uint64():
    assert protobuf.read_varint(b"\xff" * 9 + b"\x01", 0) == (2**64 - 1, 10)


def test_varint_cut_off_raises():
    with pytest.raises(DecodeError, match="cut off"):
        protobuf.read_varint(b"\x96", 0)


def test_varint_eleven_bytes_raises():
    with pytest.raises(DecodeError, match="longer than 10"):
        protobuf.read_varint(b"\x80" * 10 + b"\x01", 0)


def test_varint_above_64_bits_raises():
    with pytest.raises(DecodeError, match="exceeds 64 bits"):
        protobuf.read_varint(b"\xff" * 9 + b"\x02", 0)


SAMPLE = MessageType(
    "sample",
    [
        Field(1, "count", "uint32", "required"),
        Field(2, "delta", "sint32"),
        Field(3, "level", "int32"),
        Field(4, "name", "string"),
        Field(5, "values", "uint32", "repeated"),
        Field(6, "stamp", "fixed64"),
    ],
)


def test_decode_skips_unknown_field():
    message = protobuf.decode_message(SAMPLE, varint_field(1, 7) + bytes_field(9, b"new") + varint_field(15, 3))
    assert dict(message) == {"count": 7, "values": []}
    assert message.unknown == ((9, 2, b"new"), (15, 0, 3))


def test_decode_sint32_zigzag():
    assert protobuf.decode_message(SAMPLE, varint_field(1, 0) + varint_field(2, 3))["delta"] == -2


def test_decode_int32_negative():
    level = protobuf.decode_message(SAMPLE, varint_field(1, 0) + varint_field(3, 2**64 - 5))["level"]
    assert level == -5


def test_decode_fixed64_little_endian():
    data = varint_field(1, 0) + bytes([6 << 3 | 1]) + struct.pack("<Q", 0x1122334455667788)
    assert protobuf.decode_message(SAMPLE, data)["stamp"] == 0x1122334455667788


def test_decode_packed_and_unpacked_repeated():
    packed = bytes_field(5, bytes([1, 2, 0x96, 0x01]))
    message = protobuf.decode_message(SAMPLE, varint_field(1, 0) + packed + varint_field(5, 9))
    assert message["values"] == [1, 2, 150, 9]


def test_decode_scalar_last_value_wins():
    assert protobuf.decode_message(SAMPLE, varint_field(1, 1) + varint_field(1, 2))["count"] == 2


def test_decode_string_keeps_non_utf8_bytes():
    name = protobuf.decode_message(SAMPLE, varint_field(1, 0) + bytes_field(4, b"/mnt/\xff"))["name"]
    assert os.fsencode(name) == b"/mnt/\xff"


def test_decode_missing_required_raises():
    with pytest.raises(DecodeError, match="required field count"):
        protobuf.decode_message(SAMPLE, varint_field(2, 1))


def test_decode_uint32_overflow_raises():
    with pytest.raises(DecodeError, match="uint32"):
        protobuf.decode_message(SAMPLE, varint_field(1, 2**32))


def test_decode_wrong_wire_type_raises():
    with pytest.raises(DecodeError, match="wire type 2"):
        protobuf.decode_message(SAMPLE, bytes_field(1, b"x"))


def test_decode_group_wire_type_raises():
    with pytest.raises(DecodeError, match="wire type 3"):
        protobuf.decode_message(SAMPLE, bytes([1 << 3 | 3]))


def test_decode_length_beyond_data_raises():
    with pytest.raises(DecodeError, match="declares 5 bytes"):
        protobuf.decode_message(SAMPLE, bytes([4 << 3 | 2, 5]) + b"ab")


def test_decode_field_number_zero_raises():
    with pytest.raises(DecodeError, match="number 0"):
        protobuf.decode_message(SAMPLE, b"\x00\x01")


# Reading the fixtures


def test_inventory_version():
    assert images.read_inventory(IPC_UTS_IMAGES)["img_version"] == 2


def test_root_namespace_ids():
    expected = {"pid": 1, "net": 2, "ipc": 9, "uts": 10, "mnt": 6, "user": 7, "cgroup": 8, "time": 5}
    assert images.root_namespace_ids(IPC_UTS_IMAGES) == expected


def test_ipc_namespace_id(source):
    images_dir, _ = source
    assert images.read_ipc_namespace(images_dir).ns_id == images.root_namespace_ids(images_dir)["ipc"]


def test_ipc_shm_matches_snapshot(source):
    images_dir, expected = source
    assert ipc_snapshot(images.read_ipc_namespace(images_dir))["shm"] == expected["shm"]


def test_ipc_msg_matches_snapshot(source):
    images_dir, expected = source
    assert ipc_snapshot(images.read_ipc_namespace(images_dir))["msg"] == expected["msg"]


def test_ipc_sem_matches_snapshot(source):
    images_dir, expected = source
    assert ipc_snapshot(images.read_ipc_namespace(images_dir))["sem"] == expected["sem"]


def test_ipc_sysctls_match_snapshot(source):
    images_dir, expected = source
    assert ipc_snapshot(images.read_ipc_namespace(images_dir))["sysctl"] == expected["sysctl"]


def test_uts_names(source):
    images_dir, expected = source
    uts = images.read_uts_namespace(images_dir)
    assert (uts.nodename, uts.domainname) == (expected["hostname"], expected["domainname"])


def test_shm_unaligned_last_chunk_clipped():
    segment = images.read_ipc_namespace(IPC_UTS_IMAGES).shm[1]
    last = segment.chunks[-1]
    assert (segment.size, last.offset, last.length) == (1048699, 1048576, 123)


def test_shm_chunks_point_into_pages_files():
    segments = images.read_ipc_namespace(IPC_UTS_IMAGES).shm
    names = [sorted({chunk.path.name for chunk in segment.chunks}) for segment in segments]
    assert names == [["pages-2.img"], ["pages-3.img"], ["pages-4.img"]]


def test_msg_with_zero_padding_between_texts():
    queue = images.read_ipc_namespace(IPC_UTS_IMAGES).msg[0]
    assert [len(message.data) for message in queue.messages] == [1, 100, 4000, 8000]


def test_read_image_rejects_unknown_type(ipc_images):
    with pytest.raises(ImageError, match="not an image type"):
        images.read_image(ipc_images / "core-1134.img")


# Mount namespaces


def expected_mounts(name):
    mounts = json.loads((FIXTURES / name / "expected-mnt.json").read_text())["mounts"]
    return {mount["mountpoint"]: mount for mount in mounts}


def mount_flag_names(entry):
    names = {"ro" if entry.flags & MS_RDONLY else "rw"}
    for bit, name in ((MS_NOSUID, "nosuid"), (MS_NODEV, "nodev"), (MS_NOEXEC, "noexec")):
        if entry.flags & bit:
            names.add(name)
    return sorted(names)


@pytest.mark.parametrize("name", ["containerd", "podman"])
def test_mountpoints_match_live_container(name, request):
    entries = images.read_mountpoints(request.getfixturevalue(f"{name}_images"))
    assert sorted(entry.mountpoint for entry in entries) == sorted(expected_mounts(name))


@pytest.mark.parametrize("name", ["containerd", "podman"])
def test_mount_flags_match_live_container(name, request):
    # External mounts (ext_key set) are left out: for them CRIU 4.1.1 records the flags
    # of the mount it matched the source to, e.g. containerd's /proc/timer_list, a bind
    # of /dev/null that is rw in the container, is stored with the nosuid of its /dev.
    entries = images.read_mountpoints(request.getfixturevalue(f"{name}_images"))
    owned = {e.mountpoint: mount_flag_names(e) for e in entries if e.ext_key is None}
    expected = {point: mount["flags"] for point, mount in expected_mounts(name).items() if point in owned}
    assert owned == expected


@pytest.mark.parametrize(
    "mountpoint, fstype",
    [
        ("/", FSTYPE_OVERLAYFS),
        ("/proc", FSTYPE_PROC),
        ("/sys", FSTYPE_SYSFS),
        ("/dev", FSTYPE_TMPFS),
        ("/dev/pts", FSTYPE_DEVPTS),
        ("/dev/shm", FSTYPE_TMPFS),
        ("/dev/mqueue", FSTYPE_MQUEUE),
        ("/run", FSTYPE_TMPFS),
        ("/scratch", FSTYPE_TMPFS),
    ],
)
def test_containerd_mount_fstype(containerd_images, mountpoint, fstype):
    entries = {entry.mountpoint: entry for entry in images.read_mountpoints(containerd_images)}
    assert entries[mountpoint].fstype == fstype


def test_containerd_scratch_options(containerd_images):
    entries = {entry.mountpoint: entry for entry in images.read_mountpoints(containerd_images)}
    assert entries["/scratch"].options == "size=16384k"


def test_containerd_bind_mount_external(containerd_images):
    entries = {entry.mountpoint: entry for entry in images.read_mountpoints(containerd_images)}
    assert (entries["/hostdata"].root, entries["/hostdata"].ext_key) == ("/tmp/hostdata", "/hostdata")


def test_mount_parents_are_in_namespace(containerd_images):
    entries = images.read_mountpoints(containerd_images)
    ids = {entry.mnt_id for entry in entries}
    orphans = [entry.mountpoint for entry in entries if entry.parent_mnt_id not in ids]
    assert orphans == ["/"]


def test_mount_extra_empty_for_criu_4_1_1(containerd_images):
    assert [entry.extra for entry in images.read_mountpoints(containerd_images)] == [{}] * 18


def test_mount_unknown_field_goes_to_extra(ipc_images):
    entry = (
        varint_field(1, FSTYPE_TMPFS) + varint_field(2, 30) + varint_field(3, 80) + varint_field(4, 20)
        + varint_field(5, 0) + bytes_field(6, b"/") + bytes_field(7, b"/dev/shm")
        + bytes_field(8, b"shm") + bytes_field(9, b"") + varint_field(40, 1)
    )
    (ipc_images / "mountpoints-6.img").write_bytes(image_head(images.MNTS_MAGIC) + frame(entry))
    [mount] = images.read_mountpoints(ipc_images)
    assert mount.extra == {"field40": 1}


def test_mountpoints_missing_raises():
    with pytest.raises(ImageError, match="mountpoints-6.img: missing"):
        images.read_mountpoints(IPC_UTS_IMAGES)


@pytest.mark.parametrize("name", ["containerd", "podman"])
def test_tmpfs_images_belong_to_tmpfs_mounts(name, request):
    images_dir = request.getfixturevalue(f"{name}_images")
    tmpfs_devices = {e.root_dev for e in images.read_mountpoints(images_dir) if e.fstype == FSTYPE_TMPFS}
    assert set(images.list_tmpfs_images(images_dir)) <= tmpfs_devices


def test_tmpfs_images_of_containerd(containerd_images):
    found = images.list_tmpfs_images(containerd_images)
    assert {dev: path.name for dev, path in found.items()} == {
        dev: f"tmpfs-dev-{dev}.tar.gz.img" for dev in (70, 80, 82, 83, 84, 85)
    }


def test_stats_service_magic(tmp_path):
    path = tmp_path / "stats-dump"
    path.write_bytes(podman_export_member("stats-dump"))
    [stats] = images.read_image(path)
    assert [number for number, _wire_type, _value in stats.unknown] == [1]


# Namespaces the checkpoint does not carry


def test_ipc_without_images_is_none(ipc_images):
    for path in ipc_images.glob("ipcns-*"):
        path.unlink()
    assert images.read_ipc_namespace(ipc_images) is None


def test_ipc_without_var_image_raises(ipc_images):
    (ipc_images / "ipcns-var-9.img").unlink()
    with pytest.raises(ImageError, match="ipcns-var-9.img: missing while ipcns-shm-9.img"):
        images.read_ipc_namespace(ipc_images)


@pytest.mark.parametrize("kind", ["shm", "msg", "sem"])
def test_ipc_missing_object_image_is_empty(ipc_images, kind):
    # CRIU 4.1.1 creates no file for an image without entries.
    (ipc_images / f"ipcns-{kind}-9.img").unlink()
    assert getattr(images.read_ipc_namespace(ipc_images), kind) == ()


def test_uts_without_image_is_none(ipc_images):
    (ipc_images / "utsns-10.img").unlink()
    assert images.read_uts_namespace(ipc_images) is None


# Corruption, on copies of the real images


def truncation_offsets(path, boundaries=()):
    """Offsets to cut ``path`` at: every byte of its first 64 and a stride, minus ``boundaries``."""
    size = path.stat().st_size
    offsets = set(range(min(64, size))) | set(range(0, size, 97)) | {size - 1}
    return sorted(offsets - set(boundaries))


# A cut right after the magic of a multi-entry image leaves a valid empty image (no
# queues, no semaphore sets): the format has no entry count, so that offset is skipped.
@pytest.mark.parametrize(
    "name, boundaries",
    [("ipcns-var-9.img", ()), ("ipcns-msg-9.img", (8,)), ("ipcns-sem-9.img", (8,)), ("utsns-10.img", ())],
)
def test_truncated_image_raises(ipc_images, name, boundaries):
    path = ipc_images / name
    read = images.read_uts_namespace if name.startswith("utsns") else images.read_ipc_namespace
    accepted = []
    for offset in reversed(truncation_offsets(path, boundaries)):
        os.truncate(path, offset)
        try:
            read(ipc_images)
        except ImageError as error:
            if name not in str(error):
                accepted.append((offset, str(error)))
        else:
            accepted.append(offset)
    assert accepted == []


def test_truncated_shm_image_raises(ipc_images):
    # A cut exactly between two entries leaves a shorter but well-formed image: the
    # format has no entry count, so those offsets cannot be detected.
    path = ipc_images / "ipcns-shm-9.img"
    accepted = []
    for offset in reversed(truncation_offsets(path, entry_offsets(path))):
        os.truncate(path, offset)
        try:
            images.read_ipc_namespace(ipc_images)
        except ImageError:
            pass
        else:
            accepted.append(offset)
    assert accepted == []


def test_truncated_length_names_entry(ipc_images):
    path = ipc_images / "ipcns-shm-9.img"
    os.truncate(path, entry_offsets(path)[2] + 2)
    with pytest.raises(ImageError, match=r"ipcns-shm-9.img entry 2: ends inside an entry length") as caught:
        images.read_ipc_namespace(ipc_images)
    assert "re-dump or re-export the checkpoint" in str(caught.value)


def test_truncated_message_text_names_entry(ipc_images):
    path = ipc_images / "ipcns-msg-9.img"
    os.truncate(path, path.stat().st_size - 100)
    with pytest.raises(ImageError, match="ipcns-msg-9.img entry 4: is truncated in the text of message 4 of 4"):
        images.read_ipc_namespace(ipc_images)


def test_missing_message_entry_raises(ipc_images):
    # Queue entry 0 announces 4 messages; keep the queue and the first message only.
    path = ipc_images / "ipcns-msg-9.img"
    data = path.read_bytes()
    queue_length = U32.unpack_from(data, 8)[0]
    message_start = 8 + 4 + queue_length
    message_length = U32.unpack_from(data, message_start)[0]
    path.write_bytes(data[: message_start + 4 + message_length + 8])
    with pytest.raises(ImageError, match="entry 2: ends before message 2 of 4"):
        images.read_ipc_namespace(ipc_images)


@pytest.mark.parametrize("offset, match", [(0, "expected head magic"), (4, "expected 0x46283044")])
def test_flipped_magic_raises(ipc_images, offset, match):
    path = ipc_images / "ipcns-shm-9.img"
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ImageError, match=match):
        images.read_ipc_namespace(ipc_images)


def test_image_of_other_type_raises(ipc_images):
    shutil.copy(ipc_images / "ipcns-sem-9.img", ipc_images / "ipcns-shm-9.img")
    with pytest.raises(ImageError, match="the magic of ipcns-sem images"):
        images.read_ipc_namespace(ipc_images)


def test_flipped_inventory_magic_raises(ipc_images):
    path = ipc_images / "inventory.img"
    data = bytearray(path.read_bytes())
    data[3] ^= 0x80
    path.write_bytes(bytes(data))
    with pytest.raises(ImageError, match="inventory.img: bad magic"):
        images.read_inventory(ipc_images)


def test_v1_image_without_common_magic_raises(ipc_images):
    path = ipc_images / "utsns-10.img"
    path.write_bytes(path.read_bytes()[4:])
    with pytest.raises(ImageError, match="no common magic"):
        images.read_uts_namespace(ipc_images)


@pytest.mark.parametrize(
    "garbage, match",
    [
        (b"\x01\x02\x03", "ends inside an entry length"),
        (U32.pack(100) + b"\x08", "declares a 100-byte ipc_shm_entry but 1 bytes remain"),
        (frame(b"\x10\x01"), "ipc_shm_entry does not decode: ipc_shm_entry: required field desc"),
        (frame(b"\x0a\x7f"), "ipc_shm_entry does not decode: field 1 at byte 0 declares 127 bytes"),
    ],
)
def test_garbage_after_last_shm_entry_raises(ipc_images, garbage, match):
    path = ipc_images / "ipcns-shm-9.img"
    path.write_bytes(path.read_bytes() + garbage)
    with pytest.raises(ImageError, match=rf"ipcns-shm-9.img entry 3: {match}"):
        images.read_ipc_namespace(ipc_images)


def test_garbage_after_last_message_raises(ipc_images):
    path = ipc_images / "ipcns-msg-9.img"
    path.write_bytes(path.read_bytes() + b"\x00\x00")
    with pytest.raises(ImageError, match="ipcns-msg-9.img entry 5: ends inside an entry length"):
        images.read_ipc_namespace(ipc_images)


@pytest.mark.parametrize("name", ["ipcns-var-9.img", "utsns-10.img", "ids-1134.img", "inventory.img"])
def test_garbage_after_single_entry_raises(ipc_images, name):
    path = ipc_images / name
    path.write_bytes(path.read_bytes() + frame(b""))
    with pytest.raises(ImageError, match=f"{name} entry 1: has trailing garbage"):
        images.read_image(path)


def test_empty_single_entry_image_raises(ipc_images):
    path = ipc_images / "ipcns-var-9.img"
    os.truncate(path, 8)
    with pytest.raises(ImageError, match="entry 0: ends before its ipc_var_entry entry"):
        images.read_ipc_namespace(ipc_images)


def test_missing_pages_file_raises(ipc_images):
    (ipc_images / "pages-3.img").unlink()
    with pytest.raises(ImageError, match="pages-3.img: missing; pagemap-shmem-1.img stores"):
        images.read_ipc_namespace(ipc_images)


def test_truncated_pages_file_raises(ipc_images):
    os.truncate(ipc_images / "pages-3.img", 4096 * 256)
    with pytest.raises(ImageError, match="pages-3.img: is truncated: 1048576 bytes, pagemap-shmem-1.img lists 1052672"):
        images.read_ipc_namespace(ipc_images)


def test_oversized_pages_file_raises(ipc_images):
    with open(ipc_images / "pages-4.img", "ab") as pages:
        pages.write(b"\0" * 4096)
    with pytest.raises(ImageError, match="pages-4.img: has trailing garbage"):
        images.read_ipc_namespace(ipc_images)


def test_missing_pagemap_raises(ipc_images):
    (ipc_images / "pagemap-shmem-2.img").unlink()
    with pytest.raises(ImageError, match="pagemap-shmem-2.img: missing"):
        images.read_ipc_namespace(ipc_images)


# Pagemap flags, on pagemaps rewritten from the real pagemap-shmem-1.img


def rewrite_pagemap(images_dir, runs):
    """Replace pagemap-shmem-1.img's runs by ``(vaddr, nr_pages, flags)``, keeping its head."""
    path = images_dir / "pagemap-shmem-1.img"
    head, entries = split_entries(path)
    body = b"".join(
        frame(varint_field(1, vaddr) + varint_field(2, nr_pages) + (varint_field(4, flags) if flags is not None else b""))
        for vaddr, nr_pages, flags in runs
    )
    path.write_bytes(head + frame(entries[0]) + body)


PE_PARENT, PE_LAZY, PE_PRESENT = 1, 2, 4


@pytest.mark.parametrize(
    "flags, match",
    [
        (PE_PARENT, "parent image"),
        (PE_PARENT | PE_PRESENT, "parent image"),
        (PE_LAZY, "lazy pages"),
        (0, "flags name no storage"),
        (8, "unknown pagemap flags 0x8"),
    ],
)
def test_pagemap_run_not_in_pages_file_raises(ipc_images, flags, match):
    rewrite_pagemap(ipc_images, [(0, 256, PE_PRESENT), (0x100000, 1, flags)])
    with pytest.raises(ImageError, match=rf"pagemap-shmem-1.img entry 2: .*{match}"):
        images.read_ipc_namespace(ipc_images)


def test_pagemap_in_parent_bool_raises(ipc_images):
    path = ipc_images / "pagemap-shmem-1.img"
    head, entries = split_entries(path)
    run = varint_field(1, 0x100000) + varint_field(2, 1) + varint_field(3, 1)
    path.write_bytes(head + frame(entries[0]) + frame(entries[1]) + frame(run))
    with pytest.raises(ImageError, match="entry 2: pages are in the parent image"):
        images.read_ipc_namespace(ipc_images)


def test_pagemap_lazy_and_present_is_read(ipc_images):
    rewrite_pagemap(ipc_images, [(0, 256, PE_PRESENT | PE_LAZY), (0x100000, 1, PE_PRESENT | PE_LAZY)])
    expected = json.loads((FIXTURES / "criu-ipc-uts" / "expected.json").read_text())
    assert ipc_snapshot(images.read_ipc_namespace(ipc_images))["shm"] == expected["shm"]


def test_pagemap_without_flags_field_is_present(ipc_images):
    rewrite_pagemap(ipc_images, [(0, 256, None), (0x100000, 1, None)])
    expected = json.loads((FIXTURES / "criu-ipc-uts" / "expected.json").read_text())
    assert ipc_snapshot(images.read_ipc_namespace(ipc_images))["shm"] == expected["shm"]


def test_pagemap_hole_reads_as_zeros(ipc_images):
    # Keep only the last page: the first 256 pages are then absent, so zeros. The
    # pages file must shrink to match, keeping its last page.
    rewrite_pagemap(ipc_images, [(0x100000, 1, PE_PRESENT)])
    pages = ipc_images / "pages-3.img"
    pages.write_bytes(pages.read_bytes()[256 * 4096 :])
    segment = images.read_ipc_namespace(ipc_images).shm[1]
    contents = assemble_segment(segment)
    original = assemble_segment(images.read_ipc_namespace(IPC_UTS_IMAGES).shm[1])
    assert contents == bytes(0x100000) + original[0x100000:]


@pytest.mark.parametrize(
    "runs, match",
    [
        ([(0x100, 1, PE_PRESENT)], "not page-aligned"),
        ([(0, 256, PE_PRESENT), (0x100000, 2, PE_PRESENT)], "beyond the segment's 1048699 bytes"),
        ([(0, 256, PE_PRESENT), (0xFF000, 1, PE_PRESENT)], "overlaps the previous run"),
    ],
)
def test_pagemap_run_outside_segment_raises(ipc_images, runs, match):
    rewrite_pagemap(ipc_images, runs)
    with pytest.raises(ImageError, match=match):
        images.read_ipc_namespace(ipc_images)


# The older layout: segment contents inline in ipcns-shm, which CRIU 4.1.1 no longer writes


def write_inline_shm_image(images_dir):
    """Rewrite ipcns-shm-9.img in the inline layout, from its real entries and contents.

    Each entry loses ``in_pagemaps`` (field 3) and is followed by the segment, padded
    to 4 bytes. The pagemap and pages files are removed, so nothing else can supply them.
    """
    segments = images.read_ipc_namespace(images_dir).shm
    path = images_dir / "ipcns-shm-9.img"
    head, entries = split_entries(path)
    body = b""
    for entry, segment in zip(entries, segments, strict=True):
        contents = assemble_segment(segment)
        body += frame(drop_field(entry, 3)) + contents + b"\0" * (-len(contents) % 4)
    for pattern in ("pagemap-shmem-*.img", "pages-[234].img"):
        for stale in images_dir.glob(pattern):
            stale.unlink()
    path.write_bytes(head + body)
    return path


def test_inline_shm_reads_same_contents(ipc_images):
    write_inline_shm_image(ipc_images)
    expected = json.loads((FIXTURES / "criu-ipc-uts" / "expected.json").read_text())
    assert ipc_snapshot(images.read_ipc_namespace(ipc_images))["shm"] == expected["shm"]


def test_inline_shm_chunk_points_into_shm_image(ipc_images):
    path = write_inline_shm_image(ipc_images)
    segments = images.read_ipc_namespace(ipc_images).shm
    assert {chunk.path for segment in segments for chunk in segment.chunks} == {path}


def test_inline_shm_truncated_contents_raise(ipc_images):
    path = write_inline_shm_image(ipc_images)
    os.truncate(path, path.stat().st_size - 100)
    with pytest.raises(ImageError, match="entry 2: is truncated in the contents of shm segment 2"):
        images.read_ipc_namespace(ipc_images)


# Messages above CRIU 4.1.1's restore limit of 8192 bytes


def write_msg_image(images_dir, sizes):
    """Replace ipcns-msg-9.img by one queue holding messages of ``sizes`` bytes."""
    desc = b"".join(varint_field(number, value) for number, value in enumerate((0xC0FFEE3, 0, 0, 0, 0, 0o620, 0), 1))
    queue = bytes_field(1, desc) + varint_field(2, 1 << 20) + varint_field(3, len(sizes))
    body = frame(queue)
    texts = []
    for number, size in enumerate(sizes):
        text = bytes((number + i) % 251 for i in range(size))
        texts.append(text)
        body += frame(varint_field(1, number + 1) + varint_field(2, size)) + text + b"\0" * (-size % 8)
    (images_dir / "ipcns-msg-9.img").write_bytes(image_head(images.IPCNS_MSG_MAGIC) + body)
    return texts


def test_msg_above_8192_bytes_read_whole(ipc_images):
    texts = write_msg_image(ipc_images, [8193, 65536, 0, 3])
    queue = images.read_ipc_namespace(ipc_images).msg[0]
    assert [message.data for message in queue.messages] == texts


def test_msg_types_in_queue_order(ipc_images):
    write_msg_image(ipc_images, [8193, 65536, 0, 3])
    queue = images.read_ipc_namespace(ipc_images).msg[0]
    assert [message.mtype for message in queue.messages] == [1, 2, 3, 4]


# Fresh dumps by the CRIU on this machine


@pytest.mark.criu
@pytest.mark.parametrize("scenario", ["sparse-ids", "large", "empty", "many"])
def test_fresh_dump_matches_snapshot(tmp_path, scenario):
    checkpoint = criu_checkpoints.make_ipc_checkpoint(tmp_path, scenario)
    snapshot = ipc_snapshot(images.read_ipc_namespace(checkpoint.images_dir))
    expected = {section: checkpoint.expected[section] for section in snapshot}
    assert snapshot == expected
