"""KVCache: a typed, model-independent KV cache, convertible to and from transformers' DynamicCache.

Layout (per layer l): keys[l], values[l] are ``[batch, kv_heads, tokens, head_dim]``; heads and head
dims may differ between keys and values of different models but not within a layer. ``mask`` is
``[batch, tokens]`` (True = a real token; caches are right-padded, so valid slots come first) and
``positions`` is ``[batch, tokens]`` with each slot's logical RoPE position. ``rope_applied`` says
whether keys carry the rotation of the model named by ``fingerprint``. All tensors of a cache live
on one device (``KVCache.device``); ``to(device=...)`` moves it whole.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from transformers import DynamicCache

from densecomm_core.errors import CacheLayoutError


@dataclass
class KVCache:
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    mask: torch.Tensor  # (B, T) bool
    positions: torch.Tensor  # (B, T) long
    rope_applied: bool = True
    fingerprint: str = ""  # geometry fingerprint of the model whose cache space this is

    def __post_init__(self) -> None:
        self.validate()

    # ---- layout -------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def batch_size(self) -> int:
        return int(self.mask.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.mask.shape[1])

    @property
    def lengths(self) -> torch.Tensor:
        """(B,) valid tokens per row."""
        return self.mask.long().sum(dim=1)

    @property
    def next_positions(self) -> torch.Tensor:
        """(B,) logical position of the first token after the cache: last valid position + 1.

        Equal to ``lengths`` for a dense cache; larger when tokens were evicted (positions keep gaps).
        """
        return torch.where(self.mask, self.positions + 1, torch.zeros_like(self.positions)).max(dim=1).values

    @property
    def dtype(self) -> torch.dtype:
        return self.keys[0].dtype

    @property
    def device(self) -> torch.device:
        return self.keys[0].device

    @property
    def nbytes(self) -> int:
        """Bytes of all K and V tensors (padding included), the raw payload size."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def valid_nbytes(self) -> int:
        """Bytes of K and V for real tokens only (what a single-request transfer carries)."""
        per_token = sum(k.shape[1] * k.shape[3] * k.element_size() for k in (*self.keys, *self.values))
        return int(self.lengths.sum()) * per_token

    def validate(self) -> None:
        """Raise CacheLayoutError unless every tensor agrees with the documented layout."""
        if len(self.keys) != len(self.values) or not self.keys:
            raise CacheLayoutError(f"need the same non-zero number of key and value layers, got {len(self.keys)} and {len(self.values)}")
        if self.mask.dim() != 2 or self.mask.dtype != torch.bool:
            raise CacheLayoutError(f"mask must be a (batch, tokens) bool tensor, got {tuple(self.mask.shape)} {self.mask.dtype}")
        if self.positions.shape != self.mask.shape:
            raise CacheLayoutError(f"positions shape {tuple(self.positions.shape)} != mask shape {tuple(self.mask.shape)}")
        batch, tokens = self.mask.shape
        device = self.keys[0].device
        if self.mask.device != device or self.positions.device != device:
            raise CacheLayoutError(f"mask ({self.mask.device}) and positions ({self.positions.device}) must be on the keys' device {device}")
        for layer, (k, v) in enumerate(zip(self.keys, self.values)):
            if k.device != device or v.device != device:
                raise CacheLayoutError(f"layer {layer}: keys on {k.device} and values on {v.device}; a cache lives on one device ({device})")
            if k.dim() != 4 or v.dim() != 4:
                raise CacheLayoutError(f"layer {layer}: keys/values must be [batch, kv_heads, tokens, head_dim], got {tuple(k.shape)} and {tuple(v.shape)}")
            if k.shape[0] != batch or v.shape[0] != batch or k.shape[2] != tokens or v.shape[2] != tokens:
                raise CacheLayoutError(
                    f"layer {layer}: keys {tuple(k.shape)} / values {tuple(v.shape)} disagree with mask (batch={batch}, tokens={tokens})"
                )
            if k.shape[1] != v.shape[1] or k.dtype != v.dtype:
                raise CacheLayoutError(f"layer {layer}: keys {tuple(k.shape)} {k.dtype} and values {tuple(v.shape)} {v.dtype} differ in heads or dtype")

    def check_matches(self, num_layers: int, num_kv_heads: int, head_dim: int, who: str) -> None:
        """Raise CacheLayoutError unless every layer is [*, num_kv_heads, *, head_dim] for ``who``."""
        if self.num_layers != num_layers:
            raise CacheLayoutError(f"{who} expects {num_layers} layers, cache has {self.num_layers}")
        for layer, k in enumerate(self.keys):
            if k.shape[1] != num_kv_heads or k.shape[3] != head_dim or self.values[layer].shape[3] != head_dim:
                raise CacheLayoutError(
                    f"{who} expects layer {layer} as [batch, {num_kv_heads}, tokens, {head_dim}], cache has keys "
                    f"{tuple(k.shape)} and values {tuple(self.values[layer].shape)}"
                )

    # ---- transformations ----------------------------------------------------------------------
    def with_tensors(self, keys: list[torch.Tensor], values: list[torch.Tensor], **changes) -> KVCache:
        """A copy with new K/V (and any other field changed); mask and positions follow the keys' device."""
        device = keys[0].device if keys else self.mask.device
        for name in ("mask", "positions"):
            changes[name] = changes.get(name, getattr(self, name)).to(device)
        return replace(self, keys=keys, values=values, **changes)

    def rows(self, index: slice | list[int] | torch.Tensor) -> KVCache:
        """A cache holding only the given batch rows (padding columns kept)."""
        return self.with_tensors(
            [k[index] for k in self.keys], [v[index] for v in self.values], mask=self.mask[index], positions=self.positions[index]
        )

    def trimmed(self) -> KVCache:
        """Drop padding columns that no row uses."""
        width = int(self.lengths.max())
        return self.with_tensors(
            [k[:, :, :width] for k in self.keys], [v[:, :, :width] for v in self.values],
            mask=self.mask[:, :width], positions=self.positions[:, :width],
        )

    @classmethod
    def stack_rows(cls, caches: list[KVCache]) -> KVCache:
        """One batch from several caches of the same geometry, each right-padded to the widest."""
        if not caches:
            raise CacheLayoutError("stack_rows needs at least one cache")
        first = caches[0]
        if any(c.rope_applied != first.rope_applied or c.fingerprint != first.fingerprint or c.num_layers != first.num_layers
               for c in caches):
            raise CacheLayoutError("stack_rows needs caches of one cache space (same layers, RoPE state and fingerprint)")
        width = max(c.num_tokens for c in caches)

        def pad(t: torch.Tensor, dim: int, value=0) -> torch.Tensor:
            extra = width - t.shape[dim]
            if extra == 0:
                return t
            shape = list(t.shape)
            shape[dim] = extra
            return torch.cat([t, t.new_full(shape, value)], dim=dim)

        keys = [torch.cat([pad(c.keys[i], 2) for c in caches]) for i in range(first.num_layers)]
        values = [torch.cat([pad(c.values[i], 2) for c in caches]) for i in range(first.num_layers)]
        mask = torch.cat([pad(c.mask, 1, False) for c in caches])
        positions = torch.cat([pad(c.positions, 1) for c in caches])
        return first.with_tensors(keys, values, mask=mask, positions=positions)

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> KVCache:
        return self.with_tensors(
            [k.to(device=device, dtype=dtype) for k in self.keys], [v.to(device=device, dtype=dtype) for v in self.values],
            mask=self.mask.to(device), positions=self.positions.to(device),
        )

    # ---- transformers interop -----------------------------------------------------------------
    def to_dynamic_cache(self, device: torch.device | str | None = None) -> DynamicCache:
        """A transformers DynamicCache holding these tensors, moved to ``device`` when given (the
        attending model's); no copy when already there, and gradients flow through either way."""
        if not self.rope_applied:
            raise CacheLayoutError("a cache with stripped RoPE cannot be attended to; restore_rope first")
        return DynamicCache(ddp_cache_data=[(k.to(device), v.to(device)) for k, v in zip(self.keys, self.values)])

    @classmethod
    def from_dynamic_cache(
        cls, cache: DynamicCache, mask: torch.Tensor, positions: torch.Tensor | None = None, fingerprint: str = ""
    ) -> KVCache:
        """Read ``cache.layers[i].keys/.values`` (transformers 5.x) into a KVCache."""
        keys = [layer.keys for layer in cache.layers]
        values = [layer.values for layer in cache.layers]
        mask = mask.to(keys[0].device) if keys else mask
        if positions is None:
            positions = (mask.long().cumsum(dim=1) - 1).clamp(min=0)
        positions = positions.to(mask.device)
        return cls(keys, values, mask.bool(), positions.long(), rope_applied=True, fingerprint=fingerprint)
