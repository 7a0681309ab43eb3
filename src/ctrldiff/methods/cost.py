"""Cost counters that count what ran: forward hooks on the networks themselves, whatever wraps them."""

from __future__ import annotations

import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

from torch import Tensor, nn


@dataclass
class Cost:
    """Per-sample-in-batch network passes: a batch of B through the denoiser counts B forward passes; a
    gradient that flows back through that output counts B backward passes."""

    forward: dict[str, int] = field(default_factory=dict)
    backward: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def _add(self, table: dict[str, int], key: str, n: int) -> None:
        table[key] = table.get(key, 0) + n

    def hook(self, key: str):
        def count(module: nn.Module, args, output) -> None:
            output = output if isinstance(output, Tensor) else output[0]  # diffusers: a ModelOutput
            n = output.shape[0]  # SD's text CFG runs 2B rows for B samples: 2 passes per sample
            self._add(self.forward, key, n)
            if output.requires_grad:
                output.register_hook(lambda grad: self._add(self.backward, key, n))
        return count

    @contextmanager
    def watch(self, nets: list[tuple[str, nn.Module]]):
        """Count the passes of `nets` ((kind, module) pairs; a kind may repeat) and the wall time of the block."""
        with ExitStack() as stack:
            for key, net in nets:
                stack.callback(net.register_forward_hook(self.hook(key)).remove)
            t0 = time.perf_counter()
            try:
                yield self
            finally:
                self.seconds += time.perf_counter() - t0

    def per_sample(self, n: int) -> dict:
        """Mean cost of one returned sample: forward / backward passes per network, and seconds."""
        keys = sorted(set(self.forward) | set(self.backward))
        out = {f"forward_{k}": self.forward.get(k, 0) / n for k in keys}
        out.update({f"backward_{k}": self.backward.get(k, 0) / n for k in keys})
        out["seconds"] = self.seconds / n
        return out
