"""Exceptions raised by cerman.

Every error that cerman raises on purpose derives from ``CermanError``::

    CermanError
     ├── ConfigError          a checkpoint YAML file is invalid
     ├── ImageError           a CRIU image file is missing, truncated or corrupt
     ├── SourceError          a checkpoint source cannot be read or extracted
     │    └── UnsafeArchiveError   an archive entry would land outside its target
     ├── NamespaceError       a kernel call on a namespace failed (keeps errno)
     ├── PoolError            a pool cannot serve the request
     │    └── LeaseNotFound   a lease id is unknown to the worker
     └── RequestError         a request could not be delivered or replied to
          └── WorkerUnavailable   the checkpoint's worker is missing, starting or slow

Each error carries the context of the boundary it crossed (file, key, checkpoint,
namespace type, lease id) in its message, and ``code`` names its class on the wire so
``cerman ctl`` can show it without importing worker code.
"""


class CermanError(Exception):
    """Base class of every error cerman raises on purpose."""

    code = "error"


class ConfigError(CermanError):
    """Raised when a checkpoint config file is invalid; names the file and the key."""

    code = "config"

    def __init__(self, path, key, message):
        self.path = str(path)
        self.key = key
        where = f"{self.path}: {key}" if key else self.path
        super().__init__(f"{where}: {message}")


class ImageError(CermanError):
    """Raised when a CRIU image file is missing, truncated or does not parse."""

    code = "image"

    def __init__(self, path, message, entry=None):
        self.path = str(path)
        self.entry = entry
        where = self.path if entry is None else f"{self.path} entry {entry}"
        super().__init__(f"{where}: {message}")


class SourceError(CermanError):
    """Raised when a checkpoint source cannot be read, verified or extracted."""

    code = "source"


class UnsafeArchiveError(SourceError):
    """Raised when an archive entry would be written outside the extraction target."""

    code = "unsafe-archive"


class NamespaceError(CermanError, OSError):
    """Raised when a kernel call on a namespace fails.

    Keeps ``errno`` so callers can tell EPERM from ENOSPC, and names the operation and
    the namespace (type and pin path) it was working on.
    """

    code = "namespace"

    def __init__(self, errno, operation, target=""):
        import os

        OSError.__init__(self, errno, os.strerror(errno) if errno else operation)
        self.operation = operation
        self.target = target

    def __str__(self):
        detail = f" on {self.target}" if self.target else ""
        reason = self.strerror or "failed"
        return f"{self.operation}{detail} failed: [errno {self.errno}] {reason}"


class PoolError(CermanError):
    """Raised when a pool cannot serve a request (no such pool, pool disabled, full)."""

    code = "pool"


class LeaseNotFound(PoolError):
    """Raised by ``put`` for a lease id that the worker does not hold."""

    code = "lease-not-found"


class RequestError(CermanError):
    """Raised when a request is malformed or gets no reply."""

    code = "request"


class WorkerUnavailable(RequestError):
    """Raised by the router when the checkpoint's worker is missing, starting or slow."""

    code = "worker-unavailable"
