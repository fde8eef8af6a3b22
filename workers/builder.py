"""Builder process: forks one short-lived child per namespace it builds.

A worker runs ZeroMQ I/O threads, and fork() in a threaded process can deadlock the
child on a lock another thread held, so the worker never forks. It starts this
module (``python -m workers.builder``) with subprocess, and this process stays
single-threaded and forks the children.

Protocol: one JSON request per line on stdin, one JSON response per line on stdout,
matched by ``id``; responses may come out of order. Requests::

    {"id": 1, "op": "build", "type": "ipc" | "uts", "images_dir": DIR, "pin": PATH}
    {"id": 2, "op": "build", "type": "mnt", "prepared": {...}, "bundle": DIR, "pin": PATH}
    {"id": 3, "op": "reset", "type": "uts", "images_dir": DIR, "pin": PATH}
    {"id": 4, "op": "ping"}

Any request may add ``"timeout"`` in seconds. Responses::

    {"id": 1, "ok": true, "op": "build", "type": "ipc", "pin": PATH, "pid": CHILD,
     "seconds": 0.004}                        (mnt adds "rootfs")
    {"id": 1, "ok": false, "error": {"code": "namespace", "message": "...", "errno": 1}}

``code`` is the ``CermanError.code`` of the failure, or "error" for anything else.

A build child unshares the namespace, populates it and pins ``/proc/self/ns/TYPE``
on PATH. A mount namespace cannot be pinned from inside itself, because the bind mount would
land in the new namespace. So the mnt child reports "ready" and waits while this
process pins ``/proc/CHILD/ns/mnt``, and closing the child's go pipe lets it exit. The
pin's directory must already be a private mount (``namespaces.make_private_mount``).

After a failure, timeout or crash nothing is left at PATH: a build request is
rejected when PATH exists, so anything there afterwards belongs to the failed build.
The process exits when stdin closes (after its children finish) and, through
PR_SET_PDEATHSIG, when the process that started it dies. Logs go to stderr.
"""

import argparse
import collections
import ctypes
import errno
import json
import logging
import os
import select
import selectors
import signal
import sys
import time
from pathlib import Path

from cerman.errors import CermanError, ImageError, NamespaceError, PoolError, RequestError
from workers import namespaces

log = logging.getLogger("workers.builder")

TIMEOUT_DEFAULT = 60.0
MAX_CHILDREN_DEFAULT = 4
PR_SET_PDEATHSIG = 1
NSFS_TYPES = {"ipc": namespaces.CLONE_NEWIPC, "uts": namespaces.CLONE_NEWUTS,
              "mnt": namespaces.CLONE_NEWNS}

_libc = ctypes.CDLL(None, use_errno=True)


def set_parent_death_signal(signum):
    """Have the kernel send ``signum`` to this process when its parent exits."""
    if _libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
        raise NamespaceError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")


def error_dict(error):
    """Return the wire form of an exception: code, message and errno if it has one."""
    code = error.code if isinstance(error, CermanError) else "error"
    result = {"code": code, "message": str(error) or type(error).__name__,
              "exception": type(error).__name__}
    if isinstance(error, OSError) and error.errno:
        result["errno"] = error.errno
    return result


class ImageCache:
    """Parsed IPC and UTS images by images directory.

    An entry is reused while the directory keeps its inode and mtime, so a
    checkpoint extracted again (a new directory renamed into place) is read again.
    """

    def __init__(self):
        self._entries = {}

    def get(self, images_dir, kind):
        from workers.criu import images

        images_dir = Path(images_dir)
        try:
            status = images_dir.stat()
        except FileNotFoundError:
            raise ImageError(images_dir, "images directory not found; prepare the "
                             "checkpoint again") from None
        stamp = (status.st_ino, status.st_mtime_ns)
        key = (str(images_dir), kind)
        cached = self._entries.get(key)
        if cached and cached[0] == stamp:
            return cached[1]

        reader = images.read_ipc_namespace if kind == "ipc" else images.read_uts_namespace
        image = reader(images_dir)
        self._entries[key] = (stamp, image)
        return image


class Child:
    """One forked child working on one request."""

    def __init__(self, request, pid, result_fd, go_fd, deadline):
        self.request = request
        self.pid = pid
        self.result_fd = result_fd
        self.go_fd = go_fd
        self.deadline = deadline
        self.started = time.monotonic()
        self.buffer = b""
        self.result = None


class Builder:
    def __init__(self, timeout=TIMEOUT_DEFAULT, max_children=MAX_CHILDREN_DEFAULT):
        self.timeout = timeout
        self.max_children = max_children
        self.images = ImageCache()
        self.children = {}
        self.waiting = collections.deque()
        self.selector = selectors.DefaultSelector()
        self.stdin_buffer = b""
        self.stdin_open = True

    def run(self):
        """Serve requests until stdin closes and every child has finished."""
        os.set_blocking(0, False)
        self.selector.register(0, selectors.EVENT_READ, None)
        log.info("builder %d started (timeout %.1f s, max %d children)", os.getpid(),
                 self.timeout, self.max_children)

        while self.stdin_open or self.children or self.waiting:
            self._start_waiting()
            # Deadlines come first: a child past its deadline is killed even when its
            # result is already in the pipe, so a timeout of 0 always times out.
            self._kill_expired()
            for key, _ in self.selector.select(self._select_timeout()):
                if key.data is None:
                    self._read_stdin()
                else:
                    self._read_child(key.data)
        log.info("builder %d stopped: stdin closed", os.getpid())

    def _select_timeout(self):
        if not self.children:
            return None
        nearest = min(child.deadline for child in self.children.values())
        return max(0.0, nearest - time.monotonic())

    def _read_stdin(self):
        try:
            data = os.read(0, 65536)
        except BlockingIOError:
            return
        if not data:
            self.stdin_open = False
            self.selector.unregister(0)
            return

        self.stdin_buffer += data
        *lines, self.stdin_buffer = self.stdin_buffer.split(b"\n")
        for line in lines:
            if line.strip():
                self._accept(line)

    def _accept(self, line):
        try:
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ValueError("a request is a JSON object")
        except ValueError as error:
            log.warning("invalid request line %r: %s", line[:200], error)
            self._respond({"id": None, "ok": False, "error": error_dict(
                RequestError(f"invalid request line: {error}"))})
            return

        try:
            self._validate(request)
        except Exception as error:
            self._fail(request, error)
            return
        if request["op"] == "ping":
            self._respond({"id": request.get("id"), "ok": True, "op": "ping",
                           "pid": os.getpid()})
            return
        self.waiting.append(request)

    def _validate(self, request):
        op, kind = request.get("op"), request.get("type")
        if op == "ping":
            return
        if op not in ("build", "reset"):
            raise RequestError(f"unknown op {op!r}; expected build, reset or ping")
        if kind not in NSFS_TYPES or (op == "reset" and kind != "uts"):
            raise RequestError(f"op {op!r} does not support type {kind!r}; build takes "
                               "ipc, uts or mnt, reset takes uts")
        required = ("prepared", "bundle", "pin") if kind == "mnt" else ("images_dir", "pin")
        missing = [name for name in required if not request.get(name)]
        if missing:
            raise RequestError(f"{op} {kind} request lacks {', '.join(missing)}")

        pin = request["pin"]
        if op == "build" and os.path.lexists(pin):
            raise NamespaceError(errno.EEXIST, f"build {kind} namespace: pin already exists; "
                                 "unpin it or choose a new path", pin)
        if op == "reset" and not namespaces.is_pinned(pin, kind):
            raise NamespaceError(errno.EINVAL, f"reset {kind} namespace: not a pinned "
                                 f"{kind} namespace", pin)

    def _start_waiting(self):
        while self.waiting and len(self.children) < self.max_children:
            request = self.waiting.popleft()
            try:
                work = self._prepare_work(request)
                self._fork(request, work)
            except Exception as error:
                self._fail(request, error)

    def _prepare_work(self, request):
        """Return the child's task; images are parsed here so the cache serves every child."""
        op, kind = request["op"], request["type"]
        if kind == "mnt":
            return lambda go_fd, result_fd: _build_mnt(request, go_fd, result_fd)

        image = self.images.get(request["images_dir"], kind)
        if image is None:
            raise PoolError(f"{request['images_dir']} has no {kind} namespace images (the "
                            f"container shared the host's {kind} namespace), so there is "
                            f"no {kind} pool")
        if kind == "ipc":
            from workers.ipc_builder import check_ipc_image

            check_ipc_image(image)
        if op == "reset":
            return lambda go_fd, result_fd: _reset_uts(image, request["pin"])
        return lambda go_fd, result_fd: _build(kind, image, request["pin"])

    def _fork(self, request, work):
        result_read, result_write = os.pipe()
        go_read, go_write = os.pipe() if request["type"] == "mnt" else (None, None)
        timeout = float(request.get("timeout", self.timeout))

        pid = os.fork()
        if pid == 0:
            os.close(result_read)
            if go_write is not None:
                os.close(go_write)
            self._run_child(work, result_write, go_read)

        os.close(result_write)
        if go_read is not None:
            os.close(go_read)
        child = Child(request, pid, result_read, go_write, time.monotonic() + timeout)
        self.children[result_read] = child
        self.selector.register(result_read, selectors.EVENT_READ, child)
        log.debug("request %s: child %d started %s %s at %s", request.get("id"), pid,
                  request["op"], request["type"], request.get("pin"))

    def _run_child(self, work, result_fd, go_fd):
        """Run ``work`` in the forked child and exit. Never returns."""
        status = 1
        try:
            set_parent_death_signal(signal.SIGKILL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            # stdout is the protocol pipe: nothing the child prints may reach it.
            devnull = os.open(os.devnull, os.O_RDWR)
            os.dup2(devnull, 0)
            os.dup2(devnull, 1)
            for fd in [self.selector.fileno(), *self.children]:
                os.close(fd)
            for child in self.children.values():
                if child.go_fd is not None:
                    os.close(child.go_fd)

            result = work(go_fd, result_fd) or {}
            _send(result_fd, {"ok": True, **result})
            status = 0
        except BaseException as error:
            try:
                _send(result_fd, {"ok": False, "error": error_dict(error)})
            except BaseException:
                pass
        finally:
            os._exit(status)

    def _read_child(self, child):
        try:
            data = os.read(child.result_fd, 65536)
        except OSError as error:
            data = b""
            log.error("reading child %d failed: %s", child.pid, error)
        if data:
            child.buffer += data
            *lines, child.buffer = child.buffer.split(b"\n")
            for line in lines:
                self._child_message(child, json.loads(line))
            return

        self._forget(child)
        status = _reap(child.pid)
        if child.result is None:
            message = (f"builder child {child.pid} for {child.request['op']} "
                       f"{child.request['type']} exited with {_describe_status(status)} "
                       "before it reported a result")
            self._fail(child.request, CermanError(message), child)
        elif child.result["ok"]:
            self._succeed(child)
        else:
            self._fail(child.request, None, child, child.result["error"])

    def _child_message(self, child, message):
        if message.get("stage") == "ready":
            # A mount namespace child waits here until its parent has pinned it.
            try:
                namespaces.pin(f"/proc/{child.pid}/ns/mnt", child.request["pin"])
                child.result = message
            except Exception as error:
                child.result = {"ok": False, "error": error_dict(error)}
            os.close(child.go_fd)
            child.go_fd = None
            return
        # The final message of a mnt child must not replace the ready one (rootfs) or
        # a failure to pin it.
        if child.result is None or not message.get("ok"):
            child.result = message

    def _kill_expired(self):
        now = time.monotonic()
        for child in list(self.children.values()):
            if child.deadline > now:
                continue
            os.kill(child.pid, signal.SIGKILL)
            self._forget(child)
            _reap(child.pid)
            seconds = now - child.started
            error = NamespaceError(errno.ETIMEDOUT, f"{child.request['op']} "
                                   f"{child.request['type']} namespace by child {child.pid} "
                                   f"(killed after {seconds:.1f} s)",
                                   child.request.get("pin", ""))
            self._fail(child.request, error, child)

    def _forget(self, child):
        self.selector.unregister(child.result_fd)
        del self.children[child.result_fd]
        os.close(child.result_fd)
        if child.go_fd is not None:
            os.close(child.go_fd)
            child.go_fd = None

    def _succeed(self, child):
        request = child.request
        response = {"id": request.get("id"), "ok": True, "op": request["op"],
                    "type": request["type"], "pin": request["pin"], "pid": child.pid,
                    "seconds": round(time.monotonic() - child.started, 6)}
        if "rootfs" in child.result:
            response["rootfs"] = child.result["rootfs"]
        log.debug("request %s: %s %s at %s done by child %d in %.4f s", response["id"],
                  request["op"], request["type"], request["pin"], child.pid,
                  response["seconds"])
        self._respond(response)

    def _fail(self, request, error, child=None, wire_error=None):
        """Report a failed request; after a failed build, remove whatever is at its pin."""
        wire_error = wire_error or error_dict(error)
        pin = request.get("pin")
        if child is not None and request.get("op") == "build" and pin:
            try:
                namespaces.unpin(pin)
            except NamespaceError as cleanup_error:
                log.error("request %s: removing pin %s of the failed build failed: %s",
                          request.get("id"), pin, cleanup_error)
        log.warning("request %s: %s %s at %s failed%s: %s", request.get("id"),
                    request.get("op"), request.get("type"), pin,
                    f" in child {child.pid}" if child else "", wire_error["message"])
        self._respond({"id": request.get("id"), "ok": False, "error": wire_error})

    def _respond(self, response):
        line = json.dumps(response).encode() + b"\n"
        try:
            _write_all(1, line)
        except BrokenPipeError:
            # The worker has closed its end, so no response can be delivered any more.
            log.warning("stdout closed, dropping response to request %s", response.get("id"))
            self.stdin_open = False


def _build(kind, image, pin):
    namespaces.unshare(NSFS_TYPES[kind])
    if kind == "ipc":
        from workers.ipc_builder import populate_ipc

        populate_ipc(image)
    else:
        from workers.uts_builder import populate_uts

        populate_uts(image)
    namespaces.pin(f"/proc/self/ns/{kind}", pin)


def _reset_uts(image, pin):
    from workers.uts_builder import populate_uts

    fd = os.open(pin, os.O_RDONLY | os.O_CLOEXEC)
    try:
        namespaces.setns(fd, namespaces.CLONE_NEWUTS)
    finally:
        os.close(fd)
    populate_uts(image)


def _build_mnt(request, go_fd, result_fd):
    from workers.mnt_builder import populate_mnt
    from workers.sources.model import PreparedCheckpoint

    namespaces.unshare(namespaces.CLONE_NEWNS)
    namespaces.mount(None, "/", None, namespaces.MS_REC | namespaces.MS_PRIVATE)
    rootfs = populate_mnt(PreparedCheckpoint.from_dict(request["prepared"]),
                          Path(request["bundle"]))

    _send(result_fd, {"ok": True, "stage": "ready", "rootfs": str(rootfs)})
    # The parent closes the go pipe once it has pinned this namespace (or failed to).
    while os.read(go_fd, 1):
        pass
    return None


def _send(fd, message):
    _write_all(fd, json.dumps(message).encode() + b"\n")


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:
            # stdout shares its file description with stdin on a terminal, which
            # run() made non-blocking.
            select.select([], [fd], [])
            continue
        view = view[written:]


def _reap(pid):
    while True:
        try:
            return os.waitpid(pid, 0)[1]
        except ChildProcessError:
            return None
        except InterruptedError:
            continue


def _describe_status(status):
    if status is None:
        return "an unknown status"
    if os.WIFSIGNALED(status):
        return f"signal {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit code {os.waitstatus_to_exitcode(status)}"


NICE_DEFAULT = 10


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m workers.builder",
                                     description="Build namespaces requested as JSON lines "
                                     "on stdin; respond with JSON lines on stdout.")
    parser.add_argument("--timeout", type=float, default=TIMEOUT_DEFAULT,
                        help="seconds a child may take before it is killed (default "
                        "%(default)s); a request's own \"timeout\" overrides it")
    parser.add_argument("--max-children", type=int, default=MAX_CHILDREN_DEFAULT,
                        help="children working at the same time (default %(default)s)")
    parser.add_argument("--parent-pid", type=int, default=None,
                        help="exit at once unless this is still the parent process")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    parser.add_argument("--nice", type=int, default=NICE_DEFAULT,
                        help="niceness added to the builder and its children (default "
                        "%(default)s)")
    args = parser.parse_args(argv)

    logging.basicConfig(stream=sys.stderr, level=args.log_level.upper(),
                        format="%(asctime)s builder[%(process)d] %(levelname)s %(message)s")
    set_parent_death_signal(signal.SIGKILL)
    # The parent may have died before prctl took effect.
    if args.parent_pid is not None and os.getppid() != args.parent_pid:
        log.error("parent %d exited before the builder started", args.parent_pid)
        return 1
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    # Refills run in the background: a lower CPU priority (inherited by every build
    # child) keeps them from delaying the worker's and router's replies.
    os.nice(args.nice)

    Builder(timeout=args.timeout, max_children=args.max_children).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
