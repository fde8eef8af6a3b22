#!/usr/bin/env python3
"""Benchmarks of cerman on this machine: ``python3 bench/bench.py [--quick] [--json]``.

Run as root from a checkout where the tests run (``scripts/setup``). Everything lives
in one temporary directory: a cerman service (circusd with the repository's
circus.ini), a builder process, a private containerd with the fixture checkpoint
imported, and the pins and bundles they make. All of it is stopped, unmounted and
removed at the end, also after an error, Ctrl-C or SIGTERM.

Figures (each a median over repeated runs; docs/benchmarks.md explains them):

1. ``get`` latency through the router, p50 and p99, next to a bare pyzmq REQ/ROUTER
   round trip over ipc:// between two processes.
2. get+put pairs per second with concurrent clients, each a process with its own
   ``Client``: a burst served from a full pool, then the sustained rate once the pool
   is empty and every get waits for a build.
3. IPC and UTS namespaces built per second, by a ``BuilderProcess`` directly and as
   the pool refill rate that ``status`` shows.
4. RSS of circusd, the router, one worker and its builder after those runs.
5. For the containerd fixture checkpoint: time to build one mount namespace, and
   cold preparation (prepare, then build one IPC, UTS and MNT namespace) against a
   warm ``get`` of the same three from a full pool.

Progress goes to stderr; the table (or with ``--json`` a JSON document) to stdout.
"""

import argparse
import contextlib
import datetime
import json
import math
import multiprocessing
import os
import platform
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO / "tests", REPO):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import psutil  # noqa: E402
import yaml  # noqa: E402
import zmq  # noqa: E402

from cerman.client import Client, RemoteError  # noqa: E402
from cerman.config import load_config  # noqa: E402
from containerd_env import CHECKPOINT_IMAGE, ContainerdEnv, containerd_missing_reason  # noqa: E402
from service import IPC_UTS_IMAGES, CermanService, mounts_under, unmount_all_under  # noqa: E402
from workers import namespaces  # noqa: E402
from workers.builder_client import BuilderProcess  # noqa: E402
from workers.mnt_builder import release_bundle  # noqa: E402
from workers.sources import prepare  # noqa: E402

CHECKPOINT = "bench"
CONTAINERD_CHECKPOINT = "ck"
HOSTDATA = Path("/tmp/hostdata")
# The bare round trip carries payloads of the size cerman's get carries.
ECHO_REQUEST = json.dumps({"op": "get", "checkpoint": CHECKPOINT, "type": "ipc"},
                          separators=(",", ":")).encode()
ECHO_REPLY = json.dumps({"ok": True, "result": {
    "lease": f"{CHECKPOINT}:ipc:0123456789abcdef", "checkpoint": CHECKPOINT, "type": "ipc",
    "path": "/tmp/cerman-bench-xxxxxxxx/service/run/ns/bench/ipc/0123456789ab-0123456789ab"}},
    separators=(",", ":")).encode()
# Upper bounds that stop every loop even when the service misbehaves.
CHILD_LIFETIME = 120.0
MAX_CLIENT_ERRORS = 50
POOL_FILL_TIMEOUT = 120.0


@dataclass(frozen=True)
class Settings:
    latency_reps: int          # runs of figure 1, each on a full pool
    latency_samples: int       # timed gets per run, back to back
    idle_samples: int          # timed gets per run, each after the refill finished
    echo_samples: int          # bare round trips per run
    clients: int               # concurrent clients in figure 2
    throughput_reps: int
    throughput_capacity: int   # IPC pool capacity at the start of a burst
    throughput_seconds: float  # length of one run of figure 2
    build_reps: int
    build_count: int           # namespaces per run of figure 3
    mnt_builds: int            # mount namespaces built for figure 5
    cold_reps: int
    warm_reps: int


FULL = Settings(latency_reps=5, latency_samples=300, idle_samples=60, echo_samples=2000, clients=8,
                throughput_reps=3, throughput_capacity=400, throughput_seconds=6.0,
                build_reps=3, build_count=120, mnt_builds=5, cold_reps=3, warm_reps=5)
QUICK = Settings(latency_reps=3, latency_samples=100, idle_samples=30, echo_samples=500, clients=8,
                 throughput_reps=2, throughput_capacity=150, throughput_seconds=3.0,
                 build_reps=2, build_count=48, mnt_builds=3, cold_reps=2, warm_reps=3)
WARMUP = 10


def note(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def percentile(values, fraction):
    """Return the nearest-rank percentile of ``values`` (fraction 0.5 for p50)."""
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def median(values):
    return statistics.median(values) if values else None


class Interrupted(BaseException):
    """SIGTERM or SIGHUP, raised like KeyboardInterrupt so that cleanup runs."""


def _raise_interrupted(signum, frame):
    raise Interrupted(signal.Signals(signum).name)


def _child_signals():
    # The parent stops its children itself; a Ctrl-C on the terminal must not kill
    # them in the middle of a request.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


# -- child processes ---------------------------------------------------------------


def echo_server(endpoint, ready, limit):
    """Reply ECHO_REPLY to every request on a ROUTER socket: the bare round trip's far end."""
    _child_signals()
    context = zmq.Context()
    socket = context.socket(zmq.ROUTER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.bind(endpoint)
    ready.set()
    deadline = time.monotonic() + CHILD_LIFETIME
    served = 0
    try:
        while served < limit and time.monotonic() < deadline:
            if not socket.poll(200):
                continue
            frames = socket.recv_multipart()
            if frames[-1] == b"stop":
                socket.send_multipart(frames[:-1] + [b"stopped"])
                return
            socket.send_multipart(frames[:-1] + [ECHO_REPLY])
            served += 1
    finally:
        socket.close(linger=0)
        context.term()


def pair_client(endpoint, checkpoint, barrier, seconds, results):
    """Do get+put pairs for ``seconds`` and report the monotonic time each one finished."""
    _child_signals()
    finished, errors, last_error = [], 0, None
    with Client(endpoint, timeout=30, context=zmq.Context()) as client:
        client.status(checkpoint)
        barrier.wait(60)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and errors < MAX_CLIENT_ERRORS:
            try:
                lease = client.get(checkpoint, "ipc")
                client.put(lease["lease"])
            except RemoteError as error:
                errors, last_error = errors + 1, str(error)
                continue
            finished.append(time.monotonic())
    results.put({"finished": finished, "errors": errors, "last_error": last_error})


def service_processes(service):
    """Return circusd, the router, the bench checkpoint's worker and its builder."""
    circusd = psutil.Process(service.process.pid)
    descendants = circusd.children(recursive=True)
    router = next(p for p in descendants if "router" in " ".join(p.cmdline()))
    worker = psutil.Process(service.worker_pid(CHECKPOINT))
    builder = next(p for p in worker.children() if "workers.builder" in " ".join(p.cmdline()))
    return {"circusd": circusd, "router": router, "worker": worker, "builder": builder}


def wait_refilled(client):
    """Wait until the IPC pool of the bench checkpoint is full again and nothing builds."""
    deadline = time.monotonic() + POOL_FILL_TIMEOUT
    while time.monotonic() < deadline:
        pool = client.status(CHECKPOINT)["pools"]["ipc"]
        if pool["building"] == 0 and pool["free"] >= pool["capacity"]:
            return
        time.sleep(0.005)
    raise RuntimeError(f"the IPC pool of {CHECKPOINT!r} did not refill within "
                       f"{POOL_FILL_TIMEOUT:g} s; see the circusd log")


def wait_idle(service, checkpoint):
    """Wait until every pool of ``checkpoint`` is full and no build is running."""
    def idle():
        pools = service.client.status(checkpoint)["pools"]
        return all(pool["building"] == 0 and pool["free"] >= pool["capacity"]
                   for pool in pools.values())
    service.wait(idle, timeout=POOL_FILL_TIMEOUT, what=f"pools of {checkpoint} idle")


def cpu_seconds(processes):
    """Return CPU seconds used so far per process and machine-wide ("all", "iowait").

    The builder's include its reaped build children.
    """
    seconds = {}
    for name, process in processes.items():
        times = process.cpu_times()
        seconds[name] = times.user + times.system
        if name == "builder":
            seconds[name] += times.children_user + times.children_system
    machine_times = psutil.cpu_times()
    seconds["all"] = sum(machine_times) - machine_times.idle - machine_times.iowait
    seconds["iowait"] = machine_times.iowait
    return seconds


def cpu_share(before, after, seconds):
    """Return each process's CPU use between two ``cpu_seconds`` as percent of one core."""
    return {name: 100 * (after[name] - before[name]) / seconds for name in before}


# -- figure 1: latency ---------------------------------------------------------------


def bare_round_trips(spawn, base, settings):
    endpoint = f"ipc://{base}/echo.sock"
    ready = spawn.Event()
    # The limit only bounds the server; the stop request ends it.
    total = settings.latency_reps * (settings.echo_samples + WARMUP) + 10
    server = spawn.Process(target=echo_server, args=(endpoint, ready, total), daemon=True)
    server.start()
    context = zmq.Context()
    socket = context.socket(zmq.REQ)
    socket.setsockopt(zmq.LINGER, 0)
    try:
        if not ready.wait(30):
            raise RuntimeError("the pyzmq echo server did not start within 30 s; "
                               "check the load on this machine")
        socket.connect(endpoint)
        runs = []
        for _ in range(settings.latency_reps):
            samples = []
            for index in range(WARMUP + settings.echo_samples):
                started = time.perf_counter()
                socket.send(ECHO_REQUEST)
                if not socket.poll(10_000):
                    raise RuntimeError("the pyzmq echo server did not reply within 10 s; "
                                       "check the load on this machine")
                socket.recv()
                if index >= WARMUP:
                    samples.append(time.perf_counter() - started)
            runs.append(samples)
        socket.send(b"stop")
        socket.poll(5_000)
    finally:
        socket.close(linger=0)
        context.term()
        server.join(10)
        if server.is_alive():
            server.kill()
            server.join()
    return summarize_latency(runs)


def summarize_latency(runs):
    return {"p50_ms": median([percentile(run, 0.50) * 1e3 for run in runs]),
            "p99_ms": median([percentile(run, 0.99) * 1e3 for run in runs]),
            "runs": len(runs), "samples_per_run": len(runs[0])}


def service_latency(service, settings):
    client = service.client
    capacity = settings.latency_samples + WARMUP + 8
    client.update(CHECKPOINT, capacity, "ipc")
    get_runs, put_runs = [], []
    for _ in range(settings.latency_reps):
        service.wait_pools_full(CHECKPOINT, types=("ipc",), timeout=POOL_FILL_TIMEOUT)
        gets, puts = [], []
        for index in range(WARMUP + settings.latency_samples):
            started = time.perf_counter()
            lease = client.get(CHECKPOINT, "ipc")
            got = time.perf_counter()
            client.put(lease["lease"])
            put = time.perf_counter()
            if index >= WARMUP:
                gets.append(got - started)
                puts.append(put - got)
        get_runs.append(gets)
        put_runs.append(puts)
    # The same path without a lease: status replies from memory, and checkpoint-get only
    # writes one journal file (write, rename), as a get does.
    wait_idle(service, CHECKPOINT)
    status_runs, journal_runs = [], []
    for _ in range(settings.latency_reps):
        status, journal = [], []
        for index in range(WARMUP + settings.idle_samples):
            started = time.perf_counter()
            client.status(CHECKPOINT)
            middle = time.perf_counter()
            client.checkpoint_get(CHECKPOINT)
            ended = time.perf_counter()
            client.checkpoint_put(CHECKPOINT)
            if index >= WARMUP:
                status.append(middle - started)
                journal.append(ended - middle)
        status_runs.append(status)
        journal_runs.append(journal)

    idle_runs = []
    for _ in range(settings.latency_reps):
        service.wait_pools_full(CHECKPOINT, types=("ipc",), timeout=POOL_FILL_TIMEOUT)
        idle = []
        for _ in range(settings.idle_samples):
            started = time.perf_counter()
            lease = client.get(CHECKPOINT, "ipc")
            idle.append(time.perf_counter() - started)
            client.put(lease["lease"])
            wait_refilled(client)
        idle_runs.append(idle)
    return {"get": summarize_latency(get_runs), "put": summarize_latency(put_runs),
            "get_idle": summarize_latency(idle_runs), "status": summarize_latency(status_runs),
            "checkpoint_get": summarize_latency(journal_runs), "capacity": capacity}


# -- figure 2: throughput ------------------------------------------------------------


def throughput_run(spawn, service, settings):
    service.client.update(CHECKPOINT, settings.throughput_capacity, "ipc")
    service.wait_pools_full(CHECKPOINT, types=("ipc",), timeout=POOL_FILL_TIMEOUT)
    endpoint = service.client.endpoint
    processes = service_processes(service)
    barrier = spawn.Barrier(settings.clients + 1)
    results = spawn.Queue()
    clients = [spawn.Process(target=pair_client, daemon=True,
                             args=(endpoint, CHECKPOINT, barrier, settings.throughput_seconds,
                                   results))
               for _ in range(settings.clients)]
    try:
        for process in clients:
            process.start()
        barrier.wait(60)
        started = time.monotonic()
        cpu_start = cpu_seconds(processes)
        cpu_drained = None
        # Watch the pool from here: the first status with no free namespace ends the burst.
        drained = None
        while time.monotonic() < started + settings.throughput_seconds:
            pool = service.client.status(CHECKPOINT)["pools"]["ipc"]
            if drained is None and pool["free"] == 0:
                drained = time.monotonic()
                cpu_drained = cpu_seconds(processes)
            time.sleep(0.05)
        cpu_end = cpu_seconds(processes)
        ended = time.monotonic()
        reports = [results.get(timeout=60) for _ in clients]
    finally:
        for process in clients:
            process.join(10)
            if process.is_alive():
                process.kill()
                process.join()

    finished = sorted(stamp for report in reports for stamp in report["finished"])
    errors = sum(report["errors"] for report in reports)
    run = {"pairs": len(finished), "errors": errors,
           "last_error": next((r["last_error"] for r in reports if r["last_error"]), None),
           "overall_per_s": len(finished) / settings.throughput_seconds,
           "drained_after_s": None if drained is None else drained - started,
           "burst_per_s": None, "sustained_per_s": None, "burst_cpu_pct": None,
           "sustained_cpu_pct": None}
    if drained is None:
        run["burst_per_s"] = run["overall_per_s"]
        run["burst_cpu_pct"] = cpu_share(cpu_start, cpu_end, ended - started)
    else:
        before = sum(1 for stamp in finished if stamp <= drained)
        run["burst_per_s"] = before / (drained - started)
        run["burst_cpu_pct"] = cpu_share(cpu_start, cpu_drained, drained - started)
        if ended - drained > 0.5:
            run["sustained_per_s"] = (len(finished) - before) / (ended - drained)
            run["sustained_cpu_pct"] = cpu_share(cpu_drained, cpu_end, ended - drained)
    return run


def throughput(spawn, service, settings):
    runs = [throughput_run(spawn, service, settings) for _ in range(settings.throughput_reps)]
    for run in runs:
        if run["errors"]:
            note(f"figure 2: {run['errors']} failed requests; last: {run['last_error']}")

    def med(key):
        return median([run[key] for run in runs if run[key] is not None])

    def med_cpu(key):
        shares = [run[key] for run in runs if run[key] is not None]
        return {name: median([share[name] for share in shares])
                for name in shares[0]} if shares else None
    return {"clients": settings.clients, "capacity": settings.throughput_capacity,
            "seconds_per_run": settings.throughput_seconds, "runs": len(runs),
            "burst_per_s": med("burst_per_s"), "sustained_per_s": med("sustained_per_s"),
            "drained_after_s": med("drained_after_s"),
            "burst_cpu_pct": med_cpu("burst_cpu_pct"),
            "sustained_cpu_pct": med_cpu("sustained_cpu_pct"),
            "runs_that_drained": sum(run["drained_after_s"] is not None for run in runs),
            "errors": sum(run["errors"] for run in runs), "detail": runs}


# -- figure 3: build rates -----------------------------------------------------------


def builder_rate(builder, pin_dir, kind, settings):
    rates, child_seconds, unpins = [], [], []
    for rep in range(settings.build_reps):
        pins = [pin_dir / f"{kind}-{rep}-{index}" for index in range(settings.build_count)]
        responses = []
        try:
            started = time.monotonic()
            waiting = {builder.submit({"op": "build", "type": kind,
                                       "images_dir": str(IPC_UTS_IMAGES), "pin": str(pin)})
                       for pin in pins}
            deadline = started + 60
            while waiting and time.monotonic() < deadline:
                select.select([builder.fileno()], [], [], 1.0)
                for response in builder.read_responses():
                    waiting.discard(response.get("id"))
                    responses.append(response)
            elapsed = time.monotonic() - started
            if waiting:
                raise RuntimeError(f"{len(waiting)} {kind} builds did not finish within 60 s; "
                                   "see the builder's log above")
            failed = [response for response in responses if not response.get("ok")]
            if failed:
                raise RuntimeError(f"{len(failed)} {kind} builds failed: {failed[0]['error']}")
            rates.append(len(pins) / elapsed)
            child_seconds.extend(response["seconds"] for response in responses)
        finally:
            for pin in pins:
                started = time.perf_counter()
                namespaces.unpin(pin)
                unpins.append(time.perf_counter() - started)
    return {"per_s": median(rates), "runs": len(rates), "per_run": settings.build_count,
            "child_ms_p50": percentile(child_seconds, 0.5) * 1e3,
            "unpin_ms_p50": percentile(unpins, 0.5) * 1e3}


def refill_rate(service, kind, settings):
    """Measure namespaces per second from capacity 0 to ``build_count`` free, via status."""
    client = service.client
    rates = []
    for _ in range(settings.build_reps):
        client.update(CHECKPOINT, 0, kind)
        service.wait(lambda: client.status(CHECKPOINT)["pools"][kind]["building"] == 0,
                     timeout=60, what=f"{kind} builds in flight finishing")
        client.update(CHECKPOINT, 0, kind)
        started = time.monotonic()
        client.update(CHECKPOINT, settings.build_count, kind)
        deadline = started + POOL_FILL_TIMEOUT
        while time.monotonic() < deadline:
            pool = client.status(CHECKPOINT)["pools"][kind]
            if pool["free"] >= settings.build_count:
                break
            time.sleep(0.02)
        else:
            raise RuntimeError(f"{kind} pool did not refill within {POOL_FILL_TIMEOUT:g} s")
        rates.append(settings.build_count / (time.monotonic() - started))
    return {"per_s": median(rates), "runs": len(rates), "per_run": settings.build_count}


# -- figure 4: memory ------------------------------------------------------------------


def memory(service):
    return {f"{name}_mib": process.memory_info().rss / 2**20
            for name, process in service_processes(service).items()}


# -- figure 5: containerd checkpoint -----------------------------------------------------


@contextlib.contextmanager
def hostdata():
    """Provide /tmp/hostdata, which the containerd fixture bind-mounts at /hostdata.

    The directory is removed afterwards only when this context created it.
    """
    created = not HOSTDATA.exists()
    if created:
        HOSTDATA.mkdir(mode=0o755)
        (HOSTDATA / "h.txt").write_text("host\n")
    try:
        yield
    finally:
        if created:
            shutil.rmtree(HOSTDATA, ignore_errors=True)


def containerd_source(env):
    return {"type": "containerd", "image": CHECKPOINT_IMAGE, "namespace": env.namespace,
            "address": str(env.address)}


def build_three(builder, prepared, state_dir, pin_dir, tag):
    """Build one IPC, UTS and MNT namespace of ``prepared``; return pins, bundle, times."""
    pins = {kind: pin_dir / f"{kind}-{tag}" for kind in ("ipc", "uts", "mnt")}
    bundle = state_dir / "bundles" / prepared.name / f"mnt-{tag}"
    seconds = {}
    for kind, pin in pins.items():
        request = {"op": "build", "type": kind, "pin": str(pin),
                   "images_dir": str(prepared.images_dir)}
        if kind == "mnt":
            request.update(prepared=prepared.as_dict(), bundle=str(bundle))
        started = time.monotonic()
        response = builder.call(request, timeout=60)
        seconds[kind] = time.monotonic() - started
        if not response.get("ok"):
            release_three(pins, bundle, state_dir)
            raise RuntimeError(f"building the {kind} namespace failed: {response['error']}")
    return pins, bundle, seconds


def release_three(pins, bundle, state_dir):
    for pin in pins.values():
        namespaces.unpin(pin)
    release_bundle(bundle, state_dir=state_dir)


def cold_and_mnt(builder, env, base, settings):
    config_dir = base / "cold-configs"
    config_dir.mkdir()
    config_file = config_dir / f"{CONTAINERD_CHECKPOINT}.yaml"
    config_file.write_text(yaml.safe_dump({"name": CONTAINERD_CHECKPOINT,
                                           "source": containerd_source(env),
                                           "pools": {"ipc": 1, "uts": 1, "mnt": 1}}))
    config = load_config(config_file)
    pin_dir = base / "cold-pins"
    namespaces.make_private_mount(pin_dir)
    try:
        cold = []
        for rep in range(settings.cold_reps):
            state_dir = base / f"cold-state-{rep}"
            started = time.monotonic()
            prepared = prepare(config, state_dir)
            prepared_at = time.monotonic()
            pins, bundle, seconds = build_three(builder, prepared, state_dir, pin_dir, rep)
            total = time.monotonic() - started
            release_three(pins, bundle, state_dir)
            cold.append({"total_s": total, "prepare_s": prepared_at - started, **{
                f"{kind}_s": value for kind, value in seconds.items()}})
            if rep < settings.cold_reps - 1:
                shutil.rmtree(state_dir)

        # Mount namespaces of the last preparation, now warm on disk.
        mnt_calls, mnt_child = [], []
        for index in range(settings.mnt_builds):
            pin = pin_dir / f"mnt-only-{index}"
            bundle = state_dir / "bundles" / prepared.name / f"mnt-only-{index}"
            started = time.monotonic()
            response = builder.call({"op": "build", "type": "mnt", "pin": str(pin),
                                     "prepared": prepared.as_dict(), "bundle": str(bundle)},
                                    timeout=60)
            mnt_calls.append(time.monotonic() - started)
            namespaces.unpin(pin)
            release_bundle(bundle, state_dir=state_dir)
            if not response.get("ok"):
                raise RuntimeError(f"building a mount namespace failed: {response['error']}")
            mnt_child.append(response["seconds"])
    finally:
        unmount_all_under(pin_dir)
        namespaces.release_private_mount(pin_dir)

    def med(key):
        return median([run[key] for run in cold])
    return ({"runs": len(cold), "total_s": med("total_s"), "prepare_s": med("prepare_s"),
             "ipc_s": med("ipc_s"), "uts_s": med("uts_s"), "mnt_s": med("mnt_s")},
            {"builds": len(mnt_calls), "call_s": median(mnt_calls), "child_s": median(mnt_child)})


def warm_gets(service, settings):
    types = ("ipc", "uts", "mnt")
    client = service.client
    runs = []
    for _ in range(settings.warm_reps):
        service.wait_pools_full(CONTAINERD_CHECKPOINT, types=types, timeout=POOL_FILL_TIMEOUT)
        started = time.monotonic()
        leases = [client.get(CONTAINERD_CHECKPOINT, kind) for kind in types]
        runs.append(time.monotonic() - started)
        for lease in leases:
            client.put(lease["lease"])
    return {"runs": len(runs), "total_s": median(runs)}


# -- machine and output ------------------------------------------------------------------


def machine():
    model = next((line.split(":", 1)[1].strip() for line in
                  Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown")
    return {"nproc": os.cpu_count(), "cpu": model, "kernel": platform.release(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "load_average": [round(value, 2) for value in os.getloadavg()],
            "python": platform.python_version(), "pyzmq": zmq.__version__,
            "libzmq": zmq.zmq_version(), "containerd": containerd_version()}


def containerd_version():
    if shutil.which("containerd") is None:
        return None
    words = subprocess.run(["containerd", "--version"], capture_output=True,
                           text=True).stdout.split()
    # "containerd github.com/containerd/containerd 1.6.20~ds1 ..."
    return words[2] if len(words) > 2 else None


def fmt(value, digits=2):
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.{digits}f}"


def latency_pair(figures):
    return f"{fmt(figures['p50_ms'], 3)} / {fmt(figures['p99_ms'], 3)} ms"


def latency_rows(lat):
    return [
        ("1", "get via router, back to back, p50 / p99", latency_pair(lat["get"])),
        ("1", "get via router, no build running, p50 / p99", latency_pair(lat["get_idle"])),
        ("1", "status via router (no journal write), p50 / p99", latency_pair(lat["status"])),
        ("1", "checkpoint-get via router (journal write only), p50 / p99",
         latency_pair(lat["checkpoint_get"])),
        ("1", "put via router, back to back, p50 / p99", latency_pair(lat["put"])),
        ("1", "bare pyzmq REQ/ROUTER, p50 / p99", latency_pair(lat["bare"])),
    ]


def throughput_rows(tp):
    rows = [
        ("2", f"get+put, {tp['clients']} clients, burst (full pool of {tp['capacity']})",
         f"{fmt(tp['burst_per_s'])} pairs/s"),
        ("2", "get+put, sustained (pool empty, bound by builds)",
         f"{fmt(tp['sustained_per_s'])} pairs/s"),
        ("2", "pool emptied after", f"{fmt(tp['drained_after_s'])} s "
         f"({tp['runs_that_drained']} of {tp['runs']} runs)"),
    ]
    for phase in ("burst", "sustained"):
        shares = tp[f"{phase}_cpu_pct"]
        if shares:
            text = ", ".join(f"{name} {share:.0f}" for name, share in shares.items())
            rows.append(("2", f"CPU % of one core, {phase}", text))
    return rows


def build_rows(builds):
    rows = []
    for kind in ("ipc", "uts"):
        direct, refill = builds[kind]["builder"], builds[kind]["refill"]
        rows += [
            ("3", f"{kind.upper()} builds, BuilderProcess direct",
             f"{fmt(direct['per_s'])} /s (child p50 {fmt(direct['child_ms_p50'])} ms)"),
            ("3", f"{kind.upper()} pool refill via service", f"{fmt(refill['per_s'])} /s"),
            ("3", f"{kind.upper()} unpin one namespace, p50",
             f"{fmt(direct['unpin_ms_p50'], 3)} ms"),
        ]
    return rows


def memory_rows(mem):
    return [("4", f"RSS {name.removesuffix('_mib')}", f"{fmt(value, 1)} MiB")
            for name, value in mem.items()]


def containerd_rows(ck):
    cold, warm, mnt = ck["cold"], ck["warm"], ck["mnt"]
    parts = ", ".join(f"{step} {fmt(cold[f'{step}_s'] * 1e3)}"
                      for step in ("prepare", "ipc", "uts", "mnt"))
    return [
        ("5", "build one MNT namespace (builder call)", f"{fmt(mnt['call_s'] * 1e3)} ms"),
        ("5", "cold: prepare + IPC + UTS + MNT", f"{fmt(cold['total_s'] * 1e3)} ms ({parts})"),
        ("5", "warm: get IPC + UTS + MNT", f"{fmt(warm['total_s'] * 1e3)} ms"),
        ("5", "cold / warm", f"{fmt(ck['ratio'], 0)} x"),
    ]


def table(results):
    sections = (("latency", latency_rows), ("throughput", throughput_rows),
                ("builds", build_rows), ("memory", memory_rows),
                ("containerd", containerd_rows))
    rows = []
    for key, make_rows in sections:
        if results.get(key):
            rows += make_rows(results[key])

    m = results["machine"]
    width = max(len(row[1]) for row in rows) if rows else 10
    lines = [f"cerman benchmarks ({results['mode']}), {results['date']}",
             f"{m['nproc']} x {m['cpu']}, {m['memory_gib']} GiB, kernel {m['kernel']}, "
             f"Python {m['python']}, libzmq {m['libzmq']}",
             f"load average at the start {results['load_at_start']}, at the end "
             f"{m['load_average']}", ""]
    lines += [f"{figure:>2}  {name:<{width}}  {value}" for figure, name, value in rows]
    lines += ["", f"wall time {results['wall_s']:.0f} s; medians over repeated runs"]
    return "\n".join(lines)


# -- main ----------------------------------------------------------------------------------


def run(args, settings, stack, base):
    spawn = multiprocessing.get_context("spawn")
    results = {}

    note("figure 1: bare pyzmq round trips")
    bare = bare_round_trips(spawn, base, settings)

    note("starting cerman (circusd) with the IPC/UTS fixture checkpoint")
    service = CermanService(base / "service")
    stack.callback(service.cleanup)
    service.write_config(CHECKPOINT, pools={"ipc": settings.latency_samples + WARMUP + 8,
                                            "uts": 1})
    service.start()
    service.wait_pools_full(CHECKPOINT, types=("ipc", "uts"), timeout=POOL_FILL_TIMEOUT)

    note("figure 1: get latency through the router")
    results["latency"] = {**service_latency(service, settings), "bare": bare}

    note(f"figure 2: get+put with {settings.clients} client processes")
    results["throughput"] = throughput(spawn, service, settings)

    note("figure 3: build rates (BuilderProcess, then pool refill)")
    # The service must be idle while the builder is measured alone.
    service.client.update(CHECKPOINT, 1, "ipc")
    wait_idle(service, CHECKPOINT)
    builder = BuilderProcess(log_level="WARNING")
    builder.start()
    stack.callback(builder.stop)
    pin_dir = base / "pins"
    namespaces.make_private_mount(pin_dir)
    stack.callback(namespaces.release_private_mount, pin_dir)
    stack.callback(unmount_all_under, pin_dir)
    builds = {}
    for kind in ("ipc", "uts"):
        builds[kind] = {"builder": builder_rate(builder, pin_dir, kind, settings),
                        "refill": refill_rate(service, kind, settings)}
    results["builds"] = builds

    note("figure 4: memory")
    results["memory"] = memory(service)
    service.cleanup()

    reason = containerd_missing_reason()
    if reason:
        note(f"figure 5 skipped: {reason}")
        return results
    note("figure 5: starting containerd with the fixture checkpoint")
    env = ContainerdEnv()
    env.start()
    stack.callback(env.stop)
    stack.enter_context(hostdata())

    note("figure 5: cold preparation and mount namespace builds")
    cold, mnt = cold_and_mnt(builder, env, base, settings)

    note("figure 5: warm gets from a full pool")
    ck_service = CermanService(base / "service-containerd")
    stack.callback(ck_service.cleanup)
    capacity = settings.warm_reps
    ck_service.write_config(CONTAINERD_CHECKPOINT, source=containerd_source(env),
                            pools={"ipc": capacity, "uts": capacity, "mnt": capacity})
    ck_service.start()
    warm = warm_gets(ck_service, settings)
    results["containerd"] = {"cold": cold, "warm": warm, "mnt": mnt,
                             "ratio": cold["total_s"] / warm["total_s"]}
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer and shorter runs (under a minute)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("cerman builds namespaces and mounts: run as root")
    settings = QUICK if args.quick else FULL

    # A shell starts background jobs with SIGINT ignored; Ctrl-C and kill -INT must work.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_interrupted)
    signal.signal(signal.SIGHUP, _raise_interrupted)
    base = Path(tempfile.mkdtemp(prefix="cerman-bench-"))
    load_at_start = [round(value, 2) for value in os.getloadavg()]
    started = time.monotonic()
    results = None
    try:
        with contextlib.ExitStack() as stack:
            try:
                results = run(args, settings, stack, base)
            finally:
                # A second Ctrl-C must not cut the cleanup short.
                for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                    signal.signal(signum, signal.SIG_IGN)
                note("cleaning up")
    except (KeyboardInterrupt, Interrupted) as error:
        note(f"interrupted ({type(error).__name__} {error}); cleaned up")
        return 130
    finally:
        unmount_all_under(base)
        left = mounts_under(base)
        if left:
            note(f"mounts left under {base}: {left}")
        else:
            shutil.rmtree(base, ignore_errors=True)

    results.update(mode="quick" if args.quick else "full",
                   date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                   machine=machine(), settings=asdict(settings),
                   load_at_start=load_at_start, wall_s=time.monotonic() - started)
    print(json.dumps(results, indent=2) if args.json else table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
