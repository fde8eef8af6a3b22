"""The CRIU protobuf messages cerman reads, with field numbers from CRIU 4.1.1.

Each ``MessageType`` mirrors a message of CRIU's ``images/*.proto`` (file named in the
comment above it). Only fields cerman uses or passes on are declared; the decoder keeps
any other field aside, so images written by a newer CRIU still read.
"""

from workers.criu.protobuf import Field, MessageType

# core.proto (namespace ids: CRIU's own numbering within one dump, not inode numbers)
TASK_KOBJ_IDS_ENTRY = MessageType(
    "task_kobj_ids_entry",
    [
        Field(1, "vm_id", "uint32", "required"),
        Field(2, "files_id", "uint32", "required"),
        Field(3, "fs_id", "uint32", "required"),
        Field(4, "sighand_id", "uint32", "required"),
        Field(5, "pid_ns_id", "uint32"),
        Field(6, "net_ns_id", "uint32"),
        Field(7, "ipc_ns_id", "uint32"),
        Field(8, "uts_ns_id", "uint32"),
        Field(9, "mnt_ns_id", "uint32"),
        Field(10, "user_ns_id", "uint32"),
        Field(11, "cgroup_ns_id", "uint32"),
        Field(12, "time_ns_id", "uint32"),
    ],
)

# inventory.proto
PLUGINS_ENTRY = MessageType("plugins_entry", [Field(12, "plugins", "string", "repeated")])

INVENTORY_ENTRY = MessageType(
    "inventory_entry",
    [
        Field(1, "img_version", "uint32", "required"),
        Field(2, "fdinfo_per_id", "bool"),
        Field(3, "root_ids", "message", message=TASK_KOBJ_IDS_ENTRY),
        Field(4, "ns_per_id", "bool"),
        Field(5, "root_cg_set", "uint32"),
        Field(6, "lsmtype", "enum"),
        Field(8, "dump_uptime", "uint64"),
        Field(9, "pre_dump_mode", "uint32"),
        Field(10, "tcp_close", "bool"),
        Field(11, "network_lock_method", "uint32"),
        Field(12, "plugins_entry", "message", message=PLUGINS_ENTRY),
        Field(13, "dump_criu_run_id", "string"),
    ],
)

# pstree.proto
PSTREE_ENTRY = MessageType(
    "pstree_entry",
    [
        Field(1, "pid", "uint32", "required"),
        Field(2, "ppid", "uint32", "required"),
        Field(3, "pgid", "uint32", "required"),
        Field(4, "sid", "uint32", "required"),
        Field(5, "threads", "uint32", "repeated"),
    ],
)

# utsns.proto
UTSNS_ENTRY = MessageType(
    "utsns_entry",
    [
        Field(1, "nodename", "string", "required"),
        Field(2, "domainname", "string", "required"),
    ],
)

# ipc-desc.proto
IPC_DESC_ENTRY = MessageType(
    "ipc_desc_entry",
    [
        Field(1, "key", "uint32", "required"),
        Field(2, "uid", "uint32", "required"),
        Field(3, "gid", "uint32", "required"),
        Field(4, "cuid", "uint32", "required"),
        Field(5, "cgid", "uint32", "required"),
        Field(6, "mode", "uint32", "required"),
        Field(7, "id", "uint32", "required"),
    ],
)

# ipc-var.proto
IPC_VAR_ENTRY = MessageType(
    "ipc_var_entry",
    [
        Field(1, "sem_ctls", "uint32", "repeated"),
        Field(2, "msg_ctlmax", "uint32", "required"),
        Field(3, "msg_ctlmnb", "uint32", "required"),
        Field(4, "msg_ctlmni", "uint32", "required"),
        Field(5, "auto_msgmni", "uint32", "required"),
        Field(6, "shm_ctlmax", "uint64", "required"),
        Field(7, "shm_ctlall", "uint64", "required"),
        Field(8, "shm_ctlmni", "uint32", "required"),
        Field(9, "shm_rmid_forced", "uint32", "required"),
        Field(10, "mq_queues_max", "uint32", "required"),
        Field(11, "mq_msg_max", "uint32", "required"),
        Field(12, "mq_msgsize_max", "uint32", "required"),
        Field(13, "mq_msg_default", "uint32"),
        Field(14, "mq_msgsize_default", "uint32"),
        Field(15, "msg_next_id", "uint32"),
        Field(16, "sem_next_id", "uint32"),
        Field(17, "shm_next_id", "uint32"),
    ],
)

# ipc-shm.proto
IPC_SHM_ENTRY = MessageType(
    "ipc_shm_entry",
    [
        Field(1, "desc", "message", "required", IPC_DESC_ENTRY),
        Field(2, "size", "uint64", "required"),
        Field(3, "in_pagemaps", "bool"),
        Field(4, "hugetlb_flag", "uint32"),
    ],
)

# ipc-msg.proto
IPC_MSG = MessageType(
    "ipc_msg",
    [
        Field(1, "mtype", "uint64", "required"),
        Field(2, "msize", "uint32", "required"),
    ],
)

IPC_MSG_ENTRY = MessageType(
    "ipc_msg_entry",
    [
        Field(1, "desc", "message", "required", IPC_DESC_ENTRY),
        Field(2, "qbytes", "uint32", "required"),
        Field(3, "qnum", "uint32", "required"),
    ],
)

# ipc-sem.proto
IPC_SEM_ENTRY = MessageType(
    "ipc_sem_entry",
    [
        Field(1, "desc", "message", "required", IPC_DESC_ENTRY),
        Field(2, "nsems", "uint32", "required"),
    ],
)

# pagemap.proto
PAGEMAP_HEAD = MessageType("pagemap_head", [Field(1, "pages_id", "uint32", "required")])

PAGEMAP_ENTRY = MessageType(
    "pagemap_entry",
    [
        Field(1, "vaddr", "uint64", "required"),
        Field(2, "nr_pages", "uint32", "required"),
        Field(3, "in_parent", "bool"),
        Field(4, "flags", "uint32"),
    ],
)

# mnt.proto (fstype values are the proto's ``fstype`` enum: 1 proc, 5 tmpfs, ...)
MNT_ENTRY = MessageType(
    "mnt_entry",
    [
        Field(1, "fstype", "uint32", "required"),
        Field(2, "mnt_id", "uint32", "required"),
        Field(3, "root_dev", "uint32", "required"),
        Field(4, "parent_mnt_id", "uint32", "required"),
        Field(5, "flags", "uint32", "required"),
        Field(6, "root", "string", "required"),
        Field(7, "mountpoint", "string", "required"),
        Field(8, "source", "string", "required"),
        Field(9, "options", "string", "required"),
        Field(10, "shared_id", "uint32"),
        Field(11, "master_id", "uint32"),
        Field(12, "with_plugin", "bool"),
        Field(13, "ext_mount", "bool"),
        Field(14, "fsname", "string"),
        Field(15, "internal_sharing", "bool"),
        Field(16, "deleted", "bool"),
        Field(17, "sb_flags", "uint32"),
        Field(18, "ext_key", "string"),
    ],
)
