"""Every way ctrldiff samples p(x | c, y), behind one entry point: `build_method(name, backend, knobs, ...)`.

base (the pre-trained model), ctrl (the fine-tuned augmented model), cfg (the same model trained on triplets),
the inference-time baselines dps, classifier, mpgd, smc, svdd, best_of_n (METHOD.md §6), and ctrl_smc: SMC
whose proposal is CTRL's chain, exact as its particles grow and cheap when CTRL is near its target. Each is a
`Method` whose `draw(cond, generator)` returns x0 (and the Trajectory where the method is one Gaussian chain);
`Cost.watch(method.nets)` counts its network passes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..contracts import Cond
from ..control import ControlledDenoiser, y_guidance
from ..io import CtrlDiffError
from ..sampling import Trajectory, sample
from .cost import Cost
from .guidance import Likelihood, classifier_guidance, mpgd_guide, reconstruction_guidance
from .particles import best_of_n, smc, svdd

# method -> its knobs and their defaults (the neutral settings, which reproduce the base sampler, are in the
# tests: w = 0; particles = 1 with w = 0; candidates = 1; n = 1; ctrl/cfg with w = 1 are the model itself)
KNOBS: dict[str, dict[str, float | int]] = {
    "base": {},
    "ctrl": {"w": 1.0},  # guidance weight on y (1 = the fine-tuned model as is)
    "cfg": {"w": 2.0},  # guidance weight on y for the model trained on triplets
    "dps": {"w": 1.0},  # reconstruction-guidance scale
    "classifier": {"w": 1.0},  # classifier-guidance scale (noise-aware classifier)
    "mpgd": {"w": 1.0},  # step size on x0_hat, in units of (1 - abar_t)
    "smc": {"particles": 4, "gamma": 10.0, "w": 1.0, "ess": 0.5},  # K, twist exponent, proposal scale, ESS/K
    "svdd": {"candidates": 20, "alpha": 0.1},  # M (official 20), selection temperature (0 = argmax)
    "best_of_n": {"n": 8},
    "ctrl_smc": {"particles": 4, "gamma": 10.0, "ess": 0.5},  # K, twist exponent (the target's gamma), ESS/K
}
NEEDS = {"ctrl": "a fine-tuned checkpoint (--ckpt)", "cfg": "a checkpoint from `finetune --method cfg` (--ckpt)",
         "ctrl_smc": "a fine-tuned checkpoint (--ckpt) and reward classifiers (--classifiers)",
         "classifier": "noise-aware classifiers (--classifiers from `ctrldiff classifier`)"}
_INT_KNOBS = {"particles", "candidates", "n"}
_RANGES = {"ess": (0.0, 1.0)}


def check_knobs(method: str, knobs: dict | None = None) -> dict:
    """The method's knobs with `knobs` applied; unknown methods, foreign knobs and bad values raise."""
    if method not in KNOBS:
        raise CtrlDiffError(f"unknown method {method!r}; choose from {', '.join(KNOBS)}")
    out = dict(KNOBS[method])
    for key, value in (knobs or {}).items():
        if key not in out:
            valid = ", ".join(out) or "none"
            raise CtrlDiffError(f"knob {key!r} does not belong to method {method!r}; its knobs: {valid}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise CtrlDiffError(f"{method} knob {key}={value!r} must be a finite number")
        if key in _INT_KNOBS and (value != int(value) or value < 1):
            raise CtrlDiffError(f"{method} knob {key}={value!r} must be an integer >= 1")
        lo, hi = _RANGES.get(key, (0.0, float("inf")))
        if not lo <= value <= hi:
            raise CtrlDiffError(f"{method} knob {key}={value!r} must be in [{lo}, {hi}]")
        out[key] = int(value) if key in _INT_KNOBS else float(value)
    return out


@dataclass
class Method:
    """A sampler of p(x | c, y): `draw(cond, generator)` -> (x0 in latent space, Trajectory or None)."""

    name: str
    knobs: dict
    draw: Callable[[Cond, torch.Generator], tuple[Tensor, Trajectory | None]]
    nets: list[tuple[str, nn.Module]] = field(default_factory=list)  # what `Cost.watch` counts
    width: int = 1  # network batch per requested sample (particles, candidates, n): a memory hint

    def __call__(self, cond: Cond, generator: torch.Generator, cost: Cost | None = None):
        with (cost or Cost()).watch(self.nets), torch.no_grad():
            return self.draw(cond, generator)


def build_method(name: str, backend, knobs: dict | None = None, *, steps: int = 20, eta: float = 1.0,
                 model: ControlledDenoiser | None = None, classifiers: dict | None = None,
                 noisy: dict | None = None) -> Method:
    """The named method on `backend`'s pre-trained model and sampler (DDIM `steps`, `eta`).

    model: the augmented model (ctrl, cfg); classifiers: control -> calibrated p̂(y|x) (dps, mpgd, smc, svdd,
    best_of_n); noisy: control -> noise-aware p̂(y|x_t, t) (classifier). Several controls compose as the sum of
    their log-likelihoods.
    """
    k = check_knobs(name, knobs)
    sch, base = backend.schedule, backend.denoiser
    nets = [("denoiser", backend.net)]
    if not {"base": backend, "ctrl": model, "cfg": model, "classifier": noisy,
            "ctrl_smc": model is not None and classifiers}.get(name, classifiers):
        raise CtrlDiffError(f"method {name!r} needs {NEEDS.get(name, 'reward classifiers (--classifiers)')}")

    def chain(denoiser, x0_guide=None, final=None):
        def draw(cond: Cond, g: torch.Generator):
            x_T = torch.randn((len(cond), *backend.shape), generator=g)
            traj = sample(denoiser, sch, x_T, cond, steps=steps, eta=eta, generator=g, x0_guide=x0_guide,
                          final=final)
            return traj.x0, traj
        return draw

    def particles(fn, **kw):
        return lambda cond, g: (fn(base, sch, lik, cond, backend.shape, g, steps=steps, eta=eta, **kw), None)

    def ctrl_smc():  # SMC from CTRL's chain: the base's last step, no gradient in the proposal
        nets.insert(0, ("denoiser", model.net))
        return particles(smc, w=0.0, proposal=model, **k), k["particles"]

    if name == "base":
        return Method(name, k, chain(base), nets)
    if name in ("ctrl", "cfg"):
        nets = [("denoiser", model.net)] + ([("denoiser", backend.net)] if model.final_step == "base" else [])
        return Method(name, k, chain(y_guidance(model, k["w"]), final=model.final(backend)), nets)
    if name == "classifier":
        nets += [("classifier", c) for c in noisy.values()]
        return Method(name, k, chain(classifier_guidance(base, sch, noisy, k["w"])), nets)
    lik = Likelihood(backend, classifiers)
    nets += [("classifier", c) for c in classifiers.values()]
    draw, width = {
        "dps": lambda: (chain(reconstruction_guidance(base, sch, lik, k["w"])), 1),
        "mpgd": lambda: (chain(base, mpgd_guide(sch, lik, k["w"])), 1),
        "smc": lambda: (particles(smc, **k), k["particles"]),
        "svdd": lambda: (particles(svdd, **k), k["candidates"]),
        "best_of_n": lambda: (particles(best_of_n, **k), k["n"]),
        "ctrl_smc": ctrl_smc,
    }[name]()
    return Method(name, k, draw, nets, width)


__all__ = ["KNOBS", "Cost", "Likelihood", "Method", "build_method", "check_knobs"]
