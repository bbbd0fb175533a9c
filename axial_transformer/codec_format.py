"""The codec's container (.axc): what a decoder must know, each image's checksum, the payload.

Layout, little-endian, in version 1:

    offset  bytes  field
    0       8      magic 89 41 58 43 0D 0A 1A 0A ("\\x89AXC\\r\\n\\x1a\\n")
    8       2      format version (uint16), 1
    10      32     model fingerprint: SHA-256 of the model's config and weights
    42      4      N, images (uint32)
    46      2      C, channels (uint16)
    48      2      H, rows (uint16)
    50      2      W, columns (uint16)
    52      2      levels, values a subpixel takes (uint16)
    54      4      S, length of the settings (uint32)
    58      S      settings: a UTF-8 JSON object, sorted keys: batch_size, device, threads,
                   and for a class-conditional model labels (N classes, -1 for none)
    58+S    4N     CRC-32 of each image's pixels, uint8 in [C, H, W] order
    58+S+4N 8      P, length of the payload (uint64)
    66+S+4N P      payload: the range coder's 32-bit words
    end-4   4      CRC-32 of every byte before it

Every version starts with the magic bytes and ends with the CRC-32 of the rest, so a damaged
file is told apart from one of a newer version. The settings section is where later versions
add what decoding needs.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass

MAGIC = b"\x89AXC\r\n\x1a\n"  # PNG's trick: a high bit, CR LF, Ctrl-Z, LF catch mangled copies
VERSION = 1
# Everything decoding needs besides the model; a file with other keys is from another version.
SETTINGS = ("batch_size", "device", "threads")
LABELS = "labels"  # the images' classes, in a file of a class-conditional model

_FIXED = struct.Struct("<8sH32sIHHHHI")  # magic .. settings length: offsets 0..57
_LENGTH = struct.Struct("<Q")
_CRC = struct.Struct("<I")
_SMALLEST = _FIXED.size + _LENGTH.size + _CRC.size  # no settings, no images, no payload


@dataclass(frozen=True)
class Header:
    fingerprint: bytes  # SHA-256 of the model that wrote the file (32 bytes)
    shape: tuple[int, int, int, int]  # N, C, H, W
    levels: int
    settings: dict  # batch_size: images per batch; device: "cpu" or "cuda"; threads: CPU threads;
    # labels: the images' classes (class-conditional models only)
    image_crcs: tuple[int, ...]  # CRC-32 of each image's uint8 pixels in [C, H, W] order


def pack(header: Header, payload: bytes) -> bytes:
    """The file's bytes: header, payload and the closing CRC-32."""
    if sorted(set(header.settings) - {LABELS}) != sorted(SETTINGS):
        raise ValueError(f"settings must have exactly the keys {SETTINGS} (and {LABELS}), "
                         f"got {sorted(header.settings)}")
    settings = json.dumps(header.settings, sort_keys=True).encode()
    body = b"".join([
        _FIXED.pack(MAGIC, VERSION, header.fingerprint, *header.shape, header.levels,
                    len(settings)),
        settings,
        struct.pack(f"<{len(header.image_crcs)}I", *header.image_crcs),
        _LENGTH.pack(len(payload)),
        payload,
    ])
    return body + _CRC.pack(zlib.crc32(body))


def unpack(data: bytes) -> tuple[Header, bytes]:
    """(header, payload) of a file's bytes; a ValueError that says what is wrong with any other
    bytes: another format, damage (a changed byte, anywhere), truncation, another version."""
    if not data.startswith(MAGIC):
        raise ValueError("not an Axial Transformer codec file (.axc): it does not start with "
                         "the magic bytes \\x89AXC")
    check_integrity(data)
    _, version, fingerprint, n, c, h, w, levels, settings_length = _FIXED.unpack_from(data)
    if version != VERSION:
        raise ValueError(f"an .axc file of format version {version}; this version of the "
                         f"toolkit reads version {VERSION}")
    end = _FIXED.size
    try:
        settings = json.loads(data[end : end + settings_length])
        end += settings_length
        crcs = struct.unpack_from(f"<{n}I", data, end)
        end += 4 * n
        (payload_length,) = _LENGTH.unpack_from(data, end)
        end += _LENGTH.size
    except (ValueError, struct.error) as e:  # only a writer that breaks the layout gets here
        raise ValueError(f"a damaged .axc file: its header does not parse ({e})") from None
    if not isinstance(settings, dict) or sorted(set(settings) - {LABELS}) != sorted(SETTINGS):
        raise ValueError(f"an .axc file with the settings {settings}; version {VERSION} has "
                         f"exactly {', '.join(SETTINGS)} (and {LABELS})")
    labels = settings.get(LABELS, [])
    if LABELS in settings and (not isinstance(labels, list) or len(labels) != n or
                               not all(type(k) is int and k >= -1 for k in labels)):
        raise ValueError(f"an .axc file whose labels are not {n} classes (integers, -1 for none)")
    counts = [settings["batch_size"], settings["threads"]]
    if not all(type(k) is int and k > 0 for k in counts) or not isinstance(settings["device"], str):
        raise ValueError(f"an .axc file with the settings {settings}: expected a positive "
                         "batch_size and threads, and a device name")
    if end + payload_length + _CRC.size != len(data):
        raise ValueError(f"a damaged .axc file: {len(data)} bytes, its header declares "
                         f"{end + payload_length + _CRC.size}")
    header = Header(fingerprint, (n, c, h, w), levels, settings, crcs)
    return header, data[end : end + payload_length]


def check_integrity(data: bytes) -> None:
    """The closing CRC-32 must match the bytes before it; if not, say whether the file was cut
    short (shorter than any file, or than its header declares) or damaged."""
    if len(data) < _SMALLEST:
        raise ValueError(f"a truncated .axc file: {len(data)} bytes, less than the {_SMALLEST} "
                         "of the smallest one")
    if _CRC.pack(zlib.crc32(data[: -_CRC.size])) == data[-_CRC.size :]:
        return
    declared = declared_size(data)
    if declared is not None and declared > len(data):
        raise ValueError(f"a truncated .axc file (or one with a damaged header): it ends after "
                         f"{len(data):,} bytes, its header declares at least {declared:,}")
    raise ValueError("a damaged .axc file: its checksum does not match its contents (a byte "
                     "was changed, added or lost)")


def declared_size(data: bytes) -> int | None:
    """The size a version-1 header declares, or a lower bound when the header itself is cut
    short; None for another version."""
    _, version, _, n, *_, settings_length = _FIXED.unpack_from(data)
    if version != VERSION:
        return None
    lengths_at = _FIXED.size + settings_length + 4 * n
    if len(data) < lengths_at + _LENGTH.size:
        return lengths_at + _LENGTH.size + _CRC.size
    (payload_length,) = _LENGTH.unpack_from(data, lengths_at)
    return lengths_at + _LENGTH.size + payload_length + _CRC.size


def image_crc(pixels: bytes) -> int:
    """CRC-32 of one image's uint8 pixels in [C, H, W] order."""
    return zlib.crc32(pixels)
