"""Plain data read from a checkpoint's CRIU images, as the namespace builders use it.

Field names follow CRIU's ``images/*.proto`` messages; sizes are in bytes.
"""

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class IpcDesc:
    """``ipc_desc_entry``: identity and permissions of one SysV IPC object."""

    key: int
    uid: int
    gid: int
    cuid: int
    cgid: int
    mode: int
    id: int


@dataclass(frozen=True)
class ShmChunk:
    """Bytes of a shared memory segment stored in an image file.

    ``length`` bytes at ``file_offset`` of ``path`` belong at ``offset`` in the segment.
    Ranges of a segment not covered by any chunk were never written and read as zeros.
    """

    offset: int
    path: Path
    file_offset: int
    length: int


@dataclass(frozen=True)
class ShmSegment:
    """``ipc_shm_entry`` plus where its contents are stored."""

    desc: IpcDesc
    size: int
    chunks: tuple = ()
    hugetlb_flag: int = 0


@dataclass(frozen=True)
class Message:
    """``ipc_msg`` and its text."""

    mtype: int
    data: bytes


@dataclass(frozen=True)
class MessageQueue:
    """``ipc_msg_entry`` and its messages in queue order."""

    desc: IpcDesc
    qbytes: int
    messages: tuple = ()


@dataclass(frozen=True)
class SemaphoreSet:
    """``ipc_sem_entry`` and the value of each semaphore."""

    desc: IpcDesc
    values: tuple = ()


@dataclass(frozen=True)
class IpcSysctls:
    """``ipc_var_entry``: the per-IPC-namespace sysctls.

    Optional fields are None when the image predates them.
    """

    sem: tuple  # kernel.sem: SEMMSL, SEMMNS, SEMOPM, SEMMNI
    msgmax: int
    msgmnb: int
    msgmni: int
    auto_msgmni: int
    shmmax: int
    shmall: int
    shmmni: int
    shm_rmid_forced: int
    mq_queues_max: int
    mq_msg_max: int
    mq_msgsize_max: int
    mq_msg_default: int | None = None
    mq_msgsize_default: int | None = None
    msg_next_id: int | None = None
    sem_next_id: int | None = None
    shm_next_id: int | None = None


@dataclass(frozen=True)
class IpcNamespaceImage:
    """Everything CRIU saved about one IPC namespace."""

    ns_id: int
    sysctls: IpcSysctls
    shm: tuple = ()
    msg: tuple = ()
    sem: tuple = ()


@dataclass(frozen=True)
class UtsNamespaceImage:
    """``utsns_entry``: the namespace's hostname (nodename) and domainname."""

    ns_id: int
    nodename: str
    domainname: str


@dataclass(frozen=True)
class MountEntry:
    """``mnt_entry`` from ``mountpoints-<id>.img``: one mount of a mount namespace.

    ``mountpoint`` is the path from the namespace root as CRIU 4.1.1 stores it (for
    example "/dev/shm"); ``root`` is the path inside the mounted filesystem; ``ext_key`` is
    set for external (bind) mounts whose source the restoring side provides.
    """

    fstype: int
    mnt_id: int
    root_dev: int
    parent_mnt_id: int
    flags: int
    root: str
    mountpoint: str
    source: str
    options: str = ""
    shared_id: int | None = None
    master_id: int | None = None
    with_plugin: bool | None = None
    ext_mount: bool | None = None
    fsname: str | None = None
    internal_sharing: bool | None = None
    deleted: bool | None = None
    sb_flags: int | None = None
    ext_key: str | None = None
    extra: dict = field(default_factory=dict)
