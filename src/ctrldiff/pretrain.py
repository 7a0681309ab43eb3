"""Pre-training the embedded base model p_pre(x | c) by denoising score matching (DDPM's simple loss)."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F
from tqdm import tqdm

from .checkpoint import Checkpointer, check_finite, grad_norm
from .config import Config
from .contracts import Cond, Denoiser
from .models import SmallUNet
from .schedule import Schedule, add_noise
from .tasks.mnist import NUM_DIGITS, load_digits


def dsm_loss(denoiser: Denoiser, schedule: Schedule, x0: Tensor, cond: Cond, generator: torch.Generator) -> Tensor:
    """E_t,eps ||eps - eps_theta(x_t, t, cond)||^2 (Ho et al. 2020, eq. 14), t uniform over the schedule."""
    t = torch.randint(0, schedule.num_train_timesteps, (x0.shape[0],), generator=generator)
    eps = torch.randn(x0.shape, generator=generator)
    return F.mse_loss(denoiser(add_noise(schedule, x0, eps, t), t, cond), eps)


def drop_labels(labels: Tensor, null: int, p: float, generator: torch.Generator) -> Tensor:
    """Replace each label by the null value with probability p (classifier-free guidance training)."""
    drop = torch.rand(labels.shape, generator=generator) < p
    return torch.where(drop, torch.full_like(labels, null), labels)


def pretrain(cfg: Config, log=None, ckpt: Checkpointer | None = None) -> tuple[SmallUNet, dict]:
    """Train the class-conditional base; returns the EMA network and a summary. ckpt: resume from / save to."""
    pc = cfg.pretrain
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    data = load_digits("train", cfg.data.resolution, cfg.data.heldout, cfg.data.split_seed)
    schedule = Schedule.linear()
    net = SmallUNet(channels=tuple(pc.channels), num_classes=NUM_DIGITS)
    ema = torch.optim.swa_utils.AveragedModel(net, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(pc.ema))
    opt = torch.optim.AdamW(net.parameters(), lr=pc.lr, weight_decay=0.0)
    warm = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / pc.warmup))
    ckpt = ckpt or Checkpointer(None, {}, pc.checkpoint_every)
    start, extra = ckpt.start(pc.steps, {"net": net, "ema": ema, "opt": opt, "warm": warm}, {"g": g})
    loss = extra.get("loss", torch.full((), math.nan))
    bar = tqdm(range(start, pc.steps), desc="pretrain", dynamic_ncols=True, initial=start, total=pc.steps)
    for step in bar:
        # --- one batch of denoising score matching, digit dropped to null at p_uncond
        idx = torch.randint(0, len(data), (pc.batch,), generator=g)
        c = drop_labels(data.c[idx], NUM_DIGITS, pc.p_uncond, g)
        loss = dsm_loss(lambda x, t, cond: net(x, t, cond.c), schedule, data.x[idx], Cond(c), g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        check_finite(step, loss.item(), grad_norm(net.parameters()), ckpt)
        opt.step()
        warm.step()
        ema.update_parameters(net)
        # --- maintenance
        if step % 50 == 0 or step == pc.steps - 1:
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if log is not None:
                log({"step": step, "loss": loss.item(), "seconds": ckpt.seconds()})
        ckpt.step(step + 1, {"loss": loss.detach()})
    return ema.module, {"steps": pc.steps, "seconds": ckpt.seconds(), "final_loss": loss.item()}
