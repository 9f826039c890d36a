"""`pca`: transform coding of KV caches (in the spirit of KVTC): decorrelate, quantize uniformly, entropy-code.

A model's keys and values are far from isotropic: per layer and KV head a few principal directions
carry most of the variance. Quantizing in the principal basis instead of the channel basis is classic
transform coding:

    y = (x − mean) · U                     U: the (layer, head)'s orthonormal PCA basis, by variance
    code = round(y / step)                 one step per layer: step = rel_step · rms(y) (calibration)
    x̂ = code · step · Uᵀ + mean            every coefficient errs at most step / 2, so every token's
                                           head vector errs at most step / 2 · √head_dim (L2)

One uniform step for every component is the high-rate optimum (reverse water-filling): components
whose spread is below the step quantize to zero almost everywhere, and the entropy coder (zstd over
component-major codes, int8 unless a chunk needs wider) stores those runs in next to nothing, so the
bits go where the variance is without any explicit allocation.

The bases come from calibration (``KVBasis.fit`` on a model's own caches, ``densecomm codec calibrate``)
and live beside the model as ``kv_basis.safetensors``; both ends of a hop load them into a ``KVBases``
that is passed to the encoder and decoder (``Codec.bind``; ``register_basis`` fills a process-wide
default for callers that pass none). The wire header names the basis by its content fingerprint,
never by path, and a decoder without that basis refuses the stream (``UnknownBasisError``).
``basis="auto"`` picks the basis of the cache's own space when the stream is encoded, so one codec
spec serves both hops of a relay. Building the codec resolves nothing: a relay ingress that holds no
bases validates a request naming a basis as well as the sender that holds it.

Keys are coded RoPE-stripped by default (``strip_rope``): the position-dependent rotation smears each
principal direction over a plane, so rotated keys cost more bits for more error (the ``rotated`` row
of ``densecomm bench codec``, "rot.", against the default one). Chunks carry no positions, so the codec does not
rotate: the sending side strips its
own model's RoPE before encoding (the header says ``rope_applied: false``) and the receiving side,
which knows its model, re-applies it (``round_trip(..., model=)`` in process; the services do it per hop).
"""

from __future__ import annotations

import copy
import math
import re
import threading
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import xxhash
from safetensors.torch import save_file

from densecomm_core.cache import KVCache
from densecomm_core.codec.base import Codec, CodecError, integer_in, number_in
from densecomm_core.codec.bytes import tensor_buffer, tensor_from_bytes
from densecomm_core.codec.lossless import byte_planes, merge_planes
from densecomm_core.codec.zstd import section_parts, unpack_section

BASIS_FILE = "kv_basis.safetensors"
CODE_WIDTHS = {1: torch.int8, 2: torch.int16, 4: torch.int32}


class UnknownBasisError(CodecError):
    """The stream names a KV basis this process has not loaded."""


ANALYSES_KEPT = 4  # scaled analysis matrices kept per basis side: (step, device) pairs
_ANALYSES_LOCK = threading.Lock()


@dataclass(frozen=True)
class SideBasis:
    """One side (K or V) of one layer: per KV head mean (H, D), basis (H, D, D) with components as
    columns by decreasing variance, and the RMS of the centred coefficients over all heads."""

    mean: torch.Tensor
    basis: torch.Tensor
    rms: float
    # (rel_step, device) -> the scaled analysis matrix, kept for the basis's life: every stream coded with
    # the same step shares it (building it is a transposed copy of the basis, ~20 % of a CPU encode).
    _analyses: dict = field(default_factory=dict, init=False, compare=False, repr=False)

    def analysis(self, rel_step: float, device: torch.device) -> torch.Tensor:
        """(H, D, D) float32 on ``device``: row c of head h is component c divided by the step
        (``rel_step · rms``), so one batched matmul turns centred (H, D, t) vectors into component-major
        codes before rounding. At most ``ANALYSES_KEPT`` (step, device) pairs are kept (a client picks the
        step; the oldest goes first), plain tensors only; a benign race only builds one twice."""
        key = (float(rel_step), torch.device(device))
        analysis = self._analyses.get(key)
        if analysis is None:
            analysis = (self.basis.transpose(1, 2) / (rel_step * self.rms)).contiguous().to(device)
            if type(analysis) is torch.Tensor:  # not a tensor subclass of some tracing mode (fake, meta)
                with _ANALYSES_LOCK:  # encoder threads share a basis: evict and insert as one step
                    while len(self._analyses) >= ANALYSES_KEPT:
                        self._analyses.pop(next(iter(self._analyses)))
                    self._analyses[key] = analysis
        return analysis


@dataclass(frozen=True)
class KVBasis:
    """Per (layer, KV head) PCA bases of one cache space, fitted on calibration caches."""

    cache_fingerprint: str  # KVCache.fingerprint of the space it was fitted on
    rope_applied: bool  # whether the fitted keys carried RoPE
    keys: list[SideBasis]
    values: list[SideBasis]

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @cached_property
    def fingerprint(self) -> str:
        """Content hash: what the wire header names (hashed once: every stream's bind asks for it)."""
        digest = xxhash.xxh3_128(f"{self.cache_fingerprint}/rope={self.rope_applied}".encode())
        for side in (*self.keys, *self.values):
            for tensor in (side.mean, side.basis):
                digest.update(tensor_buffer(tensor.float()))
            digest.update(np.float64(side.rms).tobytes())
        return digest.hexdigest()

    @classmethod
    def fit(cls, caches: list[KVCache]) -> KVBasis:
        """PCA of every (layer, head)'s K and V over the valid tokens of ``caches`` (one cache space)."""
        if not caches:
            raise ValueError("fitting a KV basis needs at least one calibration cache")
        spaces = {(c.fingerprint, c.rope_applied) for c in caches}
        if len(spaces) != 1:
            raise ValueError(f"calibration caches come from {len(spaces)} cache spaces or RoPE states; fit one basis per space")
        first = caches[0]
        sides = []
        for tensors_of in (lambda c: c.keys, lambda c: c.values):
            layers = []
            for layer in range(first.num_layers):
                rows = torch.cat([tensors_of(c)[layer].transpose(1, 2)[c.mask].double() for c in caches])  # (N, H, D)
                if rows.shape[0] < 2:
                    raise ValueError("fitting a KV basis needs at least two valid tokens")
                mean = rows.mean(dim=0)
                centred = (rows - mean).transpose(0, 1)  # (H, N, D)
                eigenvalues, vectors = torch.linalg.eigh(centred.transpose(1, 2) @ centred / rows.shape[0])
                rms = float(eigenvalues.clamp_min(0).mean().sqrt())
                layers.append(SideBasis(mean.float().cpu(), vectors.flip(-1).float().contiguous().cpu(), rms))
            sides.append(layers)
        return cls(first.fingerprint, first.rope_applied, sides[0], sides[1])

    def save(self, path: str | Path) -> None:
        tensors = {}
        for name, sides in (("keys", self.keys), ("values", self.values)):
            for layer, side in enumerate(sides):
                tensors[f"{name}.{layer}.mean"] = side.mean.contiguous()
                tensors[f"{name}.{layer}.basis"] = side.basis.contiguous()
                tensors[f"{name}.{layer}.rms"] = torch.tensor([side.rms], dtype=torch.float64)
        save_file(tensors, str(path), metadata={"cache_fingerprint": self.cache_fingerprint,
                                                      "rope_applied": str(self.rope_applied).lower(), "layers": str(self.num_layers)})

    @classmethod
    def load(cls, path: str | Path) -> KVBasis:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        try:
            layers = int(metadata["layers"])
            sides = [[SideBasis(tensors[f"{name}.{i}.mean"], tensors[f"{name}.{i}.basis"], float(tensors[f"{name}.{i}.rms"][0]))
                      for i in range(layers)] for name in ("keys", "values")]
            basis = cls(metadata["cache_fingerprint"], metadata["rope_applied"] == "true", sides[0], sides[1])
        except (KeyError, ValueError) as exc:
            raise ValueError(f"{path} is not a KV basis file: {exc}") from exc
        for side in (*basis.keys, *basis.values):
            h, d = side.mean.shape
            if side.basis.shape != (h, d, d) or not side.rms > 0:
                raise ValueError(f"{path}: inconsistent basis shapes {tuple(side.mean.shape)} / {tuple(side.basis.shape)}")
        return basis


@dataclass(frozen=True)
class KVBases:
    """The KV bases one side of a hop holds (its route's), by fingerprint: passed to encoders and decoders
    explicitly, so what a process can code never depends on what else it happened to load."""

    by_fingerprint: dict = field(default_factory=dict)  # fingerprint -> KVBasis, in load order

    @classmethod
    def of(cls, *bases: KVBasis) -> KVBases:
        return cls({b.fingerprint: b for b in bases})

    @classmethod
    def load(cls, *directories: str | Path) -> KVBases:
        """The ``kv_basis.safetensors`` of each directory that has one (model or adapter dirs)."""
        return cls.of(*(KVBasis.load(Path(d) / BASIS_FILE) for d in directories if (Path(d) / BASIS_FILE).is_file()))

    @property
    def fingerprints(self) -> tuple[str, ...]:
        return tuple(self.by_fingerprint)

    def __len__(self) -> int:
        return len(self.by_fingerprint)

    def __contains__(self, fingerprint: str) -> bool:
        return fingerprint in self.by_fingerprint

    def get(self, fingerprint: str) -> KVBasis:
        basis = self.by_fingerprint.get(fingerprint)
        if basis is None:
            raise UnknownBasisError(f"KV basis {fingerprint!r} is not loaded here; load the sender's or adapter's {BASIS_FILE}")
        return basis

    def for_space(self, cache_fingerprint: str, rope_applied: bool) -> KVBasis:
        """The most recently added basis fitted on that cache space in that RoPE state."""
        matches = [b for b in self.by_fingerprint.values() if (b.cache_fingerprint, b.rope_applied) == (cache_fingerprint, rope_applied)]
        if not matches:
            state = "RoPE applied" if rope_applied else "RoPE stripped"
            raise UnknownBasisError(f"no KV basis is loaded for cache space {cache_fingerprint!r} with {state}; "
                                    f"calibrate one (densecomm codec calibrate) and load its {BASIS_FILE}")
        return matches[-1]


# A process-wide default for callers that pass no ``KVBases`` (notebooks, training scripts): thin
# wrappers over one dict. Services never use it: each hop gets its route's bases explicitly.
_REGISTRY: dict[str, KVBasis] = {}
_LOCK = threading.Lock()


def register_basis(basis: KVBasis) -> str:
    """Add ``basis`` to the process-wide default bases; returns its fingerprint."""
    with _LOCK:
        _REGISTRY[basis.fingerprint] = basis
    return basis.fingerprint


def load_bases(*directories: str | Path) -> list[str]:
    """Register the ``kv_basis.safetensors`` of each directory that has one (model or adapter dirs)."""
    return [register_basis(b) for b in KVBases.load(*directories).by_fingerprint.values()]


def default_bases() -> KVBases:
    """A snapshot of the process-wide default bases."""
    with _LOCK:
        return KVBases(dict(_REGISTRY))


def registered_basis(fingerprint: str) -> KVBasis:
    return default_bases().get(fingerprint)


class TransformCodec(Codec):
    name = "pca"
    lossless = False
    token_wise = True  # fixed per-layer steps: a token's codes depend on that token alone

    def __init__(self, key_step: float = 0.25, value_step: float = 0.35, strip_rope: bool = True, basis: str = "auto",
                 level: int = 1) -> None:
        for field, value in (("key_step", key_step), ("value_step", value_step)):
            if not number_in(value, 0.001, 10.0):
                raise CodecError(f"{field} must be a number in [0.001, 10] (step / rms of the layer's coefficients), got {value!r}")
        if not isinstance(strip_rope, bool):
            raise CodecError(f"strip_rope must be true or false, got {strip_rope!r}")
        if not isinstance(basis, str) or not (basis == "auto" or re.fullmatch(r"[0-9a-f]{1,64}", basis)):
            raise CodecError(f"basis must be 'auto' or a basis fingerprint (hex digits), got {basis!r}")
        if not integer_in(level, -7, 19):
            raise CodecError(f"level must be an integer in [-7, 19], got {level!r}")
        self.key_step, self.value_step, self.strip_rope, self.level = float(key_step), float(value_step), strip_rope, level
        self.basis_name, self.layer = basis, None  # the layer a for_layer copy codes
        self.kv_basis: KVBasis | None = None  # resolved by bind, from the bases the caller holds

    @property
    def params(self) -> dict:
        return {"key_step": self.key_step, "value_step": self.value_step, "strip_rope": self.strip_rope,
                "basis": self.basis_name, "level": self.level}

    @property
    def strips_rope(self) -> bool:
        return self.strip_rope

    def bind(self, cache_fingerprint: str, rope_applied: bool, bases: KVBases | None = None) -> Codec:
        """Resolve the basis among ``bases`` (the process-wide default when None): the named one, which
        must be fitted on this cache space, or with ``basis="auto"`` that space's latest."""
        if rope_applied and self.strip_rope:
            raise CodecError("pca (strip_rope=true) codes RoPE-stripped keys: ship the cache stripped "
                             "(rope.strip_rope; the receiving side re-applies its rotation) or set strip_rope=false")
        bases = default_bases() if bases is None else bases
        if self.basis_name == "auto":
            kv_basis = bases.for_space(cache_fingerprint, rope_applied)
        else:
            kv_basis = bases.get(self.basis_name)
            if kv_basis.rope_applied == self.strip_rope:
                raise CodecError(f"basis {self.basis_name!r} was fitted on keys with RoPE {'applied' if self.strip_rope else 'stripped'}, "
                                 f"but strip_rope={str(self.strip_rope).lower()}")
            if (kv_basis.cache_fingerprint, kv_basis.rope_applied) != (cache_fingerprint, rope_applied):
                raise CodecError(f"basis {self.basis_name!r} was fitted on cache space {kv_basis.cache_fingerprint!r}, "
                                 f"this stream is {cache_fingerprint!r}: name each hop's own basis (or basis='auto')")
        bound = copy.copy(self)
        bound.basis_name, bound.kv_basis = kv_basis.fingerprint, kv_basis
        return bound

    def for_layer(self, layer: int) -> Codec:
        if self.kv_basis is None:
            raise CodecError("the pca codec must be bound to a basis before encoding (basis='auto' is resolved per stream)")
        if not 0 <= layer < self.kv_basis.num_layers:
            raise CodecError(f"layer {layer} is outside the KV basis's {self.kv_basis.num_layers} layers")
        bound = copy.copy(self)
        bound.layer = layer
        return bound

    def _sides(self) -> tuple[SideBasis, SideBasis]:
        if self.layer is None:
            raise CodecError("the pca codec codes one layer at a time (for_layer)")
        return self.kv_basis.keys[self.layer], self.kv_basis.values[self.layer]

    @staticmethod
    def _check(x_shape: tuple[int, ...], side: SideBasis, what: str) -> None:
        if len(x_shape) != 4 or tuple(x_shape[1::2]) != tuple(side.mean.shape):
            raise CodecError(f"{what} of shape {tuple(x_shape)} do not match the KV basis (heads, head_dim) = {tuple(side.mean.shape)}")

    def encode_parts(self, keys: torch.Tensor, values: torch.Tensor) -> list:
        parts = []
        for x, side, rel, what in zip((keys, values), self._sides(), (self.key_step, self.value_step), ("keys", "values")):
            self._check(tuple(x.shape), side, what)
            # Centre in float32 (one pass: the bf16 input is promoted as it is read), then one batched
            # matmul with the step folded into the basis gives component-major codes (B, H, D, t).
            x = x if x.dtype in (torch.bfloat16, torch.float16, torch.float32) else x.float()
            centred = x - side.mean.to(x.device)[None, :, None]  # (B, H, t, D) float32
            codes = torch.matmul(side.analysis(rel, x.device), centred.transpose(2, 3)).round_()  # (B, H, D, t)
            if codes.numel():
                low, high = torch.aminmax(codes)
                peak = max(-float(low), float(high))
            else:
                peak = 0.0
            if not math.isfinite(peak):  # a non-finite input poisons its whole token's coefficients
                if not torch.isfinite(x).all():
                    raise CodecError("pca cannot code non-finite values; use a lossless codec for such caches")
                raise CodecError(f"{what} overflow float32 in the basis: not this basis's cache space")
            width = next((w for w in CODE_WIDTHS if peak < 2 ** (8 * w - 1)), None)
            if width is None:
                raise CodecError(f"{what} lie {peak:.3g} steps from the basis mean: not this basis's cache space")
            codes = codes.to(CODE_WIDTHS[width]).cpu()  # contiguous, component-major
            parts.append(bytes([width]))
            planes = byte_planes(codes)
            for i, plane in enumerate(planes):  # the top plane (int8 codes, or wider codes' high bytes) shrinks: no probe
                parts.extend(section_parts(plane, self.level, probe=i < len(planes) - 1))
        return parts

    def encode(self, keys: torch.Tensor, values: torch.Tensor) -> bytes:
        return b"".join(self.encode_parts(keys, values))

    def reconstruct(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What ``decode(encode(...))`` gives, on the inputs' device without bytes: the same codes (the
        wire stores them as integers, exactly) times the same steps, through the same basis."""
        out = []
        for x, side, rel, what in zip((keys, values), self._sides(), (self.key_step, self.value_step), ("keys", "values")):
            self._check(tuple(x.shape), side, what)
            centred = x.float() - side.mean.to(x.device)[None, :, None]
            codes = torch.matmul(side.analysis(rel, x.device), centred.transpose(2, 3)).round_()  # (B, H, D, t)
            peak = float(codes.abs().max()) if codes.numel() else 0.0
            if not math.isfinite(peak):
                raise CodecError(f"pca cannot code non-finite {what}; use a lossless codec for such caches")
            if peak >= 2 ** 31:  # the widest code on the wire
                raise CodecError(f"{what} lie {peak:.3g} steps from the basis mean: not this basis's cache space")
            synthesis = side.basis.transpose(1, 2).to(x.device)[None]  # (1, H, D, D)
            decoded = codes.transpose(2, 3) * (rel * side.rms) @ synthesis + side.mean.to(x.device)[None, :, None]
            out.append(decoded.to(x.dtype))
        return out[0], out[1]

    def decode(self, payload, key_shape, value_shape, dtype):
        view, offset, out = memoryview(payload), 0, []
        for shape, side, rel, what in zip((key_shape, value_shape), self._sides(), (self.key_step, self.value_step), ("keys", "values")):
            self._check(tuple(shape), side, what)
            if offset >= len(view):
                raise CodecError(f"pca payload ends before its {what}")
            width = view[offset]
            offset += 1
            if width not in CODE_WIDTHS:
                raise CodecError(f"pca {what} code width {width} is not one of {tuple(CODE_WIDTHS)}")
            b, h, t, d = shape
            n = b * h * t * d
            planes = []
            for _ in range(width):
                plane, offset = unpack_section(view, offset, n)
                planes.append(plane)
            codes = merge_planes(planes, n, (b, h, d, t), CODE_WIDTHS[width]) if width > 1 else tensor_from_bytes(planes[0], (b, h, d, t), torch.int8)
            coefficients = codes.float().transpose(2, 3) * (rel * side.rms)
            out.append((coefficients @ side.basis.transpose(1, 2)[None] + side.mean[None, :, None]).to(dtype).contiguous())
        if offset != len(view):
            raise CodecError(f"pca payload has {len(view) - offset} trailing bytes")
        if not (torch.isfinite(out[0]).all() and torch.isfinite(out[1]).all()):
            raise CodecError("pca payload decodes to non-finite values")
        return out[0], out[1]
