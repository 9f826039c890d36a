"""The pca (transform) codec: calibration, error bound, basis binding by fingerprint, RoPE-stripped shipping."""

from __future__ import annotations

import math

import pytest
import torch

from densecomm_core.cache import KVCache
from densecomm_core.codec import (
    decode_cache,
    encode_cache,
    get_codec,
    round_trip,
    transform,
)
from densecomm_core.codec.base import CodecError
from densecomm_core.codec.transform import (
    BASIS_FILE,
    KVBases,
    KVBasis,
    UnknownBasisError,
    load_bases,
    register_basis,
)
from densecomm_core.codec.wire import split_frames
from densecomm_core.rope import restore_rope, strip_rope

HEADS, DIM, LAYERS = 2, 16, 3


def correlated_cache(tokens: int = 40, seed: int = 0, rank: int = 4, rope_applied: bool = False, dtype=torch.float32) -> KVCache:
    """Low-rank-plus-noise K/V (what trained models' caches look like), one fixed mixing per (layer, head)."""
    mixing = torch.Generator().manual_seed(1234)
    g = torch.Generator().manual_seed(seed)
    keys, values = [], []
    for _ in range(LAYERS):
        for out in (keys, values):
            w = torch.randn(HEADS, rank, DIM, generator=mixing) * 2
            z = torch.randn(1, HEADS, tokens, rank, generator=g)
            out.append((z @ w + 0.05 * torch.randn(1, HEADS, tokens, DIM, generator=g) + 0.5).to(dtype))
    mask = torch.ones(1, tokens, dtype=torch.bool)
    return KVCache(keys, values, mask, torch.arange(tokens)[None], rope_applied, "pca-test-space")


@pytest.fixture
def registry(monkeypatch):
    """A private basis registry, so tests cannot see each other's (or the zoo's) bases."""
    monkeypatch.setattr(transform, "_REGISTRY", {})
    return transform._REGISTRY


@pytest.fixture
def basis(registry) -> KVBasis:
    fitted = KVBasis.fit([correlated_cache(seed=s) for s in range(1, 6)])
    register_basis(fitted)
    return fitted


def test_fit_gives_orthonormal_bases_sorted_by_variance(basis, tmp_path):
    for side in (*basis.keys, *basis.values):
        assert side.basis.shape == (HEADS, DIM, DIM) and side.rms > 0
        eye = side.basis.transpose(1, 2) @ side.basis
        assert torch.allclose(eye, torch.eye(DIM).expand_as(eye), atol=1e-5)
    cache = correlated_cache(seed=9)
    y = (cache.keys[0][0].float() - basis.keys[0].mean[:, None]) @ basis.keys[0].basis
    variances = y.var(dim=1)  # (H, D): the first components carry the variance
    assert (variances[:, :4].sum(1) > 50 * variances[:, 4:].sum(1)).all()
    basis.save(tmp_path / BASIS_FILE)
    loaded = KVBasis.load(tmp_path / BASIS_FILE)
    assert loaded.fingerprint == basis.fingerprint and loaded.rope_applied is False
    assert load_bases(tmp_path, tmp_path / "nothing-here") == [basis.fingerprint]


@pytest.mark.parametrize("key_step, value_step", [(0.05, 0.05), (0.25, 0.35), (1.5, 3.0)])
@pytest.mark.parametrize("chunk_tokens", [None, 7])
def test_error_is_at_most_half_a_step_per_coefficient(basis, key_step, value_step, chunk_tokens):
    cache = correlated_cache(seed=11)
    codec = get_codec("pca", key_step=key_step, value_step=value_step)
    out = decode_cache(encode_cache(cache, codec, chunk_tokens=chunk_tokens))
    assert out.rope_applied is False and out.fingerprint == cache.fingerprint
    for sides, rel, xs, ys in ((basis.keys, key_step, cache.keys, out.keys), (basis.values, value_step, cache.values, out.values)):
        for side, x, y in zip(sides, xs, ys):
            step = rel * side.rms
            coefficient_error = ((y - x).float() @ side.basis).abs().max()  # in the basis: each code errs <= step / 2
            assert coefficient_error <= step / 2 * (1 + 1e-4) + 1e-5
            assert (y - x).norm(dim=-1).max() <= step / 2 * math.sqrt(DIM) * (1 + 1e-4) + 1e-5


def test_transform_coding_beats_channel_quantization_on_correlated_caches(basis):
    """Fewer bytes and less error than 4-bit KIVI quantization at the same time."""
    cache = correlated_cache(tokens=64, seed=12)

    def error_and_size(codec):
        blob = encode_cache(cache, codec)
        out = decode_cache(blob)
        err = sum(((a - b) ** 2).sum() for a, b in zip(out.keys + out.values, cache.keys + cache.values))
        return float(err / sum((b**2).sum() for b in cache.keys + cache.values)), len(blob)

    pca_error, pca_bytes = error_and_size(get_codec("pca", key_step=0.25, value_step=0.25))
    int4_error, int4_bytes = error_and_size(get_codec("quantized", key_bits=4, value_bits=4, group=64))
    assert pca_bytes < int4_bytes and pca_error < int4_error / 2


def test_header_names_the_basis_and_a_decoder_without_it_refuses(basis, registry):
    cache = correlated_cache(seed=13)
    blob = encode_cache(cache, get_codec("pca"))
    header = bytes(next(iter(split_frames(blob))))
    assert basis.fingerprint.encode() in header and b'"auto"' not in header
    registry.clear()
    with pytest.raises(UnknownBasisError, match=basis.fingerprint):
        decode_cache(blob)
    with pytest.raises(UnknownBasisError, match="pca-test-space"):
        encode_cache(cache, get_codec("pca"))


def test_rope_state_is_part_of_the_contract(basis, tiny_pair):
    sender, _ = tiny_pair
    rotated = correlated_cache(rope_applied=True)
    with pytest.raises(CodecError, match="RoPE-stripped"):
        encode_cache(rotated, get_codec("pca"))
    with pytest.raises(CodecError, match="needs the cache's model"):
        round_trip(rotated, get_codec("pca"))
    with pytest.raises(CodecError, match="fitted on keys with RoPE stripped"):
        get_codec("pca", strip_rope=False, basis=basis.fingerprint).bind("pca-test-space", True)
    with pytest.raises(CodecError, match="must not strip RoPE"):
        get_codec("eviction", keep=0.5, inner="pca")


def test_round_trip_strips_and_restores_the_models_rope(registry, tiny_pair):
    """In process, round_trip(model=) ships what the services ship: RoPE-stripped keys, restored on arrival."""
    from densecomm_core.relay import sender_prefill
    from densecomm_core.zoo import tasks

    sender, _ = tiny_pair
    texts = [e.context for e in tasks.make_split("train", 4)]
    register_basis(KVBasis.fit([strip_rope(sender_prefill(sender, [t]), sender) for t in texts]))
    cache = sender_prefill(sender, [tasks.make_split("test", 1)[0].context])
    out = round_trip(cache, get_codec("pca", key_step=0.02, value_step=0.02), dtype=torch.float32, model=sender)
    assert out.rope_applied and out.fingerprint == cache.fingerprint
    for a, b in zip(out.keys + out.values, cache.keys + cache.values):
        assert torch.allclose(a, b, atol=0.05 * float(b.abs().max()))
    # what was on the wire: stripped keys, decoded back close to the stripped original
    stripped = strip_rope(cache, sender)
    wire = decode_cache(encode_cache(stripped, get_codec("pca", key_step=0.02, value_step=0.02)))
    assert not wire.rope_applied
    assert torch.allclose(restore_rope(wire, sender, dtype=torch.float32).keys[0], out.keys[0], atol=1e-4)


def test_codes_widen_instead_of_clipping(basis):
    cache = correlated_cache(seed=14)
    cache.values[1][0, 0, 3] += 5000.0  # far outside the calibration: int16 codes, still within half a step
    out = decode_cache(encode_cache(cache, get_codec("pca", key_step=0.05, value_step=0.05)))
    step = 0.05 * basis.values[1].rms
    assert ((out.values[1] - cache.values[1]).float() @ basis.values[1].basis).abs().max() <= step / 2 * 1.001 + 1e-3


def test_geometry_that_disagrees_with_the_basis_is_refused(basis):
    wide = KVCache([torch.zeros(1, HEADS + 1, 5, DIM)] * LAYERS, [torch.zeros(1, HEADS + 1, 5, DIM)] * LAYERS,
                   torch.ones(1, 5, dtype=torch.bool), torch.arange(5)[None], False, "pca-test-space")
    with pytest.raises(CodecError, match="do not match the KV basis"):
        encode_cache(wide, get_codec("pca"))
    deep = correlated_cache()
    deep = KVCache(deep.keys * 2, deep.values * 2, deep.mask, deep.positions, False, deep.fingerprint)
    with pytest.raises(CodecError, match="outside the KV basis"):
        encode_cache(deep, get_codec("pca"))


@pytest.mark.parametrize("params, message", [({"key_step": 0}, "key_step"), ({"value_step": "x"}, "value_step"),
                                             ({"strip_rope": 1}, "strip_rope"), ({"basis": ""}, "basis"),
                                             ({"basis": "not/hex"}, "basis"), ({"level": 40}, "level"),
                                             ({"level": True}, "level"), ({"key_step": False}, "key_step"),
                                             ({"layer": 3}, "bad parameters")])  # the layer is the codec's own state
def test_bad_parameters(registry, params, message):
    with pytest.raises(CodecError, match=message):
        get_codec("pca", **params)


def test_a_named_basis_is_resolved_when_bound_not_when_built(basis):
    """Building the codec needs no bases (a relay ingress holds none); binding needs the named one, in its space."""
    codec = get_codec("pca", basis="f" * 32)
    assert codec.params["basis"] == "f" * 32
    with pytest.raises(UnknownBasisError, match="not loaded"):
        codec.bind("pca-test-space", False, KVBases.of(basis))
    named = get_codec("pca", basis=basis.fingerprint)
    assert named.bind("pca-test-space", False, KVBases.of(basis)).kv_basis is basis
    with pytest.raises(CodecError, match="fitted on cache space 'pca-test-space'"):
        named.bind("another-space", False, KVBases.of(basis))


def test_explicit_bases_need_no_process_wide_registry(registry, basis, tmp_path):
    """Encoder and decoder each get their KVBases; the process-wide default stays empty."""
    registry.clear()
    basis.save(tmp_path / BASIS_FILE)
    bases = KVBases.load(tmp_path)
    assert bases.fingerprints == (basis.fingerprint,) and not registry
    cache = correlated_cache(seed=21)
    blob = encode_cache(cache, get_codec("pca", key_step=0.05, value_step=0.05), bases=bases)
    out = decode_cache(blob, bases=bases)
    assert torch.allclose(out.keys[0], cache.keys[0], atol=0.5)  # step 0.05 · rms ≈ 0.17: a few half-steps at most
    with pytest.raises(UnknownBasisError, match=basis.fingerprint):
        decode_cache(blob, bases=KVBases())
    with pytest.raises(UnknownBasisError, match="no KV basis"):
        encode_cache(cache, get_codec("pca"))  # nothing registered process-wide


def test_bind_prefers_the_callers_bases_among_those_of_one_space(basis):
    other = KVBasis.fit([correlated_cache(seed=s, rank=6) for s in range(20, 24)])  # same space, another fit
    register_basis(other)
    codec = get_codec("pca")
    assert codec.bind("pca-test-space", False).params["basis"] == other.fingerprint  # the latest by default
    assert codec.bind("pca-test-space", False, KVBases.of(basis)).params["basis"] == basis.fingerprint
    with pytest.raises(UnknownBasisError, match="no KV basis"):
        codec.bind("pca-test-space", False, KVBases())


@pytest.mark.parametrize("codec", ["pca", "lossless", "quantized"])
def test_reconstruct_is_round_trip_on_every_real_token(registry, tiny_pair, codec):
    """Training's tensor path through a codec (hop.reconstruct, a padded batch at once) gives exactly what
    the byte round trip (one payload per request) gives; a non-token-wise codec makes the round trip."""
    from densecomm_core.hop import reconstruct
    from densecomm_core.relay import sender_prefill
    from densecomm_core.zoo import tasks

    sender, _ = tiny_pair
    texts = [e.context for e in tasks.make_split("train", 6)]
    register_basis(KVBasis.fit([strip_rope(sender_prefill(sender, [t]), sender) for t in texts]))
    cache = sender_prefill(sender, [texts[0], texts[1] + " " + texts[2], texts[3][:20]])  # uneven: padding
    assert not bool(cache.mask.all())
    c = get_codec(codec)
    shipped = round_trip(cache, c, model=sender)
    tensors = reconstruct(cache, c, model=sender)
    assert tensors.dtype == cache.dtype and tensors.mask.equal(cache.mask)
    if c.strips_rope:
        assert not tensors.rope_applied
        tensors = restore_rope(tensors, sender, dtype=cache.dtype)
    real = cache.mask[:, None, :, None]
    for a, b in zip(shipped.keys + shipped.values, tensors.keys + tensors.values):
        assert torch.equal(a * real, b * real)
    assert c.name == "quantized" or c.token_wise


def test_reconstruct_refuses_what_the_wire_refuses(basis):
    bound = get_codec("pca").bind("pca-test-space", False).for_layer(0)
    keys = correlated_cache().keys[0].clone()
    keys[0, 0, 3, 0] = float("nan")
    with pytest.raises(CodecError, match="non-finite"):
        bound.reconstruct(keys, keys)


def test_scaled_bases_are_built_once_and_shared_across_streams(basis):
    """The analysis matrix of a (layer, side) is built for the first stream coded with a step and reused
    by every later stream, which codes exactly as before; a client-chosen step cannot grow the cache
    past ``ANALYSES_KEPT`` entries."""
    cache = correlated_cache(seed=7)
    codec = get_codec("pca", key_step=0.3, value_step=0.4, strip_rope=False)
    first = encode_cache(cache, codec)
    side = basis.keys[0]
    built = side.analysis(0.3, torch.device("cpu"))
    assert side.analysis(0.3, "cpu") is built  # the one the first stream built, not a new copy
    assert torch.equal(built, basis.keys[0].basis.transpose(1, 2) / (0.3 * side.rms))
    assert encode_cache(cache, codec) == first  # a second stream: the same bytes
    for step in (0.5, 0.6, 0.7, 0.8, 0.9):
        side.analysis(step, "cpu")
    assert len(side._analyses) == transform.ANALYSES_KEPT
    assert side.analysis(0.3, "cpu") is not built  # the oldest went first; rebuilt equal on demand
    assert torch.equal(side.analysis(0.3, "cpu"), built)


def test_scaled_bases_survive_threads_evicting_each_other(basis):
    """Encoder threads share a basis; client-chosen steps make them evict and insert at once: no error, and
    every thread gets its own step's matrix."""
    from concurrent.futures import ThreadPoolExecutor

    side = basis.values[1]

    def build(i: int) -> bool:
        step = 0.1 + (i % 11) / 10
        return torch.equal(side.analysis(step, "cpu"), side.basis.transpose(1, 2) / (step * side.rms))

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(build, range(400)))
    assert len(side._analyses) <= transform.ANALYSES_KEPT
