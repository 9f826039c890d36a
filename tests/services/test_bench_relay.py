"""`densecomm bench relay`'s hop table on a tiny cache: the bare byte-stream ceiling is measured in the same run
and every hop figure is printed as a ratio to it (a command's output format, not a timing assertion)."""

from __future__ import annotations

import pytest
import torch

from densecomm_core.cache import KVCache
from services.bench import relay as bench


def tiny_cache(layers: int = 3, tokens: int = 16) -> KVCache:
    g = torch.Generator().manual_seed(0)
    keys = [torch.randn(1, 2, tokens, 8, generator=g).to(torch.bfloat16) for _ in range(layers)]
    values = [torch.randn(1, 2, tokens, 8, generator=g).to(torch.bfloat16) for _ in range(layers)]
    return KVCache(keys, values, torch.ones(1, tokens, dtype=torch.bool), torch.arange(tokens)[None], True, "tiny")


def test_hop_rows_are_ratios_to_the_bare_stream_of_the_same_run():
    cache = tiny_cache()
    rows = bench.hop_table(cache, repeats=1, workers=1)
    ceilings = bench.ceiling_table(cache.nbytes, repeats=1, sizes=(1024, 4096))
    bare = next(r for r in rows if r["path"].startswith("bare gRPC bytes"))
    assert bare["ratio"] == pytest.approx(1.0)
    for row in rows:
        assert row["mb_s"] > 0 and row["ratio"] == pytest.approx(row["mb_s"] / bare["mb_s"])
    assert {r["codec"] for r in rows} >= {"raw", "lossless"} and len(ceilings) == 2
    text = bench.render_hop(rows, ceilings)
    assert "x bare" in text and f"{bare['ratio']:7.2f}".strip() == "1.00"
    lines = text.splitlines()
    assert all(f"{r['ratio']:7.2f}" in line for r, line in zip(rows, lines[1:]))
