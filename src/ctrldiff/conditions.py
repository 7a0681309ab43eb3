"""What conditions a batch: the requests (c, y) drawn for training, cycled for evaluation, and indexed per request.

A request is a base condition c with one label per control, y = (y_1, ..., y_m) in the order of the controls.
Everything that averages per request (the target's yardstick, evaluation's heat maps) indexes the same table
of shape (num_c, K_1, ..., K_m).
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from .contracts import Cond


def draw_conditions(n: int, num_c: int, controls: dict[str, int], g: torch.Generator) -> Cond:
    """(c, y) drawn per sample: c uniform over the base's conditions, each y uniform over its classes."""
    return Cond(torch.randint(0, num_c, (n,), generator=g),
                {k: torch.randint(0, K, (n,), generator=g) for k, K in controls.items()})


def balanced_conditions(n: int, num_c: int, controls: dict[str, int]) -> Cond:
    """A fixed batch cycling through every joint class of y and every c (for monitoring and evaluation); n a
    multiple of num_c * prod(K) gives every request exactly n / (num_c * prod(K)) rows."""
    y, rest = {}, torch.arange(n)
    for k, K in controls.items():  # mixed radix: every joint class of y, then every c within each
        y[k], rest = rest % K, rest // K
    return Cond(rest % num_c, y)


def requests(num_c: int, ks: dict[str, int]) -> list[tuple[int, tuple[int, ...]]]:
    """Every request (c, joint y), y in the order of `ks`."""
    return [(c, ys) for c in range(num_c) for ys in itertools.product(*[range(k) for k in ks.values()])]


def request_index(cond: Cond, names) -> tuple[Tensor, ...]:
    """The index of each row's request into a (num_c, K_1, ..., K_m) table."""
    return (cond.c, *[cond.y[k] for k in names])
