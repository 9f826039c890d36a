"""zstd helpers shared by codecs: per-thread contexts, bounded decompression, framed byte sections."""

from __future__ import annotations

import struct
import threading

import zstandard

try:  # the standard library's zstd (Python >= 3.14), else its backport: both take zstd's experimental parameters
    from compression.zstd import CompressionParameter as Parameter, ZstdCompressor
except ImportError:
    try:
        from backports.zstd import CompressionParameter as Parameter, ZstdCompressor
    except ImportError as exc:
        raise ImportError("densecomm's codecs need zstd bindings that pass zstd's experimental parameters: the standard "
                          "library's compression.zstd (Python >= 3.14, built with zstd) or, below 3.14, the "
                          "backports.zstd package (pip install 'backports.zstd>=1.0')") from exc

from densecomm_core.codec.base import CodecError, TruncatedError

_local = threading.local()
SECTION = struct.Struct("<BI")  # mode (0 stored, 1 zstd), length
STORED, ZSTD = 0, 1


FLOAT_PLANE_MAX_LEVEL = 3
# zstd's ZSTD_c_literalCompressionMode (an experimental parameter, stable since zstd 1.4.5) and its
# ZSTD_ps_enable: entropy-code the literals even at negative (accelerated) levels, which store them raw.
LITERAL_COMPRESSION_MODE, LITERALS_HUFFMAN = 1002, 1


def compressor(level: int, float_planes: bool = False):
    """A per-thread compressor (``compress`` calls it). ``float_planes`` tunes fast levels (<= 3) for byte
    planes of floats, which hold few repeated strings: a tiny hash table and 7-byte minimum matches
    leave zstd mostly to its entropy stage (bf16 exponent planes: ~20 % faster and ~13 % smaller than
    stock level 1; bit-packed integer codes, which do repeat, lose ~3 % with it, so they keep stock
    settings). A negative level -k on float planes is zstd's acceleration k (its match finder skips
    ahead k times faster where it finds nothing) with the literals still Huffman-coded: zstd's own
    negative levels store literals raw, which leaves an exponent plane nearly uncompressed, while most
    of a bf16 exponent plane's gain is its entropy stage (see ``LosslessCodec``)."""
    cache = getattr(_local, "compressors", None)
    if cache is None:
        cache = _local.compressors = {}
    key = (level, float_planes)
    if key not in cache:
        if float_planes and level <= FLOAT_PLANE_MAX_LEVEL:
            # a negative level keeps level 1's tables and accelerates its match finder
            params = zstandard.ZstdCompressionParameters.from_level(level if level >= 0 else 1, hash_log=6, min_match=7, search_log=1)
            options = {
                Parameter.strategy: params.strategy, Parameter.window_log: params.window_log,
                Parameter.chain_log: params.chain_log, Parameter.hash_log: params.hash_log,
                Parameter.search_log: params.search_log, Parameter.min_match: params.min_match,
                Parameter.target_length: -level if level < 0 else params.target_length,
                Parameter.content_size_flag: 1, Parameter.checksum_flag: 0,
                LITERAL_COMPRESSION_MODE: LITERALS_HUFFMAN,
            }
            frame = ZstdCompressor(options=options)
            cache[key] = lambda data: frame.compress(data, mode=ZstdCompressor.FLUSH_FRAME)
        else:  # stock level: zstd also sizes its tables to each input
            cache[key] = zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=False).compress
    return cache[key]


def decompressor() -> zstandard.ZstdDecompressor:
    if getattr(_local, "decompressor", None) is None:
        _local.decompressor = zstandard.ZstdDecompressor()
    return _local.decompressor


def compress(data: bytes | memoryview, level: int, float_planes: bool = False) -> bytes:
    return compressor(level, float_planes)(data)


def decompress(data: bytes | memoryview, expected_size: int) -> bytes:
    """Decompress exactly ``expected_size`` bytes; a frame that claims or yields anything else is an error."""
    try:
        declared = zstandard.frame_content_size(data)
    except zstandard.ZstdError as exc:
        raise CodecError(f"corrupt zstd frame: {exc}") from exc
    if declared != expected_size:
        raise CodecError(f"zstd frame declares {declared} bytes, expected {expected_size}")
    try:
        out = decompressor().decompress(data, max_output_size=expected_size)
    except zstandard.ZstdError as exc:
        raise CodecError(f"corrupt zstd frame: {exc}") from exc
    if len(out) != expected_size:
        raise CodecError(f"zstd frame yielded {len(out)} bytes, expected {expected_size}")
    return out


def decompress_into(data: bytes | memoryview, out) -> None:
    """Decompress a frame of exactly ``len(out)`` bytes into the writable buffer ``out`` (no allocation:
    zstd writes straight into it when the whole frame is at hand); errors as ``decompress``."""
    out = memoryview(out).cast("B")
    try:
        declared = zstandard.frame_content_size(data)
    except zstandard.ZstdError as exc:
        raise CodecError(f"corrupt zstd frame: {exc}") from exc
    if declared != len(out):
        raise CodecError(f"zstd frame declares {declared} bytes, expected {len(out)}")
    try:
        # The whole frame in one read: zstd then decodes it in one pass, checking its declared size.
        size = decompressor().stream_reader(data, read_size=len(data) + 1).readinto(out)
    except zstandard.ZstdError as exc:
        raise CodecError(f"corrupt zstd frame: {exc}") from exc
    if size != len(out):
        raise CodecError(f"zstd frame yielded {size} bytes, expected {len(out)}")


def scratch(size: int, slot=0):
    """A thread-local uint8 buffer of ``size`` bytes, reused across calls on this thread (no fresh pages
    to fault in per chunk); valid until the next ``scratch(..., slot)`` call on the same thread."""
    import numpy as np

    buffers = getattr(_local, "scratch", None)
    if buffers is None:
        buffers = _local.scratch = {}
    buffer = buffers.get(slot)
    if buffer is None or buffer.size < size:
        buffer = buffers[slot] = np.empty(max(size, 1 << 16), dtype=np.uint8)
    return buffer[:size]


PROBE_BYTES = 8 << 10
MIN_PROBE_BYTES = 1 << 10


def section_parts(data, level: int | None, float_planes: bool = False, probe: bool = True) -> list:
    """One framed section as [prefix, body] buffers: compressed when it pays (>= 2 % smaller), else stored.

    Sections are probed first (unless ``probe`` is false: the caller expects them to shrink): when their
    first eighth (1-8 KiB) does not shrink by 5 %, the whole section is stored without a full compression
    attempt (mantissa bytes look random and never shrink). A stored body is the caller's buffer itself,
    not a copy.
    """
    view = memoryview(data).cast("B")
    if level is not None:
        size = min(PROBE_BYTES, len(view) // 8)
        if not probe or size < MIN_PROBE_BYTES or len(compress(view[:size], level, float_planes)) < 0.95 * size:
            packed = compress(view, level, float_planes)
            if len(packed) < 0.98 * len(view):
                return [SECTION.pack(ZSTD, len(packed)), packed]
    return [SECTION.pack(STORED, len(view)), view]


def pack_section(data, level: int | None) -> bytes:
    """``section_parts`` joined into one byte string."""
    return b"".join(section_parts(data, level))


def unpack_section(payload: memoryview, offset: int, expected_size: int, out=None) -> tuple[bytes | memoryview, int]:
    """Read one section at ``offset``; returns (exactly ``expected_size`` bytes, next offset). A compressed
    section is decompressed into ``out`` (a writable buffer of ``expected_size`` bytes) when given; a
    stored one is returned as a view of ``payload`` either way."""
    if offset + SECTION.size > len(payload):
        raise TruncatedError(f"payload ends inside a section header at byte {offset}")
    mode, size = SECTION.unpack_from(payload, offset)
    start, end = offset + SECTION.size, offset + SECTION.size + size
    if end > len(payload):
        raise TruncatedError(f"section at byte {offset} needs {size} bytes, {len(payload) - start} remain")
    body = payload[start:end]
    if mode == STORED:
        if size != expected_size:
            raise CodecError(f"stored section is {size} bytes, expected {expected_size}")
        return body, end
    if mode == ZSTD:
        if out is not None:
            decompress_into(body, out)
            return out, end
        return decompress(body, expected_size), end
    raise CodecError(f"unknown section mode {mode}")
