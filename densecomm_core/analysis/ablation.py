"""Head ablation and KV-group filters: the two interventions of the compressed-sensing analysis.

    attention_modules(model)              each decoder layer's attention module (Qwen3, Llama, Qwen2, Mistral, ...)
    ablate_heads(model, ablated)          context manager: zero chosen query heads' outputs at o_proj's input
    keep_kv_groups(cache, keep)           a cache whose K/V of every (layer, KV group) not kept are zero
    receiver_keep(keep, layer_map, group_map)  which receiver groups read a kept sender group (adapter maps)

A query head's contribution to a layer's output is o_proj(concat_h attn_h)[:, h·d:(h+1)·d] block, so
zeroing that slice of o_proj's *input* removes head h and nothing else (its K/V are still computed and
cached; what changes is what later layers see). The hook is a forward pre-hook, so it works for any
architecture whose attention ends in an ``o_proj`` Linear of in_features num_heads·head_dim.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from densecomm_core.analysis import AnalysisError
from densecomm_core.cache import KVCache


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The ``self_attn`` module of every decoder layer, in depth order; AnalysisError if there is none."""
    base = getattr(model, "base_model", model)
    layers = getattr(base, "layers", None)
    if layers is None or not all(hasattr(layer, "self_attn") and hasattr(layer.self_attn, "o_proj") for layer in layers):
        raise AnalysisError(f"{type(model).__name__} has no base_model.layers[i].self_attn.o_proj; head ablation needs them")
    return [layer.self_attn for layer in layers]


def head_layout(model: nn.Module) -> tuple[int, int, int]:
    """(layers, query heads per layer, head_dim) read off the attention modules' o_proj."""
    modules = attention_modules(model)
    config = model.config.get_text_config() if hasattr(model, "config") else None
    heads = getattr(config, "num_attention_heads", None)
    if heads is None:
        raise AnalysisError(f"{type(model).__name__} has no config.num_attention_heads")
    width = modules[0].o_proj.in_features
    if width % heads:
        raise AnalysisError(f"o_proj in_features {width} is not a multiple of num_attention_heads {heads}")
    return len(modules), heads, width // heads


@contextmanager
def ablate_heads(model: nn.Module, ablated: torch.Tensor) -> Iterator[None]:
    """Within the block, query head h of layer l contributes nothing where ``ablated[l, h]`` is True.

    ablated: (layers, query heads) bool. The hooks are removed on exit, even after an exception, so
    the model is exactly as it was."""
    layers, heads, head_dim = head_layout(model)
    ablated = torch.as_tensor(ablated, dtype=torch.bool)
    if tuple(ablated.shape) != (layers, heads):
        raise AnalysisError(f"ablated must be (layers, query heads) = ({layers}, {heads}), got {tuple(ablated.shape)}")
    handles = []

    def make_hook(keep: torch.Tensor):
        def hook(module: nn.Module, args: tuple):
            (x, *rest) = args  # x (B, T, H·d): the heads' outputs, concatenated
            scale = keep.to(device=x.device, dtype=x.dtype).repeat_interleave(head_dim)  # (H·d,)
            return (x * scale, *rest)

        return hook

    try:
        for layer, attention in enumerate(attention_modules(model)):
            if bool(ablated[layer].any()):
                handles.append(attention.o_proj.register_forward_pre_hook(make_hook(~ablated[layer])))
        yield
    finally:
        for handle in handles:
            handle.remove()


def keep_kv_groups(cache: KVCache, keep: torch.Tensor) -> KVCache:
    """A copy of ``cache`` whose keys and values are zero in every (layer, KV group) where ``keep`` is False.

    keep: (layers, KV groups) bool of the cache's own model. Zero keys give a logit of 0 and zero values
    add nothing, so a dropped group is an uninformative slot (paper C.3: "the rest are zeroed")."""
    keep = torch.as_tensor(keep, dtype=torch.bool)
    groups = cache.keys[0].shape[1]
    if tuple(keep.shape) != (cache.num_layers, groups):
        raise AnalysisError(f"keep must be (layers, KV groups) = ({cache.num_layers}, {groups}), got {tuple(keep.shape)}")
    scale = keep.to(device=cache.device)
    keys = [k * scale[l].to(k.dtype)[None, :, None, None] for l, k in enumerate(cache.keys)]  # (B, G, T, d)
    values = [v * scale[l].to(v.dtype)[None, :, None, None] for l, v in enumerate(cache.values)]
    return cache.with_tensors(keys, values)


def receiver_keep(keep: torch.Tensor, layer_map: Sequence[int], group_map: Sequence[int]) -> torch.Tensor:
    """Sender-group keep mask (L_S, G_S) -> receiver-group mask (L_R, G_R): receiver (l, g) is kept when
    the sender group it is computed from, (layer_map[l], group_map[g]), is kept."""
    keep = torch.as_tensor(keep, dtype=torch.bool)
    if max(layer_map) >= keep.shape[0] or max(group_map) >= keep.shape[1]:
        raise AnalysisError(f"maps reach sender layer {max(layer_map)} / group {max(group_map)}, keep is {tuple(keep.shape)}")
    return keep[torch.tensor(list(layer_map))][:, torch.tensor(list(group_map))]
