"""The two contracts every part of ctrldiff shares: what conditions a batch, and what a denoiser is."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from torch import Tensor


@dataclass
class Cond:
    """What conditions one batch.

    c: the pre-trained model's own condition (digit ids here; for SD, indices into its prompt list), or None.
    y: the new controls by name, integer labels; the value K (= that control's number of classes) is null.
    """

    c: Tensor | None = None
    y: dict[str, Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        for v in [self.c, *self.y.values()]:
            if v is not None:
                return v.shape[0]
        raise ValueError("an empty Cond has no batch size")

    def index(self, idx: Tensor) -> Cond:
        """The sub-batch (or re-ordered batch) at `idx`."""
        return Cond(None if self.c is None else self.c[idx], {k: v[idx] for k, v in self.y.items()})

    def with_y(self, y: dict[str, Tensor]) -> Cond:
        return Cond(self.c, y)


class Denoiser(Protocol):
    """Predicts eps from a noisy x_t at integer timesteps t (shape (B,)) under a condition."""

    def __call__(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor: ...
