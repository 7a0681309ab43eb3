"""CTRL fine-tuning: the KL-regularised reward maximised by direct back-propagation through the sampling chain
(the paper's Algorithm 2) or by Adjoint Matching (`rl/adjoint.py`). The loop reads like the paper; it trains only
the augmented model's new parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
from tqdm import tqdm

from ..checkpoint import Checkpointer, Trainable, check_finite
from ..classifier import Classifier
from ..conditions import balanced_conditions, draw_conditions, request_index
from ..config import LR_SCHEDULES, Config
from ..control import ControlledDenoiser
from ..io import CtrlDiffError
from ..sampling import sample
from ..target import LogZ, meter
from ..tasks.controls import Control
from ..yardstick import PathLogZ, all_request_meter
from . import adjoint, scale
from .objective import ctrl_objective


@dataclass
class RewardTerm:
    """One control in the objective: gamma * log p̂(y | x_0), with an optional independent monitor classifier."""

    control: Control
    classifier: Classifier
    gamma: float
    monitor: Classifier | None = None


MIN_ETA = 1e-3


def lr_factor(schedule: str, step: int, total: int, warmup: int = 0) -> float:
    """The learning rate at `step` over its configured value: constant, or a cosine decay to zero over `total`
    steps (the 2-D exactness study's setting, docs/exactness.md), times a linear ramp over the first `warmup`
    steps. A pure function of the step, so a resumed run needs no scheduler state."""
    if schedule not in LR_SCHEDULES:
        raise CtrlDiffError(f"rl.lr_schedule={schedule!r}; choose from {LR_SCHEDULES}")
    ramp = min(1.0, (step + 1) / warmup) if warmup else 1.0
    return ramp * (1.0 if schedule == "constant" else 0.5 * (1 + math.cos(math.pi * step / total)))


def set_lr(opt, base_lrs: list[float], schedule: str, step: int, total: int, warmup: int = 0) -> None:
    """Each parameter group's rate at `step`: its configured rate (`base_lrs`) times `lr_factor`."""
    for grp, lr in zip(opt.param_groups, base_lrs):
        grp["lr"] = lr * lr_factor(schedule, step, total, warmup)


def start_from(model: ControlledDenoiser, init: ControlledDenoiser) -> None:
    """Copy `init`'s new parameters into `model`; both must be the same augmented model."""
    if init.meta() != model.meta():
        raise CtrlDiffError(f"init model {init.meta()} does not match the configured one {model.meta()}")
    model.load_adapter_state(init.adapter_state())  # a merged init still holds its LoRA factors


@torch.no_grad()
def monitor(model, backend, terms: list[RewardTerm], cfg: Config, n: int = 64, show=None) -> dict:
    """Accuracy on a fixed batch by the optimised classifier, the independent monitor and the oracle.
    show(images, cond): also given the batch's decoded samples (e.g. for the experiment tracker's grid)."""
    cond = balanced_conditions(n, backend.num_c, model.controls)
    g = torch.Generator().manual_seed(12345)
    x_T = torch.randn((n, *backend.shape), generator=g)
    x0 = sample(model, backend.schedule, x_T, cond, steps=cfg.sampler.steps, eta=cfg.sampler.eta, generator=g,
                final=model.final(backend)).x0
    x, images = backend.classifier_input(x0), backend.decode(x0)
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
             log_z: LogZ | None = None, log_images=None):
    """Fine-tune a fresh augmented model by CTRL; returns (model, summary). ckpt: resume from / save to.
    accelerator: an accelerate.Accelerator for multi-GPU, mixed precision and accumulation (`rl/scale.py`).

    The estimator (`rl.estimator`): "backprop" differentiates the objective through the whole sampling chain (the
    paper's Algorithm 2); "adjoint" regresses the control onto the lean adjoint (Adjoint Matching, `rl/adjoint.py`):
    the same objective and optimum, no graph through the chain.
    start: (cond, generator) -> x_T, the start distribution (default N(0, I)); a start tilted by the value
    function removes the start-distribution bias (METHOD.md §4, docs/exactness.md).
    init: an augmented model (same controls, adapter and final step) whose new parameters the fine-tune starts
    from instead of zero, e.g. one fine-tuned on a coarser, cheaper chain (docs/exactness.md, table 4b); it is
    copied, not changed.
    log_z: log Z(c, y) per request from the bank (`target.bank_log_z`): each step then logs `gap` = log Z - J over
    its rows whose request the bank trusts, J = sum_k gamma_k log p̂_k - path KL: KL(P_theta || P*) >= 0 in nats,
    how far the fine-tune is from the objective's optimum; and `gap_all` over every row, log Z per request the
    larger of the bank's and the running path weights' (`yardstick.PathLogZ`). Needs the base to take the last step
    (with "model" the path ratio is undefined) and the plain start (a tilted one would add KL(start || N(0, I))).

    log_images(step, images, cond): the monitoring batch's decoded samples at each monitoring step."""
    rc, sc = cfg.rl, cfg.sampler
    if sc.eta < MIN_ETA:  # a denormal eta (4.7e-277, found by fuzzing) underflows the step noise to exactly 0
        raise CtrlDiffError(f"sampler.eta={sc.eta}: the KL term needs a stochastic sampler (eta >= {MIN_ETA})")
    if rc.estimator == "adjoint" and (rc.final_step != "base" or rc.kl != "sum" or accelerator is not None):
        raise CtrlDiffError("rl.estimator='adjoint' regresses the control of the stochastic steps: it needs "
                            "rl.final_step='base', rl.kl='sum' and no accelerator (use 'backprop' otherwise)")
    meter_on = log_z is not None and rc.kl == "sum" and rc.final_step == "base"
    if meter_on and start is not None:
        raise CtrlDiffError("a tilted start adds KL(start || N(0, I)) to the path KL, which the meter leaves out; "
                            "pass start or log_z, not both")
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    controls = {t.control.name: t.control.num_classes for t in terms}
    gammas = {t.control.name: t.gamma for t in terms}
    model = ControlledDenoiser(backend, controls, rc.lora_rank, final_step=rc.final_step, adapter=rc.adapter)
    if init is not None:
        start_from(model, init)
    groups = [{"params": model.embedding_parameters(), "lr": rc.lr_emb}]
    if model.lora_parameters():
        groups.append({"params": model.lora_parameters(), "lr": rc.lr_lora})
    params, base_lrs = [p for grp in groups for p in grp["params"]], [grp["lr"] for grp in groups]
    opt = torch.optim.AdamW(groups, weight_decay=rc.weight_decay, betas=(0.9, 0.999))
    opt = scale.prepare(accelerator, opt, g, cfg.seed)
    paths = PathLogZ(log_z.table.shape) if meter_on else None
    ckpt = ckpt or Checkpointer(None, {}, rc.checkpoint_every)
    state = {"model": Trainable(model), "opt": opt} | ({"paths": paths} if paths is not None else {})
    first, extra = ckpt.start(rc.steps, state, {"g": g})
    stats = extra.get("stats", {})
    bar = tqdm(range(first, rc.steps), desc="ctrl finetune", disable=not progress, dynamic_ncols=True,
               initial=first, total=rc.steps)

    def reward(x0: torch.Tensor, cond) -> torch.Tensor:  # sum_k gamma_k log p̂_k(y_k | x_0)
        x = backend.classifier_input(x0)
        return sum(t.gamma * t.classifier.log_prob(x, cond.y[t.control.name]) for t in terms)

    for step in scale.accelerated(bar, accelerator, model):
        # --- roll out the augmented model; (c, y) fresh per sample
        cond = draw_conditions(rc.batch, backend.num_c, controls, g)
        x_T = torch.randn((rc.batch, *backend.shape), generator=g) if start is None else start(cond, g)
        if rc.estimator == "backprop":  # the loss is minus the objective, differentiated through the chain
            traj = sample(model, backend.schedule, x_T, cond, steps=sc.steps, eta=sc.eta, reference=backend.denoiser,
                          grad=True, truncate=rc.truncate, checkpoint=rc.checkpoint, generator=g,
                          final=model.final(backend))
            x = backend.classifier_input(traj.x0)
            log_probs = {t.control.name: t.classifier.log_prob(x, cond.y[t.control.name]) for t in terms}
            loss, stats, j = ctrl_objective(traj, log_probs, gammas, rc.kl)
            losses = [lambda loss=loss: loss]
        else:  # Adjoint Matching: a rollout without a graph, the lean adjoint, a regression per update
            traj, adj = adjoint.rollout(model, backend, x_T, cond, sc.steps, sc.eta, g, partial(reward, cond=cond))
            stochastic = sum(bool((s > 0).all()) for s in traj.stds)
            losses = [partial(adjoint.matching_loss, model, backend, traj, cond, adj, group, stochastic / len(group))
                      for group in adjoint.regressed_steps(traj, rc.adjoint_steps, g, rc.adjoint_updates)]
            with torch.no_grad():
                r, kl = reward(traj.x0, cond), traj.path_kl()
            j = r - kl
            stats = {"reward": r.mean().item(), "kl": kl.mean().item()}
        if meter_on:  # the convergence meter: log Z - J on this batch, trusted requests and every request
            with torch.no_grad():
                idx = request_index(cond, controls)
                paths.add(idx, j + traj.path_kl() + traj.log_ratio())  # log w = reward + log dP_pre/dP_theta
            stats["gap"] = meter(log_z, cond, controls, j)
            stats["gap_all"] = all_request_meter(log_z, paths, cond, controls, j)
        # --- update the new parameters only (Adjoint Matching: once per group of regressed steps)
        set_lr(opt, base_lrs, rc.lr_schedule, step, rc.steps, rc.warmup)
        for loss_of in losses:
            loss = loss_of()
            scale.backward(loss, accelerator)
            grad_norm = scale.sync_and_clip(params, rc.clip, accelerator)
            check_finite(step, loss.item(), grad_norm, ckpt)  # before the step: the last checkpoint stays good
            opt.step()
            opt.zero_grad(set_to_none=True)  # after the step: an accumulation cycle keeps its gradients
        stats.setdefault("loss", loss.item())
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
