"""`densecomm bench codec`'s rows, targets and stage profile on tiny caches (output format and bookkeeping,
not timing assertions)."""

from __future__ import annotations

import pytest
import torch

from densecomm_core.cache import KVCache
from densecomm_core.codec import get_codec
from densecomm_core.codec.transform import KVBases
from services.bench import codec as bench


def tiny_cache(layers: int = 3, tokens: int = 16, seed: int = 0) -> KVCache:
    g = torch.Generator().manual_seed(seed)
    keys = [torch.randn(1, 2, tokens, 8, generator=g).to(torch.bfloat16) for _ in range(layers)]
    values = [torch.randn(1, 2, tokens, 8, generator=g).to(torch.bfloat16) for _ in range(layers)]
    return KVCache(keys, values, torch.ones(1, tokens, dtype=torch.bool), torch.arange(tokens)[None], True, "tiny")


def test_rows_carry_time_per_request():
    r = bench.row("zoo", "lossless", raw_bytes=2_000_000, wire_bytes=1_000_000, encode_s=0.002, decode_s=0.001, requests=4)
    assert r.ratio == 2.0 and r.encode_mb_s == pytest.approx(1000) and r.decode_mb_s == pytest.approx(2000)
    assert r.us_per_request == pytest.approx(750)
    assert "750" in bench.render([r]).splitlines()[-1]


def test_targets_are_marked_ok_or_missed_from_the_rows_of_the_run():
    rows = [
        bench.row("qwen3-4b", "lossless", 26_000_000, 16_000_000, 0.026, 0.010, 1),  # 1000 MB/s encode, 2600 decode
        bench.row("qwen3-4b", bench.REFERENCE, 26_000_000, 20_000_000, 0.020, 0.026, 1),
        bench.row("qwen3-4b", "pca k.25/v.35", 26_000_000, 5_000_000, 0.050, 0.050, 1),  # 520 MB/s
        bench.row("zoo", "lossless", 48_000 * 60, 30_000 * 60, 60 * 0.0002, 60 * 0.0002, 60),  # 0.4 ms per request
        bench.row("zoo", bench.REFERENCE, 48_000 * 60, 40_000 * 60, 60 * 0.00005, 60 * 0.00005, 60),
    ]
    found = {t.name: t for t in bench.targets(rows)}
    assert not found["qwen3-4b lossless encode"].ok and found["qwen3-4b lossless decode"].ok
    assert found["zoo lossless enc+dec per request"].ok and found["zoo lossless enc+dec per request"].value == pytest.approx(0.4)
    assert found["qwen3-4b pca k.25/v.35 encode"].ok
    text = bench.render_targets(list(found.values()))
    marks = [line.split()[0] for line in text.splitlines()]
    assert marks.count("MISSED") == 1 and marks.count("ok") == 3 and "zstd -1 0.100 ms" in text
    assert bench.targets(rows[:1])[0].name == "qwen3-4b lossless decode"  # rows not measured: no target


def test_measure_has_a_reference_row_and_the_profile_splits_time_into_stages():
    caches = [tiny_cache(seed=s) for s in range(2)]
    encode, decode, encode_s, decode_s = bench.profile_codec(caches, get_codec("lossless"), KVBases(), repeats=1)
    assert encode["zstd compress"] > 0 and decode["zstd decompress"] > 0 and encode_s > 0 and decode_s > 0
    assert sum(encode.values()) > 0 and set(encode) <= {s for s, _ in bench.STAGES} | {"python (rest)"}
    text = bench.render_profile("title", (encode, decode, encode_s, decode_s), "µs")
    assert "zstd compress" in text and "wall, no profiler" in text
