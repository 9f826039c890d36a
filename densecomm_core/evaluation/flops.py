"""Per-side token counts and FLOPs (paper appendix B.1), on the models measured or projected onto real geometries.

    ModelLayout                     what FLOPs need of one model: non-embedding params, layers, KV heads, head dim
    PairCost                        a sender, a receiver and the dense adapter's expansion between them
    dense_adapter_params(pair)      parameters of T_θ's K and V MLPs for that pair (all receiver layers and groups)
    c2c_fuser_params(pair)          parameters of the C2C-style fuser for that pair
    QWEN3 / qwen3_pair(s, r)        public Qwen3 configs and the pairs a zoo measurement is projected onto
    TokenRow / token_row(...)       mean per-request S_pre, S_dec, R_pre, R_dec, all tokens and FLOPs per side

FLOPs ≈ 2·N_S·(S_pre + S_dec) + 2·N_R·(R_pre + R_dec) + 2·|θ|·S_pre (the adapter maps every transferred
token once), N the non-embedding parameters; attention's O(L_kv) term is left out, as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass

from densecomm_core.models import LoadedModel
from densecomm_core.relay import TokenCounts


@dataclass(frozen=True)
class ModelLayout:
    """One model as FLOPs see it."""

    name: str
    non_embedding_params: int  # N of appendix B.1
    num_layers: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, model: LoadedModel, name: str | None = None) -> ModelLayout:
        """The layout of a loaded model, its parameters counted on the weights themselves."""
        g = model.geometry
        return cls(name or str(model.path), model.non_embedding_params, g.num_layers, g.num_kv_heads, g.head_dim)


@dataclass(frozen=True)
class PairCost:
    """A sender -> receiver pair whose FLOPs a method reports; ``expansion`` sizes the dense adapter's MLPs."""

    sender: ModelLayout
    receiver: ModelLayout
    expansion: int = 16  # the paper's e (AdapterConfig.expansion)
    c2c_hidden: int = 1024  # width of the C2C-style fuser's MLPs (C2C's own on Qwen-scale caches; the zoo's is 128)

    @property
    def name(self) -> str:
        return f"{self.sender.name}->{self.receiver.name}"


def dense_adapter_params(pair: PairCost) -> int:
    """|θ| of the K and V MLPs: per receiver layer and KV group, d_S -> e·d_S -> d_R with biases, twice."""
    d_s, d_r = pair.sender.head_dim, pair.receiver.head_dim
    hidden = pair.expansion * d_s
    one_mlp = d_s * hidden + hidden + hidden * d_r + d_r
    return 2 * one_mlp * pair.receiver.num_layers * pair.receiver.num_kv_heads


def c2c_fuser_params(pair: PairCost) -> int:
    """Parameters of the C2C-style fuser (``baselines.c2c.C2CFuser``): per receiver layer, for K and for V,
    [all sender groups ; all receiver groups] -> hidden, RMSNorm scale, a bias-free FFN hidden -> hidden -> hidden,
    a projection to the receiver's groups and per-group weights (the 2·L_R gate logits are left out: no FLOPs)."""
    s, r, h = pair.sender, pair.receiver, pair.c2c_hidden
    d_in, d_out = s.num_kv_heads * s.head_dim + r.num_kv_heads * r.head_dim, r.num_kv_heads * r.head_dim
    one = d_in * h + h + h + 2 * h * h + h * d_out + d_out + h * r.num_kv_heads + r.num_kv_heads
    return 2 * r.num_layers * one


def dense_adapter_flops_per_token(pair: PairCost) -> int:
    """2·|θ| FLOPs per transferred token (equals ``DenseAdapter.num_flops_per_token`` for a built adapter)."""
    return 2 * dense_adapter_params(pair)


@dataclass(frozen=True)
class Qwen3Config:
    """The numbers of a public Hugging Face Qwen3 ``config.json`` that parameter counts depend on."""

    name: str
    num_layers: int  # num_hidden_layers
    hidden_size: int
    num_heads: int  # num_attention_heads
    num_kv_heads: int  # num_key_value_heads
    head_dim: int
    intermediate_size: int
    vocab_size: int  # embeddings and LM head: left out of N

    def non_embedding_params(self) -> int:
        """Per layer: q, k, v, o projections (no bias), q/k RMSNorm (head_dim each), the SwiGLU MLP (gate,
        up, down) and two RMSNorms; plus the final RMSNorm."""
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        attention = h * q + 2 * h * kv + q * h + 2 * self.head_dim
        mlp = 3 * h * self.intermediate_size
        return self.num_layers * (attention + mlp + 2 * h) + h

    def layout(self) -> ModelLayout:
        return ModelLayout(self.name, self.non_embedding_params(), self.num_layers, self.num_kv_heads, self.head_dim)


# The public Hugging Face configs of Qwen/Qwen3-4B, Qwen/Qwen3-8B and Qwen/Qwen3-14B (config.json:
# num_hidden_layers, hidden_size, num_attention_heads, num_key_value_heads, head_dim, intermediate_size,
# vocab_size), the paper's model set.
QWEN3: dict[str, Qwen3Config] = {
    c.name: c
    for c in (
        Qwen3Config("qwen3-4b", 36, 2560, 32, 8, 128, 9728, 151936),
        Qwen3Config("qwen3-8b", 36, 4096, 32, 8, 128, 12288, 151936),
        Qwen3Config("qwen3-14b", 40, 5120, 40, 8, 128, 17408, 151936),
    )
}
# Sender -> receiver pairs of the paper that a zoo measurement is projected onto (big -> small and back).
PROJECTIONS: tuple[tuple[str, str], ...] = (("qwen3-14b", "qwen3-4b"), ("qwen3-8b", "qwen3-4b"), ("qwen3-4b", "qwen3-8b"))


def qwen3_pair(sender: str, receiver: str, expansion: int = 16) -> PairCost:
    """The cost of a Qwen3 pair by name (keys of ``QWEN3``); ValueError names the known ones."""
    for name in (sender, receiver):
        if name not in QWEN3:
            raise ValueError(f"unknown Qwen3 geometry {name!r}; expected one of {sorted(QWEN3)}")
    return PairCost(QWEN3[sender].layout(), QWEN3[receiver].layout(), expansion)


@dataclass
class TokenRow:
    """Mean per-request token counts of one (method, mode) cell and its FLOPs per side on one pair."""

    requests: int
    sender_prefill: float
    sender_decode: float
    receiver_prefill: float
    receiver_decode: float
    flops: dict[str, float]  # sender, adapter, receiver, total: mean FLOPs per request

    @property
    def all_tokens(self) -> float:
        """Every token that touches either model (the paper's "All tok")."""
        return self.sender_prefill + self.sender_decode + self.receiver_prefill + self.receiver_decode


def token_row(counts: TokenCounts, requests: int, flops: dict[str, int]) -> TokenRow:
    """Per-request means of summed ``counts`` and of the ``flops`` a method computed from them."""
    if requests < 1:
        raise ValueError(f"requests must be >= 1, got {requests}")
    mean = lambda x: x / requests
    return TokenRow(requests, mean(counts.sender_prefill), mean(counts.sender_decode), mean(counts.receiver_prefill),
                    mean(counts.receiver_decode), {side: mean(value) for side, value in flops.items()})


def add_counts(total: TokenCounts, more: TokenCounts) -> TokenCounts:
    """``total`` + ``more``, side by side (a new object)."""
    return TokenCounts(total.sender_prefill + more.sender_prefill, total.sender_decode + more.sender_decode,
                       total.receiver_prefill + more.receiver_prefill, total.receiver_decode + more.receiver_decode)
