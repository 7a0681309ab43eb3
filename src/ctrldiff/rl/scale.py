"""Fine-tuning at scale through accelerate (docs/sd.md): multi-GPU, mixed precision, gradient accumulation.

`finetune(..., accelerator=None)` calls these; without an accelerator each is the plain single-process step.
The model is not wrapped in DistributedDataParallel: DDP's reducer expects one forward per backward, and CTRL
calls the model once per step of the chain (50 times, some with checkpointing, some detached) before one
backward. The trainable parameters (LoRA + embeddings) are small, so averaging their gradients over the
processes explicitly (`accelerator.reduce`) costs little and is exact.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn

from ..checkpoint import grad_norm
from ..io import CtrlDiffError


def prepare(accelerator, opt: torch.optim.Optimizer, g: torch.Generator, seed: int):
    """The optimiser accelerate steps (skipped inside an accumulation cycle; fp16 loss scaling), with each
    process drawing its own (c, y, noise) from seed + its index. The model was built before this from the same
    global seed in every process, so all processes start from the same parameters."""
    if accelerator is None:
        return opt
    for group in opt.param_groups:  # trained parameters stay fp32 whatever the frozen base's dtype
        for p in group["params"]:
            p.data = p.data.float()
    g.manual_seed(seed + accelerator.process_index)
    return accelerator.prepare_optimizer(opt)


def accelerated(steps: Iterable[int], accelerator, model: nn.Module) -> Iterator[int]:
    """Yield each step inside accelerate's `accumulate` (counts the micro-steps of a cycle) and `autocast`
    (mixed precision) contexts; the loop body runs while the generator is suspended inside them."""
    for step in steps:
        if accelerator is None:
            yield step
            continue
        with accelerator.accumulate(model), accelerator.autocast():
            yield step


def backward(loss: Tensor, accelerator) -> None:
    """loss.backward(), divided by the accumulation count and loss-scaled for fp16 when accelerated."""
    if accelerator is None:
        loss.backward()
    else:
        accelerator.backward(loss)


def sync_and_clip(params: list[nn.Parameter], clip: float, accelerator) -> float:
    """Average the gradients over processes and clip their global norm (at the end of an accumulation cycle);
    returns the norm before clipping. Inside a cycle the gradients are left alone and their norm returned."""
    if accelerator is None:
        return torch.nn.utils.clip_grad_norm_(params, clip).item()
    if not accelerator.sync_gradients:
        return grad_norm(params)
    if accelerator.num_processes > 1:
        for p in params:
            if p.grad is not None:
                p.grad.copy_(accelerator.reduce(p.grad, reduction="mean"))
    return float(accelerator.clip_grad_norm_(params, clip))


def make_accelerator(mixed_precision: str = "no", accumulate: int = 1, cpu: bool = False):
    """The Accelerator of a fine-tune (settings from `sd.mixed_precision`, `sd.accumulate`)."""
    if mixed_precision not in ("no", "fp16", "bf16"):
        raise CtrlDiffError(f"sd.mixed_precision={mixed_precision!r}; choose from ['no', 'fp16', 'bf16']")
    if type(accumulate) is not int or accumulate < 1:
        raise CtrlDiffError(f"sd.accumulate={accumulate!r}; choose an int >= 1")
    from accelerate import Accelerator

    return Accelerator(mixed_precision=mixed_precision, gradient_accumulation_steps=accumulate, cpu=cpu)
