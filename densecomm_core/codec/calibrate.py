"""Fit the ``pca`` codec's KV bases for a relay: the sender's cache space, and the receiver space the adapter writes.

    calibrate(sender, texts)                              KVBasis of the sender's caches (hop 1 payloads)
    calibrate(sender, texts, adapter, receiver)           ... and of the adapter's outputs (hop 2 payloads)

The caches are exactly what each hop ships: the sender's prefill, and the adapter's transform of it,
with keys RoPE-stripped when ``strip_rope`` (the ``pca`` codec's default).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from densecomm_core.codec.transform import KVBasis


@torch.no_grad()
def calibrate(sender, texts: Sequence[str], adapter=None, receiver=None, strip_rope: bool = True,
              batch_size: int = 16) -> tuple[KVBasis, KVBasis | None]:
    """Bases fitted on the sender's prefill of ``texts`` (and on the adapter's transform of those caches)."""
    from densecomm_core.relay import sender_prefill, transform_cache
    from densecomm_core.rope import strip_rope as strip

    if not texts:
        raise ValueError("calibration needs at least one text")
    if (adapter is None) != (receiver is None):
        raise ValueError("pass both adapter and receiver to calibrate the receiver space, or neither")
    sent, transformed = [], []
    for start in range(0, len(texts), batch_size):
        cache = sender_prefill(sender, list(texts[start : start + batch_size])).to(dtype=torch.float32)
        sent.append(strip(cache, sender) if strip_rope else cache)
        if adapter is not None:  # transform_cache takes a stripped cache as it is
            out = transform_cache(adapter, sent[-1], sender, receiver).to(dtype=torch.float32)
            transformed.append(strip(out, receiver) if strip_rope else out)
    return KVBasis.fit(sent), KVBasis.fit(transformed) if adapter is not None else None
