"""The CTRL pipeline on the embedded default, one function per stage; the CLI and the demo call these."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .backends import backend_for
from .backends.pixels import PixelBackend, asset_path
from .classifier import Classifier, NoisyClassifier, evaluate_classifier, fit_classifier, fit_noisy_classifier
from .config import Config
from .control import ControlledDenoiser
from .evaluate import evaluate, features
from .io import CtrlDiffError, read_meta, write_json, write_text
from .methods import Method, build_method
from .methods.triplets import fit_cfg
from .pairs import defined
from .plots import plot_curves, save_grid
from .rl import RewardTerm, finetune
from .runs import Run
from .schedule import add_noise
from .tasks.controls import Control, controls_of
from .tasks.mnist import NUM_DIGITS, load_digits, to_unit


def check_finetune(cfg: Config) -> None:
    """Fail before any work (or any folder) on settings CTRL cannot run with."""
    controls_of(cfg)
    if cfg.sampler.eta <= 0:
        raise CtrlDiffError(f"sampler.eta={cfg.sampler.eta}: the KL term needs a stochastic sampler (eta > 0)")


def digit_oracle(resolution: int) -> Classifier:
    """The evaluation digit classifier shipped with the base (trained on real digits by `ctrldiff pretrain`)."""
    return Classifier.load(asset_path(f"digits{resolution}.safetensors"), "digits")


def fit_digit_oracle(cfg: Config, progress: bool = True, run: Run | None = None) -> tuple[Classifier, dict]:
    """Train the evaluation digit classifier on the training split; report it on the held-out digits."""
    tr = load_digits("train", cfg.data.resolution, cfg.data.heldout, cfg.data.split_seed)
    ho = load_digits("heldout", cfg.data.resolution, cfg.data.heldout, cfg.data.split_seed)
    clf, report = fit_classifier(tr.x, tr.c, NUM_DIGITS, cfg.classifier, cfg.seed, "digits", progress=progress,
                                 ckpt=_checkpointer(run, "digits", cfg.classifier.checkpoint_every))
    report["heldout"] = evaluate_classifier(clf, ho.x, ho.c)
    return clf, report


def _checkpointer(run: Run | None, name: str, every: int):
    return run.checkpointer(name, every) if run is not None else None


def pairs_for(control: Control, split: str, cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs (x, y) for a control: the digits of a split, labelled by the control's labeller (pixels only);
    `data.pairs` keeps a random subset of the training pairs (drawn by `seed`: the sample-efficiency study)."""
    d = load_digits(split, cfg.data.resolution, cfg.data.heldout, cfg.data.split_seed)
    x = d.x
    if split == "train" and cfg.data.pairs is not None:
        if cfg.data.pairs > len(x):
            raise CtrlDiffError(f"data.pairs={cfg.data.pairs}: only {len(x)} training pairs exist")
        x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.data.pairs]]
    return x, control.label(to_unit(x))


def fit_reward_terms(cfg: Config, run: Run | None = None, progress: bool = True, noisy: bool = False,
                     pairs: dict | None = None) -> tuple[list[RewardTerm], dict]:
    """Step 1 for each control: the reward classifier from the training pairs, calibrated, and an independent
    monitor classifier from the disjoint held-out pairs (to catch reward hacking). noisy: also the
    noise-aware classifier p̂(y | x_t, t) of the classifier-guidance baseline, from the same training pairs.
    pairs: {control: (train, heldout)} from disk (`ctrldiff.pairs`); other controls label the digits."""
    terms, reports, pairs = [], {}, pairs or {}
    schedule = backend_for(cfg).schedule if noisy else None  # the noise-aware classifier's q(x_t | x_0)
    for ctl in controls_of(cfg):
        if ctl.name in pairs:
            (x, y), (x_ho, y_ho) = ((p.x, p.y) for p in pairs[ctl.name])
        else:
            x, y = pairs_for(ctl, "train", cfg)
            x_ho, y_ho = pairs_for(ctl, "heldout", cfg)
        every = cfg.classifier.checkpoint_every
        clf, rep = fit_classifier(x, y, ctl.num_classes, cfg.classifier, cfg.seed, ctl.name, progress=progress,
                                  ckpt=_checkpointer(run, f"classifier-{ctl.name}", every))
        rep["heldout"] = evaluate_classifier(clf, x_ho, y_ho)
        mon, mrep = fit_classifier(x_ho, y_ho, ctl.num_classes, cfg.classifier, cfg.seed + 1, ctl.name,
                                   progress=progress, ckpt=_checkpointer(run, f"monitor-{ctl.name}", every))
        rep["monitor"] = {"pairs": mrep["pairs"], "accuracy_on_train_pairs": evaluate_classifier(mon, x, y)["accuracy"]}
        terms.append(RewardTerm(ctl, clf, cfg.rl.controls[ctl.name], mon))
        reports[ctl.name] = rep
        if noisy:
            nclf = fit_noisy_classifier(x, y, ctl.num_classes, cfg.classifier, schedule, cfg.seed, ctl.name, progress,
                                        _checkpointer(run, f"noisy-{ctl.name}", every))
            rep["noise_aware_heldout_accuracy"] = noisy_accuracy(nclf, x_ho, y_ho, schedule, cfg.seed)
            if run is not None:
                nclf.save(run.path(f"noisy-{ctl.name}.safetensors"))
        if run is not None:
            clf.save(run.path(f"classifier-{ctl.name}.safetensors"), {"report": rep})
            mon.save(run.path(f"monitor-{ctl.name}.safetensors"))
    if run is not None:
        write_json(run.path("classifiers.json"), reports)
    return terms, reports


@torch.no_grad()
def noisy_accuracy(clf: NoisyClassifier, x, y, schedule, seed: int, ts=(0, 250, 500, 750)) -> dict:
    """Held-out accuracy of a noise-aware classifier at a few noise levels t."""
    g, out = torch.Generator().manual_seed(seed), {}
    for t in ts:
        tt = torch.full((len(x),), t)
        x_t = add_noise(schedule, x, torch.randn(x.shape, generator=g), tt)
        out[f"t={t}"] = (clf(x_t, tt).argmax(-1) == y).float().mean().item()
    return out


def load_reward_terms(cfg: Config, folder: Path) -> list[RewardTerm]:
    """Reward terms from a `ctrldiff classifier` run folder."""
    return [RewardTerm(ctl, Classifier.load(folder / f"classifier-{ctl.name}.safetensors", ctl.name),
                       cfg.rl.controls[ctl.name], Classifier.load(folder / f"monitor-{ctl.name}.safetensors", ctl.name))
            for ctl in controls_of(cfg)]


def run_finetune(cfg: Config, run: Run, terms: list[RewardTerm], backend, progress: bool = True):
    """Step 3: CTRL fine-tuning; writes ctrl.safetensors and the training curves."""
    model, summary = finetune(backend, terms, cfg, log=run.log, progress=progress,
                              ckpt=run.checkpointer("ctrl", cfg.rl.checkpoint_every))
    model.save(run.path("ctrl.safetensors"), {"method": "ctrl", "resolution": cfg.data.resolution,
                                              "summary": summary["seconds"],
                                              "defined_controls": defined(model.controls)})
    records = run.records()
    keys = sorted({k for r in records for k in r})
    panels = {"accuracy, monitoring batch": [k for k in keys if k.startswith("acc_")],
              "reward (sum of gamma log p)": ["reward"], "path KL to the base (nats)": ["kl"]}
    plot_curves(records, panels, run.path("curves.png"), f"CTRL fine-tuning ({cfg.name})")
    return model, summary


def real_features(cfg: Config, oracle: Classifier):
    ho = load_digits("heldout", cfg.data.resolution, cfg.data.heldout, cfg.data.split_seed)
    return features(oracle, to_unit(ho.x))


def run_cfg_finetune(cfg: Config, run: Run, backend, progress: bool = True) -> tuple[ControlledDenoiser, dict]:
    """The CFG baseline's training: the augmented model on (x, c, y) triplets from the training digits."""
    controls = controls_of(cfg)
    d = load_digits("train", cfg.data.resolution, cfg.data.heldout, cfg.data.split_seed)
    y = {ctl.name: ctl.label(to_unit(d.x)) for ctl in controls}
    model, summary = fit_cfg(backend, d.x, d.c, y, {c.name: c.num_classes for c in controls}, cfg.triplets,
                             cfg.seed, log=run.log, progress=progress,
                             ckpt=run.checkpointer("cfg", cfg.triplets.checkpoint_every))
    model.save(run.path("cfg.safetensors"), {"method": "cfg", "resolution": cfg.data.resolution, "summary": summary})
    return model, summary


def load_model(path: Path, backend, method: str) -> ControlledDenoiser:
    """A fine-tuned augmented model (ctrl or cfg), LoRA merged for sampling; the checkpoint must match `method`."""
    trained_by = read_meta(path).get("method", "ctrl")
    if trained_by != method:
        raise CtrlDiffError(f"{path} was trained by {trained_by!r}, not {method!r}; pass --method {trained_by}")
    return ControlledDenoiser.load(path, backend).merge_lora()


def method_for(cfg: Config, name: str, backend, knobs: dict | None = None, ckpt: Path | None = None,
               classifiers: Path | None = None) -> Method:
    """Build a method with what it needs loaded from disk: a checkpoint (ctrl, cfg) or a `ctrldiff classifier`
    folder (reward classifiers; noise-aware ones for `classifier`)."""
    kw: dict = {"steps": cfg.sampler.steps, "eta": cfg.sampler.eta}
    if name in ("ctrl", "cfg"):
        if ckpt is None:
            raise CtrlDiffError(f"method {name!r} needs --ckpt (a checkpoint written by `ctrldiff finetune`)")
        kw["model"] = load_model(ckpt, backend, name)
        knobs = {"w": cfg.eval.guidance, **(knobs or {})} if name == "ctrl" else knobs
    elif name != "base":
        if classifiers is None:
            raise CtrlDiffError(f"method {name!r} needs --classifiers (a `ctrldiff classifier` run folder)")
        cls, prefix, key = ((NoisyClassifier, "noisy", "noisy") if name == "classifier"
                            else (Classifier, "classifier", "classifiers"))
        kw[key] = {}
        for ctl in controls_of(cfg):
            path = Path(classifiers) / f"{prefix}-{ctl.name}.safetensors"
            if not path.exists():
                raise CtrlDiffError(f"missing {path}; run `ctrldiff classifier` for {ctl.name} first")
            kw[key][ctl.name] = cls.load(path, ctl.name)
    return build_method(name, backend, knobs, **kw)


def run_evaluate(cfg: Config, run: Run, methods: list[Method], backend, progress: bool = True) -> dict:
    """Evaluate methods against the oracles, the base always beside them; writes metrics.json/.md and grids."""
    controls = controls_of(cfg)
    digits = isinstance(backend, PixelBackend)  # the digit oracle is the embedded model's (SD: no CLIP score yet)
    oracle = digit_oracle(cfg.data.resolution) if digits else None
    real = real_features(cfg, oracle) if digits else None
    if all(m.name != "base" for m in methods):
        methods = [build_method("base", backend, steps=cfg.sampler.steps, eta=cfg.sampler.eta), *methods]
    results = {}
    for method in methods:
        metrics, images, cond = evaluate(method, backend, controls, cfg, oracle, real, reference=backend.denoiser,
                                         seed=cfg.seed, progress=progress)
        results[method.name] = metrics
        save_grid(*grid_of(images, cond, controls, backend.num_c), run.path(f"samples-{method.name}.png"))
    write_json(run.path("metrics.json"), results)
    write_text(run.path("metrics.md"), results_table(results, controls))
    return results


def grid_of(images: torch.Tensor, cond, controls: list[Control], num_c: int = NUM_DIGITS):
    """Pick one image per (joint y, c): rows = joint class of y, columns = c (the first ten values at most)."""
    cols = min(num_c, NUM_DIGITS)
    row, rows = torch.zeros(len(images), dtype=torch.long), 1
    for ctl in controls:  # mixed radix, first control fastest (the order of balanced_conditions)
        row += cond.y[ctl.name] * rows
        rows *= ctl.num_classes
    picks = []
    for r in range(rows):
        for c in range(cols):
            idx = torch.nonzero((row == r) & (cond.c == c))
            picks.append(images[idx[0, 0]] if len(idx) else torch.ones_like(images[0]))
    return torch.stack(picks), rows, cols


def _num(v: float) -> str:
    return "n/a" if math.isnan(v) else f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"


def results_table(results: dict, controls: list[Control]) -> str:
    """A markdown table: one row per method."""
    cols = [f"{c.name} acc" for c in controls] + [f"{c.name} F1" for c in controls]
    cols += (["joint acc"] if len(controls) > 1 else []) + ["digit fidelity", "feature-FID", "mean KL",
                                                            "net fwd/sample", "net bwd/sample", "s/sample"]
    lines = ["| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for method, m in results.items():
        vals = [m[c.name]["accuracy"] for c in controls] + [m[c.name]["macro_f1"] for c in controls]
        vals += ([m["joint_accuracy"]] if len(controls) > 1 else [])
        cost = m["cost_per_sample"]
        vals += [m["digit_fidelity"], m["feature_fid"], m.get("mean_kl", float("nan")),
                 cost.get("forward_denoiser", 0), cost.get("backward_denoiser", 0), m["seconds_per_sample"]]
        lines.append(f"| {method} | " + " | ".join(_num(v) for v in vals) + " |")
    if len(controls) > 1:
        lines += ["", "Per-corner joint accuracy:", "", "| method | " + " | ".join(results["base"]["per_corner"]) + " |",
                  "|---" * (len(results["base"]["per_corner"]) + 1) + "|"]
        for method, m in results.items():
            lines.append(f"| {method} | " + " | ".join(f"{v:.3f}" for v in m["per_corner"].values()) + " |")
    return "\n".join(lines) + "\n"
