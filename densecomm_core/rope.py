"""Positional disentanglement (paper eq. 8-9): remove and re-apply a model's own rotary embedding on cached keys.

Both directions call the model's own ``rotary_emb`` (so scaled variants such as YaRN, Llama-3 or
dynamic NTK come for free) and its own ``apply_rotary_pos_emb``. RoPE rotates each coordinate pair by
an angle and may scale by an attention factor m (cos = m·cos θ, sin = m·sin θ); the inverse rotates by
-θ and divides by m² = cos² + sin², exactly. Values carry no rotation and pass through unchanged.
"""

from __future__ import annotations

import torch

from densecomm_core.cache import KVCache
from densecomm_core.errors import CacheLayoutError
from densecomm_core.models import RopeModel


def rotary_cos_sin(model: RopeModel, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (B, T, head_dim) in float32 for logical ``positions`` (B, T)."""
    probe = torch.empty(0, dtype=torch.float32, device=positions.device)
    cos, sin = model.rotary_embedding(probe, positions)
    return cos.float(), sin.float()


def _rotated(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, model: RopeModel) -> torch.Tensor:
    # apply_rotary_pos_emb rotates a query and a key; only the key is wanted, so the query is one head of
    # the keys (B, 1, T, D): its result is discarded, and the key's does not depend on it (bit for bit)
    return model.apply_rotary(keys[:, :1], keys, cos, sin)[1]


def rotate_keys(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, model: RopeModel) -> torch.Tensor:
    """Apply the model's RoPE to keys (B, H, T, D) with cos/sin (B, T, D)."""
    return _rotated(keys, cos, sin, model)


def unrotate_keys(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, model: RopeModel) -> torch.Tensor:
    """Exact inverse of ``rotate_keys``: rotate by -θ, then undo the attention scaling."""
    scale = (cos * cos + sin * sin).unsqueeze(1)  # (B, 1, T, D): m² per coordinate
    return _rotated(keys, cos, -sin, model) / scale


def _check(cache: KVCache, model: RopeModel, want_applied: bool) -> None:
    if cache.rope_applied != want_applied:
        state = "applied" if cache.rope_applied else "stripped"
        raise CacheLayoutError(f"cache RoPE is already {state}; expected rope_applied={want_applied}")
    g = model.geometry
    cache.check_matches(g.num_layers, g.num_kv_heads, g.head_dim, who=f"model {model.path!r}")


def strip_rope(cache: KVCache, model: RopeModel) -> KVCache:
    """Remove ``model``'s rotation from the keys of its own cache (eq. 8). Returns float32 tensors."""
    _check(cache, model, want_applied=True)
    cos, sin = rotary_cos_sin(model, cache.positions)
    keys = [unrotate_keys(k.float(), cos, sin, model) for k in cache.keys]
    return cache.with_tensors(keys, [v.float() for v in cache.values], rope_applied=False)


def restore_rope(cache: KVCache, model: RopeModel, dtype: torch.dtype | None = None) -> KVCache:
    """Apply ``model``'s rotation at the cache's positions (eq. 9), returning ``dtype`` (model's by default)."""
    _check(cache, model, want_applied=False)
    dtype = dtype or model.dtype
    cos, sin = rotary_cos_sin(model, cache.positions)
    keys = [rotate_keys(k.float(), cos, sin, model).to(dtype) for k in cache.keys]
    values = [v.to(dtype) for v in cache.values]
    return cache.with_tensors(keys, values, rope_applied=True, fingerprint=model.geometry.fingerprint())
