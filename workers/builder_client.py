"""The worker's handle on its builder process (``python -m workers.builder``).

``BuilderProcess`` starts the builder with subprocess (fork plus an immediate exec,
which is safe in a process with ZeroMQ threads), writes JSON requests to its stdin
and reads JSON responses from its stdout. ``fileno()`` fits a ``zmq.Poller``, so the
worker's loop can wait on clients and builds together and call ``read_responses()``
when the builder's stdout is readable.
"""

import json
import logging
import os
import select
import subprocess
import sys
import time
from pathlib import Path

from cerman.errors import RequestError

log = logging.getLogger(__name__)

_REPO = Path(__file__).resolve().parents[1]


class BuilderProcess:
    """A running builder: submit requests, collect responses, stop it."""

    def __init__(self, timeout=None, max_children=None, log_level="INFO", env=None):
        self.timeout = timeout
        self.max_children = max_children
        self.log_level = log_level
        self.env = env
        self._process = None
        self._next_id = 1
        self._buffer = b""
        self._pending = []

    def start(self):
        """Start the builder process, which inherits stderr for its log."""
        command = [sys.executable, "-m", "workers.builder", "--parent-pid", str(os.getpid()),
                   "--log-level", self.log_level]
        if self.timeout is not None:
            command += ["--timeout", str(self.timeout)]
        if self.max_children is not None:
            command += ["--max-children", str(self.max_children)]

        env = dict(os.environ if self.env is None else self.env)
        # The builder imports this checkout even when cerman is not installed.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_REPO), env.get("PYTHONPATH")]))
        self._process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         env=env, cwd=_REPO, close_fds=True)
        os.set_blocking(self._process.stdout.fileno(), False)
        log.info("builder process %d started", self._process.pid)

    @property
    def pid(self):
        return self._process.pid if self._process else None

    def fileno(self):
        """Return the builder's stdout descriptor, readable when responses arrive."""
        return self._process.stdout.fileno()

    def alive(self):
        return self._process is not None and self._process.poll() is None

    def submit(self, request):
        """Send ``request`` (a dict without "id") and return the id it was given."""
        request_id = self._next_id
        self._next_id += 1
        line = json.dumps({**request, "id": request_id}).encode() + b"\n"
        try:
            self._process.stdin.write(line)
            self._process.stdin.flush()
        except (BrokenPipeError, ValueError) as error:
            raise RequestError(f"builder process {self.pid} is not running "
                               f"({error}); restart it") from None
        return request_id

    def read_responses(self):
        """Return the responses that have arrived, without blocking."""
        responses, self._pending = self._pending, []
        while True:
            try:
                data = os.read(self.fileno(), 65536)
            except BlockingIOError:
                break
            if not data:
                break
            self._buffer += data

        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            if line.strip():
                responses.append(json.loads(line))
        return responses

    def call(self, request, timeout=60.0):
        """Submit ``request`` and block until its response arrives; return the response.

        Other responses that arrive meanwhile are kept for ``read_responses``.
        Raises ``RequestError`` when the builder dies or does not respond in time.
        """
        request_id = self.submit(request)
        deadline = time.monotonic() + timeout
        while True:
            for response in self.read_responses():
                if response.get("id") == request_id:
                    return response
                self._pending.append(response)

            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RequestError(f"builder process {self.pid} did not respond to request "
                                   f"{request_id} within {timeout} s")
            if not self.alive():
                raise RequestError(f"builder process {self.pid} exited with "
                                   f"{self._process.returncode} before it responded to "
                                   f"request {request_id}")
            select.select([self.fileno()], [], [], min(remaining, 0.5))

    def stop(self, timeout=10.0):
        """Close the builder's stdin, wait for it to exit, kill it after ``timeout`` s."""
        if self._process is None:
            return
        try:
            self._process.stdin.close()
        except BrokenPipeError:
            pass
        try:
            self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("builder process %d still running %s s after stdin closed; killing it",
                        self._process.pid, timeout)
            self._process.kill()
            self._process.wait()
        self._process.stdout.close()
        log.info("builder process %d stopped with %d", self._process.pid,
                 self._process.returncode)
