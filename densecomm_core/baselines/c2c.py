"""C2CFuser: a Cache-to-Cache-style baseline (Fu et al. 2025) that steers the receiver's own cache with the sender's.

    C2CConfig                                   both geometries, the fuser's width, the gate's temperatures, the recipe
    C2CFuser.residual(sender_s, receiver_s)     per receiver layer, the gated residual added to the receiver's cache
    fuse_caches(fuser, sender_cache, own, S, R) strip RoPE of both, residual, rotate it with R's RoPE, add onto ``own``
    c2c_run(S, R, fuser, contexts, mode, ...)   the baseline end to end, with exact per-side token counts

For every receiver layer l, separately for keys and for values (C2C's fuser, ``rosetta/model/projector.py``):
    x  = [ŝ_{a(l)} ; r̂_l]                         the sender's groups of layer a(l) and the receiver's own groups, per token
    h  = W_in x + b_in;  h = h + W_down GELU(W_up RMSNorm(h))   projection to the fuser width + one residual FFN
    p  = W_out h + b_out        (G_R·d_R)        the projected sender content, per receiver head
    w  = σ(W_head h + b_head)   (G_R)            C2C's input-dependent per-head weights
    r_l = r̂_l + g_l · w ⊙ p                       the gated residual on the receiver's own (RoPE-stripped) cache
with ŝ, r̂ RoPE-stripped (``rope.strip_rope``; C2C itself fuses RoPE-applied keys of same-tokenizer pairs, we strip so
pairs with different RoPE bases fuse the same way as the dense adapter's caches) and a(l) the depth map of eq. 10
(``adapter.layer_map``). The gate g_l is C2C's: one logit per (layer, K|V), a Gumbel-sigmoid whose temperature anneals
from ``initial_temperature`` to ``final_temperature`` over training, and hard at inference (open iff the logit > 0).
Because RoPE is linear, restoring RoPE on r̂ + Δ equals the receiver's cache plus Δ rotated, so ``fuse_caches`` adds
the rotated residual onto the receiver's untouched cache: a closed gate leaves it bit for bit unchanged.

The two regimes (paper §2.3). Context-aware: the receiver prefills X itself and the fuser steers that cache of X.
Context-unaware: the receiver never reads X, so it has no cache of X to steer: the fuser's base is an all-zero cache
on X's positions (``own=None``) and whatever the receiver knows of X comes through the gated projection alone. A closed
gate then leaves the receiver with nothing about X, which is the paper's reading of C2C's context-unaware collapse.

A checkpoint is a directory: ``fuser.safetensors`` plus ``fuser_config.json`` (geometries and fingerprints of both
models, maps, width, temperatures, recipe, data fingerprint, metrics), refused for another pair like an adapter's.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from densecomm_core.adapter import group_map, layer_map, refuse_other_pair
from densecomm_core.cache import KVCache
from densecomm_core.errors import CacheLayoutError, CheckpointError, GeometryMismatchError
from densecomm_core.generation import GenerationConfig
from densecomm_core.models import LoadedModel, ModelGeometry, RopeModel, check_shared_tokenizer
from densecomm_core.relay import (
    ContextMode,
    PromptFormat,
    RelayOutput,
    device_of,
    receiver_generate,
    sender_prefill,
)
from densecomm_core.rope import restore_rope, strip_rope

FORMAT_VERSION = 1
KIND = "c2c-fuser"
WEIGHTS_FILE = "fuser.safetensors"
CONFIG_FILE = "fuser_config.json"
KEYS, VALUES = 0, 1  # index of the first dimension of every stacked parameter


@dataclass
class C2CConfig:
    """Everything needed to rebuild a fuser and to know what it was trained for and on."""

    sender: ModelGeometry
    receiver: ModelGeometry
    # Width of each layer's fuser MLP (and of its FFN). C2C uses 1024 on Qwen-scale caches (8 heads x 128);
    # the zoo's caches are 64 (sender) and 72 (receiver) numbers per token and layer, so 128 is the same ratio.
    hidden: int = 128
    initial_temperature: float = 1.0  # C2C's Gumbel-sigmoid gate temperature at step 0 ...
    final_temperature: float = 0.001  # ... annealed exponentially to this by the last training step (C2C: 1.0 -> 0.001)
    recipe: dict = field(default_factory=dict)  # the training config, filled by training
    data_fingerprint: str = ""  # hash of the training traces
    metrics: dict = field(default_factory=dict)  # validation / test figures at save time

    def __post_init__(self) -> None:
        if self.hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {self.hidden}")
        if not 0.0 < self.final_temperature <= self.initial_temperature:
            raise ValueError(
                f"need 0 < final_temperature <= initial_temperature, got {self.final_temperature} and {self.initial_temperature}")

    @property
    def layer_map(self) -> list[int]:
        return layer_map(self.sender.num_layers, self.receiver.num_layers)

    @property
    def group_map(self) -> list[int]:
        """Not used by the fuser (it reads every sender group at once, as C2C does); recorded for comparison."""
        return group_map(self.sender.num_kv_heads, self.receiver.num_kv_heads)

    def to_dict(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "kind": KIND,
            "sender": self.sender.to_dict() | {"fingerprint": self.sender.fingerprint()},
            "receiver": self.receiver.to_dict() | {"fingerprint": self.receiver.fingerprint()},
            "layer_map": self.layer_map,
            "hidden": self.hidden,
            "initial_temperature": self.initial_temperature,
            "final_temperature": self.final_temperature,
            "recipe": self.recipe,
            "data_fingerprint": self.data_fingerprint,
            "metrics": self.metrics,
        }

    @classmethod
    def from_dict(cls, data: dict) -> C2CConfig:
        if data.get("kind") != KIND:
            raise CheckpointError(f"checkpoint kind {data.get('kind')!r}, expected {KIND!r}")
        if data.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"fuser format_version {data.get('format_version')!r}, expected {FORMAT_VERSION}")
        strip = lambda d: {k: v for k, v in d.items() if k != "fingerprint"}
        return cls(
            sender=ModelGeometry.from_dict(strip(data["sender"])),
            receiver=ModelGeometry.from_dict(strip(data["receiver"])),
            hidden=data["hidden"],
            initial_temperature=data["initial_temperature"],
            final_temperature=data["final_temperature"],
            recipe=data.get("recipe", {}),
            data_fingerprint=data.get("data_fingerprint", ""),
            metrics=data.get("metrics", {}),
        )


def _uniform(*shape: int, fan_in: int) -> nn.Parameter:
    """nn.Linear's default initialisation, for a stacked weight or bias."""
    bound = 1 / math.sqrt(fan_in)
    return nn.Parameter(torch.empty(*shape).uniform_(-bound, bound))


class C2CFuser(nn.Module):
    """Per receiver layer, a gated projection of the depth-mapped sender cache added onto the receiver's own cache.

    Every parameter is stacked (2, L_R, ...): keys and values of every receiver layer have their own MLP, and
    one batched matmul serves all 2·L_R of them."""

    def __init__(self, config: C2CConfig) -> None:
        super().__init__()
        self.config = config
        s, r, h = config.sender, config.receiver, config.hidden
        L = r.num_layers
        d_in = s.num_kv_heads * s.head_dim + r.num_kv_heads * r.head_dim  # [sender groups ; receiver groups] per token
        d_out = r.num_kv_heads * r.head_dim
        self.w_in, self.b_in = _uniform(2, L, d_in, h, fan_in=d_in), _uniform(2, L, h, fan_in=d_in)
        self.norm = nn.Parameter(torch.ones(2, L, h))  # RMSNorm scale before the FFN
        self.w_up, self.w_down = _uniform(2, L, h, h, fan_in=h), _uniform(2, L, h, h, fan_in=h)  # bias-free FFN, as C2C
        self.w_out, self.b_out = _uniform(2, L, h, d_out, fan_in=h), _uniform(2, L, d_out, fan_in=h)
        self.w_head, self.b_head = _uniform(2, L, h, r.num_kv_heads, fan_in=h), _uniform(2, L, r.num_kv_heads, fan_in=h)
        self.gate_logit = nn.Parameter(torch.zeros(2, L))  # C2C starts every gate at logit 0 (closed at inference)
        self.temperature = config.initial_temperature  # of the training-time Gumbel-sigmoid; set by ``anneal``
        self.register_buffer("layer_index", torch.tensor(config.layer_map), persistent=False)

    # ---- the gate ------------------------------------------------------------------------------
    def anneal(self, step: int, total_steps: int) -> float:
        """Set the gate temperature of step ``step`` of ``total_steps`` (exponential, as C2C); returns it."""
        c = self.config
        ratio = min(1.0, step / max(1, total_steps - 1))
        self.temperature = c.initial_temperature * (c.final_temperature / c.initial_temperature) ** ratio
        return self.temperature

    @property
    def open_gates(self) -> torch.Tensor:
        """(2, L_R) bool: the inference-time gates (keys row 0, values row 1); open iff the logit > 0."""
        return self.gate_logit.detach() > 0

    def _gates(self, tokens: int) -> torch.Tensor:
        """(2·L_R, N, G_R) gate values: Gumbel-sigmoid noise per token and head in training, hard 0/1 otherwise."""
        logit = self.gate_logit.flatten()[:, None, None]  # (2L, 1, 1)
        if not self.training:
            return (logit > 0).to(logit.dtype)
        u = torch.rand(logit.shape[0], tokens, self.config.receiver.num_kv_heads, device=logit.device, dtype=logit.dtype)
        gumbel = -torch.log(-torch.log(u + 1e-20) + 1e-20)
        return torch.sigmoid((logit + gumbel) / self.temperature)

    # ---- the fusion ----------------------------------------------------------------------------
    def residual(self, sender: KVCache, receiver: KVCache) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Δ keys and values per receiver layer, each (B, G_R, T, d_R), from RoPE-stripped caches of the same tokens.

        Inputs move to the fuser's device and dtype; padded positions (``receiver.mask`` false) and layers whose
        inference gate is closed come out as exact zeros."""
        s, r = self.config.sender, self.config.receiver
        if sender.rope_applied or receiver.rope_applied:
            raise CacheLayoutError("the fuser reads RoPE-stripped caches; strip_rope both first (fuse_caches does)")
        sender.check_matches(s.num_layers, s.num_kv_heads, s.head_dim, who="C2C fuser (sender side)")
        receiver.check_matches(r.num_layers, r.num_kv_heads, r.head_dim, who="C2C fuser (receiver side)")
        if sender.mask.shape != receiver.mask.shape or not torch.equal(sender.mask.cpu(), receiver.mask.cpu()):
            raise CacheLayoutError(
                f"the fuser fuses caches of the same tokens: sender rows hold {sender.lengths.tolist()} tokens, "
                f"receiver rows {receiver.lengths.tolist()}")
        device, dtype = self.gate_logit.device, self.gate_logit.dtype
        B, T, G, D = receiver.batch_size, receiver.num_tokens, r.num_kv_heads, r.head_dim
        L = r.num_layers
        if not self.training and not bool(self.open_gates.any()):  # inference with every gate closed: nothing to add
            zeros = [torch.zeros(B, G, T, D, device=device, dtype=dtype) for _ in range(L)]
            return zeros, [z.clone() for z in zeros]

        def tokens(cache: KVCache, layers: list[int]) -> torch.Tensor:
            """(2, L, B·T, heads·d): every group of each layer's K (row 0) and V (row 1), token by token."""
            kv = torch.stack([torch.stack((cache.keys[a], cache.values[a])) for a in layers], 1)  # (2, L, B, H, T, d)
            kv = kv.to(device=device, dtype=dtype).permute(0, 1, 2, 4, 3, 5)  # (2, L, B, T, H, d)
            return kv.reshape(2, len(layers), B * T, -1)

        x = torch.cat((tokens(sender, self.config.layer_map), tokens(receiver, list(range(L)))), -1)  # (2, L, N, d_in)
        flat = lambda p: p.flatten(0, 1)  # (2, L, ...) -> (2L, ...)
        h = torch.baddbmm(flat(self.b_in).unsqueeze(1), flat(x), flat(self.w_in))  # (2L, N, hidden)
        normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * flat(self.norm).unsqueeze(1)
        h = h + torch.bmm(F.gelu(torch.bmm(normed, flat(self.w_up))), flat(self.w_down))
        projected = torch.baddbmm(flat(self.b_out).unsqueeze(1), h, flat(self.w_out))  # (2L, N, G·D)
        weights = torch.sigmoid(torch.baddbmm(flat(self.b_head).unsqueeze(1), h, flat(self.w_head)))  # (2L, N, G)
        scale = self._gates(B * T) * weights * receiver.mask.to(device=device, dtype=dtype).reshape(1, B * T, 1)
        delta = scale.unsqueeze(-1) * projected.view(2 * L, B * T, G, D)  # (2L, N, G, D)
        delta = delta.view(2, L, B, T, G, D).permute(0, 1, 2, 4, 3, 5)  # (2, L, B, G, T, D)
        return list(delta[KEYS].unbind(0)), list(delta[VALUES].unbind(0))

    def forward(self, sender: KVCache, receiver: KVCache) -> KVCache:
        """The fused RoPE-stripped receiver cache r̂ + Δ (same tokens, mask and positions), in the fuser's dtype."""
        dk, dv = self.residual(sender, receiver)
        receiver = receiver.to(device=self.gate_logit.device, dtype=self.gate_logit.dtype)
        return receiver.with_tensors([k + d for k, d in zip(receiver.keys, dk)], [v + d for v, d in zip(receiver.values, dv)])

    def num_flops_per_token(self) -> int:
        """2 · parameters touched per transferred token (every layer's K and V MLPs; the gates are free)."""
        return 2 * sum(p.numel() for name, p in self.named_parameters() if name != "gate_logit")

    # ---- checkpoints -------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, directory / WEIGHTS_FILE)
        (directory / CONFIG_FILE).write_text(json.dumps(self.config.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, directory: str | Path, sender: ModelGeometry | None = None, receiver: ModelGeometry | None = None) -> C2CFuser:
        """Load a checkpoint; with geometries given, refuse a pair other than the one it was trained for."""
        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        if not config_path.is_file() or not weights_path.is_file():
            raise CheckpointError(f"{str(directory)!r} is not a C2C fuser checkpoint (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
        try:
            config = C2CConfig.from_dict(json.loads(config_path.read_text()))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"unreadable {config_path}: {exc}") from exc
        refuse_other_pair(f"C2C fuser {str(directory)!r}", config, sender, receiver)
        fuser = cls(config)
        try:
            fuser.load_state_dict(load_file(weights_path))
        except RuntimeError as exc:
            raise CheckpointError(f"weights in {weights_path} do not match its config: {exc}") from exc
        fuser.eval()
        return fuser


def check_pair(fuser: C2CFuser, sender: RopeModel, receiver: RopeModel) -> None:
    """GeometryMismatchError unless ``fuser`` was built for exactly this sender and receiver."""
    for side, model, want in (("sender", sender, fuser.config.sender), ("receiver", receiver, fuser.config.receiver)):
        if model.geometry != want:
            raise GeometryMismatchError(
                f"C2C fuser expects {side} {want.fingerprint()}, but {side} {model.path!r} is {model.geometry.fingerprint()}")


def zero_cache(like: KVCache, geometry: ModelGeometry, device: torch.device, dtype: torch.dtype, rope_applied: bool) -> KVCache:
    """An all-zero cache of ``geometry``'s layout on ``like``'s tokens: the unaware receiver's 'own cache' of X."""
    shape = (like.batch_size, geometry.num_kv_heads, like.num_tokens, geometry.head_dim)
    zeros = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(geometry.num_layers)]
    return KVCache(zeros, [z.clone() for z in zeros], like.mask.to(device), like.positions.to(device), rope_applied=rope_applied,
                   fingerprint=geometry.fingerprint())


def fuse_caches(
    fuser: C2CFuser,
    sender_cache: KVCache,
    own: KVCache | None,
    sender: RopeModel,
    receiver: RopeModel,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> KVCache:
    """The receiver's own cache of X (``own``; None in the context-unaware regime: zeros) steered by the sender's.

    Both caches are RoPE-stripped in float32 on the fuser's device; the residual is rotated with the receiver's RoPE
    and added onto ``own`` as it was, so a closed gate returns ``own`` unchanged. The result is in ``dtype`` (default:
    the receiver's) on ``device`` (default: the receiver's); differentiable in the fuser."""
    check_pair(fuser, sender, receiver)
    where = fuser.gate_logit.device
    sender_cache = sender_cache.to(device=where)
    source = strip_rope(sender_cache, sender) if sender_cache.rope_applied else sender_cache.to(dtype=torch.float32)
    geometry = fuser.config.receiver
    if own is None:
        base = zero_cache(sender_cache, geometry, where, dtype or receiver.dtype, rope_applied=True)
        target = zero_cache(sender_cache, geometry, where, torch.float32, rope_applied=False)
    else:
        if not own.rope_applied:
            raise CacheLayoutError("the receiver's own cache must carry its RoPE (as its prefill left it)")
        base = own.to(device=where)
        target = strip_rope(base, receiver)
    dk, dv = fuser.residual(source, target)
    rotated = restore_rope(target.with_tensors(dk, dv), receiver, dtype=torch.float32)  # Δ in the receiver's RoPE space
    out_dtype = dtype or receiver.dtype
    keys = [(k.float() + d).to(out_dtype) for k, d in zip(base.keys, rotated.keys)]
    values = [(v.float() + d).to(out_dtype) for v, d in zip(base.values, rotated.values)]
    fused = base.with_tensors(keys, values, rope_applied=True, fingerprint=geometry.fingerprint())
    return fused.to(device=device if device is not None else device_of(receiver))


@torch.no_grad()
def c2c_run(
    sender: LoadedModel,
    receiver: LoadedModel,
    fuser: C2CFuser,
    contexts: Sequence[str],
    mode: ContextMode,
    config: GenerationConfig = GenerationConfig(),
    prompt_format: PromptFormat = PromptFormat(),
) -> RelayOutput:
    """The C2C-style baseline on a batch: sender prefill of X (no decoding), in the context-aware regime the
    receiver's own prefill of X, fusion (gates at their inference values), then the receiver answers in ``mode``.

    Token counts: sender_prefill = X's tokens as the sender read them, sender_decode = 0, receiver_prefill = the
    receiver's own prefill of X (context-aware only) + its prompt, receiver_decode = generated tokens.
    ``payload_bytes`` is the raw sender cache the fuser reads (valid tokens): what would cross the wire."""
    check_shared_tokenizer(sender, receiver)
    texts = [prompt_format.sender.format(context=c) for c in contexts]
    was_training = fuser.training
    fuser.eval()
    try:
        source = sender_prefill(sender, texts)
        own = sender_prefill(receiver, texts) if mode is ContextMode.AWARE else None  # the same prefill, by the receiver
        fused = fuse_caches(fuser, source, own, sender, receiver)
    finally:
        fuser.train(was_training)
    out = receiver_generate(receiver, fused, [prompt_format.receiver_prompt(mode, c) for c in contexts], config)
    out.counts.sender_prefill = int(source.lengths.sum())
    out.counts.sender_decode = 0
    if own is not None:
        out.counts.receiver_prefill += int(own.lengths.sum())
    out.payload_bytes = source.valid_nbytes()
    return out
