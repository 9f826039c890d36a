"""Post-hoc analyses of a trained pair (paper §3.1, appendix C, §5.3): which sender heads carry the signal, and where caches lie.

    ablation.py   head ablation on a model's attention (zero chosen query heads at o_proj's input), KV-group filters
    cs.py         compressed-sensing head importance: stratified masks, Lasso, KV-group scores, top-K sweep, gates
    pca.py        value vectors of receiver / transformed sender / raw sender caches on the receiver's PCs
    recon.py      the adapter's reconstruction loss against the receiver's own cache, task set by task set
    plots.py      the PNGs (matplotlib, imported inside the functions)
"""

from densecomm_core.errors import DenseCommError


class AnalysisError(DenseCommError, ValueError):
    """An analysis was asked for something its model or its inputs cannot give (names the value)."""

    status = "INVALID_ARGUMENT"
