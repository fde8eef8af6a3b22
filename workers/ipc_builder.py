"""Fill a fresh IPC namespace with the SysV IPC state of a CRIU checkpoint.

``populate_ipc(image)`` works on the IPC namespace of the calling process, so it
runs in a short-lived child that has just called ``unshare(CLONE_NEWIPC)``. Steps:

1. Raise the limits (``kernel/msgmax``, ``kernel/msgmnb``, ``kernel/sem``,
   ``kernel/shmmax`` and the object counts) to whatever the image needs, because it
   may hold more than its own final limits allow: a message larger than ``msgmax``
   sent before it was lowered. Raising ``msgmnb`` first also lets ``IPC_SET`` give a
   queue a ``msg_qbytes`` above the default without CAP_SYS_RESOURCE.
2. Create each object under its exact id by writing ``kernel/{shm,msg,sem}_next_id``
   right before the get call, then check the id the kernel returned. The creator
   ids (cuid, cgid) come from the effective uid and gid at creation, so the child
   switches to them for the get call.
3. Fill it: shared memory contents from the image chunks (pages no chunk covers
   stay zero and unallocated), messages in queue order, semaphore values (SETALL).
4. Set owner, group and mode (and a queue's ``msg_qbytes``) with ``IPC_SET``.
5. Write the image's final sysctl values.

``IPC_SET`` takes a whole ``*id_ds`` structure, so the builder fills a buffer with
``IPC_STAT`` and patches a few fields. It relies on glibc's x86_64 layout, which
matches the kernel's ``ipc64_perm`` and ``msqid64_ds``. ``ipc_perm`` sits at offset
0 and holds ``__key`` (s32) at 0, ``uid`` (u32) at 4, ``gid`` (u32) at 8 and ``mode``
(u32) at 20. ``msqid_ds.msg_qbytes`` (u64) sits at 88. The key read back is compared
with the key just used, which catches a different layout before anything is written.

``kernel/shm_rmid_forced=1`` destroys a segment that nobody has attached once its
creator exits, and the builder child exits right after creating it, so a pooled
namespace cannot keep such segments (CRIU 4.1.1 fails to restore these checkpoints
for the same reason). ``check_ipc_image`` rejects that combination with a
``PoolError``. An image with the sysctl set and no segments is restored with it set.
"""

import contextlib
import ctypes
import errno
import logging
import os
import struct

from cerman.errors import ImageError, NamespaceError, PoolError

log = logging.getLogger(__name__)

IPC_CREAT = 0o1000
IPC_EXCL = 0o2000
IPC_NOWAIT = 0o4000
IPC_SET = 1
IPC_STAT = 2
SETALL = 17
# Largest semaphore value (SEMVMX in the kernel's <linux/sem.h>).
SEM_VALUE_MAX = 32767

_PERM_KEY = 0
_PERM_UID = 4
_PERM_GID = 8
_PERM_MODE = 20
_MSQID_DS_QBYTES = 88
# Larger than any of shmid_ds (112), msqid_ds (120) and semid_ds (104) on x86_64.
_DS_BUFFER_SIZE = 256

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.shmget.argtypes = [ctypes.c_int, ctypes.c_size_t, ctypes.c_int]
_libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
_libc.shmat.restype = ctypes.c_void_p
_libc.shmdt.argtypes = [ctypes.c_void_p]
_libc.shmctl.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
_libc.msgget.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.msgsnd.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.msgctl.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
_libc.semget.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
# semctl is variadic, so its fourth argument is passed without argtypes.
_libc.pread.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_long]
_libc.pread.restype = ctypes.c_ssize_t

_SHMAT_FAILED = ctypes.c_void_p(-1).value


def check_ipc_image(image):
    """Raise ``PoolError`` when no pooled namespace can hold the image's state."""
    if image.shm and image.sysctls.shm_rmid_forced:
        raise PoolError(
            f"IPC namespace {image.ns_id} has {len(image.shm)} shared memory segments "
            "and kernel.shm_rmid_forced=1, which destroys every segment that no process "
            "has attached, so a pooled namespace cannot keep them; set "
            "kernel.shm_rmid_forced=0 in the container before checkpointing")


def populate_ipc(image):
    """Create the image's objects and sysctls in the calling process's IPC namespace.

    The namespace must be fresh: an object already using a key or an id fails the
    build. Raises ``NamespaceError`` (with errno) for a failed kernel call,
    ``ImageError`` when a content chunk is missing from its image file, and
    ``PoolError`` from ``check_ipc_image``.
    """
    check_ipc_image(image)

    for name, value in _creation_limits(image).items():
        _write_sysctl(name, value)

    for segment in image.shm:
        _create_shm(segment)
    for queue in image.msg:
        _create_queue(queue)
    for semaphores in image.sem:
        _create_semaphores(semaphores)

    for name, value in _final_sysctls(image.sysctls).items():
        _write_sysctl(name, value)
    log.debug("populated IPC namespace %d: %d shm, %d msg, %d sem", image.ns_id,
              len(image.shm), len(image.msg), len(image.sem))


def _creation_limits(image):
    """Return sysctl values high enough to create every object of the image."""
    sysctls = image.sysctls
    largest_message = max((len(message.data) for queue in image.msg
                           for message in queue.messages), default=0)
    largest_segment = max((segment.size for segment in image.shm), default=0)
    shm_pages = sum(-(-segment.size // _PAGE_SIZE) for segment in image.shm)
    largest_set = max((len(semaphores.values) for semaphores in image.sem), default=0)
    total_semaphores = sum(len(semaphores.values) for semaphores in image.sem)
    largest_queue = max((_queue_room(queue) for queue in image.msg), default=0)
    semmsl, semmns, semopm, semmni = sysctls.sem

    return {
        "kernel/msgmax": max(sysctls.msgmax, largest_message),
        "kernel/msgmnb": max(sysctls.msgmnb, largest_queue),
        "kernel/msgmni": max(sysctls.msgmni, len(image.msg)),
        "kernel/shmmax": max(sysctls.shmmax, largest_segment),
        "kernel/shmall": max(sysctls.shmall, shm_pages),
        "kernel/shmmni": max(sysctls.shmmni, len(image.shm)),
        "kernel/sem": _sem_value((max(semmsl, largest_set), max(semmns, total_semaphores),
                                  semopm, max(semmni, len(image.sem)))),
    }


def _final_sysctls(sysctls):
    """Return the image's sysctls by /proc/sys name, in the order they are written.

    ``auto_msgmni`` is not restored because Linux 3.19 removed that sysctl.
    """
    values = {
        "kernel/msgmax": sysctls.msgmax,
        "kernel/msgmnb": sysctls.msgmnb,
        "kernel/msgmni": sysctls.msgmni,
        "kernel/sem": _sem_value(sysctls.sem),
        "kernel/shmmax": sysctls.shmmax,
        "kernel/shmall": sysctls.shmall,
        "kernel/shmmni": sysctls.shmmni,
        "fs/mqueue/queues_max": sysctls.mq_queues_max,
        "fs/mqueue/msg_max": sysctls.mq_msg_max,
        "fs/mqueue/msgsize_max": sysctls.mq_msgsize_max,
        "fs/mqueue/msg_default": sysctls.mq_msg_default,
        "fs/mqueue/msgsize_default": sysctls.mq_msgsize_default,
        "kernel/msg_next_id": sysctls.msg_next_id,
        "kernel/sem_next_id": sysctls.sem_next_id,
        "kernel/shm_next_id": sysctls.shm_next_id,
        # Last, because writing 1 destroys unattached segments at once.
        "kernel/shm_rmid_forced": sysctls.shm_rmid_forced,
    }
    return {name: value for name, value in values.items() if value is not None}


def _sem_value(sem):
    if len(sem) != 4:
        raise ImageError("ipcns-var", f"kernel.sem has {len(sem)} values, expected 4 "
                         "(SEMMSL SEMMNS SEMOPM SEMMNI); re-dump the checkpoint")
    return " ".join(str(value) for value in sem)


def _write_sysctl(name, value):
    try:
        with open(f"/proc/sys/{name}", "w") as file:
            file.write(f"{value}\n")
    except OSError as error:
        raise NamespaceError(error.errno, f"write {value} to /proc/sys/{name}") from None


def _signed32(key):
    """Return a key_t (s32) for an unsigned 32-bit key as CRIU stores it."""
    return key - (1 << 32) if key >= (1 << 31) else key


def _describe(kind, desc):
    return f"{kind} id {desc.id} (key {desc.key:#010x})"


@contextlib.contextmanager
def _as_creator(desc):
    """Run the block with the effective uid and gid set to the object's creator."""
    uid, gid = os.geteuid(), os.getegid()
    if (desc.cuid, desc.cgid) == (uid, gid):
        yield
        return

    try:
        os.setegid(desc.cgid)
        os.seteuid(desc.cuid)
    except OSError as error:
        os.setegid(gid)
        raise NamespaceError(error.errno, f"switch to creator uid {desc.cuid} "
                             f"gid {desc.cgid}") from None
    try:
        yield
    finally:
        os.seteuid(uid)
        os.setegid(gid)


def _get_with_id(kind, desc, get):
    """Create an object with ``get()`` under the exact id ``desc.id``."""
    _write_sysctl(f"kernel/{kind}_next_id", desc.id)
    with _as_creator(desc):
        ipc_id = get()
    if ipc_id < 0:
        raise NamespaceError(ctypes.get_errno(), f"{kind}get", _describe(kind, desc))
    if ipc_id != desc.id:
        raise NamespaceError(errno.EINVAL, f"{kind}get returned id {ipc_id} after "
                             f"kernel/{kind}_next_id was set", _describe(kind, desc))
    return ipc_id


def _set_permissions(kind, ctl, desc, qbytes=None):
    """Set owner, group, mode and optionally a queue's qbytes (IPC_STAT, patch, IPC_SET)."""
    buffer = ctypes.create_string_buffer(_DS_BUFFER_SIZE)
    if ctl(desc.id, IPC_STAT, buffer) < 0:
        raise NamespaceError(ctypes.get_errno(), f"{kind}ctl(IPC_STAT)", _describe(kind, desc))

    (key,) = struct.unpack_from("<i", buffer, _PERM_KEY)
    if key & 0xFFFFFFFF != desc.key & 0xFFFFFFFF:
        raise NamespaceError(errno.EPROTO, f"{kind}ctl(IPC_STAT) returned key {key:#x}, so "
                             "struct ipc_perm differs from the x86_64 layout this module uses",
                             _describe(kind, desc))
    struct.pack_into("<I", buffer, _PERM_UID, desc.uid)
    struct.pack_into("<I", buffer, _PERM_GID, desc.gid)
    struct.pack_into("<I", buffer, _PERM_MODE, desc.mode & 0o777)
    if qbytes is not None:
        struct.pack_into("<Q", buffer, _MSQID_DS_QBYTES, qbytes)

    if ctl(desc.id, IPC_SET, buffer) < 0:
        raise NamespaceError(ctypes.get_errno(), f"{kind}ctl(IPC_SET)", _describe(kind, desc))


def _create_shm(segment):
    desc = segment.desc
    flags = IPC_CREAT | IPC_EXCL | (desc.mode & 0o777) | segment.hugetlb_flag
    _get_with_id("shm", desc, lambda: _libc.shmget(_signed32(desc.key), segment.size, flags))

    if segment.chunks:
        _write_shm_contents(segment)
    _set_permissions("shm", _libc.shmctl, desc)


def _write_shm_contents(segment):
    desc = segment.desc
    address = _libc.shmat(desc.id, None, 0)
    if address in (None, _SHMAT_FAILED):
        raise NamespaceError(ctypes.get_errno(), "shmat", _describe("shm", desc))

    files = {}
    try:
        for chunk in segment.chunks:
            if chunk.offset < 0 or chunk.offset + chunk.length > segment.size:
                raise ImageError(chunk.path, f"chunk at offset {chunk.offset} of "
                                 f"{chunk.length} bytes lies outside {_describe('shm', desc)} "
                                 f"of {segment.size} bytes; re-dump the checkpoint")
            if chunk.path not in files:
                files[chunk.path] = os.open(chunk.path, os.O_RDONLY | os.O_CLOEXEC)
            _read_exactly(files[chunk.path], address + chunk.offset, chunk)
    finally:
        for fd in files.values():
            os.close(fd)
        if _libc.shmdt(ctypes.c_void_p(address)) != 0:
            log.error("shmdt of %s failed: %s", _describe("shm", desc),
                      os.strerror(ctypes.get_errno()))


def _read_exactly(fd, address, chunk):
    """Read ``chunk`` from its image file straight into shared memory at ``address``."""
    done = 0
    while done < chunk.length:
        count = _libc.pread(fd, address + done, chunk.length - done, chunk.file_offset + done)
        if count < 0:
            error = ctypes.get_errno()
            if error == errno.EINTR:
                continue
            raise ImageError(chunk.path, f"read failed: {os.strerror(error)}")
        if count == 0:
            raise ImageError(chunk.path, f"file ends before byte "
                             f"{chunk.file_offset + chunk.length}, which shared memory "
                             "contents need; re-export the checkpoint")
        done += count


def _create_queue(queue):
    desc = queue.desc
    flags = IPC_CREAT | IPC_EXCL | (desc.mode & 0o777)
    _get_with_id("msg", desc, lambda: _libc.msgget(_signed32(desc.key), flags))

    room = _queue_room(queue)
    if room != queue.qbytes:
        _set_permissions("msg", _libc.msgctl, desc, qbytes=room)
    for index, message in enumerate(queue.messages):
        _send(desc, index, message)

    _set_permissions("msg", _libc.msgctl, desc, qbytes=queue.qbytes)


def _queue_room(queue):
    """Return the msg_qbytes a queue needs while its messages are sent.

    msgsnd blocks once the queue's bytes or messages would exceed msg_qbytes, and the
    image may hold more than its final qbytes if that was lowered after sending.
    """
    content = sum(len(message.data) for message in queue.messages)
    return max(queue.qbytes, content, len(queue.messages))


def _send(desc, index, message):
    # struct msgbuf: a long mtype followed by the text.
    buffer = ctypes.create_string_buffer(8 + len(message.data))
    struct.pack_into("<q", buffer, 0, message.mtype)
    ctypes.memmove(ctypes.addressof(buffer) + 8, message.data, len(message.data))
    if _libc.msgsnd(desc.id, buffer, len(message.data), IPC_NOWAIT) < 0:
        raise NamespaceError(ctypes.get_errno(), f"msgsnd of message {index} (type "
                             f"{message.mtype}, {len(message.data)} bytes)",
                             _describe("msg", desc))


def _create_semaphores(semaphores):
    desc = semaphores.desc
    count = len(semaphores.values)
    flags = IPC_CREAT | IPC_EXCL | (desc.mode & 0o777)
    _get_with_id("sem", desc, lambda: _libc.semget(_signed32(desc.key), count, flags))

    for number, value in enumerate(semaphores.values):
        if not 0 <= value <= SEM_VALUE_MAX:
            raise ImageError("ipcns-sem", f"{_describe('sem', desc)} semaphore {number} "
                             f"has value {value}, outside 0..{SEM_VALUE_MAX}; re-dump "
                             "the checkpoint")
    values = (ctypes.c_ushort * count)(*semaphores.values)
    if _libc.semctl(desc.id, 0, SETALL, values) < 0:
        raise NamespaceError(ctypes.get_errno(), "semctl(SETALL)", _describe("sem", desc))

    _set_permissions("sem", _semctl_ds, desc)


def _semctl_ds(semid, command, buffer):
    return _libc.semctl(semid, 0, command, buffer)
