"""The `densecomm bench` commands: figures measured side by side in one run, each against its baseline."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch's intra-op threads set to ``threads`` for the block, restored after.

    torch keeps this count per thread: a worker thread that first runs torch inside the block keeps 1 after
    it (the benches' own pools are used only inside it), and one that ran torch before keeps its count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        yield
    finally:
        torch.set_num_threads(previous)
