"""The CFG baseline's training (METHOD.md §6): the same augmented model as CTRL (zero-initialised y-embeddings
plus LoRA on the frozen base), fitted by denoising score matching on labelled triplets (x, c, y), with each
y dropped to its null label at rate p_uncond so that `y_guidance` can extrapolate at sampling time."""

from __future__ import annotations

import torch
from torch import Tensor
from tqdm import tqdm

from ..checkpoint import Checkpointer, Trainable, check_finite, grad_norm
from ..config import TripletsConfig
from ..contracts import Cond
from ..control import ControlledDenoiser
from ..io import CtrlDiffError
from ..pretrain import drop_labels, dsm_loss


def fit_cfg(backend, x: Tensor, c: Tensor, y: dict[str, Tensor], num_classes: dict[str, int], cfg: TripletsConfig,
            seed: int = 0, log=None, progress: bool = True,
            ckpt: Checkpointer | None = None) -> tuple[ControlledDenoiser, dict]:
    """Fine-tune a fresh augmented model on triplets; `cfg.n` (if set) keeps only the first n (a random subset
    fixed by `seed`), for the sample-efficiency comparison with CTRL's pairs."""
    if set(y) != set(num_classes):
        raise CtrlDiffError(f"labels given for {sorted(y)}, controls are {sorted(num_classes)}")
    if cfg.n is not None and not 1 <= cfg.n <= len(x):
        raise CtrlDiffError(f"triplets.n={cfg.n}: choose 1..{len(x)} (the triplets available) or null for all")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    keep = torch.randperm(len(x), generator=g)[: cfg.n or len(x)]
    x, c, y = x[keep], c[keep], {k: v[keep] for k, v in y.items()}
    model = ControlledDenoiser(backend, num_classes, cfg.lora_rank)
    groups = [{"params": model.embedding_parameters(), "lr": cfg.lr_emb}]
    if cfg.lora_rank > 0:
        groups.append({"params": model.lora_parameters(), "lr": cfg.lr_lora})
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    ckpt = ckpt or Checkpointer(None, {}, cfg.checkpoint_every)
    first, extra = ckpt.start(cfg.steps, {"model": Trainable(model), "opt": opt}, {"g": g})
    loss = extra.get("loss", torch.zeros(()))
    model.train()
    for step in tqdm(range(first, cfg.steps), desc="cfg on triplets", disable=not progress, dynamic_ncols=True,
                     initial=first, total=cfg.steps):
        idx = torch.randint(0, len(x), (cfg.batch,), generator=g)
        ys = {k: drop_labels(v[idx], num_classes[k], cfg.p_uncond, g) for k, v in y.items()}
        loss = dsm_loss(model, backend.schedule, x[idx], Cond(c[idx], ys), g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        check_finite(step, loss.item(), grad_norm(model.parameters()), ckpt)
        opt.step()
        if log is not None and (step % 50 == 0 or step == cfg.steps - 1):
            log({"step": step, "loss": loss.item(), "seconds": ckpt.seconds()})
        ckpt.step(step + 1, {"loss": loss.detach()})
    return model.eval(), {"triplets": len(x), "steps": cfg.steps, "seconds": ckpt.seconds(),
                          "final_loss": loss.item()}
