"""What the checkpointing tells a layer part it runs: :class:`PartContext`, passed to every part as
``fn(x, context)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class PartContext:
    """``recomputing``: the part runs as the last one of a recomputed unit, for its backward: its output's
    value is then never read (only its autograd graph is), so the part may return placeholders for it.
    ``derivations``: where the part's saved activations go to the host, the record of :meth:`derived`
    (id(t) -> (t, source, recompute)); else None."""
    recomputing: bool = False
    derivations: dict | None = None

    def derived(self, t: torch.Tensor, source: torch.Tensor,
                recompute: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Declares ``t == recompute(source)``, bit for bit (a deterministic function of one tensor, such as a
        norm); returns t. Where the offload mode copies a part's saved activations to the host and both t and
        source are among them, t is not copied but recomputed from source in the backward (the bus carries
        less); elsewhere this does nothing."""
        if self.derivations is not None:
            self.derivations[id(t)] = (t, source, recompute)
        return t

    def residual(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """x + out, a part's residual sum; when recomputing, a placeholder of its shape whose backward passes the
        gradient to both (the sum is never read: no add runs and no memory is taken)."""
        return _GraphOnlySum.apply(x, out) if self.recomputing else x + out


class _GraphOnlySum(torch.autograd.Function):
    """x + y for the autograd graph alone: the output is a zero broadcast to the shape, the backward dy, dy."""

    @staticmethod
    def forward(ctx, x, y):
        return x.new_zeros(()).expand(torch.broadcast_shapes(x.shape, y.shape))

    @staticmethod
    def backward(ctx, dy):
        return dy, dy


PLAIN = PartContext()  # a part's forward, or a recomputed unit's parts before its last
RECOMPUTING = PartContext(recomputing=True)


def chain(fns, x: torch.Tensor, context: PartContext = PLAIN) -> torch.Tensor:
    """fn_n(... fn_1(x)), each part given ``context``."""
    for fn in fns:
        x = fn(x, context)
    return x
