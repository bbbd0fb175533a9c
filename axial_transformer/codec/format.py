"""The codec's container (.axc), format version 2 (layout in docs/codec.md). Every version starts
with the magic bytes and ends with the CRC-32 of the rest, so a damaged file is told apart from
one of another version. Nothing about how the writer computed (threads, batch, device) is kept.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from dataclasses import dataclass

MAGIC = b"\x89AXC\r\n\x1a\n"  # PNG's trick: a high bit, CR LF, Ctrl-Z, LF catch mangled copies
VERSION = 2
GROUP_SIZE = 64  # images coded side by side, one group after another: the stream's order
LABELS, NAMES = "labels", "names"  # the optional settings
MAX_NAME_LENGTH = 255  # a file name's bytes on common file systems

# magic, format and arithmetic versions, model fingerprint, N, C, H, W, levels, settings length;
# then the settings (JSON), N CRC-32s, the payload's length (_LENGTH), the payload and a CRC-32.
_FIXED = struct.Struct("<8sHH32sIHHHHI")
_LENGTH = struct.Struct("<Q")
_CRC = struct.Struct("<I")
_SMALLEST = _FIXED.size + _LENGTH.size + _CRC.size  # no settings, no images, no payload


@dataclass(frozen=True)
class Header:
    fingerprint: bytes  # SHA-256 of the model that wrote the file (32 bytes)
    shape: tuple[int, int, int, int]  # N, C, H, W
    levels: int
    arithmetic: int  # the arithmetic version of the coding distribution
    settings: dict  # labels: the images' classes; names: their file names (both optional)
    image_crcs: tuple[int, ...]  # CRC-32 of each image's uint8 pixels in [C, H, W] order


def pack(header: Header, payload: bytes) -> bytes:
    check_settings(header.settings, header.shape[0])
    settings = json.dumps(header.settings, sort_keys=True, ensure_ascii=False).encode()
    fixed = _FIXED.pack(MAGIC, VERSION, header.arithmetic, header.fingerprint, *header.shape,
                        header.levels, len(settings))
    crcs = struct.pack(f"<{len(header.image_crcs)}I", *header.image_crcs)
    body = b"".join([fixed, settings, crcs, _LENGTH.pack(len(payload)), payload])
    return body + _CRC.pack(zlib.crc32(body))


def unpack(data: bytes) -> tuple[Header, bytes]:
    """(header, payload), or a ValueError that says what is wrong: another format, damage,
    truncation, another version, or a header that cannot describe a real file."""
    if not data.startswith(MAGIC):
        raise ValueError("not an Axial Transformer codec file (.axc): it does not start with "
                         "the magic bytes \\x89AXC")
    if len(data) < _SMALLEST:
        raise ValueError(f"a truncated .axc file: {len(data)} bytes, less than the {_SMALLEST} "
                         "of the smallest one")
    _, version, arithmetic, fingerprint, n, c, h, w, levels, settings_length = \
        _FIXED.unpack_from(data)
    at = _FIXED.size + settings_length + 4 * n  # the payload's length, then the payload
    payload_length = _LENGTH.unpack_from(data, at)[0] if len(data) >= at + _LENGTH.size else 0
    end = at + _LENGTH.size + payload_length + _CRC.size  # the size the header declares
    check_integrity(data, end if version == VERSION else None)
    if version != VERSION:
        why = (", whose probabilities depended on the machine that wrote it (decompress it with "
               "the toolkit that wrote it, on the same kind of machine)") if version == 1 else ""
        raise ValueError(f"an .axc file of format version {version}{why}; this version of the "
                         f"toolkit reads version {VERSION}")
    if end != len(data):
        raise ValueError(f"a damaged .axc file: {len(data)} bytes, its header declares {end}")
    try:
        settings = json.loads(data[_FIXED.size : _FIXED.size + settings_length].decode())
    except (ValueError, RecursionError) as e:  # a writer that breaks the layout
        raise ValueError(f"a damaged .axc file: its header does not parse "
                         f"({type(e).__name__})") from None
    if n < 1 or min(c, h, w) < 1 or not 2 <= levels <= 256:
        raise ValueError(f"an .axc file of {n} images of {c}x{h}x{w} with {levels} levels: "
                         "expected at least one image, every size at least 1, 2 to 256 levels")
    check_settings(settings, n)
    # The coder gives each value at least 2^-24, so no subpixel costs less than
    # -log2(1 - (levels - 1) / 2^24) bits: the payload bounds the subpixels the header may claim
    # before anything is allocated for them.
    most = int((8 * payload_length + 64) / -math.log2(1 - (levels - 1) / 2**24)) + 1
    if n * c * h * w > most:
        raise ValueError(f"an .axc file that claims {n * c * h * w:,} subpixels in a payload of "
                         f"{payload_length:,} bytes, which holds at most {most:,}")
    crcs = struct.unpack_from(f"<{n}I", data, _FIXED.size + settings_length)
    header = Header(fingerprint, (n, c, h, w), levels, arithmetic, settings, crcs)
    return header, data[at + _LENGTH.size : end - _CRC.size]


def check_settings(settings: object, n: int) -> None:
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


def check_integrity(data: bytes, declared: int | None) -> None:
    """The closing CRC-32 must match; if not, the file is truncated when shorter than the size
    its header `declared` (None: another version), or else damaged."""
    if _CRC.pack(zlib.crc32(data[: -_CRC.size])) == data[-_CRC.size :]:
        return
    if declared is not None and declared > len(data):
        raise ValueError(f"a truncated .axc file (or one with a damaged header): it ends after "
                         f"{len(data):,} bytes, its header declares at least {declared:,}")
    raise ValueError("a damaged .axc file: its checksum does not match its contents (a byte "
                     "was changed, added or lost)")
