"""DenseAdapter: the paper's heterogeneous cache transformation T_θ (§4.2), with save/load and fingerprints.

For every receiver layer l and receiver KV group g:
    (K'_R, V'_R)[l, g] = γ[l, g] · (T_K[l, g](K̂_S[a(l), π(g)]), T_V[l, g](V̂_S[a(l), π(g)]))
where K̂_S, V̂_S are the sender's RoPE-stripped keys and values, a(l) the depth map (eq. 10), π the
KV-group map, T_* a token-wise MLP d_S -> e·d_S -> d_R with GELU (eq. 12) and γ ∈ [0, 1] a learned gate
(a sigmoid of a free logit). Parameters are stacked (layer, group) so one batched matmul serves every
K and V MLP of the cache at once, on real tokens only; ``transform_layer`` lets a service map layers
as they stream in.

A checkpoint is a directory: ``adapter.safetensors`` plus ``adapter_config.json`` holding both models'
geometry and fingerprints, the maps, the training recipe and the fingerprint of the data it saw.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from densecomm_core.cache import KVCache
from densecomm_core.errors import CheckpointError, GeometryMismatchError
from densecomm_core.models import ModelGeometry

FORMAT_VERSION = 1
WEIGHTS_FILE = "adapter.safetensors"
CONFIG_FILE = "adapter_config.json"


def layer_map(sender_layers: int, receiver_layers: int) -> list[int]:
    """a(l) = round(l·(L_S−1)/(L_R−1)) for l in 0..L_R−1 (eq. 10), rounding halves up; [0] when L_R = 1."""
    if sender_layers < 1 or receiver_layers < 1:
        raise ValueError(f"layer counts must be >= 1, got sender={sender_layers}, receiver={receiver_layers}")
    if receiver_layers == 1:
        return [0]
    return [math.floor(l * (sender_layers - 1) / (receiver_layers - 1) + 0.5) for l in range(receiver_layers)]


def group_map(sender_groups: int, receiver_groups: int) -> list[int]:
    """π(g) = floor(g·G_S/G_R): identity when the layouts match, an even spread otherwise."""
    if sender_groups < 1 or receiver_groups < 1:
        raise ValueError(f"KV group counts must be >= 1, got sender={sender_groups}, receiver={receiver_groups}")
    return [g * sender_groups // receiver_groups for g in range(receiver_groups)]


def refuse_other_pair(what: str, trained, sender: ModelGeometry | None, receiver: ModelGeometry | None) -> None:
    """GeometryMismatchError unless the given geometries (None: not checked) are the ones ``trained`` (a
    checkpoint config with ``sender`` and ``receiver``) was trained for; ``what`` names the checkpoint."""
    for side, want in (("sender", sender), ("receiver", receiver)):
        have = getattr(trained, side)
        if want is not None and want != have:
            raise GeometryMismatchError(
                f"{what} was trained for {side} {have.fingerprint()} but the given {side} is {want.fingerprint()} "
                f"({want.model_type}, {want.num_layers} layers, {want.num_kv_heads} KV heads x {want.head_dim})"
            )


@dataclass
class AdapterConfig:
    """Everything needed to rebuild an adapter and to know what it was trained for and on."""

    sender: ModelGeometry
    receiver: ModelGeometry
    expansion: int = 16  # hidden width e·d_S of each K/V MLP (paper: 16)
    # initial γ. 0.5 (logit 0) is where the sigmoid passes the most gradient; at 1.0 (logit 6) the gates
    # of the first zoo adapter never moved (0.997-0.999 after training), so they could not rank heads.
    gate_init: float = 0.5
    recipe: dict = field(default_factory=dict)  # training configs of both phases, filled by training
    data_fingerprint: str = ""  # hash of the training examples / traces
    metrics: dict = field(default_factory=dict)  # validation figures at save time

    def __post_init__(self) -> None:
        if self.expansion < 1:
            raise ValueError(f"expansion must be >= 1, got {self.expansion}")
        if not 0.0 < self.gate_init <= 1.0:
            raise ValueError(f"gate_init must be in (0, 1], got {self.gate_init}")

    @property
    def layer_map(self) -> list[int]:
        return layer_map(self.sender.num_layers, self.receiver.num_layers)

    @property
    def group_map(self) -> list[int]:
        return group_map(self.sender.num_kv_heads, self.receiver.num_kv_heads)

    def to_dict(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "sender": self.sender.to_dict() | {"fingerprint": self.sender.fingerprint()},
            "receiver": self.receiver.to_dict() | {"fingerprint": self.receiver.fingerprint()},
            "layer_map": self.layer_map,
            "group_map": self.group_map,
            "expansion": self.expansion,
            "gate_init": self.gate_init,
            "recipe": self.recipe,
            "data_fingerprint": self.data_fingerprint,
            "metrics": self.metrics,
        }

    @classmethod
    def from_dict(cls, data: dict) -> AdapterConfig:
        if data.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"adapter format_version {data.get('format_version')!r}, expected {FORMAT_VERSION}")
        strip = lambda d: {k: v for k, v in d.items() if k != "fingerprint"}
        return cls(
            sender=ModelGeometry.from_dict(strip(data["sender"])),
            receiver=ModelGeometry.from_dict(strip(data["receiver"])),
            expansion=data["expansion"],
            gate_init=data["gate_init"],
            recipe=data.get("recipe", {}),
            data_fingerprint=data.get("data_fingerprint", ""),
            metrics=data.get("metrics", {}),
        )


class GroupwiseMLP(nn.Module):
    """L·G independent token-wise MLPs d_in -> hidden -> d_out (GELU), stored stacked as (L, G, ...)."""

    def __init__(self, layers: int, groups: int, d_in: int, hidden: int, d_out: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(layers, groups, d_in, hidden))
        self.b1 = nn.Parameter(torch.empty(layers, groups, hidden))
        self.w2 = nn.Parameter(torch.empty(layers, groups, hidden, d_out))
        self.b2 = nn.Parameter(torch.empty(layers, groups, d_out))
        for w, b, fan_in in ((self.w1, self.b1, d_in), (self.w2, self.b2, hidden)):
            bound = 1 / math.sqrt(fan_in)  # nn.Linear's default init
            nn.init.uniform_(w, -bound, bound)
            nn.init.uniform_(b, -bound, bound)


def bucket(n: int) -> int:
    """``n`` rounded up to one of 8 sizes per octave (a multiple of 2^(bit_length(n) - 4)): at most 1/8 extra rows.

    Packed token counts are padded to these sizes so the allocator meets a handful of buffer sizes instead of
    one per batch and reuses its blocks (exact sizes let glibc's heap fragment: 2x the RSS in a training run)."""
    step = 1 << max(0, n.bit_length() - 4)
    return -(-n // step) * step


def paired_mlp(
    key_mlp: GroupwiseMLP, value_mlp: GroupwiseMLP, layers: slice, x: torch.Tensor, gates: torch.Tensor | None = None
) -> torch.Tensor:
    """Both MLPs of receiver layers ``layers`` on packed tokens in two batched matmuls.

    x (L, 2, G, N, d_in): N tokens of every (layer, K|V, group) -> (L, 2, G, N, d_out). One
    ``baddbmm`` per matmul serves all L·2·G MLPs, on the real tokens only (callers drop the padding).
    ``gates`` (L, G): γ scales both MLPs' outputs; it is folded into the second layer's weights and bias
    (L·2·G·hidden·d_out products, not one per output element).
    """
    L, _, G, N, d_in = x.shape
    stack = lambda name: torch.stack((getattr(key_mlp, name)[layers], getattr(value_mlp, name)[layers]), 1)  # (L, 2, G, ...)
    w2, b2 = stack("w2"), stack("b2")
    if gates is not None:
        w2, b2 = w2 * gates[:, None, :, None, None], b2 * gates[:, None, :, None]
    h = torch.baddbmm(stack("b1").flatten(0, 2).unsqueeze(1), x.reshape(L * 2 * G, N, d_in), stack("w1").flatten(0, 2))  # (L·2·G, N, hidden)
    y = torch.baddbmm(b2.flatten(0, 2).unsqueeze(1), F.gelu(h), w2.flatten(0, 2))
    return y.reshape(L, 2, G, N, y.shape[-1])


class DenseAdapter(nn.Module):
    """T_θ: RoPE-stripped sender cache -> RoPE-stripped receiver cache (apply via ``relay.transform_cache``)."""

    def __init__(self, config: AdapterConfig) -> None:
        super().__init__()
        self.config = config
        s, r = config.sender, config.receiver
        hidden = config.expansion * s.head_dim
        self.key_mlp = GroupwiseMLP(r.num_layers, r.num_kv_heads, s.head_dim, hidden, r.head_dim)
        self.value_mlp = GroupwiseMLP(r.num_layers, r.num_kv_heads, s.head_dim, hidden, r.head_dim)
        logit = math.log(config.gate_init / (1 - config.gate_init)) if config.gate_init < 1 else 6.0
        self.gate_logit = nn.Parameter(torch.full((r.num_layers, r.num_kv_heads), logit))
        self.register_buffer("layer_index", torch.tensor(config.layer_map), persistent=False)
        self.register_buffer("group_index", torch.tensor(config.group_map), persistent=False)

    @property
    def gates(self) -> torch.Tensor:
        """γ (L_R, G_R) in [0, 1]."""
        return torch.sigmoid(self.gate_logit)

    def transform_layer(
        self, layer: int, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Receiver layer ``layer`` from sender layer a(layer)'s stripped K, V (B, G_S, T, d_S) -> (B, G_R, T, d_R).

        Inputs move to the adapter's device and dtype (its parameters'; float32 unless the adapter was
        cast); the outputs are in that device and dtype too. With ``mask`` (B, T) only real tokens are
        mapped and padding comes out as zeros."""
        k, v = self._transform(slice(layer, layer + 1), keys[None], values[None], mask)
        return k[0], v[0]

    def _transform(
        self, layers: slice, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stacked sender layers (L, B, G_S, T, d_S) for receiver layers ``layers`` -> (L, B, G_R, T, d_R) K, V.

        Padded positions (``mask`` false) come out as zeros, which attention never reads. T_θ is token-wise,
        so on the CPU, where the matmuls are the cost, padding is left out of them (a batch of prompts of
        uneven length is often a third padding; the packed tokens are padded up to a ``bucket`` size instead);
        on an accelerator every position is computed and the padding zeroed by the mask, which needs no host
        sync for a data-dependent shape."""
        device, dtype = self.gate_logit.device, self.gate_logit.dtype
        L, B, G_S, T, d_S = keys.shape
        groups = self.config.group_map
        G = len(groups)
        # One pass per input: receiver groups picked, (L, B, G, T, d) -> (L, G, B, T, d) and the adapter's dtype.
        tokens = torch.empty(L, 2, G, B, T, d_S, device=device, dtype=dtype)  # (L, K|V, G_R, B, T, d_S)
        identity = groups == list(range(G_S))
        for i, side in enumerate((keys, values)):
            side = side.to(device)
            tokens[:, i].copy_((side if identity else side.index_select(2, self.group_index)).transpose(1, 2))
        gates = self.gates[layers]
        real = None if mask is None else mask.to(device=device, dtype=torch.bool)
        if real is not None and device.type == "cpu" and not bool(real.all()):
            picked = tokens[:, :, :, real]  # (L, 2, G_R, N, d_S)
            n = picked.shape[3]
            padded = F.pad(picked, (0, 0, 0, bucket(n) - n))
            y = paired_mlp(self.key_mlp, self.value_mlp, layers, padded, gates)[:, :, :, :n]
            out = y.new_zeros(L, 2, B, G, T, y.shape[-1])
            out.transpose(2, 3)[:, :, :, real] = y
        else:
            y = paired_mlp(self.key_mlp, self.value_mlp, layers, tokens.reshape(L, 2, G, B * T, -1), gates)
            out = y.reshape(L, 2, G, B, T, -1).transpose(2, 3)
            if real is not None:
                out = out * real[:, None, :, None].to(out.dtype)
        return out[:, 0], out[:, 1]

    def forward(self, sender_stripped: KVCache) -> KVCache:
        """Map a stripped sender cache to a stripped receiver cache (same tokens, mask and positions),
        on the adapter's device and in its dtype; padded positions come out as zeros."""
        s = self.config.sender
        sender_stripped.check_matches(s.num_layers, s.num_kv_heads, s.head_dim, who="adapter (sender side)")
        source = self.config.layer_map
        keys, values = self._transform(slice(None), torch.stack([sender_stripped.keys[a] for a in source]),
                                       torch.stack([sender_stripped.values[a] for a in source]), sender_stripped.mask)
        return sender_stripped.with_tensors(list(keys.unbind(0)), list(values.unbind(0)), fingerprint=self.config.receiver.fingerprint())

    def num_flops_per_token(self) -> int:
        """2 · parameters touched per token (both MLPs, all receiver layers and groups)."""
        return 2 * sum(p.numel() for p in (*self.key_mlp.parameters(), *self.value_mlp.parameters()))

    # ---- checkpoints -------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, directory / WEIGHTS_FILE)
        (directory / CONFIG_FILE).write_text(json.dumps(self.config.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(
        cls, directory: str | Path, sender: ModelGeometry | None = None, receiver: ModelGeometry | None = None
    ) -> DenseAdapter:
        """Load a checkpoint; with geometries given, refuse a pair other than the one it was trained for."""
        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        if not config_path.is_file() or not weights_path.is_file():
            raise CheckpointError(f"{str(directory)!r} is not an adapter checkpoint (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
        try:
            config = AdapterConfig.from_dict(json.loads(config_path.read_text()))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"unreadable {config_path}: {exc}") from exc
        refuse_other_pair(f"adapter {str(directory)!r}", config, sender, receiver)
        adapter = cls(config)
        try:
            adapter.load_state_dict(load_file(weights_path))
        except RuntimeError as exc:
            raise CheckpointError(f"weights in {weights_path} do not match its config: {exc}") from exc
        return adapter
