"""Checkpoints made by ``criu_checkpoints.make_ipc_checkpoint``: images and expected state.

Each scenario is dumped once per module with real CRIU. The tests check that the images
exist and that ``expected`` (the snapshot of the live process) contains what the
scenario creates, so that comparing against it can fail. Then cerman's builder
(``workers.builder``) must build IPC and UTS namespaces that snapshot exactly as
``expected``.
"""

import pytest

from criu_checkpoints import (SCENARIOS, built_namespaces, make_ipc_checkpoint,
                              snapshot_pinned)

pytestmark = pytest.mark.criu

# A SysV id on Linux 6.x is sequence number * 32768 + index.
SEQUENCE_STEP = 32768
KINDS = (("shm", "shmid"), ("msg", "msqid"), ("sem", "semid"))


@pytest.fixture(scope="module")
def dumped(tmp_path_factory):
    """Return a function that dumps a scenario once per module."""
    checkpoints = {}

    def get(scenario):
        if scenario not in checkpoints:
            checkpoints[scenario] = make_ipc_checkpoint(tmp_path_factory.mktemp(scenario), scenario)
        return checkpoints[scenario]

    return get


@pytest.fixture(params=SCENARIOS)
def checkpoint(request, dumped):
    return dumped(request.param)


def image_names(checkpoint):
    return {path.name for path in checkpoint.images_dir.iterdir()}


def ids(objects, field):
    return [entry[field] for entry in objects]


def test_images_present(checkpoint):
    names = image_names(checkpoint)
    for prefix in ("inventory", "pstree", f"core-{checkpoint.pid}", "ipcns-var-", "utsns-"):
        assert any(name.startswith(prefix) for name in names), f"no {prefix}*.img in {names}"


def test_expected_hostname(checkpoint):
    assert checkpoint.expected["hostname"] == checkpoint.scenario


def test_built_namespaces_match_expected(checkpoint, builder, tmp_path):
    with built_namespaces(builder, checkpoint.images_dir, tmp_path / "ns") as (ipc_pin, uts_pin):
        snapshot = snapshot_pinned(ipc_pin, uts_pin)
    assert snapshot == checkpoint.expected


def test_sparse_ids_sequence_above_zero(dumped):
    expected = dumped("sparse-ids").expected
    for kind, field in KINDS:
        for ipc_id in ids(expected[kind], field):
            assert ipc_id >= SEQUENCE_STEP, f"{kind} id {ipc_id} has sequence number 0"


def test_sparse_ids_have_gaps(dumped):
    expected = dumped("sparse-ids").expected
    for kind, field in KINDS:
        values = sorted(ids(expected[kind], field))
        steps = {after - before for before, after in zip(values, values[1:])}
        assert steps - {1}, f"{kind} ids {values} are consecutive"


def test_sparse_ids_placed_by_next_id(dumped):
    expected = dumped("sparse-ids").expected
    assert 7 * SEQUENCE_STEP + 1000 in ids(expected["shm"], "shmid")
    assert 3 * SEQUENCE_STEP + 500 in ids(expected["sem"], "semid")


def test_sparse_ids_private_and_keyed(dumped):
    expected = dumped("sparse-ids").expected
    for kind, _ in KINDS:
        keys = {entry["key"] for entry in expected[kind]}
        assert "0" in keys, f"no IPC_PRIVATE {kind} object"
        assert keys - {"0"}, f"no keyed {kind} object"


def test_sparse_ids_owner_and_mode(dumped):
    expected = dumped("sparse-ids").expected
    for kind, _ in KINDS:
        owners = {(entry["uid"], entry["gid"], entry["perms"]) for entry in expected[kind]}
        assert ("1000", "1000", "400") in owners, f"{kind} owners: {owners}"


def test_sparse_ids_empty_message(dumped):
    expected = dumped("sparse-ids").expected
    sizes = [message["size"] for queue in expected["msg"] for message in queue["messages"]]
    assert 0 in sizes


def test_sparse_ids_pagemap_per_segment(dumped):
    checkpoint = dumped("sparse-ids")
    names = image_names(checkpoint)
    for shmid in ids(checkpoint.expected["shm"], "shmid"):
        assert f"pagemap-shmem-{shmid}.img" in names


def test_large_shm_sizes(dumped):
    expected = dumped("large").expected
    assert ids(expected["shm"], "size") == [3 * 1024 * 1024 + 4321, 2 * 1024 * 1024]


def test_large_message_sizes(dumped):
    expected = dumped("large").expected
    messages = expected["msg"][0]["messages"]
    assert [message["size"] for message in messages] == [8192, 8193, 20000, 65536]


def test_large_messages_in_image(dumped):
    # CRIU 4.1.1 copies messages up to the namespace's kernel.msgmax on dump, each
    # padded to 8 bytes after its ipc_msg entry, so the image exceeds their total size.
    checkpoint = dumped("large")
    image = next(checkpoint.images_dir.glob("ipcns-msg-*.img"))
    assert image.stat().st_size > 8192 + 8193 + 20000 + 65536


def test_large_msgmax_raised(dumped):
    sysctl = dumped("large").expected["sysctl"]
    assert sysctl["kernel/msgmax"] == "65536"
    assert sysctl["kernel/msgmnb"] == "262144"


def test_large_semaphore_count(dumped):
    expected = dumped("large").expected
    assert ids(expected["sem"], "nsems") == [1000]


def test_empty_has_no_objects(dumped):
    expected = dumped("empty").expected
    for kind, _ in KINDS:
        assert expected[kind] == [], f"{kind} objects in the empty scenario"


def test_empty_has_no_object_images(dumped):
    names = image_names(dumped("empty"))
    for kind, _ in KINDS:
        assert not any(name.startswith(f"ipcns-{kind}-") for name in names)


def test_empty_sysctls(dumped):
    sysctl = dumped("empty").expected["sysctl"]
    assert sysctl["kernel/shmmax"] == "123456789"
    assert sysctl["kernel/shmall"] == "2345678"
    assert sysctl["kernel/shmmni"] == "1024"
    assert sysctl["kernel/msgmax"] == "4096"
    assert sysctl["kernel/msgmnb"] == "32768"
    assert sysctl["kernel/msgmni"] == "64"
    assert sysctl["kernel/sem"] == "100 1000 50 64"
    assert sysctl["fs/mqueue/queues_max"] == "77"
    assert sysctl["fs/mqueue/msg_max"] == "33"
    assert sysctl["fs/mqueue/msgsize_max"] == "12345"
    assert sysctl["fs/mqueue/msg_default"] == "7"
    assert sysctl["fs/mqueue/msgsize_default"] == "2048"


def test_empty_domainname_default(dumped):
    assert dumped("empty").expected["domainname"] == "(none)"


def test_many_object_counts(dumped):
    expected = dumped("many").expected
    for kind, _ in KINDS:
        assert len(expected[kind]) == 48, f"{kind}: {len(expected[kind])} objects"


def test_many_message_count(dumped):
    expected = dumped("many").expected
    # Queue i contains i % 4 messages.
    assert sum(queue["qnum"] for queue in expected["msg"]) == sum(i % 4 for i in range(48))
