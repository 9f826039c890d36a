"""How receiver-native the transformed cache is, task set by task set (in domain and out of it).

    reconstruction_by_set(sender, receiver, adapter, sets, prompt_format, batch_size)   one ReconRow per task set

For each set: phase I's loss (eq. 5: squared error of K and V over real tokens, averaged over layers and
coordinates) between the adapter's output T_θ(C_S(X)) and the receiver's own cache of the same X, and that
loss relative to the receiver cache's mean square (1.0: no closer than an all-zero cache). Phase II tunes the
cache for the receiver's answers, not for this loss, so the figure shows how far a trained adapter has moved
from the receiver's cache space on each set; comparing in-domain with held-out sets shows whether its mapping
carries over to inputs it never saw.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch

from densecomm_core.adapter import DenseAdapter
from densecomm_core.analysis import AnalysisError
from densecomm_core.baselines.c2c import zero_cache
from densecomm_core.models import LoadedModel
from densecomm_core.relay import PromptFormat
from densecomm_core.training.phase1 import reconstruction_loss, reconstruction_pair


@dataclass(frozen=True)
class ReconRow:
    task_set: str
    examples: int
    tokens: int
    loss: float  # eq. 5, token-weighted over the set
    relative: float  # loss / the same loss of an all-zero prediction (the receiver cache's mean square)

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def reconstruction_by_set(
    sender: LoadedModel, receiver: LoadedModel, adapter: DenseAdapter, sets: Mapping[str, Sequence[str]],
    prompt_format: PromptFormat = PromptFormat(), batch_size: int = 64,
) -> list[ReconRow]:
    """``sets``: task set name -> its contexts X (the sender reads ``prompt_format.sender``, as the relay sends)."""
    if batch_size < 1:
        raise AnalysisError(f"batch_size must be >= 1, got {batch_size}")
    rows = []
    for name, contexts in sets.items():
        if not contexts:
            raise AnalysisError(f"task set {name!r} has no contexts")
        loss = zero = 0.0
        tokens = 0
        for start in range(0, len(contexts), batch_size):
            texts = [prompt_format.sender.format(context=c) for c in contexts[start:start + batch_size]]
            predicted, target = reconstruction_pair(adapter, sender, receiver, texts)
            zeros = zero_cache(target, receiver.geometry, target.keys[0].device, target.keys[0].dtype, target.rope_applied)
            n = int(target.mask.sum())  # eq. 5 averages over a batch's real tokens: weight each batch by its count
            loss += n * float(reconstruction_loss(predicted, target))
            zero += n * float(reconstruction_loss(zeros, target))
            tokens += n
        rows.append(ReconRow(name, len(contexts), tokens, loss / tokens, loss / zero))
    return rows


def recon_table(rows: Sequence[ReconRow], out_of_domain: Sequence[str] = ()) -> str:
    """Markdown: one line per task set, OOD sets marked."""
    lines = ["| task set | examples | tokens | reconstruction loss (eq. 5) | relative to an all-zero cache |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        name = f"{r.task_set} (OOD)" if r.task_set in out_of_domain else r.task_set
        lines.append(f"| {name} | {r.examples} | {r.tokens} | {r.loss:.4f} | {r.relative:.3f} |")
    return "\n".join(lines)
