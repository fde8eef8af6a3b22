"""Pools of pinned namespaces of one checkpoint, one pool per namespace type.

A pool keeps ``capacity`` free namespaces ready; leased ones are counted apart and
never come back: ``put`` destroys them, because their content may have changed.
Pin files live in ``$CERMAN_RUN_DIR/ns/<checkpoint>/<type>/<generation>-<random>``,
where the generation names the prepared checkpoint they were built from, so a worker
that re-prepared a changed source can drop namespaces built from the old one.
"""

import logging
import secrets
import time
from collections import deque
from dataclasses import dataclass

log = logging.getLogger(__name__)

BACKOFF_FIRST = 0.5
BACKOFF_MAX = 60.0
# Build errors that repeat on every attempt (a broken image, a refused checkpoint):
# the pool stops building until the config is reloaded or the capacity updated.
PERMANENT_ERROR_CODES = {"image", "pool", "source", "config", "unsafe-archive"}


@dataclass
class Namespace:
    """One pinned namespace: its pin file and, for mount namespaces, its bundle."""

    ns_type: str
    pin: str
    bundle: str | None = None
    rootfs: str | None = None

    def as_dict(self):
        entry = {"type": self.ns_type, "pin": self.pin}
        if self.bundle:
            entry["bundle"] = self.bundle
            entry["rootfs"] = self.rootfs
        return entry

    @classmethod
    def from_dict(cls, data):
        return cls(data["type"], data["pin"], data.get("bundle"), data.get("rootfs"))


def new_pin_name(generation):
    return f"{generation}-{secrets.token_hex(6)}"


def pin_generation(pin_name):
    return pin_name.split("-", 1)[0]


class Pool:
    def __init__(self, checkpoint, ns_type, capacity):
        self.checkpoint = checkpoint
        self.ns_type = ns_type
        self.capacity = capacity
        self.free = deque()
        self.building = 0
        self.leased = 0
        self.built = 0
        self.disabled = None
        self.last_error = None
        self.failures = 0
        self.retry_at = 0.0

    def deficit(self, now):
        """Return how many builds to start now to get back to capacity."""
        if self.disabled or now < self.retry_at:
            return 0
        return max(0, self.capacity - len(self.free) - self.building)

    def record_success(self, namespace):
        self.building -= 1
        self.built += 1
        self.failures = 0
        self.free.append(namespace)

    def record_failure(self, code, message, now):
        self.building -= 1
        self.last_error = message
        if code in PERMANENT_ERROR_CODES:
            self.disabled = message
            log.error("checkpoint %r: %s pool disabled: %s", self.checkpoint, self.ns_type, message)
            return
        self.failures += 1
        delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (self.failures - 1))
        self.retry_at = now + delay
        log.warning("checkpoint %r: building a %s namespace failed (%d in a row, retry in %.1f s): %s",
                    self.checkpoint, self.ns_type, self.failures, delay, message)

    def reset_errors(self):
        """Clear a disabled state set by a build error, so building starts again."""
        self.failures = 0
        self.retry_at = 0.0
        self.disabled = None

    def take(self):
        return self.free.popleft() if self.free else None

    def surplus(self):
        """Remove and return free namespaces above capacity."""
        extra = []
        while len(self.free) > self.capacity:
            extra.append(self.free.pop())
        return extra

    def status(self):
        return {
            "free": len(self.free),
            "leased": self.leased,
            "building": self.building,
            "capacity": self.capacity,
            "built": self.built,
            "disabled": self.disabled,
            "last_error": self.last_error,
        }


def monotonic():
    return time.monotonic()
