"""Messages between ``cerman ctl``, the router and the workers.

Every message is one ZeroMQ frame holding a JSON object.

Client to router (REQ to ROUTER)::

    {"op": "get", "checkpoint": NAME, "type": "ipc"}
    {"op": "put", "lease": LEASE_ID}
    {"op": "status"}                         (all checkpoints) or with "checkpoint"
    {"op": "update", "checkpoint": NAME, "capacity": N, "type": T}   (type optional)
    {"op": "checkpoint-get", "checkpoint": NAME}
    {"op": "checkpoint-put", "checkpoint": NAME}
    {"op": "reload"}

Replies: ``{"ok": true, "result": {...}}`` or
``{"ok": false, "error": {"code": CODE, "message": TEXT}}`` where CODE is the
``code`` of a ``cerman.errors.CermanError`` subclass.

Router to worker (ROUTER to DEALER, the worker's identity is its checkpoint name):
frames ``[request_id, request]``; the worker replies ``[request_id, reply]``.
Workers also send ``[b"heartbeat", status]`` once a second so the router tracks which
workers are up and what they last reported.
"""

import json
import secrets

from cerman.errors import CermanError, RequestError

OPS = ("get", "put", "status", "update", "checkpoint-get", "checkpoint-put", "reload")
HEARTBEAT = b"heartbeat"
# A lease id names its checkpoint so the router can route ``put`` without state:
# "<checkpoint>:<type>:<random hex>". Checkpoint names cannot contain ':'.
LEASE_SEPARATOR = ":"


def encode(message):
    return json.dumps(message, separators=(",", ":")).encode()


def decode(frame):
    try:
        message = json.loads(frame)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RequestError(f"message is not valid JSON: {error}") from error
    if not isinstance(message, dict):
        raise RequestError("message must be a JSON object")
    return message


def ok(result):
    return {"ok": True, "result": result}


def failure(error):
    """Return the reply for ``error``, a CermanError or any other exception."""
    code = error.code if isinstance(error, CermanError) else "internal"
    return {"ok": False, "error": {"code": code, "message": str(error)}}


def new_lease_id(checkpoint, ns_type):
    return LEASE_SEPARATOR.join((checkpoint, ns_type, secrets.token_hex(8)))


def lease_checkpoint(lease_id):
    """Return the checkpoint name a lease id belongs to, or raise RequestError."""
    parts = lease_id.split(LEASE_SEPARATOR) if isinstance(lease_id, str) else []
    if len(parts) != 3 or not all(parts):
        raise RequestError(
            f"lease id {lease_id!r} is malformed; use the 'lease' value returned by get")
    return parts[0]


def request_checkpoint(request):
    """Return the checkpoint a request is for, or None for router-level requests."""
    op = request.get("op")
    if op not in OPS:
        raise RequestError(f"unknown op {op!r}; expected one of {', '.join(OPS)}")
    if op == "put":
        return lease_checkpoint(request.get("lease"))
    if op in ("status", "reload"):
        return request.get("checkpoint")
    name = request.get("checkpoint")
    if not isinstance(name, str) or not name:
        raise RequestError(f"op {op!r} needs a 'checkpoint' name")
    return name
