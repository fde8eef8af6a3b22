"""A real cerman instance for tests: circusd with circus.ini on temporary directories."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import yaml

from cerman.client import Client

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"
IPC_UTS_IMAGES = FIXTURES / "criu-ipc-uts" / "images"
IPC_SNAPSHOT_TOOL = FIXTURES / "tools" / "ipc_snapshot.py"


def mounts_under(base):
    """Return the mount points in /proc/self/mountinfo at or below ``base``."""
    base = os.path.realpath(base)
    points = []
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            point = line.split()[4].replace("\\040", " ")
            if point == base or point.startswith(base + "/"):
                points.append(point)
    return points


def unmount_all_under(base):
    for point in sorted(mounts_under(base), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False, capture_output=True)


def snapshot_namespaces(ipc_pin=None, uts_pin=None):
    """Run the IPC/UTS snapshot tool inside the pinned namespaces and return its JSON."""
    command = ["nsenter"]
    if ipc_pin:
        command.append(f"--ipc={ipc_pin}")
    if uts_pin:
        command.append(f"--uts={uts_pin}")
    command += ["python3", str(IPC_SNAPSHOT_TOOL)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output)


class CermanService:
    """circusd running the repository's circus.ini with its own three directories."""

    def __init__(self, base):
        self.base = Path(base)
        self.config_dir = self.base / "configs"
        self.run_dir = self.base / "run"
        self.state_dir = self.base / "state"
        self.log_path = self.base / "circusd.log"
        self.config_dir.mkdir(parents=True, exist_ok=True)
        self.process = None
        self.client = Client(f"ipc://{self.run_dir}/cerman.sock", timeout=30)

    @property
    def env(self):
        # The router and workers import this checkout, whatever `pip install -e` last
        # pointed the `cerman` command at.
        python_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        return {**os.environ, "PYTHONPATH": python_path, "CERMAN_CONFIG_DIR": str(self.config_dir),
                "CERMAN_RUN_DIR": str(self.run_dir), "CERMAN_STATE_DIR": str(self.state_dir)}

    def write_config(self, name, images=IPC_UTS_IMAGES, pools=None, file_name=None, **extra):
        document = {"name": name, "source": {"type": "directory", "path": str(images)},
                    "pools": pools if pools is not None else {"ipc": 2, "uts": 2}}
        document.update(extra)
        path = self.config_dir / (file_name or f"{name}.yaml")
        path.write_text(yaml.safe_dump(document))
        return path

    def start(self):
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            ["circusd", str(REPO / "circus.ini")], env=self.env, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True, cwd=self.base)
        log.close()
        self.wait(lambda: self.client.status(), timeout=30, what="router answering status")
        return self

    def circusctl(self, *args, timeout=60):
        return subprocess.run(
            ["circusctl", "--endpoint", f"ipc://{self.run_dir}/circus.sock", "--timeout",
             str(timeout), *args], capture_output=True, text=True, timeout=timeout + 10)

    def wait(self, predicate, timeout=30.0, what="condition"):
        deadline = time.monotonic() + timeout
        last_error = None
        while time.monotonic() < deadline:
            try:
                result = predicate()
                if result:
                    return result
            except Exception as error:  # the service may still be starting
                last_error = error
            time.sleep(0.1)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}; "
                             f"last error: {last_error}; log:\n{self.log_tail()}")

    def checkpoint_status(self, name):
        return self.client.status(name)

    def wait_pools_full(self, name, types=("ipc", "uts"), timeout=30.0):
        def full():
            status = self.client.status(name)
            pools = status.get("pools", {})
            return all(pools.get(t, {}).get("free", 0) >= pools.get(t, {}).get("capacity", 1)
                       and t in pools for t in types) and status
        return self.wait(full, timeout=timeout, what=f"pools {types} of {name} full")

    def worker_pid(self, name):
        return self.client.status(name)["pid"]

    def log_tail(self, lines=60):
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self):
        """Quit circusd gracefully; kill its process group if that fails."""
        self.client.close()
        if self.process is None:
            return
        if self.process.poll() is None:
            self.circusctl("quit", "--waiting", timeout=60)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None

    def cleanup(self):
        """Stop, then remove anything a failed test left mounted or running."""
        try:
            self.stop()
        finally:
            try:
                os.killpg(self.process.pid, signal.SIGKILL) if self.process else None
            except ProcessLookupError:
                pass
            unmount_all_under(self.base)
