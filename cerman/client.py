"""Client for the router's socket, used by ``cerman ctl``, tests and benchmarks."""

import zmq

from cerman import protocol
from cerman.errors import CermanError, RequestError

DEFAULT_TIMEOUT = 30.0


class RemoteError(CermanError):
    """An error the router or a worker returned; ``code`` is the remote error's code."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


class Client:
    """Send requests to the router over one REQ socket.

    A REQ socket that timed out cannot send again, so a timeout replaces the socket.
    Not thread-safe: use one Client per thread.
    """

    def __init__(self, endpoint, timeout=DEFAULT_TIMEOUT, context=None):
        self.endpoint = endpoint
        self.timeout = timeout
        self._context = context or zmq.Context.instance()
        self._socket = None

    def _connect(self):
        socket = self._context.socket(zmq.REQ)
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(self.endpoint)
        return socket

    def close(self):
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def request(self, message, timeout=None):
        """Send ``message`` and return the reply's result, or raise RemoteError."""
        if self._socket is None:
            self._socket = self._connect()
        timeout = self.timeout if timeout is None else timeout

        # The router replies before this timeout, so it can return a lease issued late.
        self._socket.send(protocol.encode({**message, "timeout": timeout}))
        if not self._socket.poll(int(timeout * 1000), zmq.POLLIN):
            self.close()
            raise RequestError(
                f"no reply from the router at {self.endpoint} within {timeout:g} s; check "
                "that circusd is running (circusctl --endpoint ipc://$CERMAN_RUN_DIR/circus.sock "
                "status)")
        reply = protocol.decode(self._socket.recv())

        if not reply.get("ok"):
            error = reply.get("error") or {}
            raise RemoteError(error.get("code", "error"), error.get("message", "request failed"))
        return reply.get("result")

    def status(self, checkpoint=None):
        message = {"op": "status"}
        if checkpoint:
            message["checkpoint"] = checkpoint
        return self.request(message)

    def get(self, checkpoint, ns_type):
        return self.request({"op": "get", "checkpoint": checkpoint, "type": ns_type})

    def put(self, lease):
        return self.request({"op": "put", "lease": lease})

    def update(self, checkpoint, capacity, ns_type=None):
        message = {"op": "update", "checkpoint": checkpoint, "capacity": capacity}
        if ns_type:
            message["type"] = ns_type
        return self.request(message)

    def checkpoint_get(self, checkpoint):
        return self.request({"op": "checkpoint-get", "checkpoint": checkpoint})

    def checkpoint_put(self, checkpoint):
        return self.request({"op": "checkpoint-put", "checkpoint": checkpoint})

    def reload(self):
        return self.request({"op": "reload"})
