"""`eviction`: keep the most-attended fraction of token positions, optionally with orthogonal backfill (OBF).

Importance of a token is the attention it receives from an observation window (the last ``window``
tokens' keys standing in for queries, SnapKV-style), summed over heads and layers; the first token
(the attention sink) and the window itself are always kept. The cache keeps explicit logical
positions, so the receiver's RoPE and its continuation positions stay right after tokens are dropped.

With ``obf_rank`` > 0, what eviction throws away is partly folded back in (our reading of Orthogonal
BackFill, seed ``obf-relay-abstract.txt``): per layer and KV head, each dropped token is assigned to
the kept token with the most similar key; the part of its value orthogonal to that kept value is
projected onto the top-``obf_rank`` principal directions of all such residuals, and the kept value
gains the mean of its assigned residuals, scaled by 1/(1 + count) as in a token merge.

Encoding of the kept tokens is delegated to an inner codec (``lossless`` by default, or ``quantized``).
"""

from __future__ import annotations

import copy
import math

import torch

from densecomm_core.cache import KVCache
from densecomm_core.codec.base import Codec, CodecError, get_codec, integer_in, number_in


def token_importance(cache: KVCache, window: int) -> torch.Tensor:
    """(B, T) attention mass each slot receives from the last ``window`` valid slots of its row."""
    scores = torch.zeros(cache.batch_size, cache.num_tokens, device=cache.device)
    lengths = cache.lengths
    for b in range(cache.batch_size):
        n = int(lengths[b])
        if n == 0:
            continue
        w = min(window, n)
        for keys in cache.keys:
            k = keys[b, :, :n].float()  # (H, n, D)
            q = k[:, n - w :]  # (H, w, D)
            logits = q @ k.transpose(1, 2) / math.sqrt(k.shape[-1])  # (H, w, n)
            causal = torch.arange(n, device=k.device)[None, :] <= torch.arange(n - w, n, device=k.device)[:, None]  # (w, n)
            logits = logits.masked_fill(~causal, float("-inf"))
            scores[b, :n] += logits.softmax(dim=-1).sum(dim=(0, 1))
    return scores


def kept_indices(scores: torch.Tensor, lengths: torch.Tensor, keep: float, window: int) -> list[torch.Tensor]:
    """Per row, sorted indices of the slots to keep: sink + window + the highest-scoring rest."""
    rows = []
    for b in range(scores.shape[0]):
        n = int(lengths[b])
        budget = min(n, max(math.ceil(keep * n), min(n, window + 1)))
        forced = torch.zeros(n, dtype=torch.bool, device=scores.device)
        forced[:1] = True
        forced[max(0, n - window) :] = True
        ranked = scores[b, :n].masked_fill(forced, float("inf"))
        rows.append(ranked.topk(budget).indices.sort().values)
    return rows


def orthogonal_backfill(keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor, rank: int) -> torch.Tensor:
    """New values (H, k, D) for the kept slots of one row and layer; keys/values are (H, n, D)."""
    n = keys.shape[1]
    dropped = torch.ones(n, dtype=torch.bool, device=keys.device)
    dropped[keep] = False
    kept_v = values[:, keep].float()
    if not dropped.any():
        return kept_v
    k_kept = torch.nn.functional.normalize(keys[:, keep].float(), dim=-1)
    k_drop = torch.nn.functional.normalize(keys[:, dropped].float(), dim=-1)
    v_drop = values[:, dropped].float()
    owner = (k_drop @ k_kept.transpose(1, 2)).argmax(dim=-1)  # (H, d): kept slot each dropped token joins
    anchor = torch.nn.functional.normalize(torch.gather(kept_v, 1, owner[..., None].expand_as(v_drop)), dim=-1)
    residual = v_drop - (v_drop * anchor).sum(-1, keepdim=True) * anchor  # orthogonal to the owner's value
    if rank < residual.shape[-1]:
        # top-r right singular vectors of the residuals = top-r eigenvectors of their D x D Gram matrix
        _, eigenvectors = torch.linalg.eigh(residual.transpose(1, 2) @ residual)  # ascending eigenvalues
        basis = eigenvectors[:, :, -rank:]  # (H, D, r)
        residual = residual @ basis @ basis.transpose(1, 2)
    counts = kept_v.new_zeros(kept_v.shape[:2]).scatter_add_(1, owner, torch.ones_like(owner, dtype=torch.float))
    summed = torch.zeros_like(kept_v).scatter_add_(1, owner[..., None].expand_as(residual), residual)
    return kept_v + summed / (1 + counts)[..., None]


class EvictionCodec(Codec):
    name = "eviction"
    lossless = False

    def __init__(self, keep: float = 0.5, window: int = 8, obf_rank: int = 0, inner: str = "lossless", inner_params: dict | None = None) -> None:
        if not number_in(keep, 0, 1) or keep == 0:
            raise CodecError(f"keep must be a fraction in (0, 1], got {keep!r}")
        if not integer_in(window, 1, 4096):
            raise CodecError(f"window must be an integer in [1, 4096], got {window!r}")
        if not integer_in(obf_rank, 0, 1024):
            raise CodecError(f"obf_rank must be an integer in [0, 1024], got {obf_rank!r}")
        if inner == self.name:
            raise CodecError("the eviction codec cannot wrap itself")
        if inner_params is not None and not isinstance(inner_params, dict):
            raise CodecError(f"inner_params must be a mapping, got {inner_params!r}")
        self.keep, self.window, self.obf_rank = float(keep), window, obf_rank
        self.inner_name, self.inner_params = inner, dict(inner_params or {})
        self.inner = get_codec(inner, **self.inner_params)
        if self.inner.strips_rope:
            raise CodecError(f"eviction scores attention on RoPE-applied keys; its inner {inner!r} codec must not strip RoPE "
                             "(pass strip_rope=false in inner_params)")

    @property
    def params(self) -> dict:
        return {"keep": self.keep, "window": self.window, "obf_rank": self.obf_rank,
                "inner": self.inner_name, "inner_params": self.inner_params}

    def prepare(self, cache: KVCache) -> KVCache:
        if not cache.rope_applied:
            raise CodecError("eviction scores attention with RoPE applied; got a stripped cache")
        keep_rows = kept_indices(token_importance(cache, self.window), cache.lengths, self.keep, self.window)
        width = max(len(k) for k in keep_rows)
        batch = cache.batch_size
        mask = torch.zeros(batch, width, dtype=torch.bool, device=cache.device)
        positions = torch.zeros(batch, width, dtype=torch.long, device=cache.device)
        keys = [k.new_zeros(batch, k.shape[1], width, k.shape[3]) for k in cache.keys]
        values = [v.new_zeros(batch, v.shape[1], width, v.shape[3]) for v in cache.values]
        for b, keep in enumerate(keep_rows):
            m = len(keep)
            mask[b, :m] = True
            positions[b, :m] = cache.positions[b, keep]
            n = int(cache.lengths[b])
            for layer, (k, v) in enumerate(zip(cache.keys, cache.values)):
                keys[layer][b, :, :m] = k[b, :, keep]
                if self.obf_rank:
                    values[layer][b, :, :m] = orthogonal_backfill(k[b, :, :n], v[b, :, :n], keep, self.obf_rank).to(v.dtype)
                else:
                    values[layer][b, :, :m] = v[b, :, keep]
        return cache.with_tensors(keys, values, mask=mask, positions=positions)

    def for_forwarding(self) -> Codec:
        return self.inner

    def bind(self, cache_fingerprint: str, rope_applied: bool, bases=None) -> Codec:
        inner = self.inner.bind(cache_fingerprint, rope_applied, bases)
        if inner is self.inner:
            return self
        bound = copy.copy(self)
        bound.inner, bound.inner_params = inner, dict(inner.params)
        return bound

    def for_layer(self, layer: int) -> Codec:
        return self.inner.for_layer(layer)  # kept tokens are coded by the inner codec

    def encode(self, keys, values):
        return self.inner.encode(keys, values)

    def decode(self, payload, key_shape, value_shape, dtype):
        return self.inner.decode(payload, key_shape, value_shape, dtype)
