"""What each service loads per route, and the request checks every hop shares.

    load_sender_routes / load_adapter_routes / load_receiver_routes   route name -> loaded objects (with the
                                                                      route's KV bases, passed to every hop)
    validate_request(request, config)                                 RequestError naming the field
    codec_for(spec, config)                                           the request's codec (CodecError if bad)
    input_ids(request, tokenizer, fmt)                                the sender's token ids for X
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from densecomm_core.adapter import DenseAdapter
from densecomm_core.codec.base import Codec, CodecError, get_codec
from densecomm_core.codec.transform import KVBases
from densecomm_core.errors import IncompatiblePairError
from densecomm_core.models import DTYPES, LoadedModel, RopeModel, check_shared_tokenizer_at, load_model, load_rope_model
from densecomm_core.relay import PromptFormat
from services.config import ConfigError, RouteConfig, ServeConfig
from services.errors import RequestError, RouteNotFound

MAX_NAME_CHARS = 128  # a route or codec name in a request (longer: INVALID_ARGUMENT, never echoed whole)
MAX_PARAMS_JSON_BYTES = 64 << 10  # a codec's params_json


def shown(value: str, limit: int = 80) -> str:
    """A client's string as an error message quotes it: whole when short, else its start and its length
    (a status's details travel in a header that gRPC caps at 16 KiB)."""
    return repr(value) if len(value) <= limit else f"{value[:limit]!r}... ({len(value)} characters)"


@dataclass
class ModelRoute:
    """A sender's or receiver's route: the model and the KV bases its hops code with."""

    model: LoadedModel
    bases: KVBases


@dataclass
class AdapterRoute:
    adapter: DenseAdapter
    sender: RopeModel
    receiver: RopeModel
    flops_per_token: int
    bases: KVBases = field(default_factory=KVBases)  # both hops' pca bases


def route_bases(route: RouteConfig) -> KVBases:
    """The ``pca`` codec's KV bases found beside the route's models and adapter (``kv_basis.safetensors``):
    every hop's encoder and decoder agree on them by fingerprint. Each service holds its own routes'
    bases and passes them to its hops; nothing is registered process-wide."""
    return KVBases.load(*(path for path in (route.sender, route.adapter, route.receiver) if path))


def load_sender_routes(config: ServeConfig) -> dict[str, ModelRoute]:
    return {r.name: ModelRoute(load_model(r.sender, DTYPES[r.dtype], r.device), route_bases(r)) for r in config.all_routes()}


def load_receiver_routes(config: ServeConfig) -> dict[str, ModelRoute]:
    return {r.name: ModelRoute(load_model(r.receiver, DTYPES[r.dtype], r.device), route_bases(r)) for r in config.all_routes()}


def load_adapter_route(route: RouteConfig) -> AdapterRoute:
    """The adapter's side of a route: both models' geometry and RoPE (no weights), the adapter, and the check
    that both ends cut text into the same tokens (the cache is mapped token by token)."""
    try:
        check_shared_tokenizer_at(route.sender, route.receiver)
    except IncompatiblePairError as exc:
        raise ConfigError(f"route {route.name!r}: {exc}") from exc
    dtype = DTYPES[route.dtype]
    sender, receiver = load_rope_model(route.sender, dtype), load_rope_model(route.receiver, dtype)
    adapter = DenseAdapter.load(route.adapter, sender.geometry, receiver.geometry).to(route.device, DTYPES[route.adapter_dtype])
    adapter.eval()
    return AdapterRoute(adapter, sender, receiver, adapter.num_flops_per_token(), route_bases(route))


def load_adapter_routes(config: ServeConfig) -> dict[str, AdapterRoute]:
    return {r.name: load_adapter_route(r) for r in config.all_routes()}


def route_name(request, config: ServeConfig) -> str:
    return request.route or config.default_route


def pick(routes: dict, request, config: ServeConfig):
    name = route_name(request, config)
    if name not in routes:
        raise RouteNotFound(f"unknown route {shown(name)}; this service hosts {sorted(routes)}")
    return name, routes[name]


def codec_for(spec, config: ServeConfig, field: str = "codec") -> Codec:
    """The codec a ``CodecSpec`` asks for; errors name ``field`` (the request's ``codec`` or ``receiver_codec``)."""
    name = spec.name or config.default_codec
    if len(name) > MAX_NAME_CHARS:
        raise RequestError(f"{field}.name must be at most {MAX_NAME_CHARS} characters, got {shown(name)}")
    if len(spec.params_json) > MAX_PARAMS_JSON_BYTES:
        raise RequestError(f"{field}.params_json must be at most {MAX_PARAMS_JSON_BYTES} bytes, got {len(spec.params_json)}")
    try:
        params = json.loads(spec.params_json) if spec.params_json else {}
    except json.JSONDecodeError as exc:
        raise RequestError(f"{field}.params_json is not valid JSON: {exc}") from exc
    if not isinstance(params, dict):
        raise RequestError(f"{field}.params_json must be a JSON object, got {type(params).__name__}")
    if name == config.default_codec:  # the deployment's defaults, the request's own params over them
        params = config.default_codec_params | params
    return get_codec(name, **params)


def receiver_codec_for(request, config: ServeConfig) -> Codec:
    """The adapter -> receiver hop's codec: ``receiver_codec`` when set, else ``codec``'s forwarding codec."""
    if not request.HasField("receiver_codec"):
        return codec_for(request.codec, config).for_forwarding()
    codec = codec_for(request.receiver_codec, config, "receiver_codec")
    if codec.for_forwarding() is not codec:
        raise CodecError(f"{codec.name!r} cannot be used on the adapter -> receiver hop (it selects tokens once, "
                         "at the sender); put it in codec instead")
    return codec


def validate_request(request, config: ServeConfig, pb) -> None:
    """Field checks shared by the ingress and the sender (pb: the relay_pb2 module)."""
    which = request.WhichOneof("input")
    if which is None or (which == "text" and not request.text.strip()) or (
            which == "messages" and not any(m.content.strip() for m in request.messages.messages)):
        raise RequestError("input is empty: set text, or messages with some content, to the sender's input")
    if request.mode not in (pb.CONTEXT_MODE_AWARE, pb.CONTEXT_MODE_UNAWARE):
        raise RequestError(f"mode must be CONTEXT_MODE_AWARE or CONTEXT_MODE_UNAWARE, got {request.mode}")
    if request.receiver_prompt and request.mode == pb.CONTEXT_MODE_UNAWARE:
        raise RequestError("receiver_prompt is read only in CONTEXT_MODE_AWARE: the context-unaware receiver reads the "
                           "cache and its route's prompt, so leave receiver_prompt empty (or send the request aware)")
    if len(request.route) > MAX_NAME_CHARS:
        raise RequestError(f"route must be at most {MAX_NAME_CHARS} characters, got {shown(request.route)}")
    if request.on_cache_failure not in (pb.CACHE_FAILURE_POLICY_UNSPECIFIED, pb.CACHE_FAILURE_POLICY_ERROR, pb.CACHE_FAILURE_POLICY_TEXT):
        raise RequestError(f"on_cache_failure must be CACHE_FAILURE_POLICY_UNSPECIFIED, _ERROR or _TEXT, got {request.on_cache_failure}")
    g = request.generation
    if g.max_new_tokens > config.max_new_tokens_limit:
        raise RequestError(f"generation.max_new_tokens must be <= {config.max_new_tokens_limit}, got {g.max_new_tokens}")
    if not (0 <= g.temperature <= 10) or g.temperature != g.temperature:
        raise RequestError(f"generation.temperature must be in [0, 10], got {g.temperature}")
    if not (0 <= g.top_p <= 1) or g.top_p != g.top_p:
        raise RequestError(f"generation.top_p must be in [0, 1] (0 = 1), got {g.top_p}")
    for i, message in enumerate(request.messages.messages):
        if message.role not in ("system", "user", "assistant"):
            raise RequestError(f"messages[{i}].role must be system, user or assistant, got {shown(message.role)}")
    try:
        codec_for(request.codec, config)
    except CodecError as exc:
        raise RequestError(f"codec: {exc}") from exc
    try:
        receiver_codec_for(request, config)
    except CodecError as exc:
        raise RequestError(f"receiver_codec: {exc}") from exc


def input_ids(request, tokenizer, fmt: PromptFormat) -> list[int]:
    """X as the sender's token ids: plain text through the route's format (the tokenizer's special tokens
    added), or chat messages through the chat template, which writes its own special tokens (tokenizing the
    rendered text with them added again would double a template's BOS, as Llama's and Gemma's write one)."""
    if request.WhichOneof("input") == "messages" and getattr(tokenizer, "chat_template", None):
        messages = [{"role": m.role, "content": m.content} for m in request.messages.messages]
        return list(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=False,
                                                  return_dict=True)["input_ids"])
    return tokenizer(fmt.sender.format(context=context_text(request)), add_special_tokens=True)["input_ids"]


def context_text(request) -> str:
    if request.WhichOneof("input") == "messages":
        return " ".join(m.content for m in request.messages.messages)
    return request.text
