"""Helpers for the CRIU image reader's tests: fixture extraction and image surgery.

The image writers here are deliberately independent of ``workers.criu``: they encode
protobuf fields and frame entries by hand, so a bug in the reader cannot hide in the
test input.
"""

import hashlib
import io
import json
import shutil
import struct
import subprocess
import tarfile
from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures"
IPC_UTS_IMAGES = FIXTURES / "criu-ipc-uts" / "images"
CONTAINERD_CHECKPOINT = FIXTURES / "containerd" / "ck-ipcfixture.oci.tar"
PODMAN_EXPORT = FIXTURES / "podman" / "ipcfixture-checkpoint.tar.zst"

CRIU_TAR_MEDIA_TYPE = "application/vnd.containerd.container.criu.checkpoint.criu.tar"
OCI_INDEX_MEDIA_TYPE = "application/vnd.oci.image.index.v1+json"

IMG_COMMON_MAGIC = 0x54564319
U32 = struct.Struct("=I")


def copy_ipc_uts_images(target):
    """Copy the criu-ipc-uts fixture images to ``target``; return ``target``."""
    shutil.copytree(IPC_UTS_IMAGES, target)
    return target


def extract_containerd_images(target):
    """Extract the CRIU images of the containerd checkpoint fixture into ``target``.

    The OCI layout's ``index.json`` lists the checkpoint's own index, whose entry with
    the CRIU media type is a plain tar of the image directory.
    """
    with tarfile.open(CONTAINERD_CHECKPOINT) as layout:
        digest = _find_blob(layout, json.load(layout.extractfile("index.json")), CRIU_TAR_MEDIA_TYPE)
        blob = layout.extractfile(_blob_name(digest)).read()
    target.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(blob)) as images:
        images.extractall(target, filter="data")
    return target


def _blob_name(digest):
    algorithm, value = digest.split(":", 1)
    return f"blobs/{algorithm}/{value}"


def _find_blob(layout, index, media_type):
    for descriptor in index["manifests"]:
        if descriptor["mediaType"] == media_type:
            return descriptor["digest"]
        if descriptor["mediaType"] == OCI_INDEX_MEDIA_TYPE:
            nested = json.load(layout.extractfile(_blob_name(descriptor["digest"])))
            found = _find_blob(layout, nested, media_type)
            if found:
                return found
    return None


def extract_podman_images(target):
    """Extract ``checkpoint/`` of the podman export fixture into ``target``.

    Podman 4.3.1 compresses exports with zstd whatever the file name suffix.
    """
    archive = subprocess.run(["zstd", "-dc", str(PODMAN_EXPORT)], check=True, capture_output=True).stdout
    target.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as export:
        for member in export.getmembers():
            if member.isfile() and member.name.startswith("checkpoint/"):
                member.name = member.name.removeprefix("checkpoint/")
                export.extract(member, target, filter="data")
    return target


def podman_export_member(name):
    """Return the bytes of the file ``name`` of the podman export fixture."""
    archive = subprocess.run(["zstd", "-dc", str(PODMAN_EXPORT)], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as export:
        return export.extractfile(name).read()


def assemble_segment(segment):
    """Return the bytes of a shared memory segment from its chunks, zero-filled."""
    contents = bytearray(segment.size)
    for chunk in segment.chunks:
        with open(chunk.path, "rb") as image:
            image.seek(chunk.file_offset)
            data = image.read(chunk.length)
        assert len(data) == chunk.length, f"{chunk.path} ends inside a chunk"
        contents[chunk.offset : chunk.offset + chunk.length] = data
    return bytes(contents)


def signed32(value):
    """Return a 32-bit IPC key as /proc/sysvipc prints it (signed)."""
    return value - (1 << 32) if value >= 1 << 31 else value


# Hand-made encoding, for images CRIU 4.1.1 cannot write.


def encode_varint(value):
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def varint_field(number, value):
    return encode_varint(number << 3) + encode_varint(value)


def bytes_field(number, data):
    return encode_varint(number << 3 | 2) + encode_varint(len(data)) + data


def frame(message):
    """Return ``message`` framed as an image entry (u32 length, then the bytes)."""
    return U32.pack(len(message)) + message


def image_head(type_magic):
    return U32.pack(IMG_COMMON_MAGIC) + U32.pack(type_magic)


def split_entries(path):
    """Return ``(head bytes, [message bytes])`` of an image whose entries have no payload."""
    data = Path(path).read_bytes()
    head, pos = data[:8], 8
    entries = []
    while pos < len(data):
        (length,) = U32.unpack_from(data, pos)
        entries.append(data[pos + 4 : pos + 4 + length])
        pos += 4 + length
    assert pos == len(data), f"{path} does not end at an entry boundary"
    return head, entries


def entry_offsets(path):
    """Return the file offsets where the entries of a payload-free image start."""
    head, entries = split_entries(path)
    offsets = []
    pos = len(head)
    for message in entries:
        offsets.append(pos)
        pos += 4 + len(message)
    return offsets


def drop_field(message, number):
    """Return ``message`` without its top-level fields of ``number``.

    Handles the varint and length-delimited wire types, the only ones CRIU's IPC
    entries use.
    """
    out = bytearray()
    pos = 0
    while pos < len(message):
        start = pos
        key, pos = _read_varint(message, pos)
        if key & 7 == 0:
            _, pos = _read_varint(message, pos)
        elif key & 7 == 2:
            length, pos = _read_varint(message, pos)
            pos += length
        else:
            raise ValueError(f"wire type {key & 7} at byte {start} is not handled")
        if key >> 3 != number:
            out += message[start:pos]
    return bytes(out)


def _read_varint(data, pos):
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def ipc_snapshot(image):
    """Return ``image`` (an ``IpcNamespaceImage``) in the form of ``tools/ipc_snapshot.py``.

    Only the IPC part: "shm", "msg", "sem" and "sysctl", so a test can compare the
    image with the snapshot of the live process section by section.
    """

    def identity(desc, id_name):
        return {"key": str(signed32(desc.key)), id_name: desc.id, "perms": f"{desc.mode:o}",
                "uid": str(desc.uid), "gid": str(desc.gid)}

    shm = [
        {**identity(segment.desc, "shmid"), "size": segment.size,
         "sha256": hashlib.sha256(assemble_segment(segment)).hexdigest()}
        for segment in image.shm
    ]
    msg = [
        {**identity(queue.desc, "msqid"), "qnum": len(queue.messages),
         "cbytes": sum(len(message.data) for message in queue.messages),
         "messages": [{"type": message.mtype, "size": len(message.data),
                       "sha256": hashlib.sha256(message.data).hexdigest()}
                      for message in queue.messages]}
        for queue in image.msg
    ]
    sem = [
        {**identity(semaphores.desc, "semid"), "nsems": len(semaphores.values),
         "values": list(semaphores.values)}
        for semaphores in image.sem
    ]
    return {"shm": shm, "msg": msg, "sem": sem, "sysctl": sysctl_snapshot(image.sysctls)}


def sysctl_snapshot(sysctls):
    """Return ``IpcSysctls`` as the /proc/sys values ``tools/ipc_snapshot.py`` records."""
    values = {
        "kernel/msgmax": sysctls.msgmax,
        "kernel/msgmnb": sysctls.msgmnb,
        "kernel/msgmni": sysctls.msgmni,
        "kernel/sem": " ".join(str(value) for value in sysctls.sem),
        "kernel/shmmax": sysctls.shmmax,
        "kernel/shmall": sysctls.shmall,
        "kernel/shmmni": sysctls.shmmni,
        "kernel/shm_rmid_forced": sysctls.shm_rmid_forced,
        "fs/mqueue/queues_max": sysctls.mq_queues_max,
        "fs/mqueue/msg_max": sysctls.mq_msg_max,
        "fs/mqueue/msgsize_max": sysctls.mq_msgsize_max,
        "fs/mqueue/msg_default": sysctls.mq_msg_default,
        "fs/mqueue/msgsize_default": sysctls.mq_msgsize_default,
    }
    return {name: str(value) for name, value in values.items()}
