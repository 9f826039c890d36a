"""Load Hugging Face decoder-only causal LMs with rotary positions from local directories, and read their geometry.

Works for any architecture whose base model exposes ``rotary_emb`` and whose modeling module defines
``apply_rotary_pos_emb`` (Qwen3, Qwen2, Llama, Mistral, ...). Nothing is fetched from a hub: loading
is ``local_files_only``.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from densecomm_core.errors import IncompatiblePairError, ModelLoadError


@dataclass(frozen=True)
class ModelGeometry:
    """What an adapter depends on: cache layout and positional convention of one model."""

    model_type: str
    num_layers: int
    num_heads: int
    num_kv_heads: int  # KV groups (GQA)
    head_dim: int
    hidden_size: int
    vocab_size: int
    rope: str  # JSON of the model's rope parameters (type, theta, scaling), sorted keys

    def fingerprint(self) -> str:
        """Short stable hash of the geometry; adapters and wire headers carry it."""
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return f"{self.model_type}-L{self.num_layers}-kv{self.num_kv_heads}x{self.head_dim}-" + hashlib.sha256(blob).hexdigest()[:12]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelGeometry:
        return cls(**data)


@dataclass
class RopeModel:
    """What cache transformation needs of a model: its geometry and its own RoPE implementation.

    ``load_rope_model`` builds one from a config alone (no weights), for services that only map caches.
    """

    geometry: ModelGeometry
    path: str
    rotary_embedding: torch.nn.Module  # base_model.rotary_emb: (x, position_ids) -> (cos, sin)
    apply_rotary: Callable  # the modeling module's apply_rotary_pos_emb(q, k, cos, sin)
    dtype: torch.dtype  # the dtype its caches are in


@dataclass
class LoadedModel(RopeModel):
    """A frozen causal LM, its tokenizer and the pieces of its own RoPE implementation."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase

    @property
    def non_embedding_params(self) -> int:
        """N in the paper's FLOPs estimate (appendix B.1): parameters outside embeddings and LM head."""
        excluded = {id(self.model.get_input_embeddings().weight), id(self.model.get_output_embeddings().weight)}
        return sum(p.numel() for p in self.model.parameters() if id(p) not in excluded)


def rope_description(config) -> str:
    params = getattr(config, "rope_parameters", None) or {}
    if not params:
        params = {"rope_theta": getattr(config, "rope_theta", None), "rope_scaling": getattr(config, "rope_scaling", None)}
    return json.dumps(params, sort_keys=True, default=str)


def geometry_of(model: PreTrainedModel) -> ModelGeometry:
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return ModelGeometry(
        model_type=config.model_type,
        num_layers=config.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        hidden_size=config.hidden_size,
        vocab_size=config.vocab_size,
        rope=rope_description(config),
    )


def rope_parts(model: PreTrainedModel) -> tuple[torch.nn.Module, Callable]:
    """The model's own rotary embedding module and ``apply_rotary_pos_emb``; ModelLoadError if absent."""
    rotary = getattr(model.base_model, "rotary_emb", None)
    module = sys.modules.get(type(model).__module__)
    apply = getattr(module, "apply_rotary_pos_emb", None)
    if rotary is None and getattr(model.base_model, "language_model", None) is not None:
        raise ModelLoadError(
            f"{type(model).__name__} wraps a language model with other modalities (its config is "
            f"{model.config.model_type!r}); densecomm relays the caches of text-only causal LMs: save its language "
            "model on its own (or use the text-only checkpoint of the family) and point at that"
        )
    if rotary is None or apply is None:
        raise ModelLoadError(
            f"{type(model).__name__} has no rotary position embedding (expected base_model.rotary_emb and "
            f"apply_rotary_pos_emb in {type(model).__module__}); densecomm needs a RoPE decoder"
        )
    return rotary, apply


def wrap_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: str = "<memory>") -> LoadedModel:
    """Freeze an in-memory model and collect what the relay needs from it."""
    model.eval()
    model.requires_grad_(False)
    rotary, apply = rope_parts(model)
    loaded = LoadedModel(geometry_of(model), path, rotary, apply, model.dtype, model, tokenizer)
    check_rope_layers(loaded)
    return loaded


def check_rope_layers(model: LoadedModel) -> None:
    """The layers densecomm strips and restores RoPE on (``rope.layer_rope_kinds``) must be the layers the
    model rotates: an architecture that skips RoPE by a rule densecomm does not know is refused here."""
    from densecomm_core.rope import layer_rope_kinds, traced_rope_layers

    traced = traced_rope_layers(model)
    expected = tuple(kind is not None for kind in layer_rope_kinds(model))
    if traced is not None and traced != expected:
        differ = [i for i, (a, b) in enumerate(zip(traced, expected)) if a != b]
        raise ModelLoadError(
            f"{type(model.model).__name__} in {model.path!r} rotates the keys of layers "
            f"{[i for i, r in enumerate(traced) if r]} but its config says {[i for i, r in enumerate(expected) if r]} "
            f"(layers {differ} differ): densecomm cannot strip and restore its RoPE exactly"
        )


def _read_config(directory: Path):
    if not directory.is_dir():
        raise ModelLoadError(f"model directory {str(directory)!r} does not exist")
    if not (directory / "config.json").is_file():
        raise ModelLoadError(f"{str(directory)!r} is not a Hugging Face model directory (no config.json)")
    try:
        return AutoConfig.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot read the config in {str(directory)!r}: {exc}") from exc


def load_rope_model(path: str | Path, dtype: torch.dtype | None = None) -> RopeModel:
    """Geometry and RoPE of the model in ``path`` from its config alone: no weights are read.

    The architecture is instantiated on the meta device (free) to find its rotary embedding class,
    which is then built for real from the config.
    """
    directory = Path(path)
    config = _read_config(directory)
    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except ValueError as exc:
        raise ModelLoadError(f"{str(directory)!r} holds a {config.model_type!r} model, which is not a causal LM: {exc}") from exc
    rotary, apply = rope_parts(skeleton)
    rotary = type(rotary)(config=skeleton.config.get_text_config())
    config_dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    dtype = dtype or (config_dtype if isinstance(config_dtype, torch.dtype) else torch.float32)
    return RopeModel(geometry_of(skeleton), str(directory), rotary, apply, dtype)


def load_model(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a causal LM and its tokenizer from a local directory (never from a hub).

    The weights are read straight onto ``device`` (the whole model on that one device: ``device_map``
    {"": device}), so a 14B checkpoint for a GPU never takes its size in host memory first."""
    directory = Path(path)
    config = _read_config(directory)
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    try:
        model = AutoModelForCausalLM.from_pretrained(
            directory, config=config, local_files_only=True, dtype=dtype or "auto", device_map={"": device}
        )
    except ValueError as exc:
        raise ModelLoadError(
            f"{str(directory)!r} holds a {config.model_type!r} model, which is not a causal LM: {exc}"
        ) from exc
    except OSError as exc:
        raise ModelLoadError(f"cannot load weights from {str(directory)!r}: {exc}") from exc
    return wrap_model(model, load_tokenizer(directory), str(directory))


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer of a local model directory (a pad token set to EOS where it has none)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(Path(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the tokenizer in {str(path)!r}: {exc}") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_shared_tokenizer(sender: LoadedModel, receiver: LoadedModel) -> None:
    """The adapter maps caches token by token, so both sides must tokenize identically."""
    _require_shared_vocab(sender.tokenizer, receiver.tokenizer, sender.path, receiver.path)


def check_shared_tokenizer_at(sender: str | Path, receiver: str | Path) -> None:
    """``check_shared_tokenizer`` from the two directories' tokenizers alone (no weights read): a job's
    refusal before any work."""
    _require_shared_vocab(load_tokenizer(sender), load_tokenizer(receiver), str(sender), str(receiver))


# The dtypes a model (or an adapter) is loaded in, by the name configs and flags use
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Text both tokenizers must cut alike: words, digits, punctuation, whitespace runs, non-ASCII, a chat-like line.
TOKENIZER_PROBE = "The quick brown fox, 3 + 4 = 7; 12.5% ok?\n  naïve café — x_y(z) [a] {b} <c> 'd' \"e\"\tend. recall ann 3 , bob 7 . bob ?"


def _require_shared_vocab(sender, receiver, sender_path: str, receiver_path: str) -> None:
    if sender.get_vocab() != receiver.get_vocab():
        raise IncompatiblePairError(
            f"sender {sender_path!r} and receiver {receiver_path!r} use different tokenizers "
            f"({len(sender)} vs {len(receiver)} tokens); a token-wise cache adapter needs a shared tokenizer"
        )
    # the same vocabulary may still be cut differently (another tokenizer class, normalizer or pre-tokenizer,
    # special tokens added differently): the cache is read token by token, so the ids of a probe must agree
    words = " ".join(sender.convert_ids_to_tokens(i) or "" for i in range(0, len(sender), max(1, len(sender) // 200)))
    for probe in (TOKENIZER_PROBE, words):
        a, b = sender(probe, add_special_tokens=True)["input_ids"], receiver(probe, add_special_tokens=True)["input_ids"]
        if a != b:
            first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            raise IncompatiblePairError(
                f"sender {sender_path!r} ({type(sender).__name__}) and receiver {receiver_path!r} ({type(receiver).__name__}) "
                f"share a vocabulary but tokenize text differently (a probe's ids differ from position {first}: "
                f"{a[first:first + 5]} vs {b[first:first + 5]}); a token-wise cache adapter needs identical tokenization"
            )
