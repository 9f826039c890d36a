"""Positional disentanglement (paper eq. 8-9): remove and re-apply a model's own rotary embedding on cached keys.

Both directions call the model's own ``rotary_emb`` (so scaled variants such as YaRN, Llama-3 or
dynamic NTK come for free) and its own ``apply_rotary_pos_emb``, layer by layer where a model rotates its
layers differently (per-layer-type bases, layers without RoPE: ``layer_rope_kinds``); a partial rotary rotates
the first coordinates only. RoPE rotates each coordinate pair by
an angle and may scale by an attention factor m (cos = m·cos θ, sin = m·sin θ); the inverse rotates by
-θ and divides by m² = cos² + sin², exactly. Values carry no rotation and pass through unchanged.
"""

from __future__ import annotations

import inspect
import sys
import threading

import torch

from densecomm_core.cache import KVCache
from densecomm_core.errors import CacheLayoutError
from densecomm_core.models import RopeModel


def layer_rope_kinds(model: RopeModel) -> tuple[str | None, ...]:
    """Per layer, which rotation its keys carry: ``""`` the model's one rotary embedding, a layer type
    (Gemma-3 and others rotate sliding and full layers with their own bases: the rotary's forward takes the
    ``layer_type`` of ``config.layer_types``), or None for a layer without RoPE (``config.no_rope_layers``,
    SmolLM3 / Llama-4 style, 0 = no RoPE)."""
    rotary = model.rotary_embedding
    config = getattr(rotary, "config", None)
    layers = model.geometry.num_layers
    typed = "layer_type" in inspect.signature(rotary.forward).parameters
    types = getattr(config, "layer_types", None) if typed else None
    if typed and (types is None or len(types) != layers):
        raise CacheLayoutError(f"model {model.path!r}: its rotary embedding takes a layer_type, but config.layer_types is "
                               f"{types!r}, not one type per layer ({layers} layers)")
    unrotated = layers_without_rope(config, layers, model.path)
    return tuple(None if unrotated[i] else (types[i] if typed else "") for i in range(layers))


def layers_without_rope(config, layers: int, path: str = "") -> list[bool]:
    """Per layer, whether its keys carry no rotation: ``config.no_rope_layers`` (SmolLM3 / Llama-4 style, 0 =
    no RoPE), or the rule of an architecture that decides it in its attention code by layer type (Cohere-2,
    EXAONE-4: full-attention layers). Checked against the layers the model really rotates when its weights
    load (``traced_rope_layers``), so an architecture with another rule is refused, not silently mis-rotated."""
    no_rope = getattr(config, "no_rope_layers", None)
    if no_rope is not None:
        if len(no_rope) != layers:
            raise CacheLayoutError(f"model {path!r}: config.no_rope_layers has {len(no_rope)} entries for {layers} layers")
        return [not flag for flag in no_rope]
    model_type, types = getattr(config, "model_type", ""), getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    if types is not None and len(types) == layers:
        if model_type == "cohere2":  # RoPE only where the layer has a window
            return [kind != "sliding_attention" or window is None for kind in types]
        if model_type == "exaone4":  # with a window configured, its full-attention layers are NoPE
            return [window is not None and kind != "sliding_attention" for kind in types]
    return [False] * layers


def traced_rope_layers(model) -> tuple[bool, ...] | None:
    """Per decoder layer, whether the model's forward calls its ``apply_rotary_pos_emb`` there: one forward of
    two tokens with the function traced (None when it cannot tell: no ``layers`` list to attribute calls to,
    weights on the meta device, which hold no data, or no call through the module's function at all)."""
    layers = getattr(model.model.base_model, "layers", None)
    module = sys.modules.get(type(model.model).__module__)
    parameter = next(model.model.parameters(), None)
    if layers is None or module is None or not hasattr(module, "apply_rotary_pos_emb") or parameter is None \
            or parameter.device.type == "meta":
        return None
    current, rotated = [None], set()
    original = module.apply_rotary_pos_emb

    def traced(*args, **kwargs):
        rotated.add(current[0])
        return original(*args, **kwargs)

    hooks = [layer.register_forward_pre_hook(lambda _module, _args, i=i: current.__setitem__(0, i)) for i, layer in enumerate(layers)]
    ids = torch.tensor([[model.tokenizer.bos_token_id or 0, model.tokenizer.eos_token_id or 1]], device=parameter.device)
    with _TRACE_LOCK:
        module.apply_rotary_pos_emb = traced
        try:
            with torch.no_grad():
                model.model(input_ids=ids, use_cache=False)
        finally:
            module.apply_rotary_pos_emb = original
            for hook in hooks:
                hook.remove()
    if not rotated:  # its attention rotates through another binding (a fused kernel, say): nothing to compare
        return None
    return tuple(i in rotated for i in range(len(layers)))


_TRACE_LOCK = threading.Lock()


def rotary_cos_sin(model: RopeModel, positions: torch.Tensor, kind: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (B, T, rotary_dim) in float32 for logical ``positions`` (B, T); ``kind``: a layer
    type of ``layer_rope_kinds`` ("" for a model with one rotary embedding). Computed for the batch as a
    whole, as the model's forward computes them: a rotation whose frequencies follow the call's longest
    position (transformers' dynamic NTK and LongRoPE) is then inverted exactly as the forward applied it."""
    probe = torch.empty(0, dtype=torch.float32, device=positions.device)
    cos, sin = model.rotary_embedding(probe, positions, kind) if kind else model.rotary_embedding(probe, positions)
    return cos.float(), sin.float()


def rope_tables(model: RopeModel, positions: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    """``rotary_cos_sin`` of every layer (each kind computed once), None for a layer without RoPE."""
    kinds = layer_rope_kinds(model)
    tables = {kind: rotary_cos_sin(model, positions, kind) for kind in dict.fromkeys(k for k in kinds if k is not None)}
    return [tables[kind] if kind is not None else None for kind in kinds]


def _rotated(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, model: RopeModel) -> torch.Tensor:
    # apply_rotary_pos_emb rotates a query and a key; only the key is wanted, so the query is one head of
    # the keys (B, 1, T, D): its result is discarded, and the key's does not depend on it (bit for bit).
    # A partial rotary (cos narrower than the head) turns the first coordinates only, as every transformers
    # implementation does; some apply_rotary_pos_emb split the head themselves (Phi-3), others expect their
    # caller to (Phi, StableLM, Persimmon): given only those coordinates, both rotate them alike.
    width = cos.shape[-1]
    if width == keys.shape[-1]:
        return model.apply_rotary(keys[:, :1], keys, cos, sin)[1]
    turned = keys[..., :width]
    return torch.cat([model.apply_rotary(turned[:, :1], turned, cos, sin)[1], keys[..., width:]], dim=-1)


def rotate_keys(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, model: RopeModel) -> torch.Tensor:
    """Apply the model's RoPE to keys (B, H, T, D) with cos/sin (B, T, D), or (B, T, R) for a partial rotary
    whose first R coordinates rotate."""
    return _rotated(keys, cos, sin, model)


def unrotate_keys(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, model: RopeModel) -> torch.Tensor:
    """Exact inverse of ``rotate_keys``: rotate by -θ, then undo the attention scaling on the rotated
    coordinates (a partial rotary passes its last D - R through)."""
    scale = (cos * cos + sin * sin).unsqueeze(1)  # (B, 1, T, R): m² per rotated coordinate
    if scale.shape[-1] < keys.shape[-1]:  # a partial rotary: its last coordinates pass through, unscaled
        scale = torch.nn.functional.pad(scale, (0, keys.shape[-1] - scale.shape[-1]), value=1.0)
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
    tables = rope_tables(model, cache.positions)
    keys = [unrotate_keys(k.float(), *table, model) if table else k.float() for k, table in zip(cache.keys, tables)]
    return cache.with_tensors(keys, [v.float() for v in cache.values], rope_applied=False)


def restore_rope(cache: KVCache, model: RopeModel, dtype: torch.dtype | None = None) -> KVCache:
    """Apply ``model``'s rotation at the cache's positions (eq. 9), returning ``dtype`` (model's by default)."""
    _check(cache, model, want_applied=False)
    dtype = dtype or model.dtype
    tables = rope_tables(model, cache.positions)
    keys = [(rotate_keys(k.float(), *table, model) if table else k).to(dtype) for k, table in zip(cache.keys, tables)]
    values = [v.to(dtype) for v in cache.values]
    return cache.with_tensors(keys, values, rope_applied=True, fingerprint=model.geometry.fingerprint())
