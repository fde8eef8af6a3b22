"""Decoder for the protobuf wire format, as far as CRIU's proto2 images need it.

A message is a sequence of fields, each a varint key ``number << 3 | wire_type``
followed by a value whose encoding the wire type gives:

    0  varint             uint32, uint64, int32, sint32, bool, enum
    1  64-bit             fixed64, sfixed64, double (little-endian)
    2  length-delimited   string, bytes, embedded message, packed repeated scalars
    5  32-bit             fixed32, sfixed32, float (little-endian)

Groups (wire types 3 and 4) are deprecated and absent from CRIU's images, so they are
rejected. A ``MessageType`` declares the fields a caller reads; ``decode_message`` checks
them against it and keeps fields of unknown number aside instead of failing, so images
from a newer CRIU still read. Every malformed input raises ``DecodeError``; the image
reader turns it into ``ImageError`` with the file and entry index.
"""

import struct
from dataclasses import dataclass

WIRE_VARINT = 0
WIRE_FIXED64 = 1
WIRE_LENGTH = 2
WIRE_FIXED32 = 5

# A 64-bit value needs at most 10 varint bytes (7 bits each).
MAX_VARINT_BYTES = 10

VARINT_KINDS = {"uint32", "uint64", "int32", "int64", "sint32", "sint64", "bool", "enum"}
FIXED32_KINDS = {"fixed32", "sfixed32"}
FIXED64_KINDS = {"fixed64", "sfixed64"}
LENGTH_KINDS = {"string", "bytes", "message"}

UINT32_MAX = 0xFFFFFFFF
UINT64_MAX = 0xFFFFFFFFFFFFFFFF


class DecodeError(ValueError):
    """Raised when bytes are not a valid encoding of the expected message."""


@dataclass(frozen=True)
class Field:
    """One field of a message type: its number, name, kind and label.

    ``kind`` is a protobuf scalar type name, "enum" or "message" (then ``message`` is
    the embedded ``MessageType``); ``label`` is "required", "optional" or "repeated".
    """

    number: int
    name: str
    kind: str
    label: str = "optional"
    message: "MessageType | None" = None


class MessageType:
    """The known fields of one protobuf message, looked up by field number."""

    def __init__(self, name, fields):
        self.name = name
        self.fields = tuple(fields)
        self.by_number = {f.number: f for f in self.fields}
        if len(self.by_number) != len(self.fields):
            raise ValueError(f"message type {name} declares a field number twice")

    def __repr__(self):
        return f"MessageType({self.name!r})"


class DecodedMessage(dict):
    """Field values of one decoded message by field name.

    Repeated fields are lists (empty when absent); absent optional fields have no key.
    ``unknown`` contains ``(number, wire_type, value)`` of the fields whose number the
    message type does not declare, in file order.
    """

    def __init__(self, values=(), unknown=()):
        super().__init__(values)
        self.unknown = tuple(unknown)


def read_varint(data, pos):
    """Decode the varint at ``data[pos:]``; return ``(value, position after it)``."""
    value = 0
    for i in range(MAX_VARINT_BYTES):
        if pos + i >= len(data):
            raise DecodeError(f"varint at byte {pos} is cut off by the end of the data")
        byte = data[pos + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            if value > UINT64_MAX:
                raise DecodeError(f"varint at byte {pos} exceeds 64 bits")
            return value, pos + i + 1
    raise DecodeError(f"varint at byte {pos} is longer than {MAX_VARINT_BYTES} bytes")


def iter_fields(data):
    """Yield ``(number, wire_type, value)`` for each field of an encoded message.

    ``value`` is an int for varint and fixed-width fields and a ``bytes`` object for
    length-delimited ones.
    """
    data = bytes(data)
    pos = 0
    while pos < len(data):
        start = pos
        key, pos = read_varint(data, pos)
        number, wire_type = key >> 3, key & 0x7
        if number == 0:
            raise DecodeError(f"field at byte {start} has the invalid number 0")

        if wire_type == WIRE_VARINT:
            value, pos = read_varint(data, pos)
        elif wire_type == WIRE_FIXED64:
            value, pos = _read_fixed(data, pos, 8, start)
        elif wire_type == WIRE_FIXED32:
            value, pos = _read_fixed(data, pos, 4, start)
        elif wire_type == WIRE_LENGTH:
            length, pos = read_varint(data, pos)
            if length > len(data) - pos:
                raise DecodeError(
                    f"field {number} at byte {start} declares {length} bytes "
                    f"but {len(data) - pos} remain"
                )
            value = data[pos : pos + length]
            pos += length
        else:
            raise DecodeError(f"field {number} at byte {start} has unsupported wire type {wire_type}")

        yield number, wire_type, value


def _read_fixed(data, pos, width, start):
    if width > len(data) - pos:
        raise DecodeError(f"{width * 8}-bit field at byte {start} is cut off by the end of the data")
    return int.from_bytes(data[pos : pos + width], "little"), pos + width


def decode_message(message_type, data):
    """Decode ``data`` as one ``message_type``; return a ``DecodedMessage``.

    Follows proto2 parsing rules: a scalar field seen twice keeps the last value, an
    embedded message seen twice is merged, and repeated scalars are accepted packed or
    unpacked. Raises ``DecodeError`` naming the message and field on malformed input or
    a missing required field.
    """
    values = {}
    unknown = []
    for number, wire_type, raw in iter_fields(data):
        field = message_type.by_number.get(number)
        if field is None:
            unknown.append((number, wire_type, raw))
            continue

        where = f"{message_type.name}.{field.name}"
        if field.label == "repeated":
            items = values.setdefault(field.name, [])
            if wire_type == WIRE_LENGTH and field.kind not in LENGTH_KINDS:
                items.extend(_decode_packed(field, raw, where))
            else:
                items.append(_decode_value(field, wire_type, raw, where))
        elif field.kind == "message" and field.name in values:
            merged = dict(values[field.name])
            merged.update(_decode_value(field, wire_type, raw, where))
            values[field.name] = DecodedMessage(merged, values[field.name].unknown)
        else:
            values[field.name] = _decode_value(field, wire_type, raw, where)

    for field in message_type.fields:
        if field.name in values:
            continue
        if field.label == "required":
            raise DecodeError(f"{message_type.name}: required field {field.name} ({field.number}) is missing")
        if field.label == "repeated":
            values[field.name] = []

    return DecodedMessage(values, unknown)


def _expected_wire_type(kind):
    if kind in VARINT_KINDS:
        return WIRE_VARINT
    if kind in FIXED32_KINDS:
        return WIRE_FIXED32
    if kind in FIXED64_KINDS:
        return WIRE_FIXED64
    if kind in LENGTH_KINDS:
        return WIRE_LENGTH
    raise ValueError(f"unsupported field kind {kind!r}")


def _decode_value(field, wire_type, raw, where):
    expected = _expected_wire_type(field.kind)
    if wire_type != expected:
        raise DecodeError(f"{where}: wire type {wire_type} where {field.kind} needs {expected}")

    kind = field.kind
    if kind == "message":
        try:
            return decode_message(field.message, raw)
        except DecodeError as error:
            raise DecodeError(f"{where}: {error}") from None
    if kind == "string":
        # Linux paths and names are bytes; surrogateescape keeps any non-UTF-8 byte so
        # os.fsencode() gives the original back.
        return raw.decode("utf-8", errors="surrogateescape")
    if kind == "bytes":
        return raw
    return _convert_scalar(kind, raw, where)


def _convert_scalar(kind, value, where):
    if kind in ("uint32", "fixed32"):
        if value > UINT32_MAX:
            raise DecodeError(f"{where}: {value} does not fit in uint32")
        return value
    if kind in ("uint64", "fixed64"):
        return value
    if kind == "bool":
        return value != 0
    if kind in ("int32", "enum", "int64", "sfixed64"):
        signed = value - (1 << 64) if value >> 63 else value
        if kind in ("int32", "enum") and not -(1 << 31) <= signed < (1 << 31):
            raise DecodeError(f"{where}: {signed} does not fit in int32")
        return signed
    if kind == "sfixed32":
        return struct.unpack("<i", value.to_bytes(4, "little"))[0]
    if kind in ("sint32", "sint64"):
        signed = (value >> 1) ^ -(value & 1)
        if kind == "sint32" and not -(1 << 31) <= signed < (1 << 31):
            raise DecodeError(f"{where}: {signed} does not fit in sint32")
        return signed
    raise ValueError(f"unsupported field kind {kind!r}")


def _decode_packed(field, raw, where):
    wire_type = _expected_wire_type(field.kind)
    items = []
    pos = 0
    try:
        while pos < len(raw):
            if wire_type == WIRE_VARINT:
                value, pos = read_varint(raw, pos)
            elif wire_type == WIRE_FIXED32:
                value, pos = _read_fixed(raw, pos, 4, pos)
            else:
                value, pos = _read_fixed(raw, pos, 8, pos)
            items.append(_convert_scalar(field.kind, value, where))
    except DecodeError as error:
        raise DecodeError(f"{where} (packed): {error}") from None
    return items
