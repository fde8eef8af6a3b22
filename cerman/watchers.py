"""Keep circus' worker watchers in line with the checkpoint configs.

The router calls circus' control socket: one watcher ``cerman-worker-NAME`` per valid
config file, added with ``start`` so circus also restarts it when it crashes.
"""

import logging
import sys
import time

from circus.client import CircusClient
from circus.exc import CallError

from cerman.errors import CermanError

log = logging.getLogger(__name__)

WATCHER_PREFIX = "cerman-worker-"
# circus 0.19 rejects a command that arrives while it still runs a previous
# watcher_start ("arbiter is already running ... command", errno 5): retry with backoff.
RETRY_DELAYS = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2)


class CircusError(CermanError):
    """Raised when circus' control socket does not reply or rejects a command."""

    code = "circus"


def watcher_name(checkpoint):
    return WATCHER_PREFIX + checkpoint


class WatcherControl:
    """Add, remove and restart worker watchers through circus' control socket."""

    def __init__(self, endpoint, paths, timeout=5.0):
        self.endpoint = endpoint
        self.paths = paths
        self._client = CircusClient(endpoint=endpoint, timeout=timeout)

    def close(self):
        self._client.stop()

    def _call(self, command, **properties):
        message = {"command": command, "properties": properties}
        for attempt, delay in enumerate(RETRY_DELAYS + (None,)):
            try:
                reply = self._client.call(message)
            except CallError as error:
                raise CircusError(f"circus at {self.endpoint} did not reply to '{command}': "
                                  f"{error}; check that circusd is running") from error
            if reply.get("status") == "ok":
                return reply
            reason = reply.get("reason", "")
            if reply.get("errno") == 5 and delay is not None:
                log.debug("circus busy on %s (attempt %d): %s", command, attempt + 1, reason)
                time.sleep(delay)
                continue
            raise CircusError(f"circus rejected '{command}' {properties.get('name', '')}: {reason}")

    def worker_watchers(self):
        """Return {lowercased checkpoint name: the checkpoint name its worker runs}.

        circus 0.19 lists watcher names lowercased, so the name with its case is read
        from the watcher's last argument (``cerman worker NAME``).
        """
        result = {}
        for watcher in self._call("list").get("watchers", []):
            if not watcher.lower().startswith(WATCHER_PREFIX):
                continue
            options = self._call("get", name=watcher, keys=["args"]).get("options", {})
            args = options.get("args") or []
            result[watcher[len(WATCHER_PREFIX):].lower()] = args[-1] if args else None
        return result

    def statuses(self):
        """Return circus' state ("active", "stopped", ...) of each worker watcher."""
        statuses = self._call("status").get("statuses", {})
        return {name[len(WATCHER_PREFIX):].lower(): state for name, state in statuses.items()
                if name.lower().startswith(WATCHER_PREFIX)}

    def add(self, checkpoint):
        options = {
            "copy_env": True,
            "env": self.paths.as_env(),
            "stop_signal": 15,
            # Releasing a few thousand pinned namespaces takes seconds, not minutes.
            "graceful_timeout": 60,
            "stdout_stream": {"class": "StdoutStream"},
            "stderr_stream": {"class": "StdoutStream"},
        }
        log.info("adding watcher %s", watcher_name(checkpoint))
        self._call("add", name=watcher_name(checkpoint), cmd=sys.executable,
                   args=["-m", "cerman", "worker", checkpoint], options=options, start=True)

    def remove(self, checkpoint, waiting=False):
        log.info("removing watcher %s", watcher_name(checkpoint))
        self._call("rm", name=watcher_name(checkpoint), waiting=waiting)

    def replace(self, checkpoint):
        """Remove the watcher of the same name ignoring case, then add this one."""
        self.remove(checkpoint, waiting=True)
        self.add(checkpoint)

    def restart(self, checkpoint):
        log.info("restarting watcher %s", watcher_name(checkpoint))
        self._call("restart", name=watcher_name(checkpoint), waiting=False)
