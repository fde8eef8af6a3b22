"""Reader for the CRIU image files of a checkpoint (image format v1.1).

Grammar of an image file, integers being host-endian 32-bit words::

    image    := head type_magic entry*
    head     := IMG_COMMON_MAGIC              (absent from inventory.img)
              | IMG_SERVICE_MAGIC             (service files such as stats-dump)
    entry    := length message[length] payload
    payload  := raw bytes that follow the message, per image type:
        ipcns-shm  without in_pagemaps: the segment, size bytes padded to 4
        ipcns-msg  qnum times: an ipc_msg entry, then msize bytes padded to 8
        ipcns-sem  nsems u16 semaphore values padded to 8
        others     nothing

The file ends where the next ``length`` would start and a read returns no byte. Anything
else is corruption: a partial length, a message or payload cut short, a message that
does not decode, or bytes after the entry of a single-entry image. ``pagemap-*.img`` hold a
``pagemap_head`` entry, then ``pagemap_entry`` entries; ``pages-*.img`` and
``tmpfs-dev-*.tar.gz.img`` are raw data without magic.

``IMAGE_TYPES`` maps each image type cerman reads to its magic and handler. Entry
indexes in errors count the length-prefixed entries of a file from 0 in file order, the
messages of ``ipcns-msg`` included.
"""

import dataclasses
import logging
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cerman.errors import ImageError
from workers.criu import messages
from workers.criu.model import (
    IpcDesc,
    IpcNamespaceImage,
    IpcSysctls,
    Message,
    MessageQueue,
    MountEntry,
    SemaphoreSet,
    ShmChunk,
    ShmSegment,
    UtsNamespaceImage,
)
from workers.criu.protobuf import DecodeError, MessageType, decode_message
from workers.criu.shmem import REDUMP, pagemap_chunks, round_up

logger = logging.getLogger(__name__)

# CRIU 4.1.1 criu/include/magic.h
IMG_COMMON_MAGIC = 0x54564319
IMG_SERVICE_MAGIC = 0x55105940
INVENTORY_MAGIC = 0x58313116
PSTREE_MAGIC = 0x50273030
IDS_MAGIC = 0x54432030
UTSNS_MAGIC = 0x54473203
IPC_VAR_MAGIC = 0x53115007
IPCNS_SHM_MAGIC = 0x46283044
IPCNS_MSG_MAGIC = 0x55453737
IPCNS_SEM_MAGIC = 0x59573019
PAGEMAP_MAGIC = 0x56084025
MNTS_MAGIC = 0x55563928
STATS_MAGIC = 0x57093306

# inventory_entry.img_version of images with the common magic ("v1.1").
IMAGES_V1_1 = 2

U32 = struct.Struct("=I")

# stats.proto's stats_entry; its dump and restore timings are kept as unknown fields.
STATS_ENTRY = MessageType("stats_entry", [])


class ImageReader:
    """Sequential reader of the entries of one image file, checking its framing.

    ``entry`` is the index of the last entry read (-1 before the first).
    """

    def __init__(self, path, image_type):
        self.path = Path(path)
        self.image_type = image_type
        self.entry = -1
        try:
            self._file = open(self.path, "rb")
        except FileNotFoundError:
            raise ImageError(self.path, f"missing; {REDUMP}") from None
        except OSError as error:
            raise ImageError(self.path, f"cannot be opened: {error.strerror}") from error

        try:
            self.size = os.fstat(self._file.fileno()).st_size
            self._check_magic()
        except BaseException:
            self._file.close()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def close(self):
        self._file.close()

    def _check_magic(self):
        expected = self.image_type.magic
        head = self.image_type.head_magic
        first = self._read_magic_word()
        if head is None:
            if first != expected:
                raise ImageError(self.path, f"{self._describe_magic(first)}; expected {expected:#010x}; {REDUMP}")
            return

        if first != head:
            if first == expected:
                reason = "has no common magic (image format v1); cerman reads format v1.1"
            else:
                reason = f"{self._describe_magic(first)}; expected head magic {head:#010x}"
            raise ImageError(self.path, f"{reason}; {REDUMP}")

        second = self._read_magic_word()
        if second != expected:
            raise ImageError(
                self.path,
                f"{self._describe_magic(second)}; expected {expected:#010x} ({self.image_type.name}); {REDUMP}",
            )

    def _read_magic_word(self):
        data = self._file.read(U32.size)
        if len(data) < U32.size:
            raise ImageError(self.path, f"is truncated in its magic ({self.size} bytes); {REDUMP}")
        return U32.unpack(data)[0]

    def _describe_magic(self, value):
        names = [t.name for t in IMAGE_TYPES.values() if t.magic == value]
        known = f", the magic of {'/'.join(names)} images" if names else ""
        return f"bad magic {value:#010x}{known}"

    def read_entry(self, message_type, expected=None):
        """Read and decode the next entry; return None at the clean end of the file.

        With ``expected`` (a description such as "message 2 of 4"), the end of the file
        is an error instead, since the previous entry announced this one.
        """
        length_bytes = self._file.read(U32.size)
        if not length_bytes:
            if expected is not None:
                raise ImageError(self.path, f"ends before {expected}; {REDUMP}", self.entry + 1)
            return None

        self.entry += 1
        if len(length_bytes) < U32.size:
            raise ImageError(
                self.path,
                f"ends inside an entry length ({len(length_bytes)} of 4 bytes): "
                f"the file is truncated or has trailing garbage; {REDUMP}",
                self.entry,
            )

        length = U32.unpack(length_bytes)[0]
        remaining = self.size - self._file.tell()
        if length > remaining:
            raise ImageError(
                self.path,
                f"declares a {length}-byte {message_type.name} but {remaining} bytes remain: "
                f"the file is truncated or has trailing garbage; {REDUMP}",
                self.entry,
            )

        data = self._read_exact(length, message_type.name)
        try:
            return decode_message(message_type, data)
        except DecodeError as error:
            raise ImageError(self.path, f"{message_type.name} does not decode: {error}; {REDUMP}", self.entry) from None

    def read_payload(self, size, what):
        """Read the ``size`` raw bytes that follow the last entry."""
        return self._read_exact(size, what)

    def skip_payload(self, size, what):
        """Skip the ``size`` raw bytes that follow the last entry; return their file offset."""
        offset = self._file.tell()
        if size > self.size - offset:
            raise ImageError(
                self.path,
                f"is truncated in {what}: {self.size - offset} of {size} bytes; {REDUMP}",
                self.entry,
            )
        self._file.seek(size, os.SEEK_CUR)
        return offset

    def expect_end(self):
        """Raise unless the file ends here."""
        if self._file.read(1):
            raise ImageError(
                self.path,
                f"has trailing garbage after its only {self.image_type.name} entry; {REDUMP}",
                self.entry + 1,
            )

    def _read_exact(self, size, what):
        data = self._file.read(size)
        if len(data) < size:
            raise ImageError(self.path, f"is truncated in {what}: {len(data)} of {size} bytes; {REDUMP}", self.entry)
        return data


# Handlers: each reads the entries of one image type and returns them as a list.


def _single_entry(message_type):
    def read(reader):
        entry = reader.read_entry(message_type, expected=f"its {message_type.name} entry")
        reader.expect_end()
        return [entry]

    return read


def _all_entries(message_type):
    def read(reader):
        entries = []
        while (entry := reader.read_entry(message_type)) is not None:
            entries.append(entry)
        return entries

    return read


def _read_pagemap(reader):
    head = reader.read_entry(messages.PAGEMAP_HEAD, expected="its pagemap_head entry")
    return [head] + _all_entries(messages.PAGEMAP_ENTRY)(reader)


def _read_shm(reader):
    """Read ``ipc_shm_entry``s; old-layout entries get ``contents_offset`` in this file."""
    entries = []
    while (entry := reader.read_entry(messages.IPC_SHM_ENTRY)) is not None:
        if not entry.get("in_pagemaps"):
            # Older CRIU wrote the segment right after its entry, padded to 4 bytes.
            padded = round_up(entry["size"], 4)
            entry["contents_offset"] = reader.skip_payload(padded, f"the contents of shm segment {entry['desc']['id']}")
        entries.append(entry)
    return entries


def _read_msg(reader):
    """Read ``ipc_msg_entry``s, each with its ``messages`` (``ipc_msg`` plus ``data``)."""
    queues = []
    while (queue := reader.read_entry(messages.IPC_MSG_ENTRY)) is not None:
        queue_id = queue["desc"]["id"]
        queue["messages"] = []
        for number in range(1, queue["qnum"] + 1):
            what = f"message {number} of {queue['qnum']} of queue {queue_id}"
            message = reader.read_entry(messages.IPC_MSG, expected=what)
            padded = reader.read_payload(round_up(message["msize"], 8), f"the text of {what}")
            message["data"] = padded[: message["msize"]]
            queue["messages"].append(message)
        queues.append(queue)
    return queues


def _read_sem(reader):
    """Read ``ipc_sem_entry``s, each with its semaphore ``values``."""
    sets = []
    while (entry := reader.read_entry(messages.IPC_SEM_ENTRY)) is not None:
        nsems = entry["nsems"]
        what = f"the values of semaphore set {entry['desc']['id']}"
        padded = reader.read_payload(round_up(2 * nsems, 8), what)
        entry["values"] = list(struct.unpack(f"={nsems}H", padded[: 2 * nsems]))
        sets.append(entry)
    return sets


@dataclass(frozen=True)
class ImageType:
    """One kind of image file: its name prefix, magic words and entry handler."""

    name: str
    magic: int
    head_magic: int | None
    handler: Callable[[ImageReader], list]


IMAGE_TYPES = {
    image_type.name: image_type
    for image_type in (
        ImageType("inventory", INVENTORY_MAGIC, None, _single_entry(messages.INVENTORY_ENTRY)),
        ImageType("pstree", PSTREE_MAGIC, IMG_COMMON_MAGIC, _all_entries(messages.PSTREE_ENTRY)),
        ImageType("ids", IDS_MAGIC, IMG_COMMON_MAGIC, _single_entry(messages.TASK_KOBJ_IDS_ENTRY)),
        ImageType("utsns", UTSNS_MAGIC, IMG_COMMON_MAGIC, _single_entry(messages.UTSNS_ENTRY)),
        ImageType("ipcns-var", IPC_VAR_MAGIC, IMG_COMMON_MAGIC, _single_entry(messages.IPC_VAR_ENTRY)),
        ImageType("ipcns-shm", IPCNS_SHM_MAGIC, IMG_COMMON_MAGIC, _read_shm),
        ImageType("ipcns-msg", IPCNS_MSG_MAGIC, IMG_COMMON_MAGIC, _read_msg),
        ImageType("ipcns-sem", IPCNS_SEM_MAGIC, IMG_COMMON_MAGIC, _read_sem),
        ImageType("pagemap", PAGEMAP_MAGIC, IMG_COMMON_MAGIC, _read_pagemap),
        ImageType("pagemap-shmem", PAGEMAP_MAGIC, IMG_COMMON_MAGIC, _read_pagemap),
        ImageType("mountpoints", MNTS_MAGIC, IMG_COMMON_MAGIC, _all_entries(messages.MNT_ENTRY)),
        ImageType("stats-dump", STATS_MAGIC, IMG_SERVICE_MAGIC, _single_entry(STATS_ENTRY)),
        ImageType("stats-restore", STATS_MAGIC, IMG_SERVICE_MAGIC, _single_entry(STATS_ENTRY)),
    )
}

_ID_SUFFIX = re.compile(r"-\d+$")


def image_type_for(path):
    """Return the ``ImageType`` of an image file, chosen by its file name."""
    name = Path(path).name.removesuffix(".img")
    image_type = IMAGE_TYPES.get(name) or IMAGE_TYPES.get(_ID_SUFFIX.sub("", name))
    if image_type is None:
        raise ImageError(path, f"is not an image type this reader knows ({', '.join(sorted(IMAGE_TYPES))})")
    return image_type


def read_image(path):
    """Read every entry of an image file; return them as ``DecodedMessage`` dicts.

    The handler of the file's type adds payload fields: ``contents_offset`` (old-layout
    shm), ``messages`` (message queues), ``values`` (semaphore sets).
    """
    image_type = image_type_for(path)
    with ImageReader(path, image_type) as reader:
        return image_type.handler(reader)


# Public API: what the namespace builders use.


def read_inventory(images_dir):
    """Return the checkpoint's ``inventory_entry`` as a dict (``root_ids`` nested)."""
    path = Path(images_dir) / "inventory.img"
    [inventory] = read_image(path)
    if inventory["img_version"] != IMAGES_V1_1:
        raise ImageError(
            path,
            f"image version {inventory['img_version']}; cerman reads version {IMAGES_V1_1} "
            f"(files with the common magic); {REDUMP} with a current CRIU",
        )
    return dict(inventory)


def root_namespace_ids(images_dir):
    """Return the namespace ids of the checkpoint's root task, e.g. ``{"ipc": 9, ...}``.

    The root task is the first ``pstree.img`` entry; its ids are in ``ids-<pid>.img``.
    Keys are the namespace types CRIU recorded: pid, net, ipc, uts, mnt, user, cgroup,
    time.
    """
    images_dir = Path(images_dir)
    pstree_path = images_dir / "pstree.img"
    tasks = read_image(pstree_path)
    if not tasks:
        raise ImageError(pstree_path, f"has no task entry; {REDUMP}")

    [ids] = read_image(images_dir / f"ids-{tasks[0]['pid']}.img")
    return {name.removesuffix("_ns_id"): ids[name] for name in ids if name.endswith("_ns_id")}


def read_ipc_namespace(images_dir, ns_id=None):
    """Return the ``IpcNamespaceImage`` saved for IPC namespace ``ns_id``.

    ``ns_id`` defaults to the root task's. Returns None when the checkpoint has no
    ``ipcns-var-<id>.img``, which CRIU writes for every IPC namespace it dumps: the
    container used the host IPC namespace. A missing shm, msg or sem image means no
    objects of that kind. Shared memory contents are returned as ``ShmChunk``s into the
    image files, never loaded.
    """
    images_dir = Path(images_dir)
    if ns_id is None:
        ns_id = root_namespace_ids(images_dir).get("ipc")
        if ns_id is None:
            logger.info("%s: the root task has no IPC namespace id; no IPC namespace image", images_dir)
            return None

    paths = {kind: images_dir / f"ipcns-{kind}-{ns_id}.img" for kind in ("var", "shm", "msg", "sem")}
    if not paths["var"].exists():
        others = [path.name for path in paths.values() if path.exists()]
        if others:
            raise ImageError(paths["var"], f"missing while {', '.join(others)} exist; {REDUMP}")
        logger.info("%s: no %s; the IPC namespace was not dumped", images_dir, paths["var"].name)
        return None

    [var] = read_image(paths["var"])
    sysctls = _ipc_sysctls(paths["var"], var)
    shm = tuple(_shm_segment(images_dir, paths["shm"], entry) for entry in _read_if_present(paths["shm"]))
    msg = tuple(_message_queue(entry) for entry in _read_if_present(paths["msg"]))
    sem = tuple(_semaphore_set(entry) for entry in _read_if_present(paths["sem"]))
    logger.debug(
        "%s: IPC namespace %d has %d shm segments, %d message queues, %d semaphore sets",
        images_dir, ns_id, len(shm), len(msg), len(sem),
    )
    return IpcNamespaceImage(ns_id=ns_id, sysctls=sysctls, shm=shm, msg=msg, sem=sem)


def _read_if_present(path):
    # CRIU 4.1.1 creates an image file when it writes the first entry, so an IPC
    # namespace without message queues has no ipcns-msg image; its restore reads a
    # missing file as empty, and so does this.
    if not path.exists():
        return []
    return read_image(path)


def _ipc_desc(desc):
    return IpcDesc(**{f.name: desc[f.name] for f in dataclasses.fields(IpcDesc)})


def _ipc_sysctls(path, var):
    if len(var["sem_ctls"]) != 4:
        raise ImageError(path, f"sem_ctls has {len(var['sem_ctls'])} values instead of 4; {REDUMP}", 0)
    return IpcSysctls(
        sem=tuple(var["sem_ctls"]),
        msgmax=var["msg_ctlmax"],
        msgmnb=var["msg_ctlmnb"],
        msgmni=var["msg_ctlmni"],
        auto_msgmni=var["auto_msgmni"],
        shmmax=var["shm_ctlmax"],
        shmall=var["shm_ctlall"],
        shmmni=var["shm_ctlmni"],
        shm_rmid_forced=var["shm_rmid_forced"],
        mq_queues_max=var["mq_queues_max"],
        mq_msg_max=var["mq_msg_max"],
        mq_msgsize_max=var["mq_msgsize_max"],
        mq_msg_default=var.get("mq_msg_default"),
        mq_msgsize_default=var.get("mq_msgsize_default"),
        msg_next_id=var.get("msg_next_id"),
        sem_next_id=var.get("sem_next_id"),
        shm_next_id=var.get("shm_next_id"),
    )


def _shm_segment(images_dir, shm_path, entry):
    desc = _ipc_desc(entry["desc"])
    size = entry["size"]
    if entry.get("in_pagemaps"):
        # NOTE: hugetlb segments are read in base pages like any other; no checkpoint
        # of a hugetlb segment has been read yet.
        pagemap_path = images_dir / f"pagemap-shmem-{desc.id}.img"
        chunks = pagemap_chunks(pagemap_path, read_image(pagemap_path), images_dir, size)
    elif size:
        chunks = (ShmChunk(offset=0, path=shm_path, file_offset=entry["contents_offset"], length=size),)
    else:
        chunks = ()
    return ShmSegment(desc=desc, size=size, chunks=chunks, hugetlb_flag=entry.get("hugetlb_flag", 0))


def _message_queue(entry):
    texts = tuple(Message(mtype=m["mtype"], data=m["data"]) for m in entry["messages"])
    return MessageQueue(desc=_ipc_desc(entry["desc"]), qbytes=entry["qbytes"], messages=texts)


def _semaphore_set(entry):
    return SemaphoreSet(desc=_ipc_desc(entry["desc"]), values=tuple(entry["values"]))


def read_uts_namespace(images_dir, ns_id=None):
    """Return the ``UtsNamespaceImage`` of UTS namespace ``ns_id`` (default: the root task's).

    Returns None when the checkpoint has no ``utsns-<id>.img``: the container used the
    host UTS namespace.
    """
    images_dir = Path(images_dir)
    if ns_id is None:
        ns_id = root_namespace_ids(images_dir).get("uts")
        if ns_id is None:
            logger.info("%s: the root task has no UTS namespace id; no UTS namespace image", images_dir)
            return None

    path = images_dir / f"utsns-{ns_id}.img"
    if not path.exists():
        logger.info("%s: no %s; the UTS namespace was not dumped", images_dir, path.name)
        return None
    [uts] = read_image(path)
    return UtsNamespaceImage(ns_id=ns_id, nodename=uts["nodename"], domainname=uts["domainname"])


_MOUNT_FIELDS = {f.name for f in dataclasses.fields(MountEntry)} - {"extra"}


def read_mountpoints(images_dir, ns_id=None):
    """Return the ``MountEntry``s of mount namespace ``ns_id`` (default: the root task's).

    Entries keep the order of ``mountpoints-<id>.img`` (CRIU 4.1.1 writes children
    before their parents). ``mnt_entry`` fields that ``MountEntry`` does not declare,
    and fields of unknown number as ``field<number>``, go to ``extra``. Raises
    ``ImageError`` when the image is missing, as it is for a task that ran in the host
    mount namespace.
    """
    images_dir = Path(images_dir)
    if ns_id is None:
        ns_id = root_namespace_ids(images_dir).get("mnt")
        if ns_id is None:
            raise ImageError(images_dir / "pstree.img", f"the root task has no mount namespace id; {REDUMP}")

    return [_mount_entry(entry) for entry in read_image(images_dir / f"mountpoints-{ns_id}.img")]


def _mount_entry(entry):
    known = {name: value for name, value in entry.items() if name in _MOUNT_FIELDS}
    extra = {name: value for name, value in entry.items() if name not in _MOUNT_FIELDS}
    extra.update({f"field{number}": value for number, _wire_type, value in entry.unknown})
    return MountEntry(**known, extra=extra)


_TMPFS_IMAGE = re.compile(r"tmpfs-dev-(\d+)\.tar\.gz\.img")


def list_tmpfs_images(images_dir):
    """Return the tmpfs content archives by device number, ``{dev: Path}``, sorted.

    ``dev`` is the mount's ``root_dev`` as ``mnt_entry`` stores it (the kernel's
    internal encoding, major << 20 | minor). Each file is a gzip tar of the tmpfs.
    """
    found = {}
    for path in Path(images_dir).iterdir():
        match = _TMPFS_IMAGE.fullmatch(path.name)
        if match:
            found[int(match.group(1))] = path
    return dict(sorted(found.items()))
