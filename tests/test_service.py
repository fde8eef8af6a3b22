"""cerman end to end: circusd, router, workers and `cerman ctl` on real CRIU images."""

import json
import os
import shutil
import signal
import subprocess
import time

import pytest

from cerman.client import RemoteError
from criu_checkpoints import make_ipc_checkpoint
from service import IPC_UTS_IMAGES, FIXTURES, mounts_under, snapshot_namespaces

EXPECTED = json.loads((FIXTURES / "criu-ipc-uts" / "expected.json").read_text())


def ctl(service, *args):
    """Run `cerman ctl --json ...` as a user would; return (exit code, JSON or stderr)."""
    result = subprocess.run(["cerman", "ctl", "--socket", f"ipc://{service.run_dir}/cerman.sock",
                             "--timeout", "30", *args, "--json"],
                            capture_output=True, text=True, timeout=60, env=service.env)
    if result.returncode == 0:
        return 0, json.loads(result.stdout)
    return result.returncode, result.stderr


def ctl_text(service, *args):
    """Run `cerman ctl ...` without --json; return the completed process."""
    return subprocess.run(["cerman", "ctl", "--socket", f"ipc://{service.run_dir}/cerman.sock",
                           *args], capture_output=True, text=True, env=service.env, timeout=60)


def test_lease_matches_checkpoint(cerman):
    cerman.write_config("fixture")
    cerman.start()
    cerman.wait_pools_full("fixture")

    code, ipc = ctl(cerman, "get", "fixture", "--type", "ipc")
    assert code == 0, ipc
    code, uts = ctl(cerman, "get", "fixture", "--type", "uts")
    assert code == 0, uts

    assert ipc["checkpoint"] == "fixture"
    assert ipc["type"] == "ipc"
    assert snapshot_namespaces(ipc["path"], uts["path"]) == EXPECTED

    assert ctl(cerman, "put", ipc["lease"])[0] == 0
    assert ctl(cerman, "put", uts["lease"])[0] == 0
    assert not os.path.exists(ipc["path"])


def test_status_counts(cerman):
    cerman.write_config("fixture", pools={"ipc": 3, "uts": 1})
    cerman.start()
    cerman.wait_pools_full("fixture")
    lease = cerman.client.get("fixture", "ipc")

    code, status = ctl(cerman, "status", "fixture")
    assert code == 0
    assert status["state"] == "ready"
    assert status["pid"] > 0
    assert status["pools"]["ipc"]["leased"] == 1
    assert status["pools"]["ipc"]["capacity"] == 3
    cerman.client.put(lease["lease"])


def test_status_lists_open_leases(cerman):
    cerman.write_config("fixture", pools={"ipc": 2, "uts": 1})
    cerman.start()
    cerman.wait_pools_full("fixture")
    first = cerman.client.get("fixture", "ipc")
    second = cerman.client.get("fixture", "uts")

    code, status = ctl(cerman, "status", "fixture")
    assert code == 0
    assert [lease["lease"] for lease in status["lease_list"]] == [first["lease"], second["lease"]]
    assert status["lease_list"][0]["path"] == first["path"]
    assert status["lease_list"][1]["type"] == "uts"
    assert status["lease_list"][0]["leased_at"] <= status["lease_list"][1]["leased_at"]

    result = ctl_text(cerman, "status", "fixture")
    assert f"lease {first['lease']} (ipc), held " in result.stdout

    cerman.client.put(first["lease"])
    code, status = ctl(cerman, "status", "fixture")
    assert code == 0
    assert [lease["lease"] for lease in status["lease_list"]] == [second["lease"]]
    cerman.client.put(second["lease"])


def test_several_checkpoints(cerman, tmp_path):
    checkpoints = {"fixture": (IPC_UTS_IMAGES, EXPECTED)}
    for scenario in ("sparse-ids", "many"):
        made = make_ipc_checkpoint(tmp_path / scenario, scenario)
        checkpoints[scenario] = (made.images_dir, made.expected)
    for name, (images, _) in checkpoints.items():
        cerman.write_config(name, images=images)
    cerman.start()

    for name, (_, expected) in checkpoints.items():
        cerman.wait_pools_full(name)
        ipc = cerman.client.get(name, "ipc")
        uts = cerman.client.get(name, "uts")
        assert snapshot_namespaces(ipc["path"], uts["path"]) == expected, name
        cerman.client.put(ipc["lease"])
        cerman.client.put(uts["lease"])


def test_worker_kill_keeps_leases(cerman):
    cerman.write_config("fixture")
    cerman.start()
    cerman.wait_pools_full("fixture")
    old_pid = cerman.worker_pid("fixture")
    ipc = cerman.client.get("fixture", "ipc")
    uts = cerman.client.get("fixture", "uts")

    os.kill(old_pid, signal.SIGKILL)
    cerman.wait(lambda: cerman.worker_pid("fixture") != old_pid, timeout=30,
                what="worker restarted by circus")

    assert snapshot_namespaces(ipc["path"], uts["path"]) == EXPECTED
    status = cerman.wait_pools_full("fixture")
    assert status["pools"]["ipc"]["leased"] == 1
    again = cerman.client.get("fixture", "ipc")
    assert again["lease"] != ipc["lease"]
    assert again["path"] != ipc["path"]
    cerman.client.put(ipc["lease"])
    cerman.client.put(uts["lease"])
    cerman.client.put(again["lease"])
    with pytest.raises(RemoteError, match="not held"):
        cerman.client.put(ipc["lease"])


def test_quit_leaves_no_mounts(cerman):
    cerman.write_config("fixture")
    cerman.start()
    cerman.wait_pools_full("fixture")
    cerman.client.get("fixture", "ipc")
    assert mounts_under(cerman.base)

    cerman.stop()
    assert mounts_under(cerman.base) == []


def test_invalid_config_reported(cerman):
    cerman.write_config("fixture")
    (cerman.config_dir / "broken.yaml").write_text("name: broken\nsource: {type: zip}\n")
    cerman.start()
    cerman.wait_pools_full("fixture")

    code, status = ctl(cerman, "status")
    assert code == 0
    errors = status["config_errors"]
    assert [error["file"] for error in errors] == [str(cerman.config_dir / "broken.yaml")]
    assert "source.type" in errors[0]["message"]
    assert cerman.client.get("fixture", "ipc")["path"]


def test_broken_checkpoint_isolated(cerman, tmp_path):
    broken = tmp_path / "broken-images"
    shutil.copytree(IPC_UTS_IMAGES, broken)
    shm_image = broken / "ipcns-shm-9.img"
    shm_image.write_bytes(shm_image.read_bytes()[:-7])
    cerman.write_config("broken", images=broken)
    cerman.write_config("fixture")
    cerman.start()
    cerman.wait_pools_full("fixture")

    status = cerman.wait(lambda: (s := cerman.client.status("broken"))["state"] == "ready" and s,
                         what="broken checkpoint prepared")
    assert "ipcns-shm-9.img" in status["pools"]["ipc"]["disabled"]
    with pytest.raises(RemoteError, match="ipcns-shm-9.img"):
        cerman.client.get("broken", "ipc")
    assert cerman.client.get("broken", "uts")["path"]
    ipc = cerman.client.get("fixture", "ipc")
    assert snapshot_namespaces(ipc["path"]) ["shm"] == EXPECTED["shm"]


def test_reload_follows_config_dir(cerman):
    cerman.write_config("first")
    cerman.start()
    cerman.wait_pools_full("first")
    first_pins = cerman.run_dir / "ns" / "first"

    cerman.write_config("second")
    (cerman.config_dir / "first.yaml").unlink()
    code, result = ctl(cerman, "reload")
    assert code == 0
    assert result["added"] == ["second"]
    assert result["removed"] == ["first"]

    cerman.wait_pools_full("second")
    cerman.wait(lambda: not mounts_under(first_pins), what="pins of the removed checkpoint released")
    code, message = ctl(cerman, "get", "first", "--type", "ipc")
    assert code != 0
    assert "not configured" in message


def test_missing_worker_answers_error(cerman):
    cerman.write_config("fixture")
    cerman.start()
    cerman.wait_pools_full("fixture")
    assert cerman.circusctl("stop", "cerman-worker-fixture").returncode == 0
    time.sleep(3.5)

    started = time.monotonic()
    with pytest.raises(RemoteError) as caught:
        cerman.client.get("fixture", "ipc")
    assert caught.value.code == "worker-unavailable"
    assert time.monotonic() - started < 5


def test_unknown_checkpoint_error(cerman):
    cerman.start()
    code, message = ctl(cerman, "get", "nope", "--type", "uts")
    assert code == 1
    assert "'nope' is not configured" in message


def test_update_resizes_pool(cerman):
    cerman.write_config("fixture", pools={"ipc": 1, "uts": 1})
    cerman.start()
    cerman.wait_pools_full("fixture")

    code, result = ctl(cerman, "update", "fixture", "--type", "ipc", "--capacity", "4")
    assert code == 0
    assert result["pools"]["ipc"]["capacity"] == 4
    status = cerman.wait_pools_full("fixture", types=("ipc",))
    assert status["pools"]["ipc"]["free"] == 4

    ctl(cerman, "update", "fixture", "--type", "ipc", "--capacity", "0")
    status = cerman.client.status("fixture")
    assert status["pools"]["ipc"]["free"] == 0
    assert len(list((cerman.run_dir / "ns" / "fixture" / "ipc").iterdir())) == 0


def test_get_waits_for_build(cerman):
    cerman.write_config("fixture", pools={"ipc": 1})
    cerman.start()
    cerman.wait_pools_full("fixture", types=("ipc",))
    leases = [cerman.client.get("fixture", "ipc") for _ in range(3)]
    assert len({lease["path"] for lease in leases}) == 3
    for lease in leases:
        cerman.client.put(lease["lease"])


def test_checkpoint_get_put(cerman):
    cerman.write_config("fixture")
    cerman.start()
    cerman.wait_pools_full("fixture")

    code, result = ctl(cerman, "checkpoint", "get", "fixture")
    assert code == 0
    assert result["refs"] == 1
    assert result["path"]
    assert os.path.exists(os.path.join(result["path"], "inventory.img"))
    code, result = ctl(cerman, "checkpoint", "put", "fixture")
    assert result["refs"] == 0
    code, message = ctl(cerman, "checkpoint", "put", "fixture")
    assert code == 1
    assert "no references" in message


def test_rmid_forced_pool_refused(cerman, tmp_path):
    from nshelpers import set_ipc_var_field

    images = tmp_path / "rmid-forced"
    shutil.copytree(IPC_UTS_IMAGES, images)
    set_ipc_var_field(images, 9, 1)  # ipc_var_entry.shm_rmid_forced
    cerman.write_config("forced", images=images)
    cerman.start()
    cerman.wait_pools_full("forced", types=("uts",))

    status = cerman.client.status("forced")
    assert "shm_rmid_forced" in status["pools"]["ipc"]["disabled"]
    assert status["pools"]["ipc"]["free"] == 0
    with pytest.raises(RemoteError, match="shm_rmid_forced"):
        cerman.client.get("forced", "ipc")


def test_status_of_stopped_worker(cerman):
    cerman.write_config("fixture")
    cerman.start()
    cerman.wait_pools_full("fixture")
    assert cerman.circusctl("stop", "cerman-worker-fixture").returncode == 0
    time.sleep(3.5)

    status = cerman.client.status("fixture")
    assert status["watcher"] == "stopped"
    assert status["state"] == "stopped"
    assert "circusctl start" in status["error"]


def test_invalid_config_named_on_get(cerman):
    (cerman.config_dir / "broken.yaml").write_text("name: broken\nsource: {type: zip}\n")
    cerman.start()
    code, message = ctl(cerman, "get", "broken", "--type", "ipc")
    assert code == 1
    assert "broken.yaml" in message
    assert "source.type" in message


def test_uppercase_name_survives_reload(cerman):
    cerman.write_config("Upper", pools={"uts": 1})
    cerman.start()
    cerman.wait_pools_full("Upper", types=("uts",))
    lease = cerman.client.get("Upper", "uts")
    pid = cerman.worker_pid("Upper")

    result = cerman.client.reload()
    assert result["unchanged"] == ["Upper"]
    assert result["removed"] == []
    assert cerman.worker_pid("Upper") == pid
    assert os.path.exists(lease["path"])
    cerman.client.put(lease["lease"])


def test_case_clash_keeps_running_checkpoint(cerman):
    cerman.write_config("own", pools={"uts": 1}, file_name="b-own.yaml")
    cerman.start()
    cerman.wait_pools_full("own", types=("uts",))
    lease = cerman.client.get("own", "uts")

    cerman.write_config("OWN", pools={"uts": 1}, file_name="a-dup.yaml")
    result = cerman.client.reload()
    assert result["unchanged"] == ["own"]
    assert [error["file"] for error in result["config_errors"]] == [
        str(cerman.config_dir / "a-dup.yaml")]
    assert cerman.client.put(lease["lease"])["released"]


def test_reload_reenables_repaired_checkpoint(cerman, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(IPC_UTS_IMAGES, images)
    shm_image = images / "ipcns-shm-9.img"
    good = shm_image.read_bytes()
    shm_image.write_bytes(good[:-7])
    cerman.write_config("repair", images=images)
    cerman.start()
    cerman.wait(lambda: cerman.client.status("repair")["pools"]["ipc"]["disabled"],
                what="ipc pool disabled by the truncated image")

    shm_image.write_bytes(good)
    cerman.client.reload()
    status = cerman.wait_pools_full("repair")
    assert status["pools"]["ipc"]["disabled"] is None
    ipc = cerman.client.get("repair", "ipc")
    assert snapshot_namespaces(ipc["path"])["shm"] == EXPECTED["shm"]


def test_late_get_lease_returned(cerman):
    cerman.write_config("fixture", pools={"ipc": 1})
    cerman.start()
    cerman.wait_pools_full("fixture", types=("ipc",))
    pid = cerman.worker_pid("fixture")

    os.kill(pid, signal.SIGSTOP)
    try:
        with pytest.raises(RemoteError, match="did not reply"):
            cerman.client.get("fixture", "ipc")
    finally:
        os.kill(pid, signal.SIGCONT)

    status = cerman.wait(lambda: (s := cerman.client.status("fixture"))["pools"]["ipc"]["free"] == 1
                         and s, what="pool refilled")
    assert status["pools"]["ipc"]["leased"] == 0
    leases = cerman.state_dir / "journal" / "fixture" / "leases"
    assert list(leases.iterdir()) == []


def test_status_printed_for_one_checkpoint(cerman):
    cerman.write_config("fixture")
    cerman.start()
    cerman.wait_pools_full("fixture")
    result = ctl_text(cerman, "status", "fixture")
    assert result.returncode == 0
    assert result.stdout.startswith("fixture: ready (pid ")
    assert "ipc: free 2, leased 0" in result.stdout


def test_ctl_without_router_fails_fast(tmp_path):
    started = time.monotonic()
    result = subprocess.run(["cerman", "ctl", "--socket", f"ipc://{tmp_path}/cerman.sock", "status"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "no cerman router socket" in result.stderr
    assert time.monotonic() - started < 10


def test_kills_never_hand_out_twice(cerman):
    """Clients lease and return while the worker is killed: no path is handed out twice."""
    import threading

    from cerman.client import Client

    cerman.write_config("fixture", pools={"ipc": 4, "uts": 4})
    cerman.start()
    cerman.wait_pools_full("fixture")
    issued, errors = [], []
    stop = threading.Event()

    def lease_loop(ns_type):
        with Client(f"ipc://{cerman.run_dir}/cerman.sock", timeout=30) as client:
            while not stop.is_set():
                try:
                    lease = client.get("fixture", ns_type)
                except RemoteError as error:
                    errors.append(error.code)
                    time.sleep(0.05)
                    continue
                issued.append(lease["path"])
                try:
                    client.put(lease["lease"])
                except RemoteError as error:
                    errors.append(error.code)

    threads = [threading.Thread(target=lease_loop, args=(ns_type,))
               for ns_type in ("ipc", "ipc", "uts", "uts")]
    for thread in threads:
        thread.start()
    try:
        for _ in range(3):
            time.sleep(1.5)
            pid = cerman.worker_pid("fixture")
            os.kill(pid, signal.SIGKILL)
            cerman.wait(lambda: cerman.worker_pid("fixture") not in (None, pid), timeout=30,
                        what="worker restarted")
        time.sleep(1.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)

    assert len(issued) > 20
    assert len(issued) == len(set(issued))
    assert set(errors) <= {"worker-unavailable", "pool"}
    cerman.stop()
    assert mounts_under(cerman.base) == []


def test_put_while_source_missing(cerman, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(IPC_UTS_IMAGES, images)
    cerman.write_config("moving", images=images)
    cerman.start()
    cerman.wait_pools_full("moving")
    lease = cerman.client.get("moving", "ipc")
    images.rename(tmp_path / "images-moved")
    pid = cerman.worker_pid("moving")
    os.kill(pid, signal.SIGKILL)
    cerman.wait(lambda: cerman.client.status("moving")["state"] == "failed", what="worker failed")

    assert cerman.client.status("moving")["leases"] == 1
    assert cerman.client.put(lease["lease"])["released"]
    assert not os.path.exists(lease["path"])


def test_client_timeout_leaves_no_lease(cerman):
    import psutil

    from cerman.client import Client

    cerman.write_config("fixture", pools={"ipc": 1})
    cerman.start()
    cerman.wait_pools_full("fixture", types=("ipc",))
    cerman.client.get("fixture", "ipc")
    worker = psutil.Process(cerman.worker_pid("fixture"))
    builder = next(child for child in worker.children() if "workers.builder" in child.cmdline())
    cerman.wait(lambda: cerman.client.status("fixture")["pools"]["ipc"]["free"] == 1,
                what="pool refilled")
    cerman.client.get("fixture", "ipc")

    builder.suspend()
    try:
        with Client(f"ipc://{cerman.run_dir}/cerman.sock", timeout=3) as impatient:
            with pytest.raises(RemoteError):
                impatient.get("fixture", "ipc")
    finally:
        builder.resume()

    status = cerman.wait(lambda: (s := cerman.client.status("fixture"))["pools"]["ipc"]["free"] == 1
                         and s, what="pool refilled after the timeout")
    assert status["pools"]["ipc"]["leased"] == 2
    assert status["leases"] == 2


def test_journal_write_failure_keeps_namespace(cerman):
    cerman.write_config("fixture", pools={"ipc": 1})
    cerman.start()
    cerman.wait_pools_full("fixture", types=("ipc",))
    leases = cerman.state_dir / "journal" / "fixture" / "leases"
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k", "full", str(leases)], check=True)
    try:
        subprocess.run(["dd", "if=/dev/zero", f"of={leases}/.filler", "bs=4k", "count=1"],
                       capture_output=True)
        with pytest.raises(RemoteError, match="cannot record the lease"):
            cerman.client.get("fixture", "ipc")
        assert cerman.client.status("fixture")["pools"]["ipc"]["free"] == 1
    finally:
        subprocess.run(["umount", str(leases)], check=True)
    assert cerman.client.get("fixture", "ipc")["path"]


def test_router_survives_malformed_worker_message(cerman):
    import zmq

    cerman.start()
    router_pid = int(cerman.circusctl("list", "cerman-router").stdout.strip() or 0)
    context = zmq.Context()
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.IDENTITY, b"intruder")
    socket.connect(f"ipc://{cerman.run_dir}/workers.sock")
    socket.send_multipart([b"heartbeat", b"not json"])
    socket.send_multipart([b"1", b"{}"])
    time.sleep(0.5)
    socket.close(linger=0)
    context.term()

    assert cerman.client.status() is not None
    assert int(cerman.circusctl("list", "cerman-router").stdout.strip()) == router_pid


def test_config_edit_applied_after_router_restart(cerman):
    from cerman.client import Client

    cerman.write_config("fixture", pools={"ipc": 1})
    cerman.start()
    cerman.wait_pools_full("fixture", types=("ipc",))
    router_pid = int(cerman.circusctl("list", "cerman-router").stdout.strip())

    cerman.write_config("fixture", pools={"ipc": 3})
    os.kill(router_pid, signal.SIGKILL)
    # A request sent to the dead router is lost, so each try gets its own short timeout.
    with Client(f"ipc://{cerman.run_dir}/cerman.sock", timeout=2) as client:
        status = cerman.wait(lambda: (s := client.status("fixture"))["pools"]["ipc"]
                             ["capacity"] == 3 and s, what="worker restarted with the edited config")
    assert status["state"] == "ready"
