"""KV wire format and codecs: see ``wire`` for the format and ``base`` for the codec interface and registry."""

from densecomm_core.codec.base import Codec, CodecError, DecodeLimits, get_codec
from densecomm_core.codec.wire import (
    StreamDecoder,
    decode_cache,
    encode_cache,
    iter_encode,
    round_trip,
)

__all__ = ["Codec", "CodecError", "DecodeLimits", "StreamDecoder", "decode_cache", "encode_cache", "get_codec", "iter_encode", "round_trip"]
