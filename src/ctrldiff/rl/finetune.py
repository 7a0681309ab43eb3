"""CTRL fine-tuning: direct back-propagation of the KL-regularised reward through the sampling chain
(the paper's Algorithm 2). The loop reads like the paper; it trains only the augmented model's new parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
from tqdm import tqdm

from ..checkpoint import Checkpointer, Trainable, check_finite
from ..classifier import Classifier
from ..config import LR_SCHEDULES, Config
from ..contracts import Cond
from ..control import ControlledDenoiser
from ..io import CtrlDiffError
from ..sampling import sample
from ..target import lookup, meter
from ..tasks.controls import Control
from . import scale
from .objective import ctrl_objective


@dataclass
class RewardTerm:
    """One control in the objective: gamma * log p̂(y | x_0), with an optional independent monitor classifier."""

    control: Control
    classifier: Classifier
    gamma: float
    monitor: Classifier | None = None


def draw_conditions(n: int, num_c: int, controls: dict[str, int], g: torch.Generator) -> Cond:
    """(c, y) drawn per sample: c uniform over the base's conditions, each y uniform over its classes."""
    return Cond(torch.randint(0, num_c, (n,), generator=g),
                {k: torch.randint(0, K, (n,), generator=g) for k, K in controls.items()})


def balanced_conditions(n: int, num_c: int, controls: dict[str, int]) -> Cond:
    """A fixed batch cycling through every joint class of y and every c (for monitoring and evaluation)."""
    y, rest = {}, torch.arange(n)
    for k, K in controls.items():  # mixed radix: every joint class of y, then every c within each
        y[k], rest = rest % K, rest // K
    return Cond(rest % num_c, y)


MIN_ETA = 1e-3


def lr_factor(schedule: str, step: int, total: int) -> float:
    """The learning rate at `step` over its configured value: constant, or a cosine decay to zero over `total`
    steps (the 2-D exactness study's setting, docs/exactness.md). A pure function of the step, so a resumed run
    needs no scheduler state."""
    if schedule not in LR_SCHEDULES:
        raise CtrlDiffError(f"rl.lr_schedule={schedule!r}; choose from {LR_SCHEDULES}")
    return 1.0 if schedule == "constant" else 0.5 * (1 + math.cos(math.pi * step / total))


def set_lr(opt, base_lrs: list[float], schedule: str, step: int, total: int) -> None:
    """Each parameter group's rate at `step`: its configured rate (`base_lrs`) times `lr_factor`."""
    for grp, lr in zip(opt.param_groups, base_lrs):
        grp["lr"] = lr * lr_factor(schedule, step, total)


def start_from(model: ControlledDenoiser, init: ControlledDenoiser) -> None:
    """Copy `init`'s new parameters into `model`; both must be the same augmented model."""
    if init.meta() != model.meta():
        raise CtrlDiffError(f"init model {init.meta()} does not match the configured one {model.meta()}")
    model.load_adapter_state(init.adapter_state())  # a merged init still holds its LoRA factors


def reward_input(backend, x0: torch.Tensor) -> torch.Tensor:
    """What the classifiers see (the backend decides: a clamped image in [-1, 1], or the point itself in 2-D)."""
    return backend.classifier_input(x0)


@torch.no_grad()
def monitor(model, backend, terms: list[RewardTerm], cfg: Config, n: int = 64, show=None) -> dict:
    """Accuracy on a fixed batch by the optimised classifier, the independent monitor and the oracle.
    show(images, cond): also given the batch's decoded samples (e.g. for the experiment tracker's grid)."""
    cond = balanced_conditions(n, backend.num_c, model.controls)
    g = torch.Generator().manual_seed(12345)
    x_T = torch.randn((n, *backend.shape), generator=g)
    x0 = sample(model, backend.schedule, x_T, cond, steps=cfg.sampler.steps, eta=cfg.sampler.eta, generator=g,
                final=model.final(backend)).x0
    x, images = reward_input(backend, x0), backend.decode(x0)
    if show is not None:
        show(images, cond)
    out = {}
    for t in terms:
        y = cond.y[t.control.name]
        out[f"acc_reward/{t.control.name}"] = (t.classifier.predict(x) == y).float().mean().item()
        if t.monitor is not None:
            out[f"acc_monitor/{t.control.name}"] = (t.monitor.predict(x) == y).float().mean().item()
        if t.control.labeller is not None:
            out[f"acc_oracle/{t.control.name}"] = (t.control.label(images) == y).float().mean().item()
    return out


def finetune(backend, terms: list[RewardTerm], cfg: Config, log=None, progress: bool = True, start=None,
             ckpt: Checkpointer | None = None, accelerator=None, init: ControlledDenoiser | None = None,
             log_z: torch.Tensor | None = None, log_images=None):
    """Fine-tune a fresh augmented model by CTRL; returns (model, summary). ckpt: resume from / save to.
    accelerator: an accelerate.Accelerator for multi-GPU, mixed precision and accumulation (`rl/scale.py`).

    start: (cond, generator) -> x_T, the start distribution (default N(0, I)); a start tilted by the value
    function removes the start-distribution bias (METHOD.md §4, docs/exactness.md).
    init: an augmented model (same controls, rank and final step) whose new parameters the fine-tune starts from
    instead of zero, e.g. one fine-tuned on a coarser, cheaper chain (docs/exactness.md, table 4b); it is copied,
    not changed.
    log_z: log Z(c, y) per request (`target.log_z_table`, shape (num_c, K_1, ...)): each step then logs
    `gap` = log Z - J on its batch, J = sum_k gamma_k log p̂_k - path KL: KL(P_theta || P*) >= 0 in nats, how far
    the fine-tune is from the objective's optimum (negative only where the unregularised last step is the model's).
    Requests whose log Z is NaN (cells the bank barely reaches: `log_z_table(min_ess=)`) are left out of it.

    log_images(step, images, cond): the monitoring batch's decoded samples at each monitoring step."""
    rc, sc = cfg.rl, cfg.sampler
    if sc.eta < MIN_ETA:  # a denormal eta (4.7e-277, found by fuzzing) underflows the step noise to exactly 0
        raise CtrlDiffError(f"sampler.eta={sc.eta}: the KL term needs a stochastic sampler (eta >= {MIN_ETA})")
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    controls = {t.control.name: t.control.num_classes for t in terms}
    gammas = {t.control.name: t.gamma for t in terms}
    model = ControlledDenoiser(backend, controls, rc.lora_rank, final_step=rc.final_step)
    if init is not None:
        start_from(model, init)
    groups = [{"params": model.embedding_parameters(), "lr": rc.lr_emb}]
    if rc.lora_rank > 0:
        groups.append({"params": model.lora_parameters(), "lr": rc.lr_lora})
    params, base_lrs = [p for grp in groups for p in grp["params"]], [grp["lr"] for grp in groups]
    opt = torch.optim.AdamW(groups, weight_decay=rc.weight_decay, betas=(0.9, 0.999))
    opt = scale.prepare(accelerator, opt, g, cfg.seed)
    ckpt = ckpt or Checkpointer(None, {}, rc.checkpoint_every)
    first, extra = ckpt.start(rc.steps, {"model": Trainable(model), "opt": opt}, {"g": g})
    stats = extra.get("stats", {})
    bar = tqdm(range(first, rc.steps), desc="ctrl finetune", disable=not progress, dynamic_ncols=True,
               initial=first, total=rc.steps)
    for step in scale.accelerated(bar, accelerator, model):
        # --- roll out the augmented model with gradients; (c, y) fresh per sample
        cond = draw_conditions(rc.batch, backend.num_c, controls, g)
        x_T = torch.randn((rc.batch, *backend.shape), generator=g) if start is None else start(cond, g)
        traj = sample(model, backend.schedule, x_T, cond, steps=sc.steps, eta=sc.eta, reference=backend.denoiser,
                      grad=True, truncate=rc.truncate, checkpoint=rc.checkpoint, generator=g, final=model.final(backend))
        # --- reward: gamma_k log p̂_k(y_k | x_0) from each calibrated classifier; minus the path KL
        x = reward_input(backend, traj.x0)
        log_probs = {t.control.name: t.classifier.log_prob(x, cond.y[t.control.name]) for t in terms}
        loss, stats, j = ctrl_objective(traj, log_probs, gammas, rc.kl)
        if log_z is not None and rc.kl == "sum":  # the convergence meter: log Z - J on this batch
            stats["gap"] = meter(lookup(log_z, cond, controls), j)
        # --- update the new parameters only
        scale.backward(loss, accelerator)
        grad_norm = scale.sync_and_clip(params, rc.clip, accelerator)
        check_finite(step, loss.item(), grad_norm, ckpt)  # before the step: the last checkpoint stays good
        set_lr(opt, base_lrs, rc.lr_schedule, step, rc.steps)
        opt.step()
        opt.zero_grad(set_to_none=True)  # after the step: an accumulation cycle keeps its gradients
        # --- maintenance: monitor with the oracle and an independent classifier
        stats.update(step=step, grad_norm=grad_norm, seconds=ckpt.seconds())
        stats.update({f"lr/{k}": grp["lr"] for k, grp in zip(("emb", "lora"), opt.param_groups)})
        if rc.monitor_every and (step % rc.monitor_every == 0 or step == rc.steps - 1):
            model.eval()
            show = None if log_images is None else partial(log_images, step)
            stats.update(monitor(model, backend, terms, cfg, show=show))
            model.train()
        bar.set_postfix(reward=f"{stats['reward']:.2f}", kl=f"{stats['kl']:.1f}")
        if log is not None:
            log(stats)
        ckpt.step(step + 1, {"stats": stats})
    return model.eval(), {"steps": rc.steps, "seconds": ckpt.seconds(), "last": stats}
