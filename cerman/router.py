"""The router: the one socket clients talk to.

It forwards each request to the worker of the checkpoint it names. When that worker
is missing, starting or slow, it replies with an error rather than leaving the client
waiting. It also keeps circus' worker watchers in line with the config directory, at
start and on ``reload``.
"""

import hashlib
import itertools
import logging
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from cerman import paths as cerman_paths
from cerman import protocol
from cerman.config import scan_config_dir
from cerman.errors import CermanError, ConfigError, RequestError, WorkerUnavailable
from cerman.process import configure_logging, stop_on_signals
from cerman.watchers import CircusError, WatcherControl, watcher_name

log = logging.getLogger(__name__)

# A worker that sent no heartbeat for this long is treated as gone.
HEARTBEAT_EXPIRY = 3.0
# Time a worker gets to reply. It is kept below the client's default timeout (30 s), so
# the client always sees the router's error rather than its own timeout.
REQUEST_DEADLINES = {"get": 20.0, "checkpoint-get": 20.0}
REQUEST_DEADLINE_DEFAULT = 10.0
STATUS_FANOUT_DEADLINE = 2.0
RECONCILE_RETRY_DELAY = 5.0
# The router replies this long before a client's own timeout expires.
CLIENT_TIMEOUT_MARGIN = 0.5
# How long the router remembers a timed-out request, to return a lease issued late.
LATE_REPLY_MEMORY = 300.0


@dataclass
class WorkerInfo:
    last_seen: float = 0.0
    status: dict = field(default_factory=dict)
    restarted_pid: int | None = None

    def alive(self, now):
        return now - self.last_seen < HEARTBEAT_EXPIRY


@dataclass
class Pending:
    """A client request waiting for one or more worker replies."""

    envelope: list
    deadline: float
    checkpoint: str | None
    op: str
    waiting: set = field(default_factory=set)
    replies: dict = field(default_factory=dict)


class Router:
    def __init__(self, paths, watcher_control=None):
        self.paths = paths
        self.context = zmq.Context()
        self.frontend = None
        self.backend = None
        self.watchers = watcher_control
        self.workers = {}
        self.pending = {}
        self.configs = {}
        self.config_errors = {}
        self.config_digests = {}
        self.running = True
        self.reconcile_at = None
        self.expired = {}
        # Ids are unique across router restarts, because a worker may still reply to a
        # request of the previous router process and that reply must not match a new one.
        self._id_prefix = secrets.token_hex(4)
        self._request_ids = itertools.count(1)

    # -- set-up ---------------------------------------------------------------

    def bind(self):
        self.paths.run_dir.mkdir(parents=True, exist_ok=True)
        self.frontend = self.context.socket(zmq.ROUTER)
        self.frontend.setsockopt(zmq.LINGER, 0)
        # Know when a client has gone, so a lease it would have received is returned.
        self.frontend.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.frontend.bind(self.paths.client_endpoint)

        self.backend = self.context.socket(zmq.ROUTER)
        self.backend.setsockopt(zmq.LINGER, 0)
        # Fail fast (EHOSTUNREACH) instead of silently dropping a request for a worker
        # that is not connected, and let a restarted worker take over its identity.
        self.backend.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.backend.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.backend.bind(self.paths.worker_endpoint)
        log.info("router listening on %s (workers on %s)",
                 self.paths.client_endpoint, self.paths.worker_endpoint)

    def close(self):
        for socket in (self.frontend, self.backend):
            if socket is not None:
                socket.close(linger=0)
        if self.watchers is not None:
            self.watchers.close()
        self.context.term()

    # -- config reconciliation --------------------------------------------------

    def reload(self):
        """Re-read the config directory, update the worker watchers, refresh the workers."""
        scan = scan_config_dir(self.paths.config_dir, keep=set(self.configs))
        digests = {name: _file_digest(config.file) for name, config in scan.configs.items()}
        for message in scan.errors.values():
            log.warning("invalid checkpoint config %s", message)
        changed = {name for name in scan.configs
                   if self.config_digests.get(name) not in (None, digests[name])}

        self.configs = scan.configs
        self.config_errors = scan.errors
        self.config_digests = digests
        log.info("config reloaded from %s: %d checkpoints, %d invalid files",
                 self.paths.config_dir, len(scan.configs), len(scan.errors))
        result = self.reconcile(changed)
        result["config_errors"] = _error_list(scan.errors)

        # Workers whose file did not change re-check their source: a repaired or
        # re-exported checkpoint is prepared again and its disabled pools re-enabled.
        for name in result["unchanged"]:
            if self._worker_alive(name):
                self._send_internal(name, {"op": "refresh", "checkpoint": name})
        return result

    def reconcile(self, restart=()):
        """Make the worker watchers match the configs; a failed step is retried later.

        circus compares watcher names ignoring case, so watchers are matched by the
        lowercased checkpoint name, and the name a watcher runs is read from its args.
        """
        result = {"added": [], "removed": [], "restarted": [], "unchanged": [], "errors": []}
        if self.watchers is None:
            return result
        self.reconcile_at = None
        try:
            existing = self.watchers.worker_watchers()
        except CircusError as error:
            self._reconcile_failed(result, error)
            return result

        wanted = {name.lower(): name for name in self.configs}
        steps = []
        for key, name in sorted(wanted.items()):
            if key not in existing:
                steps.append((name, "added", self.watchers.add))
            elif existing[key] != name:
                steps.append((name, "restarted", self.watchers.replace))
            elif name in restart:
                steps.append((name, "restarted", self.watchers.restart))
            else:
                result["unchanged"].append(name)
        for key in sorted(set(existing) - set(wanted)):
            steps.append((existing[key] or key, "removed", self.watchers.remove))

        for name, outcome, step in steps:
            try:
                step(name)
            except CircusError as error:
                self._reconcile_failed(result, error)
                continue
            result[outcome].append(name)
            if outcome != "added":
                self.workers.pop(name, None)
        return result

    def _reconcile_failed(self, result, error):
        log.error("reconciling worker watchers failed (retry in %.0f s): %s",
                  RECONCILE_RETRY_DELAY, error)
        result["errors"].append(str(error))
        self.reconcile_at = time.monotonic() + RECONCILE_RETRY_DELAY

    # -- main loop --------------------------------------------------------------

    def run(self):
        poller = zmq.Poller()
        poller.register(self.frontend, zmq.POLLIN)
        poller.register(self.backend, zmq.POLLIN)
        while self.running:
            events = dict(poller.poll(timeout=200))
            if self.backend in events:
                self._drain(self.backend, self._on_worker_message)
            if self.frontend in events:
                self._drain(self.frontend, self._on_client_message)
            now = time.monotonic()
            self._expire(now)
            if self.reconcile_at is not None and now >= self.reconcile_at:
                self.reconcile()
        log.info("router stopping")

    def _drain(self, socket, handler):
        while True:
            try:
                frames = socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            handler(frames)

    def _on_client_message(self, frames):
        envelope, payload = frames[:-1], frames[-1]
        try:
            request = protocol.decode(payload)
            checkpoint = protocol.request_checkpoint(request)
            self._dispatch(envelope, request, checkpoint)
        except CermanError as error:
            self._reply(envelope, protocol.failure(error))
        except Exception as error:  # a router crash would take every checkpoint down
            log.exception("request %r failed", payload[:200])
            self._reply(envelope, protocol.failure(error))

    def _dispatch(self, envelope, request, checkpoint):
        op = request["op"]
        if op == "reload":
            self._reply(envelope, protocol.ok(self._reload_result()))
            return
        if op == "status" and checkpoint is None:
            self._status_all(envelope)
            return

        self._require_configured(checkpoint)
        if op == "status" and not self._worker_alive(checkpoint):
            # A worker that is down cannot reply, so the router reports what it has.
            self._reply(envelope, protocol.ok(self._merge_status({})["checkpoints"][checkpoint]))
            return
        seconds = REQUEST_DEADLINES.get(op, REQUEST_DEADLINE_DEFAULT)
        client_timeout = request.get("timeout")
        if isinstance(client_timeout, (int, float)) and not isinstance(client_timeout, bool):
            # Reply before the client gives up, so a late lease is returned, not lost.
            seconds = max(0.1, min(seconds, client_timeout - CLIENT_TIMEOUT_MARGIN))
        request_id = self._forward(checkpoint, request, seconds)
        self.pending[request_id] = Pending(envelope, time.monotonic() + seconds, checkpoint, op,
                                           {checkpoint})

    def _reload_result(self):
        result = self.reload()
        if result["errors"]:
            raise RequestError("reload read the configs but could not update every worker "
                               f"watcher: {'; '.join(result['errors'])}; retrying in "
                               f"{RECONCILE_RETRY_DELAY:g} s")
        return result

    def _worker_alive(self, checkpoint):
        worker = self.workers.get(checkpoint)
        return worker is not None and worker.alive(time.monotonic())

    def _require_configured(self, checkpoint):
        if checkpoint in self.configs:
            return
        for file, message in self.config_errors.items():
            if Path(file).stem == checkpoint:
                raise ConfigError(file, "", f"is invalid, so checkpoint {checkpoint!r} has no "
                                  f"worker: {message}")
        raise RequestError(
            f"checkpoint {checkpoint!r} is not configured in {self.paths.config_dir}; "
            "add a config file for it and run 'cerman ctl reload'")

    def _forward(self, checkpoint, request, seconds=REQUEST_DEADLINE_DEFAULT):
        """Send ``request`` to the checkpoint's worker; return the request id.

        The request carries its deadline as wall-clock time, so a worker that was
        stopped or busy drops it instead of acting on it after the client gave up.
        """
        request = {**request, "deadline": time.time() + seconds}
        if not self._worker_alive(checkpoint):
            raise WorkerUnavailable(
                f"worker of checkpoint {checkpoint!r} is not running (starting or restarting; "
                f"circus watcher {watcher_name(checkpoint)}); retry in a few seconds")
        request_id = self._new_request_id()
        try:
            self.backend.send_multipart([checkpoint.encode(), request_id, protocol.encode(request)],
                                        zmq.NOBLOCK)
        except zmq.ZMQError as error:
            raise WorkerUnavailable(
                f"worker of checkpoint {checkpoint!r} is not connected ({error.strerror}); "
                "retry in a few seconds") from error
        return request_id

    def _check_config_digest(self, checkpoint, worker):
        """Restart a worker that runs an older version of its config file.

        This happens when the file changed while the router was down: the router's
        own record starts from the file as it is now. One restart per worker process.
        """
        if self.watchers is None:
            return
        loaded = worker.status.get("config_digest")
        current = self.config_digests.get(checkpoint)
        pid = worker.status.get("pid")
        if not loaded or not current or loaded == current or worker.restarted_pid == pid:
            return
        worker.restarted_pid = pid
        log.info("worker of checkpoint %r runs an older config file; restarting it", checkpoint)
        try:
            self.watchers.restart(checkpoint)
        except CircusError as error:
            log.error("restarting the worker of checkpoint %r failed: %s", checkpoint, error)

    def _new_request_id(self):
        return f"{self._id_prefix}-{next(self._request_ids)}".encode()

    def _on_worker_message(self, frames):
        try:
            self._handle_worker_message(frames)
        except Exception:  # one bad worker message must not take the router down
            log.exception("dropping a worker message that could not be handled: %r",
                          [frame[:200] for frame in frames])

    def _handle_worker_message(self, frames):
        if len(frames) != 3:
            log.warning("dropping malformed worker message with %d frames", len(frames))
            return
        identity, tag, payload = frames
        checkpoint = identity.decode(errors="replace")
        if tag == protocol.HEARTBEAT:
            worker = self.workers.setdefault(checkpoint, WorkerInfo())
            if not worker.alive(time.monotonic()):
                log.info("worker of checkpoint %r connected", checkpoint)
            worker.last_seen = time.monotonic()
            worker.status = protocol.decode(payload)
            self._check_config_digest(checkpoint, worker)
            return

        pending = self.pending.get(tag)
        if pending is None or checkpoint not in pending.waiting:
            self._on_late_reply(checkpoint, tag, protocol.decode(payload))
            return
        if pending.envelope is None:
            del self.pending[tag]
            reply = protocol.decode(payload)
            if not reply.get("ok"):
                log.warning("worker of checkpoint %r: %s failed: %s", checkpoint, pending.op,
                            reply.get("error", {}).get("message"))
            return
        pending.replies[checkpoint] = protocol.decode(payload)
        pending.waiting.discard(checkpoint)
        if pending.waiting:
            return
        del self.pending[tag]
        if pending.op == "status" and pending.checkpoint is None:
            self._reply(pending.envelope, protocol.ok(self._merge_status(pending.replies)))
        else:
            reply = pending.replies[checkpoint]
            if not self._reply(pending.envelope, reply):
                self._return_lease(checkpoint, reply, "its client went away")

    def _send_internal(self, checkpoint, request):
        """Send a request of the router's own; its reply is only logged."""
        try:
            request_id = self._forward(checkpoint, request)
        except WorkerUnavailable as error:
            log.warning("cannot send %s to checkpoint %r: %s", request["op"], checkpoint, error)
            return
        deadline = time.monotonic() + REQUEST_DEADLINE_DEFAULT
        self.pending[request_id] = Pending(None, deadline, checkpoint, request["op"], {checkpoint})

    def _on_late_reply(self, checkpoint, request_id, reply):
        """Handle a reply that came after the router reported the request as timed out.

        A lease issued that late reached no client, so it is returned at once instead of
        staying leased until the worker stops.
        """
        entry = self.expired.pop(request_id, None)
        op = entry[0] if entry else None
        if op in ("get", None) and self._return_lease(checkpoint, reply, "it came too late"):
            return
        log.info("late reply %s from worker %r dropped", request_id.decode(), checkpoint)

    def _return_lease(self, checkpoint, reply, reason):
        """Return the lease in a get reply that reached no client; False if there is none."""
        result = reply.get("result") if reply.get("ok") else None
        if not isinstance(result, dict) or not result.get("lease") or not result.get("path"):
            return False
        log.warning("lease %s of checkpoint %r reached no client (%s); returning it",
                    result["lease"], checkpoint, reason)
        self._send_internal(checkpoint, {"op": "put", "lease": result["lease"]})
        return True

    def _expire(self, now):
        for request_id, (_, forget_at) in list(self.expired.items()):
            if now > forget_at:
                del self.expired[request_id]
        for request_id, pending in list(self.pending.items()):
            if now < pending.deadline:
                continue
            del self.pending[request_id]
            if pending.envelope is None:
                log.warning("worker of checkpoint %r did not reply to the router's %s in time",
                            pending.checkpoint, pending.op)
                continue
            if pending.op == "status" and pending.checkpoint is None:
                self._reply(pending.envelope, protocol.ok(self._merge_status(pending.replies)))
                continue
            log.warning("worker of checkpoint %r did not reply to %s in time",
                        pending.checkpoint, pending.op)
            self.expired[request_id] = (pending.op, now + LATE_REPLY_MEMORY)
            error = WorkerUnavailable(
                f"worker of checkpoint {pending.checkpoint!r} did not reply to {pending.op!r} in "
                "time; it may be busy or restarting; check 'cerman ctl status' and retry")
            self._reply(pending.envelope, protocol.failure(error))

    def _reply(self, envelope, message):
        """Send a reply to a client; return False when the client is gone."""
        try:
            self.frontend.send_multipart(envelope + [protocol.encode(message)], zmq.NOBLOCK)
        except zmq.ZMQError as error:
            log.info("client went away before its reply: %s", error)
            return False
        return True

    # -- status -----------------------------------------------------------------

    def _status_all(self, envelope):
        now = time.monotonic()
        waiting = set()
        request_id = self._new_request_id()
        for name in self.configs:
            worker = self.workers.get(name)
            if worker is None or not worker.alive(now):
                continue
            try:
                self.backend.send_multipart(
                    [name.encode(), request_id, protocol.encode({"op": "status", "checkpoint": name})],
                    zmq.NOBLOCK)
            except zmq.ZMQError:
                continue
            waiting.add(name)
        pending = Pending(envelope, now + STATUS_FANOUT_DEADLINE, None, "status", waiting)
        if not waiting:
            self._reply(envelope, protocol.ok(self._merge_status({})))
            return
        self.pending[request_id] = pending

    def _merge_status(self, replies):
        now = time.monotonic()
        watcher_states = {}
        if self.watchers is not None:
            try:
                watcher_states = self.watchers.statuses()
            except CircusError as error:
                log.warning("cannot read watcher states: %s", error)

        checkpoints = {}
        for name in sorted(self.configs):
            reply = replies.get(name)
            worker = self.workers.get(name)
            if reply is not None and reply.get("ok"):
                entry = dict(reply["result"])
            elif worker is not None and worker.alive(now):
                entry = dict(worker.status)
                entry["note"] = "worker did not reply in time; showing its last heartbeat"
            elif worker is None:
                entry = {"state": "starting", "pid": None, "pools": {}, "error": None}
            else:
                silent = now - worker.last_seen
                entry = {"state": "not responding", "pid": worker.status.get("pid"),
                         "pools": worker.status.get("pools", {}),
                         "error": f"no heartbeat from the worker for {silent:.0f} s; circus "
                                  "restarts it if it exited"}
            entry["watcher"] = watcher_states.get(name.lower(), "unknown")
            if entry["watcher"] == "stopped" and entry["state"] != "ready":
                entry["state"] = "stopped"
                entry["error"] = (f"circus watcher {watcher_name(name)} is stopped; start it "
                                  f"with 'circusctl start {watcher_name(name)}'")
            checkpoints[name] = entry
        return {"checkpoints": checkpoints, "config_dir": str(self.paths.config_dir),
                "config_errors": _error_list(self.config_errors)}


def _error_list(errors):
    return [{"file": file, "message": message} for file, message in sorted(errors.items())]


def _file_digest(path):
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def run():
    """Entry point of the cerman-router watcher; returns the exit code."""
    configure_logging("router")
    paths = cerman_paths.resolve()
    watchers = WatcherControl(paths.circus_endpoint, paths)
    router = Router(paths, watchers)
    stop_on_signals(router)

    router.bind()
    try:
        router.reload()
        router.run()
    finally:
        router.close()
    return 0
