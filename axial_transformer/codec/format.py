"""The codec's container (.axc): what a decoder must know, each image's checksum, the payload.

Layout, little-endian, in format version 2:

    offset  bytes  field
    0       8      magic 89 41 58 43 0D 0A 1A 0A ("\\x89AXC\\r\\n\\x1a\\n")
    8       2      format version (uint16), 2
    10      2      arithmetic version (uint16): the exact arithmetic of the coding distribution
    12      32     model fingerprint: SHA-256 of the model's architecture and weights
    44      4      N, images (uint32)
    48      2      C, channels (uint16)
    50      2      H, rows (uint16)
    52      2      W, columns (uint16)
    54      2      levels, values a subpixel takes (uint16)
    56      4      S, length of the settings (uint32)
    60      S      settings: a UTF-8 JSON object, sorted keys, each optional: labels (N classes,
                   -1 for none: a class-conditional model's), names (N file names)
    60+S    4N     CRC-32 of each image's pixels, uint8 in [C, H, W] order
    60+S+4N 8      P, length of the payload (uint64)
    68+S+4N P      payload: the range coder's 32-bit words
    end-4   4      CRC-32 of every byte before it

The payload codes the images in groups of GROUP_SIZE, one group after another; within a group,
subpixel after subpixel in the model's order, and at each subpixel the group's images in turn.
Nothing about how the writer computed (threads, batch, device) is stored: the distribution does
not depend on it. Every version starts with the magic bytes and ends with the CRC-32 of the rest,
so a damaged file is told apart from one of another version.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from dataclasses import dataclass

MAGIC = b"\x89AXC\r\n\x1a\n"  # PNG's trick: a high bit, CR LF, Ctrl-Z, LF catch mangled copies
VERSION = 2
GROUP_SIZE = 64  # images coded side by side: the stream's order (see above)
LABELS, NAMES = "labels", "names"  # the optional settings
MAX_NAME_LENGTH = 255  # a file name's bytes on common file systems

_FIXED = struct.Struct("<8sHH32sIHHHHI")  # magic .. settings length: offsets 0..59
_LENGTH = struct.Struct("<Q")
_CRC = struct.Struct("<I")
_SMALLEST = _FIXED.size + _LENGTH.size + _CRC.size  # no settings, no images, no payload
_VERSION_1 = ("an .axc file of format version 1, whose probabilities depended on the machine "
              "that wrote it; this version of the toolkit reads version 2: decompress it with "
              "the toolkit that wrote it, on the same kind of machine")


@dataclass(frozen=True)
class Header:
    fingerprint: bytes  # SHA-256 of the model that wrote the file (32 bytes)
    shape: tuple[int, int, int, int]  # N, C, H, W
    levels: int
    arithmetic: int  # the arithmetic version of the coding distribution
    settings: dict  # labels: the images' classes; names: their file names (both optional)
    image_crcs: tuple[int, ...]  # CRC-32 of each image's uint8 pixels in [C, H, W] order


def pack(header: Header, payload: bytes) -> bytes:
    """The file's bytes: header, payload and the closing CRC-32."""
    check_settings(header.settings, header.shape[0])
    settings = json.dumps(header.settings, sort_keys=True, ensure_ascii=False).encode()
    body = b"".join([
        _FIXED.pack(MAGIC, VERSION, header.arithmetic, header.fingerprint, *header.shape,
                    header.levels, len(settings)),
        settings,
        struct.pack(f"<{len(header.image_crcs)}I", *header.image_crcs),
        _LENGTH.pack(len(payload)),
        payload,
    ])
    return body + _CRC.pack(zlib.crc32(body))


def unpack(data: bytes) -> tuple[Header, bytes]:
    """(header, payload) of a file's bytes; a ValueError that says what is wrong with any other
    bytes: another format, damage (a changed byte, anywhere), truncation, another version, or a
    header that cannot describe a real file."""
    if not data.startswith(MAGIC):
        raise ValueError("not an Axial Transformer codec file (.axc): it does not start with "
                         "the magic bytes \\x89AXC")
    if len(data) >= 10 and struct.unpack_from("<H", data, 8)[0] == 1:
        raise ValueError(_VERSION_1)
    check_integrity(data)
    _, version, arithmetic, fingerprint, n, c, h, w, levels, settings_length = \
        _FIXED.unpack_from(data)
    if version != VERSION:
        raise ValueError(f"an .axc file of format version {version}; this version of the "
                         f"toolkit reads version {VERSION}")
    end = _FIXED.size
    try:
        settings = json.loads(data[end : end + settings_length].decode())
        end += settings_length
        crcs = struct.unpack_from(f"<{n}I", data, end)
        end += 4 * n
        (payload_length,) = _LENGTH.unpack_from(data, end)
        end += _LENGTH.size
    except (ValueError, struct.error, RecursionError) as e:  # a writer that breaks the layout
        raise ValueError(f"a damaged .axc file: its header does not parse "
                         f"({type(e).__name__})") from None
    if end + payload_length + _CRC.size != len(data):
        raise ValueError(f"a damaged .axc file: {len(data)} bytes, its header declares "
                         f"{end + payload_length + _CRC.size}")
    if n < 1 or min(c, h, w) < 1 or not 2 <= levels <= 256:
        raise ValueError(f"an .axc file of {n} images of {c}x{h}x{w} with {levels} levels: "
                         "expected at least one image, every size at least 1, 2 to 256 levels")
    check_settings(settings, n)
    check_payload_size(n * c * h * w, levels, payload_length)
    header = Header(fingerprint, (n, c, h, w), levels, arithmetic, settings, crcs)
    return header, data[end : end + payload_length]


def check_settings(settings: object, n: int) -> None:
    """Settings: a JSON object with at most `labels` (n integers, -1 or more) and `names`
    (n distinct file names, no folders)."""
    if not isinstance(settings, dict) or not set(settings) <= {LABELS, NAMES}:
        keys = sorted(settings) if isinstance(settings, dict) else type(settings).__name__
        raise ValueError(f"an .axc file with the settings {keys}; version {VERSION} has at "
                         f"most {LABELS} and {NAMES}")
    labels = settings.get(LABELS, [])
    if LABELS in settings and (not isinstance(labels, list) or len(labels) != n or
                               not all(type(k) is int and -1 <= k < 2**31 for k in labels)):
        raise ValueError(f"an .axc file whose labels are not {n} classes (integers, -1 for none)")
    names = settings.get(NAMES, [])
    if NAMES in settings and (not isinstance(names, list) or len(names) != n or
                              not all(map(safe_name, names)) or len(set(names)) != n):
        raise ValueError(f"an .axc file whose names are not {n} distinct file names")


def safe_name(name: object) -> bool:
    """A plain file name: no folder, not hidden, nothing a file system would refuse."""
    return (isinstance(name, str) and 0 < len(name.encode("utf-8", "replace")) <= MAX_NAME_LENGTH
            and not name.startswith(".") and not any(ch in name for ch in "/\\\0")
            and name.isprintable())


def check_payload_size(subpixels: int, levels: int, payload_bytes: int) -> None:
    """The coder gives each value at least 1/2^24 of probability, so no subpixel costs less than
    -log2(1 - (levels - 1) / 2^24) bits: a payload bounds the subpixels it can hold (before
    anything is allocated for them), whatever the header claims."""
    least_bits = -math.log2(1 - (levels - 1) / 2**24)
    most = int((8 * payload_bytes + 64) / least_bits) + 1
    if subpixels > most:
        raise ValueError(f"an .axc file that claims {subpixels:,} subpixels in a payload of "
                         f"{payload_bytes:,} bytes, which holds at most {most:,}")


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
    """The size a version-2 header declares, or a lower bound when the header itself is cut
    short; None for another version."""
    _, version, _, _, n, *_, settings_length = _FIXED.unpack_from(data)
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
