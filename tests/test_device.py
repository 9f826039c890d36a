"""Device and dtype placement without a GPU: the relay, decoding and both training phases on fake CUDA devices.

Every test builds tiny models, moves them to *fake* devices under ``FakeTensorMode`` and runs the real
code there. Fake tensors carry shape, dtype and device but no data, and every op checks that its
inputs share one device (``FakeTensorDeviceMismatchError`` otherwise; a 0-dim CPU scalar is allowed,
as on a real GPU). So a tensor created on the CPU (``torch.zeros(batch)`` without ``device=``) and
then combined with a model's output fails here exactly as it would on a GPU.

Fake CUDA on a CPU-only torch: factory functions accept ``device="cuda:0"`` under the mode, but
Python indexing (``t[:, None]``) opens a CUDA device guard, which a CPU build does not register
("PyTorch is not linked with support for cuda devices"). The ``gpus`` fixture compiles and loads a
ten-line library that registers c10's own ``FakeGuardImpl`` for CUDA (a few seconds with the system's
C++ compiler; no CUDA runtime involved). On a CUDA build nothing is compiled. Without a compiler the
fixture falls back to two fake ``meta`` devices (``meta:0`` and ``meta:1``), which mix with neither
each other nor the CPU, so the same tests still catch a misplaced tensor.

Backward on fake CUDA fails in the autograd engine ("Cannot access accelerator device when none is
available": it asks the CUDA runtime hooks, absent from a CPU build, for device streams). So each
training test runs twice: the loss on fake CUDA devices (where the forward's placement is checked),
and the whole step - loss, backward, gradient clipping, AdamW - on the fake ``meta:0`` / ``meta:1``
pair, which the engine handles like any other device.

Data-dependent Python (``bool(t.all())``, ``.item()``, ``.tolist()``, tokenizer decoding) cannot run
on data-free tensors, so the tests drive the per-step functions (``start_decoding``, ``choose_next``,
``decode_step``, ``receiver_inputs``, ``batch_loss``, ``generation_loss``) and ``generate`` with one
new token (its stopping test is skipped on the last step). The bf16 tests at the end run for real on
the CPU and check the dtype at each boundary.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import subprocess

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily

from densecomm_core.adapter import AdapterConfig, DenseAdapter
from densecomm_core.baselines.c2c import C2CConfig, C2CFuser, fuse_caches
from densecomm_core.cache import KVCache
from densecomm_core.codec import get_codec
from densecomm_core.errors import CacheLayoutError
from densecomm_core.hop import HopDecoder, HopEncoder
from densecomm_core.generation import (
    GenerationConfig,
    choose_next,
    decode_step,
    generate,
    start_decoding,
)
from densecomm_core.models import LoadedModel, wrap_model
from densecomm_core.relay import (
    ContextMode,
    DenseRelay,
    PromptFormat,
    encode,
    receiver_inputs,
    sender_prefill,
    transform_cache,
)
from densecomm_core.rope import strip_rope
from densecomm_core.streaming import StreamingAdapter
from densecomm_core.training import phase1, phase2
from densecomm_core.training.common import optimizer_step
from densecomm_core.training.traces import TraceRecord, TraceRequest
from densecomm_core.zoo import tasks
from densecomm_core.zoo.build import ZooModelSpec, build_model
from densecomm_core.zoo.tokenizer import build_tokenizer
from tests.conftest import TINY_RECEIVER, TINY_SENDER

log = logging.getLogger(__name__)

EXAMPLES = tasks.make_split("test", 1)  # one example per family
CONTEXTS = [e.context for e in EXAMPLES]
FORMAT = PromptFormat()

GUARD_SOURCE = """// Registers c10's FakeGuardImpl for CUDA so that fake CUDA tensors can be indexed on a CPU-only build.
#include <c10/core/impl/FakeGuardImpl.h>
namespace { C10_REGISTER_GUARD_IMPL(CUDA, c10::impl::FakeGuardImpl<c10::DeviceType::CUDA>); }
"""


def fake_cuda_works() -> bool:
    try:
        with FakeTensorMode():
            torch.empty(2, 2, device="cuda:0")[:, None]
        return True
    except RuntimeError:
        return False


def load_fake_cuda_guard(directory) -> None:
    """Compile GUARD_SOURCE against this torch's headers and libc10, and load it into the process."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set CXX)")
    torch_dir = os.path.dirname(torch.__file__)
    include, lib = os.path.join(torch_dir, "include"), os.path.join(torch_dir, "lib")
    source, library = directory / "fake_cuda_guard.cpp", directory / "libfake_cuda_guard.so"
    source.write_text(GUARD_SOURCE)
    subprocess.run(
        [compiler, "-std=c++17", "-shared", "-fPIC", f"-I{include}", str(source), f"-L{lib}", "-lc10",
         f"-Wl,-rpath,{lib}", "-o", str(library)],
        check=True, capture_output=True, timeout=300,
    )
    ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)


@pytest.fixture(scope="session")
def gpus(tmp_path_factory) -> tuple[torch.device, torch.device]:
    """Two distinct fake accelerator devices: cuda:0 and cuda:1 (meta:0 and meta:1 without a compiler)."""
    if not fake_cuda_works():
        try:
            load_fake_cuda_guard(tmp_path_factory.mktemp("fake_cuda_guard"))
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            log.warning("fake CUDA unavailable (%s); using fake meta devices", exc)
    if fake_cuda_works():
        return torch.device("cuda", 0), torch.device("cuda", 1)
    return torch.device("meta", 0), torch.device("meta", 1)


META = (torch.device("meta", 0), torch.device("meta", 1))


@pytest.fixture(params=["cuda", "meta"])
def training_devices(request, gpus) -> tuple[tuple[torch.device, torch.device], bool]:
    """(two fake devices, whether backward + optimizer step can run on them); see the module docstring."""
    devices = gpus if request.param == "cuda" else META
    return devices, devices[0].type != "cuda"


@pytest.fixture
def mode() -> FakeTensorMode:
    return FakeTensorMode()


def fake(module: torch.nn.Module, mode: FakeTensorMode, device: torch.device, dtype: torch.dtype | None = None):
    """Replace every parameter and buffer of ``module`` by a fake tensor on ``device`` (floats cast to ``dtype``)."""
    return module._apply(lambda t: mode.from_tensor(t).to(device=device, dtype=dtype if t.is_floating_point() else None))


def fake_model(spec: ZooModelSpec, seed: int, mode: FakeTensorMode, device: torch.device, dtype=torch.float32) -> LoadedModel:
    """A tiny model built for real on the CPU, then made fake on ``device`` (call inside ``mode``)."""
    with unset_fake_temporarily():
        torch.manual_seed(seed)
        tokenizer = build_tokenizer()
        model = build_model(spec, len(tokenizer), tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    return wrap_model(fake(model, mode, device, dtype), tokenizer, path=spec.name)


def tiny_adapter(sender: LoadedModel, receiver: LoadedModel) -> DenseAdapter:
    torch.manual_seed(0)
    return DenseAdapter(AdapterConfig(sender.geometry, receiver.geometry, expansion=2))


def fake_relay(mode, sender_device, adapter_device, receiver_device, dtype=torch.float32):
    """Sender, adapter (float32) and receiver on the given fake devices; models in ``dtype``."""
    sender = fake_model(TINY_SENDER, 1, mode, sender_device, dtype)
    receiver = fake_model(TINY_RECEIVER, 2, mode, receiver_device, dtype)
    with unset_fake_temporarily():
        adapter = tiny_adapter(sender, receiver)
    return sender, fake(adapter, mode, adapter_device), receiver


def assert_on(device: torch.device, *tensors: torch.Tensor) -> None:
    for t in tensors:
        assert t.device == device, f"tensor {tuple(t.shape)} {t.dtype} is on {t.device}, expected {device}"


def assert_cache_on(cache: KVCache, device: torch.device, dtype: torch.dtype) -> None:
    assert_on(device, *cache.keys, *cache.values, cache.mask, cache.positions)
    assert {t.dtype for t in (*cache.keys, *cache.values)} == {dtype}


# ---- the fake devices themselves ---------------------------------------------------------------
def test_fake_devices_refuse_mixing(gpus, mode):
    """The guard every test relies on: a CPU tensor, or one on the other device, raises."""
    gpu0, gpu1 = gpus
    with mode:
        a, b, cpu = torch.ones(2, 3, device=gpu0), torch.ones(2, 3, device=gpu1), torch.ones(2, 3)
        assert (a + a).device == gpu0 and a[:, None].device == gpu0
        for other in (b, cpu):
            with pytest.raises(RuntimeError, match="same device"):
                torch.cat([a, other])


def test_a_cache_lives_on_one_device(gpus, mode):
    gpu0, _ = gpus
    with mode:
        keys = [torch.zeros(1, 2, 3, 4, device=gpu0)]
        mask, positions = torch.ones(1, 3, dtype=torch.bool), torch.zeros(1, 3, dtype=torch.long)
        with pytest.raises(CacheLayoutError, match="device"):
            KVCache(keys, keys, mask, positions)
        cache = KVCache(keys, keys, mask.to(gpu0), positions.to(gpu0))
        moved = cache.with_tensors([k.cpu() for k in keys], [k.cpu() for k in keys])  # mask and positions follow
        assert_on(torch.device("cpu"), moved.mask, moved.positions)


# ---- relay -------------------------------------------------------------------------------------
def test_sender_prefill_on_the_senders_device(gpus, mode):
    gpu0, _ = gpus
    with mode:
        sender = fake_model(TINY_SENDER, 1, mode, gpu0, torch.bfloat16)
        cache = sender_prefill(sender, CONTEXTS)
        assert_cache_on(cache, gpu0, torch.bfloat16)


@pytest.mark.parametrize("adapter_on", [0, 1])
def test_transform_cache_across_devices(gpus, mode, adapter_on):
    """Sender on cuda:0, receiver on cuda:1, the adapter on either: the result is on the receiver's
    device in its dtype, the stripped cache in float32 on the adapter's device."""
    gpu0, gpu1 = gpus
    with mode:
        sender, adapter, receiver = fake_relay(mode, gpu0, gpus[adapter_on], gpu1, torch.bfloat16)
        source = sender_prefill(sender, CONTEXTS)
        stripped = strip_rope(source.to(device=gpus[adapter_on]), sender)
        assert_cache_on(stripped, gpus[adapter_on], torch.float32)
        assert_cache_on(adapter(stripped), gpus[adapter_on], torch.float32)
        out = transform_cache(adapter, source, sender, receiver)
        assert_cache_on(out, gpu1, torch.bfloat16)
        assert out.fingerprint == receiver.geometry.fingerprint()
        assert_cache_on(transform_cache(adapter, source, sender, receiver, dtype=torch.float32), gpu1, torch.float32)


def test_receiver_decode_step_on_the_receivers_device(gpus, mode):
    """Prompt ids and mask from the tokenizer (CPU), a transferred cache, the prefill and one step."""
    gpu0, gpu1 = gpus
    with mode:
        sender, adapter, receiver = fake_relay(mode, gpu0, gpu0, gpu1, torch.bfloat16)
        cache = transform_cache(adapter, sender_prefill(sender, CONTEXTS), sender, receiver).to(device=gpu0)  # arrives elsewhere
        prompts = [FORMAT.receiver_prompt(ContextMode.AWARE, c) for c in CONTEXTS]
        ids, mask, cache = receiver_inputs(receiver, cache, prompts)
        assert_on(gpu1, ids, mask)
        assert_cache_on(cache, gpu1, torch.bfloat16)
        state = start_decoding(receiver.model, ids, mask, cache.to_dynamic_cache(), cache.mask, cache.next_positions)
        tokens = choose_next(state, GenerationConfig(), None, receiver.tokenizer.eos_token_id)
        state = decode_step(receiver.model, state, tokens)
        assert_on(gpu1, tokens, state.logits, state.mask, state.next_positions, state.finished, state.lengths)
        assert state.mask.shape == (len(CONTEXTS), cache.num_tokens + ids.shape[1] + 1)


def test_generate_moves_cpu_prompts_and_samples_on_the_logits_device(gpus, mode, monkeypatch):
    """``generate`` (as ``generate_texts`` calls it, with the tokenizer's CPU ids) and its sampling RNG."""
    _, gpu1 = gpus
    requested, cpu_generator = [], torch.Generator

    def recording_generator(device="cpu"):  # a CPU build cannot make a CUDA generator: record the request
        requested.append(torch.device(device))
        return cpu_generator()

    monkeypatch.setattr(torch, "Generator", recording_generator)
    with mode:
        receiver = fake_model(TINY_RECEIVER, 2, mode, gpu1)
        ids, mask = encode(receiver.tokenizer, [tasks.prompt_with_input(e) for e in EXAMPLES], "left", add_special_tokens=True)
        for config in (GenerationConfig(max_new_tokens=1), GenerationConfig(max_new_tokens=1, temperature=0.7, top_p=0.9)):
            tokens, lengths = generate(receiver.model, ids, mask, config, receiver.tokenizer.eos_token_id)
            assert_on(gpu1, tokens, lengths)
    assert requested == [gpu1]


# ---- the hops and the C2C baseline -----------------------------------------------------------------
def real_cache(geometry, rope_applied: bool, tokens: int = 5) -> KVCache:
    """A real CPU cache of ``geometry`` (bf16), as a hop's encoder gets it."""
    with unset_fake_temporarily():
        g = torch.Generator().manual_seed(0)
        shape = (1, geometry.num_kv_heads, tokens, geometry.head_dim)
        keys = [torch.randn(shape, generator=g).to(torch.bfloat16) for _ in range(geometry.num_layers)]
        values = [torch.randn(shape, generator=g).to(torch.bfloat16) for _ in range(geometry.num_layers)]
        return KVCache(keys, values, torch.ones(1, tokens, dtype=torch.bool), torch.arange(tokens)[None], rope_applied,
                       geometry.fingerprint())


def real_frames(cache: KVCache) -> list[bytes]:
    with unset_fake_temporarily():
        return list(HopEncoder(get_codec("raw")).frames(cache))


def decoding_for_real(decoder: HopDecoder) -> HopDecoder:
    """Frames are bytes: verifying and decoding them is host work on real data, as in the services' worker
    threads; only what comes after runs on the fake devices."""
    feed = decoder.feed

    def real_feed(frame):
        with unset_fake_temporarily():
            return feed(frame)

    decoder.feed = real_feed
    return decoder


@pytest.mark.parametrize("rope_applied", [True, False], ids=["rotated", "stripped"])
def test_hop_decoder_finishes_on_the_receivers_device(gpus, rope_applied):
    """The receiving end of a hop: the decoded host cache goes to the receiver's device in its dtype, a
    stripped one gets the receiver's rotation back there."""
    _, gpu1 = gpus
    mode = FakeTensorMode(allow_non_fake_inputs=True)  # the decoded host tensors are real; every op still checks devices
    with mode:
        receiver = fake_model(TINY_RECEIVER, 2, mode, gpu1, torch.bfloat16)
        frames = real_frames(real_cache(receiver.geometry, rope_applied))
        decoder = decoding_for_real(HopDecoder(receiver, device=gpu1))
        for frame in frames:
            decoder.feed(frame)
        cache = decoder.finish()
        assert_cache_on(cache, gpu1, torch.bfloat16)
        assert cache.rope_applied


def test_streaming_adapter_transforms_on_the_adapters_device(gpus):
    """The adapter hop: sender chunks decoded on the host, RoPE stripped, T_θ and the receiver's RoPE applied
    where the adapter lives, in the receiver's dtype, before the outgoing encoder takes them."""
    gpu0, gpu1 = gpus
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        sender, adapter, receiver = fake_relay(mode, gpu1, gpu0, gpu1, torch.bfloat16)
        frames = real_frames(real_cache(sender.geometry, rope_applied=True))
        streaming = StreamingAdapter(adapter, sender, receiver, get_codec("raw"))
        decoding_for_real(streaming.incoming)
        layers = []
        streaming.outgoing.layer = lambda layer, k, v: layers.append((layer, k, v)) or []  # encoding needs real data
        for frame in frames:
            streaming.feed(frame)
        streaming.finish()
        assert [layer for layer, _, _ in layers] == list(range(receiver.geometry.num_layers))
        for _, k, v in layers:
            assert_on(gpu0, k, v)
            assert k.dtype == v.dtype == torch.bfloat16 and k.shape[1] == receiver.geometry.num_kv_heads


@pytest.mark.parametrize("aware", [True, False], ids=["own cache", "zeros"])
def test_c2c_fuses_on_the_fusers_device_and_delivers_on_the_receivers(gpus, mode, aware, monkeypatch):
    """The C2C baseline's fuser on cuda:0 with the sender, the receiver (and its own cache) on cuda:1."""
    gpu0, gpu1 = gpus
    equal = torch.equal  # the fuser's check that both caches cover the same tokens reads data: fake tensors have none
    monkeypatch.setattr(torch, "equal", lambda a, b: a.shape == b.shape if isinstance(a, FakeTensor) else equal(a, b))
    with mode:
        sender = fake_model(TINY_SENDER, 1, mode, gpu0, torch.bfloat16)
        receiver = fake_model(TINY_RECEIVER, 2, mode, gpu1, torch.bfloat16)
        with unset_fake_temporarily():
            fuser = C2CFuser(C2CConfig(sender.geometry, receiver.geometry, hidden=8))
        fuser = fake(fuser, mode, gpu0)
        source = sender_prefill(sender, CONTEXTS)
        own = sender_prefill(receiver, CONTEXTS) if aware else None
        fused = fuse_caches(fuser, source, own, sender, receiver)
        assert_cache_on(fused, gpu1, torch.bfloat16)
        assert_cache_on(fuse_caches(fuser, source, own, sender, receiver, dtype=torch.float32, device=gpu0), gpu0, torch.float32)


# ---- training ----------------------------------------------------------------------------------
def check_step(adapter: DenseAdapter, loss: torch.Tensor, device: torch.device) -> None:
    """Backward, clipping and an AdamW step; gradients and optimizer state on the adapter's ``device``."""
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=1e-3)
    optimizer_step(optimizer, loss, lr=1e-3)
    assert_on(device, *(p.grad for p in adapter.parameters()))
    assert_on(device, *(t for state in optimizer.state.values() for t in state.values() if t.dim()))


def test_phase1_step_across_devices(training_devices, mode):
    (gpu0, gpu1), can_step = training_devices
    with mode:
        sender, adapter, receiver = fake_relay(mode, gpu0, gpu1, gpu1, torch.bfloat16)
        loss = phase1.batch_loss(adapter, sender, receiver, [FORMAT.sender.format(context=c) for c in CONTEXTS])
        assert loss.device == gpu1 and loss.dtype == torch.float32
        if can_step:
            check_step(adapter, loss, gpu1)


def test_phase2_step_across_devices(training_devices, mode):
    (gpu0, gpu1), can_step = training_devices
    with mode:
        sender, adapter, receiver = fake_relay(mode, gpu0, gpu0, gpu1, torch.bfloat16)
        records = [TraceRecord(e.context, e.answer, f"so answer {e.answer}", e.family) for e in EXAMPLES]
        modes = [list(ContextMode)[i % 2] for i in range(len(records))]
        ids, mask, labels = phase2.receiver_batch(receiver, ["=>"] * len(records), [r.trace for r in records], gpu1)
        assert_on(gpu1, ids, mask, labels)
        for recon_weight in (0.0, 0.5):  # the reconstruction anchor prefills the receiver on its own device too
            loss = phase2.generation_loss(adapter, sender, receiver, records, modes, FORMAT, recon_weight=recon_weight)
            assert loss.device == gpu1 and loss.dtype == torch.float32
            if can_step:
                check_step(adapter, loss, gpu0)


def test_trace_batches_on_the_receivers_device(gpus, mode):
    """Trace construction's batch: guided prompts -> the receiver's inputs -> the first decoded token."""
    _, gpu1 = gpus
    requests = [TraceRequest(e.context, e.answer, tasks.prompt_with_input(e) + f" {e.answer} :", e.family) for e in EXAMPLES]
    with mode:
        receiver = fake_model(TINY_RECEIVER, 2, mode, gpu1)
        ids, mask, _ = receiver_inputs(receiver, None, [r.guided_prompt for r in requests])
        assert_on(gpu1, ids, mask)
        tokens, lengths = generate(receiver.model, ids, mask, GenerationConfig(max_new_tokens=1), receiver.tokenizer.eos_token_id)
        assert_on(gpu1, tokens, lengths)


# ---- mixed precision, for real on the CPU --------------------------------------------------------
@pytest.fixture(scope="module")
def bf16_relay():
    tokenizer = build_tokenizer()
    models = []
    for spec, seed in ((TINY_SENDER, 1), (TINY_RECEIVER, 2)):
        torch.manual_seed(seed)
        model = build_model(spec, len(tokenizer), tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
        models.append(wrap_model(model.to(torch.bfloat16), tokenizer, path=spec.name))
    sender, receiver = models
    return sender, tiny_adapter(sender, receiver), receiver


def test_bf16_relay_dtypes_at_each_boundary(bf16_relay):
    """bf16 caches on the wire, float32 RoPE strip/restore and adapter math, bf16 into the receiver."""
    sender, adapter, receiver = bf16_relay
    source = sender_prefill(sender, CONTEXTS)
    assert source.dtype == torch.bfloat16
    stripped = strip_rope(source, sender)
    assert stripped.dtype == torch.float32
    mapped = adapter(stripped)
    assert mapped.dtype == torch.float32
    out = transform_cache(adapter, source, sender, receiver)
    assert out.dtype == torch.bfloat16 and out.rope_applied
    assert all(torch.isfinite(k.float()).all() for k in (*out.keys, *out.values))
    result = DenseRelay(sender, receiver, adapter).run(CONTEXTS, ContextMode.AWARE, GenerationConfig(max_new_tokens=4))
    assert len(result.texts) == len(CONTEXTS) and result.tokens.shape[0] == len(CONTEXTS)


def test_bf16_losses_are_float32_and_finite(bf16_relay):
    sender, adapter, receiver = bf16_relay
    adapter.zero_grad(set_to_none=True)
    texts = [FORMAT.sender.format(context=c) for c in CONTEXTS]
    loss1 = phase1.batch_loss(adapter, sender, receiver, texts)
    records = [TraceRecord(e.context, e.answer, f"so answer {e.answer}", e.family) for e in EXAMPLES]
    loss2 = phase2.generation_loss(adapter, sender, receiver, records, [ContextMode.UNAWARE] * len(records), FORMAT,
                                   recon_weight=0.5)
    for loss in (loss1, loss2):
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
    (loss1 + loss2).backward()
    grads = [p.grad for p in adapter.parameters()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    adapter.zero_grad(set_to_none=True)
