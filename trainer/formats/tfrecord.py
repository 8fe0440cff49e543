"""TFRecord files and `tf.train.Example` records in plain Python, without TensorFlow.

`trainer prepare` writes shards with these (its worker processes, and Beam's workers, never load
TensorFlow), and `trainer.data.pipeline`'s fsspec path reads them. Writing them here also makes a shard's
bytes a function of its images alone: the features of an Example are written in sorted key order,
as protobuf's deterministic serialization writes them, so every run, process and runner writes the
same bytes (a test checks them against `tf.train.Example.SerializeToString(deterministic=True)`).

Framing of each record: uint64 length, masked crc32c of the length, data, masked crc32c of the
data (all little-endian).
"""

import struct

import google_crc32c

from trainer.errors import UserError
from trainer.formats import manifest

_HEADER = struct.Struct("<QI")  # record length, masked crc32c of the length
_LENGTH = struct.Struct("<Q")
_CRC = struct.Struct("<I")
_CRC_MASK_DELTA = 0xA282EAD8


def masked_crc(data):
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _CRC_MASK_DELTA) & 0xFFFFFFFF


def frame(record):
    """One record as it is stored in a TFRecord file."""
    length = _LENGTH.pack(len(record))
    return length + _CRC.pack(masked_crc(length)) + record + _CRC.pack(masked_crc(record))


def _read_exactly(stream, count):
    chunks, missing = [], count
    while missing:
        chunk = stream.read(missing)
        if not chunk:
            break
        chunks.append(chunk)
        missing -= len(chunk)
    return b"".join(chunks)


def iterate_records(stream, name):
    """Yields the records of a TFRecord stream, checking both checksums of every record.

    Args:
      stream: a binary file object (read sequentially).
      name: the shard's location, for error messages.

    Raises:
      UserError: naming the shard, the record and its byte offset, on a checksum mismatch or a
        record cut short.
    """
    offset = index = 0
    while True:
        header = _read_exactly(stream, _HEADER.size)
        if not header:
            return
        where = f"shard {name} record {index} (byte {offset})"
        if len(header) < _HEADER.size:
            raise UserError(f"{where} is truncated: the shard ends inside the record header")
        length, length_crc = _HEADER.unpack(header)
        if masked_crc(header[:8]) != length_crc:
            raise UserError(f"{where} is corrupt: length checksum mismatch")
        data = _read_exactly(stream, length)
        footer = _read_exactly(stream, _CRC.size)
        if len(data) < length or len(footer) < _CRC.size:
            raise UserError(f"{where} is truncated: the shard ends inside the record")
        if masked_crc(data) != _CRC.unpack(footer)[0]:
            raise UserError(f"{where} is corrupt: data checksum mismatch")
        yield data
        offset += _HEADER.size + length + _CRC.size
        index += 1


# --- tf.train.Example in protobuf's wire format ------------------------------------------------------
# Example{features = 1: Features{feature = 1: map<string, Feature>}};
# Feature{bytes_list = 1: BytesList{value = 1}, int64_list = 3: Int64List{value = 1, packed}}.


def _varint(value):
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _message_field(number, payload):
    """A length-delimited field (a message, bytes or a packed list)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def encode_example(features):
    """A serialized `tf.train.Example` of `{key: bytes or int}`, in sorted key order."""
    entries = []
    for key in sorted(features):
        value = features[key]
        if isinstance(value, bytes):
            feature = _message_field(1, _message_field(1, value))
        else:  # int64, two's complement as protobuf writes negative values
            feature = _message_field(3, _message_field(1, _varint(value & 0xFFFFFFFFFFFFFFFF)))
        entries.append(_message_field(1, _message_field(1, key.encode()) + _message_field(2, feature)))
    return _message_field(1, b"".join(entries))


def make_example(encoded, image_format, label, class_name, filename, height, width):
    """One serialized record with the dataset's keys (see trainer.formats.manifest)."""
    return encode_example({
        manifest.KEY_ENCODED: encoded,
        manifest.KEY_FORMAT: image_format.encode(),
        manifest.KEY_LABEL: label,
        manifest.KEY_CLASS: class_name.encode(),
        manifest.KEY_FILENAME: filename.encode(),
        manifest.KEY_HEIGHT: height,
        manifest.KEY_WIDTH: width,
    })
