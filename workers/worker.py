"""The worker of one checkpoint: prepares it, keeps its namespace pools full, serves leases.

Start-up, in order:

1. start the builder helper process, before any ZeroMQ context exists (the builder
   forks, and a process with ZeroMQ's I/O threads must not);
2. make the checkpoint's pin directory a private mount and read the lease journal;
3. connect to the router and send heartbeats, state "preparing";
4. prepare the checkpoint in a subprocess (extract images and root filesystem);
5. adopt pins left by an earlier run of this worker, drop stale ones, refill the pools.

SIGTERM (circus stop, ``circusctl quit``, config removed) releases every pin this
worker holds, leased ones included, and exits 0. SIGKILL leaves the pins in place and
the restarted worker adopts them, so lease paths stay valid across a crash.
"""

import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import zmq

from cerman import paths as cerman_paths
from cerman import protocol
from cerman.config import POOL_CAPACITY_MAX
from cerman.errors import CermanError, LeaseNotFound, PoolError, RequestError
from cerman.process import configure_logging, stop_on_signals
from workers import namespaces
from workers.builder_client import BuilderProcess
from workers.journal import Journal
from workers.pool import Namespace, Pool, new_pin_name, pin_generation
from workers.sources.model import PreparedCheckpoint

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL = 1.0
# A get that finds its pool empty waits this long for a build, less than the router's
# deadline for get (20 s) so the client sees this error rather than a timeout.
GET_WAIT_MAX = 15.0
PREPARE_RETRY_DELAY = 30.0
# How often bundles kept for processes still in their namespace are checked.
SWEEP_INTERVAL = 5.0
# File in a returned bundle whose namespace still has processes: the namespace's inode.
RELEASED_MARKER = "released-namespace"
MAX_BUILDS_IN_FLIGHT = 4
# A request is dropped when less than this remains before its deadline, so that the
# reply still reaches the router in time.
DEADLINE_MARGIN = 0.5
NS_TYPES = ("ipc", "uts", "mnt")


class Worker:
    def __init__(self, name, paths):
        self.name = name
        self.paths = paths
        self.ns_dir = paths.ns_dir(name)
        self.bundle_dir = paths.state_dir / "bundles" / name
        self.journal = Journal(paths.state_dir / "journal" / name)
        self.builder = BuilderProcess()
        self.pools = {}
        self.capacities = {}
        self.prepared = None
        self.generation = None
        self.state = "starting"
        self.error = None
        self.running = True
        self.waiters = []
        self.builds = {}
        self.preparer = None
        self.preparer_keeps = False
        self.config_digest = None
        self.prepare_retry_at = 0.0
        self.context = None
        self.socket = None
        self.poller = None

    # -- start-up ---------------------------------------------------------------

    def start(self):
        self.builder.start()
        for ns_type in NS_TYPES:
            (self.ns_dir / ns_type).mkdir(parents=True, exist_ok=True)
        namespaces.make_private_mount(self.ns_dir)
        self.journal.load()

        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.IDENTITY, self.name.encode())
        self.socket.setsockopt(zmq.LINGER, 0)
        # Queue nothing while the router is down: a blocked send would stop the loop,
        # and with it the handling of SIGTERM that releases the pins.
        self.socket.setsockopt(zmq.IMMEDIATE, 1)
        self.socket.setsockopt(zmq.SNDHWM, 100)
        self.socket.connect(self.paths.worker_endpoint)
        self.poller = zmq.Poller()
        self.poller.register(self.socket, zmq.POLLIN)
        self.poller.register(self.builder.fileno(), zmq.POLLIN)
        self.state = "preparing"
        self._start_prepare()
        log.info("worker of checkpoint %r started (pid %d)", self.name, os.getpid())

    def _start_prepare(self):
        command = [sys.executable, "-m", "workers.prepare", self.name]
        self.preparer_keeps = self._preparation_in_use()
        if self.preparer_keeps:
            command.append("--keep")
        self.preparer = subprocess.Popen(command, stdout=subprocess.PIPE,
                                         env={**os.environ, **self.paths.as_env()})
        self.poller.register(self.preparer.stdout.fileno(), zmq.POLLIN)

    def _replacing_preparation(self, request):
        """Return whether a running preparation may replace the files this request uses."""
        if self.preparer is None or self.preparer_keeps:
            return False
        return request["op"] == "checkpoint-get" or request.get("type") == "mnt"

    def _preparation_in_use(self):
        """Return whether replacing the prepared files would pull them from under a user.

        Leased mount namespaces use its layers as overlay lower dirs, and ``checkpoint
        get`` hands out its images directory.
        """
        mnt_leases = any(entry["type"] == "mnt" for entry in self.journal.leases.values())
        return mnt_leases or self.journal.checkpoint_refs > 0

    def _finish_prepare(self):
        self.poller.unregister(self.preparer.stdout.fileno())
        output = self.preparer.stdout.read()
        self.preparer.wait()
        self.preparer = None
        try:
            result = json.loads(output)
        except ValueError:
            result = {"ok": False, "error": {"message": "preparation exited without a result; "
                                                        "see the worker's log"}}
        if self.state == "ready":
            self._apply_refresh(result)
            return
        if not result.get("ok"):
            self.state = "failed"
            self.error = result["error"]["message"]
            self.prepare_retry_at = time.monotonic() + PREPARE_RETRY_DELAY
            log.error("checkpoint %r: preparation failed (retry in %.0f s): %s",
                      self.name, PREPARE_RETRY_DELAY, self.error)
            return

        self.prepared = PreparedCheckpoint.from_dict(result["prepared"])
        self.generation = result["generation"]
        try:
            self._load_pools(result["pools"])
        except CermanError as error:
            # The config file changed or broke since the router started this worker.
            self.state = "failed"
            self.error = str(error)
            self.prepare_retry_at = time.monotonic() + PREPARE_RETRY_DELAY
            log.error("checkpoint %r: cannot load pools: %s", self.name, error)
            return
        self._adopt()
        self.state = "ready"
        self.error = None
        log.info("checkpoint %r prepared in %s (generation %s)",
                 self.name, self.prepared.images_dir, self.generation)

    def _apply_refresh(self, result):
        """Take a new preparation of a running checkpoint and re-enable its pools."""
        if not result.get("ok"):
            self.error = (f"re-checking the source failed: {result['error']['message']}; "
                          "still serving the earlier preparation")
            log.error("checkpoint %r: %s", self.name, self.error)
            return
        self.error = None

        generation = result["generation"]
        if generation != self.generation:
            log.info("checkpoint %r: source changed (generation %s to %s); rebuilding free "
                     "namespaces", self.name, self.generation, generation)
            self.prepared = PreparedCheckpoint.from_dict(result["prepared"])
            self.generation = generation
            for pool in self.pools.values():
                while pool.free:
                    self._destroy(pool.free.pop())

        for ns_type, pool in self.pools.items():
            pool.reset_errors()
            pool.disabled = result["pools"].get(ns_type)
            if pool.disabled:
                log.warning("checkpoint %r: no %s pool: %s", self.name, ns_type, pool.disabled)

    def _load_pools(self, availability):
        from workers.prepare import find_config

        config = find_config(self.paths, self.name)
        self.config_digest = hashlib.sha256(config.file.read_bytes()).hexdigest()
        for ns_type, capacity in config.pools.items():
            pool = Pool(self.name, ns_type, self.capacities.get(ns_type, capacity))
            pool.disabled = availability.get(ns_type)
            if pool.disabled:
                log.warning("checkpoint %r: no %s pool: %s", self.name, ns_type, pool.disabled)
            self.pools[ns_type] = pool

    def _adopt(self):
        """Take over the pins of an earlier run: leased stay leased, the rest is free or dropped."""
        # Compared as real paths: the run directory may be named through a symlink
        # (/var/run and /run) differently from one run to the next.
        leased = {os.path.realpath(pin) for pin in self.journal.leased_pins()}
        for lease_id, entry in list(self.journal.leases.items()):
            if not namespaces.is_pinned(entry["pin"]):
                log.warning("checkpoint %r: lease %s lost its pin %s; dropping it",
                            self.name, lease_id, entry["pin"])
                self.journal.remove_lease(lease_id)
            elif entry["type"] in self.pools:
                self.pools[entry["type"]].leased += 1

        kept = set()
        for ns_type in NS_TYPES:
            for pin in sorted((self.ns_dir / ns_type).iterdir()):
                if os.path.realpath(pin) in leased:
                    kept.add(pin.name)
                    continue
                namespace = self._namespace_for(ns_type, pin)
                pool = self.pools.get(ns_type)
                usable = (pool is not None and not pool.disabled
                          and pin_generation(pin.name) == self.generation
                          and namespaces.is_pinned(pin) and len(pool.free) < pool.capacity)
                if usable:
                    pool.free.append(namespace)
                    kept.add(pin.name)
                    log.info("checkpoint %r: adopted free %s namespace %s", self.name, ns_type, pin)
                else:
                    self._destroy(namespace)
        self._remove_orphan_bundles(kept)

    def _namespace_for(self, ns_type, pin):
        if ns_type != "mnt":
            return Namespace(ns_type, str(pin))
        bundle = self.bundle_dir / pin.name
        return Namespace(ns_type, str(pin), str(bundle), str(bundle / "rootfs"))

    def _remove_orphan_bundles(self, kept):
        if not self.bundle_dir.is_dir():
            return
        for bundle in self.bundle_dir.iterdir():
            if (bundle / RELEASED_MARKER).exists():
                continue  # returned but still in use: _sweep_released removes it
            if bundle.name not in kept:
                log.info("checkpoint %r: removing orphan bundle %s", self.name, bundle)
                self._release_bundle(bundle)

    # -- main loop ----------------------------------------------------------------

    def run(self):
        next_heartbeat = 0.0
        next_sweep = 0.0
        while self.running:
            events = dict(self.poller.poll(timeout=100))
            now = time.monotonic()

            if self.preparer is not None and self.preparer.stdout.fileno() in events:
                self._finish_prepare()
            if self.builder.fileno() in events:
                for response in self.builder.read_responses():
                    self._on_build_done(response)
            if self.socket in events:
                self._drain_requests()
            if not self.builder.alive():
                raise RuntimeError("builder process exited; restarting the worker")

            if self.state == "failed" and self.preparer is None and now >= self.prepare_retry_at:
                self._start_prepare()
            self._refill(now)
            self._expire_waiters(now)
            if now >= next_sweep:
                self._sweep_released()
                next_sweep = now + SWEEP_INTERVAL
            if now >= next_heartbeat:
                self._send_heartbeat()
                next_heartbeat = now + HEARTBEAT_INTERVAL

    def _send_heartbeat(self):
        try:
            self.socket.send_multipart([protocol.HEARTBEAT, protocol.encode(self.status())],
                                       zmq.NOBLOCK)
        except zmq.Again:
            pass  # the router is down, and the next heartbeat after it returns carries the same

    def _drain_requests(self):
        while True:
            try:
                request_id, payload = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except ValueError:
                log.warning("dropping malformed request from the router")
                continue
            try:
                request = protocol.decode(payload)
                reply = self._handle(request_id, request)
            except CermanError as error:
                reply = protocol.failure(error)
            except Exception as error:  # one bad request must not kill the worker's pools
                log.exception("checkpoint %r: request %r failed", self.name, payload[:200])
                reply = protocol.failure(error)
            if reply is not None:
                self._send(request_id, reply)

    def _send(self, request_id, reply):
        try:
            self.socket.send_multipart([request_id, protocol.encode(reply)], zmq.NOBLOCK)
        except zmq.Again:
            # The router is gone; it treats the missing reply as a timeout.
            log.warning("checkpoint %r: reply %s dropped, the router is not connected",
                        self.name, request_id.decode(errors="replace"))

    def _handle(self, request_id, request):
        op = request.get("op")
        if op == "status":
            return protocol.ok(self.status())
        deadline = request.get("deadline")
        if deadline is not None and time.time() > deadline - DEADLINE_MARGIN:
            # The router has already reported a timeout to the client, so acting now
            # would, for a get, lease a namespace that no client receives.
            log.warning("checkpoint %r: dropping %s that arrived after its deadline",
                        self.name, op)
            raise RequestError(f"{op!r} reached the worker after its deadline; retry")

        if op == "refresh":
            return protocol.ok(self._refresh())
        # Returning needs only the journal, so it works whatever state the worker is in.
        if op == "put":
            return protocol.ok(self._put(request.get("lease")))
        if op == "checkpoint-put":
            return protocol.ok(self._checkpoint_ref(-1))

        if self.state != "ready":
            raise PoolError(f"checkpoint {self.name!r} is {self.state}"
                            + (f": {self.error}" if self.error else "; retry shortly"))
        if op in ("checkpoint-get", "get") and self._replacing_preparation(request):
            raise PoolError(f"checkpoint {self.name!r}: its source is being prepared again, "
                            "which may replace the files this request would use; retry in a "
                            "few seconds")

        if op == "get":
            return self._get(request_id, request.get("type"), deadline)
        if op == "update":
            return protocol.ok(self._update(request.get("capacity"), request.get("type")))
        if op == "checkpoint-get":
            return protocol.ok(self._checkpoint_ref(+1))
        raise RequestError(f"op {op!r} is not handled by workers")

    # -- requests -------------------------------------------------------------------

    def _pool(self, ns_type):
        pool = self.pools.get(ns_type)
        if pool is None:
            if ns_type not in NS_TYPES:
                raise RequestError(f"unknown namespace type {ns_type!r}; use ipc, uts or mnt")
            raise PoolError(f"checkpoint {self.name!r} has no {ns_type} pool; add pools.{ns_type} "
                            "to its config and run 'cerman ctl reload'")
        if pool.disabled:
            raise PoolError(f"checkpoint {self.name!r}: {ns_type} pool is disabled: {pool.disabled}")
        return pool

    def _refresh(self):
        if self.preparer is not None:
            return {"checkpoint": self.name, "refresh": "already preparing"}
        self._start_prepare()
        return {"checkpoint": self.name, "refresh": "started"}

    def _get(self, request_id, ns_type, deadline=None):
        pool = self._pool(ns_type)
        namespace = pool.take()
        if namespace is not None:
            return protocol.ok(self._lease(pool, namespace))
        if pool.capacity == 0 and pool.building == 0:
            raise PoolError(f"checkpoint {self.name!r}: {ns_type} pool has capacity 0; raise it with "
                            f"'cerman ctl update {self.name} --type {ns_type} --capacity N'")
        # Reply once a build finishes; make sure at least one is under way.
        wait = GET_WAIT_MAX
        if deadline is not None:
            wait = min(wait, deadline - DEADLINE_MARGIN - time.time())
        self.waiters.append((request_id, ns_type, time.monotonic() + wait))
        if pool.building == 0:
            self._submit_build(pool)
        return None

    def _lease(self, pool, namespace):
        lease_id = protocol.new_lease_id(self.name, pool.ns_type)
        entry = {**namespace.as_dict(), "leased_at": time.time()}
        # Journal first: a crash after this line leaves the lease held, never re-issued.
        try:
            self.journal.add_lease(lease_id, entry)
        except OSError as error:
            pool.free.appendleft(namespace)
            log.error("checkpoint %r: cannot record lease %s in %s: %s", self.name, lease_id,
                      self.journal.lease_dir, error)
            raise PoolError(f"checkpoint {self.name!r}: cannot record the lease in "
                            f"{self.journal.lease_dir} ({error.strerror}); free space or fix the "
                            "state directory and retry") from error
        pool.leased += 1
        log.info("checkpoint %r: lease %s of %s namespace %s", self.name, lease_id,
                 pool.ns_type, namespace.pin)
        result = {"lease": lease_id, "checkpoint": self.name, "type": pool.ns_type,
                  "path": namespace.pin}
        if namespace.bundle:
            result["bundle"] = namespace.bundle
            result["rootfs"] = namespace.rootfs
        return result

    def _put(self, lease_id):
        entry = self.journal.leases.get(lease_id)
        if entry is None:
            raise LeaseNotFound(f"lease {lease_id!r} is not held by checkpoint {self.name!r}; "
                                "it was already returned or never issued")
        # Pin first, journal second: a crash in between leaves a journal entry whose pin
        # is gone, which adoption drops, never a pinned namespace that looks free.
        self._destroy(Namespace.from_dict(entry))
        self.journal.remove_lease(lease_id)
        pool = self.pools.get(entry["type"])
        if pool is not None:
            pool.leased = max(0, pool.leased - 1)
        log.info("checkpoint %r: lease %s returned", self.name, lease_id)
        return {"lease": lease_id, "released": True}

    def _update(self, capacity, ns_type):
        if (isinstance(capacity, bool) or not isinstance(capacity, int)
                or not 0 <= capacity <= POOL_CAPACITY_MAX):
            raise RequestError(f"capacity {capacity!r} is invalid; give an integer from 0 to "
                               f"{POOL_CAPACITY_MAX}")
        types = [ns_type] if ns_type else list(self.pools)
        for name in types:
            pool = self.pools.get(name)
            if pool is None:
                self._pool(name)
            pool.capacity = capacity
            self.capacities[name] = capacity
            if pool.disabled and pool.disabled == pool.last_error:
                # Disabled by a build error, not by the checkpoint's content: try again.
                pool.reset_errors()
            for namespace in pool.surplus():
                self._destroy(namespace)
            log.info("checkpoint %r: %s pool capacity set to %d", self.name, name, capacity)
        return {"checkpoint": self.name, "pools": {name: self.pools[name].status() for name in types}}

    def _checkpoint_ref(self, delta):
        if delta < 0 and self.journal.checkpoint_refs == 0:
            raise PoolError(f"checkpoint {self.name!r} has no references to return")
        try:
            self.journal.checkpoint_refs += delta
            self.journal.save()
        except OSError as error:
            self.journal.checkpoint_refs -= delta
            raise PoolError(f"checkpoint {self.name!r}: cannot record the reference in "
                            f"{self.journal.refs_path} ({error.strerror}); free space or fix "
                            "the state directory and retry") from error
        path = str(self.prepared.images_dir) if self.prepared else None
        return {"checkpoint": self.name, "path": path, "refs": self.journal.checkpoint_refs}

    # -- building ---------------------------------------------------------------------

    def _refill(self, now):
        if self.state != "ready":
            return
        for pool in self.pools.values():
            for _ in range(pool.deficit(now)):
                if len(self.builds) >= MAX_BUILDS_IN_FLIGHT:
                    return
                self._submit_build(pool)

    def _submit_build(self, pool):
        pin = self.ns_dir / pool.ns_type / new_pin_name(self.generation)
        request = {"op": "build", "type": pool.ns_type, "pin": str(pin),
                   "images_dir": str(self.prepared.images_dir)}
        if pool.ns_type == "mnt":
            request["prepared"] = self.prepared.as_dict()
            request["bundle"] = str(self.bundle_dir / pin.name)
        build_id = self.builder.submit(request)
        self.builds[build_id] = (pool, self._namespace_for(pool.ns_type, pin))
        pool.building += 1

    def _on_build_done(self, response):
        pool, namespace = self.builds.pop(response.get("id"), (None, None))
        if pool is None:
            log.warning("checkpoint %r: unexpected builder response %r", self.name, response)
            return
        if not response.get("ok"):
            error = response.get("error") or {}
            pool.record_failure(error.get("code"), error.get("message", "build failed"),
                                time.monotonic())
            if namespace.bundle:
                self._release_bundle(Path(namespace.bundle))
            return
        if response.get("rootfs"):
            namespace.rootfs = response["rootfs"]
        pool.record_success(namespace)
        if pin_generation(Path(namespace.pin).name) != self.generation:
            # Built from a preparation that a refresh has since replaced.
            pool.free.remove(namespace)
            self._destroy(namespace)
            return
        self._serve_waiters(pool)
        for extra in pool.surplus():
            # The capacity was lowered while this build ran.
            self._destroy(extra)

    def _serve_waiters(self, pool):
        for waiter in list(self.waiters):
            request_id, ns_type, _ = waiter
            if ns_type != pool.ns_type:
                continue
            namespace = pool.take()
            if namespace is None:
                return
            self.waiters.remove(waiter)
            try:
                reply = protocol.ok(self._lease(pool, namespace))
            except CermanError as error:
                reply = protocol.failure(error)
            self._send(request_id, reply)

    def _expire_waiters(self, now):
        for waiter in list(self.waiters):
            request_id, ns_type, deadline = waiter
            pool = self.pools[ns_type]
            if now < deadline and not pool.disabled:
                continue
            self.waiters.remove(waiter)
            reason = pool.disabled or pool.last_error or "builds are still running"
            error = PoolError(f"checkpoint {self.name!r}: no {ns_type} namespace became ready in "
                              f"time ({reason}); raise the pool capacity or retry")
            self._send(request_id, protocol.failure(error))

    # -- release ----------------------------------------------------------------------

    def _destroy(self, namespace):
        pin = Path(namespace.pin)
        ns_inode = None
        if pin.exists():
            try:
                if namespaces.is_pinned(pin):
                    ns_inode = pin.stat().st_ino
                    namespaces.unpin(pin)
                else:
                    pin.unlink()
            except OSError as error:
                log.error("checkpoint %r: cannot release %s: %s", self.name, pin, error)
        if namespace.bundle:
            self._release_or_defer_bundle(Path(namespace.bundle), ns_inode)

    def _release_or_defer_bundle(self, bundle, ns_inode):
        """Remove a bundle, unless processes still live in its mount namespace.

        A restored container that joined the namespace keeps using the overlay's upper
        and work directories after ``put``, and removing them would break its root
        filesystem. Such a bundle stays where it is with a marker naming the namespace,
        and ``_sweep_released`` removes it once the last process has left.
        """
        if ns_inode is None or not mount_namespace_in_use(ns_inode):
            self._release_bundle(bundle)
            return
        (bundle / RELEASED_MARKER).write_text(f"{ns_inode}\n")
        log.info("checkpoint %r: bundle %s is still used by processes in its namespace; "
                 "removing it once they exit", self.name, bundle)

    def _sweep_released(self):
        if not self.bundle_dir.is_dir():
            return
        for bundle in self.bundle_dir.iterdir():
            marker = bundle / RELEASED_MARKER
            try:
                ns_inode = int(marker.read_text())
            except FileNotFoundError:
                continue
            except (OSError, ValueError):
                ns_inode = None
            if ns_inode is None or not mount_namespace_in_use(ns_inode):
                self._release_bundle(bundle)

    def _release_bundle(self, bundle):
        from workers.mnt_builder import release_bundle

        try:
            release_bundle(bundle)
        except (CermanError, OSError) as error:
            log.error("checkpoint %r: cannot remove bundle %s: %s", self.name, bundle, error)

    def shutdown(self):
        """Release every pin, leased ones included, and the pin directory's mount."""
        log.info("worker of checkpoint %r stopping; releasing its namespaces", self.name)
        if self.preparer is not None:
            self.preparer.kill()
            self.preparer.wait()
        self.builder.stop()
        for lease_id, entry in list(self.journal.leases.items()):
            self._destroy(Namespace.from_dict(entry))
            self.journal.remove_lease(lease_id)
        for ns_type in NS_TYPES:
            directory = self.ns_dir / ns_type
            if directory.is_dir():
                for pin in directory.iterdir():
                    self._destroy(self._namespace_for(ns_type, pin))
        if self.bundle_dir.is_dir():
            self._remove_orphan_bundles(set())
        namespaces.release_private_mount(self.ns_dir)
        for directory in [*(self.ns_dir / ns_type for ns_type in NS_TYPES), self.ns_dir]:
            try:
                directory.rmdir()
            except OSError as error:
                log.warning("checkpoint %r: leaving %s: %s", self.name, directory, error.strerror)
        if self.socket is not None:
            self.socket.close(linger=0)
            self.context.term()

    # -- status -----------------------------------------------------------------------

    def status(self):
        return {
            "checkpoint": self.name,
            "state": self.state,
            "pid": os.getpid(),
            "error": self.error,
            "images": str(self.prepared.images_dir) if self.prepared else None,
            "checkpoint_refs": self.journal.checkpoint_refs,
            "leases": len(self.journal.leases),
            "lease_list": self._lease_list(),
            "config_digest": self.config_digest,
            "pools": {name: pool.status() for name, pool in self.pools.items()},
        }

    def _lease_list(self):
        """Return the open leases, oldest first, so an operator can find and put stale ones."""
        leases = [{"lease": lease_id, "type": entry.get("type"), "path": entry.get("pin"),
                   "leased_at": entry.get("leased_at")}
                  for lease_id, entry in self.journal.leases.items()]
        return sorted(leases, key=lambda lease: (lease["leased_at"] or 0, lease["lease"]))


def mount_namespace_in_use(ns_inode):
    """Return whether any process is in the mount namespace with inode ``ns_inode``."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry.name}/ns/mnt").st_ino == ns_inode:
                return True
        except OSError:
            continue  # the process exited, or is a kernel thread
    return False


def run(name):
    """Entry point of the cerman-worker-NAME watcher; returns the exit code."""
    configure_logging(f"worker {name}")
    worker = Worker(name, cerman_paths.resolve())
    stop_on_signals(worker)
    worker.start()
    try:
        worker.run()
    finally:
        if not worker.running:
            worker.shutdown()
    return 0
