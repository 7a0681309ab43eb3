"""The CTRL pipeline on the embedded default, one function per stage; the CLI and the demo call these."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .backends import backend_for
from .backends.pixels import PixelBackend, asset_path
from .classifier import (
    Classifier,
    NoisyClassifier,
    evaluate_classifier,
    expected_calibration_error,
    fit_classifier,
    fit_noisy_classifier,
)
from .config import Config
from .control import ControlledDenoiser
from .definitions import defined, save_definitions
from .evaluate import evaluate, path_meter
from .io import CtrlDiffError, read_meta, write_json, write_text
from .methods import Method, build_method
from .methods.triplets import fit_cfg
from .metrics import features
from .plots import grid_image, grid_of, plot_cells, plot_curves, save_grid
from .report import results_table
from .rl import RewardTerm, finetune
from .runs import Run
from .schedule import add_noise
from .target import (
    LogZ,
    bank_log_probs,
    bank_log_z,
    bank_reward_table,
    base_hash,
    load_bank,
    on_trusted,
    target_metrics,
)
from .tasks.controls import Control, controls_of
from .tasks.mnist import NUM_DIGITS, load_digits, to_unit
from .yardstick import yardstick


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
    clf, report = fit_classifier(tr.x, tr.c, NUM_DIGITS, cfg.classifier, cfg.seed, "digits", _log(run, "digits"),
                                 progress, _checkpointer(run, "digits", cfg.classifier.checkpoint_every))
    report["heldout"] = evaluate_classifier(clf, ho.x, ho.c)
    return clf, report


def _checkpointer(run: Run | None, name: str, every: int):
    return run.checkpointer(name, every) if run is not None else None


def _log(run: Run | None, loop: str):
    """A classifier's records to the run, named by its loop (a reward and a monitor classifier share a name)."""
    return None if run is None else lambda record: run.log({**record, "classifier": loop})


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


def base_pairs(control: Control, cfg: Config, backend, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """`classifier.base_pairs` samples of the base model labelled by the control's oracle: more pairs, drawn where
    CTRL samples (the base's support), from their own cached bank. Its seed, target.seed + 1 + seed, follows the
    pipeline's seed (a whole-pipeline seed then varies the classifier's data too) and is never the yardstick's."""
    if control.labeller is None:
        raise CtrlDiffError(f"classifier.base_pairs={cfg.classifier.base_pairs}: control {control.name!r} has no "
                            "oracle to label base samples; set classifier.base_pairs=0")
    per_c = math.ceil(cfg.classifier.base_pairs / backend.num_c)
    bank = load_bank(backend, per_c, cfg.sampler.steps, cfg.sampler.eta, cfg.target.seed + 1 + cfg.seed,
                     progress=progress)
    images = backend.decode(bank.transpose(0, 1).flatten(0, 1)[: cfg.classifier.base_pairs])  # c cycling
    return images * 2 - 1, control.label(images)


def fit_reward_terms(cfg: Config, run: Run | None = None, progress: bool = True, noisy: bool = False,
                     pairs: dict | None = None) -> tuple[list[RewardTerm], dict]:
    """Step 1 for each control: the reward classifier from the training pairs, calibrated, and an independent
    monitor classifier from the disjoint held-out pairs (to catch reward hacking). noisy: also the
    noise-aware classifier p̂(y | x_t, t) of the classifier-guidance baseline, from the same training pairs.
    pairs: {control: (train, heldout)} from disk (`ctrldiff.pairs`); other controls label the digits."""
    terms, reports, pairs = [], {}, pairs or {}
    backend = backend_for(cfg) if noisy or cfg.classifier.base_pairs else None  # loaded once, not per control
    schedule = backend.schedule if noisy else None  # the noise-aware classifier's q(x_t | x_0)
    for ctl in controls_of(cfg):
        if ctl.name in pairs:  # pairs from disk define the control: no oracle to label base samples with
            (x, y), (x_ho, y_ho) = ((p.x, p.y) for p in pairs[ctl.name])
        else:
            x, y = pairs_for(ctl, "train", cfg)
            if cfg.classifier.base_pairs:
                xb, yb = base_pairs(ctl, cfg, backend, progress)
                x, y = torch.cat([x, xb]), torch.cat([y, yb])
            x_ho, y_ho = pairs_for(ctl, "heldout", cfg)
        every = cfg.classifier.checkpoint_every
        clf, rep = fit_classifier(x, y, ctl.num_classes, cfg.classifier, cfg.seed, ctl.name,
                                  _log(run, f"classifier-{ctl.name}"), progress,
                                  _checkpointer(run, f"classifier-{ctl.name}", every))
        rep["heldout"] = evaluate_classifier(clf, x_ho, y_ho)
        mon, mrep = fit_classifier(x_ho, y_ho, ctl.num_classes, cfg.classifier, cfg.seed + 1, ctl.name,
                                   _log(run, f"monitor-{ctl.name}"), progress,
                                   _checkpointer(run, f"monitor-{ctl.name}", every))
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
def on_base_samples(clf: Classifier, images: torch.Tensor, labels: torch.Tensor, batch: int = 2048) -> dict:
    """A classifier on fresh base samples (images in [0, 1]) labelled by the oracle: where CTRL samples, unlike
    the real held-out digits. Accuracy and ECE of the calibrated logits (returned as `logits` too)."""
    logits = torch.cat([clf(images[i:i + batch] * 2 - 1) for i in range(0, len(images), batch)])
    return {"accuracy": (logits.argmax(-1) == labels).float().mean().item(),
            "ece_calibrated": expected_calibration_error(logits, labels), "logits": logits}


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
    return [RewardTerm(ctl, Classifier.load(folder / f"classifier-{ctl.name}.safetensors", ctl.name, ctl.num_classes),
                       cfg.rl.controls[ctl.name],
                       Classifier.load(folder / f"monitor-{ctl.name}.safetensors", ctl.name, ctl.num_classes))
            for ctl in controls_of(cfg)]


def target_bank(cfg: Config, backend, progress: bool = True) -> torch.Tensor:
    """The cached bank of base samples the target p_gamma is estimated from (built on first use)."""
    return load_bank(backend, cfg.target.per_c, cfg.sampler.steps, cfg.sampler.eta, cfg.target.seed,
                     path=cfg.target.bank, progress=progress)


def log_z_of(cfg: Config, terms: list[RewardTerm], backend, progress: bool = True,
             bank: torch.Tensor | None = None) -> LogZ:
    """log Z(c, y) of the reward terms on the bank, with its ESS: the optimum of CTRL's objective per request
    (trusted where the ESS >= target.min_ess)."""
    bank = target_bank(cfg, backend, progress) if bank is None else bank
    return bank_log_z(bank_log_probs(backend, bank, {t.control.name: t.classifier for t in terms}),
                      {t.control.name: t.gamma for t in terms}, cfg.target.min_ess)


def run_finetune(cfg: Config, run: Run, terms: list[RewardTerm], backend, progress: bool = True, init=None):
    """Step 3: CTRL fine-tuning; writes ctrl.safetensors and the training curves (with `target.meter`, log Z - J:
    nats to the objective's optimum). init: an augmented model to start from (`finetune`)."""
    log_z = log_z_of(cfg, terms, backend, progress) if cfg.target.meter else None
    model, summary = finetune(backend, terms, cfg, log=run.log, progress=progress,
                              ckpt=run.checkpointer("ctrl", cfg.rl.checkpoint_every), log_z=log_z, init=init,
                              log_images=monitor_grid(run))
    model.save(run.path("ctrl.safetensors"), {"method": "ctrl", "resolution": cfg.data.resolution,
                                              "gammas": cfg.rl.controls, "summary": summary["seconds"],
                                              "estimator": cfg.rl.estimator,
                                              "defined_controls": defined(model.controls),
                                              "base": base_hash(backend)})  # `ctrldiff export` checks it
    records = run.records()
    keys = sorted({k for r in records for k in r})
    panels = {"accuracy, monitoring batch": [k for k in keys if k.startswith("acc_")],
              "reward (sum of gamma log p)": ["reward"], "path KL to the base (nats)": ["kl"]}
    if "gap" in keys:  # trusted requests (bank), and every request (bank or the running path weights)
        panels["log Z - J (nats to the optimum)"] = [k for k in ("gap", "gap_all") if k in keys]
    plot_curves(records, panels, run.path("curves.png"), f"CTRL fine-tuning ({cfg.name})")
    return model, summary


def finetune_from(cfg: Config, run: Run, classifiers: Path | None = None, base: Path | None = None, backend=None,
                  pairs: dict | None = None):
    """Steps 1-3 for the CLI and the demo: the reward classifiers (fitted here, or those of a `classifiers` run),
    then CTRL. Returns (model, backend, terms)."""
    backend = backend or backend_for(cfg, base)
    save_definitions(run.dir, pairs or {})  # before any work: a resume checks its pairs against it
    terms = load_reward_terms(cfg, classifiers) if classifiers else fit_reward_terms(cfg, run, pairs=pairs)[0]
    return run_finetune(cfg, run, terms, backend)[0], backend, terms


def monitor_grid(run: Run | None, cell: int = 48):
    """The fine-tune's `log_images`: the monitoring batch as a grid (rows = y, columns = c) to the run's
    experiment trackers (None without one); each cell about `cell` pixels (digits enlarged, SD's shrunk)."""
    if run is None or run.tracker is None:
        return None
    controls = controls_of(run.cfg)

    def log(step: int, images: torch.Tensor, cond) -> None:
        if images.shape[-1] > cell:
            images = torch.nn.functional.interpolate(images, size=cell, mode="area")
        grid = grid_image(*grid_of(images, cond, controls), scale=max(1, cell // images.shape[-1]))
        run.log_image("samples", grid, step)

    return log


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
    """Build a method with what it needs loaded from disk: a checkpoint (ctrl, cfg, ctrl_smc) and/or a `ctrldiff
    classifier` folder (reward classifiers; noise-aware ones for `classifier`)."""
    kw: dict = {"steps": cfg.sampler.steps, "eta": cfg.sampler.eta}
    if name in ("ctrl", "cfg", "ctrl_smc"):
        if ckpt is None:
            raise CtrlDiffError(f"method {name!r} needs --ckpt (a checkpoint written by `ctrldiff finetune`)")
        kw["model"] = load_model(ckpt, backend, "cfg" if name == "cfg" else "ctrl")
        knobs = {"w": cfg.eval.guidance, **(knobs or {})} if name == "ctrl" else knobs
    if name not in ("base", "ctrl", "cfg"):
        if classifiers is None:
            raise CtrlDiffError(f"method {name!r} needs --classifiers (a `ctrldiff classifier` run folder)")
        cls, prefix, key = ((NoisyClassifier, "noisy", "noisy") if name == "classifier"
                            else (Classifier, "classifier", "classifiers"))
        kw[key] = {}
        for ctl in controls_of(cfg):
            path = Path(classifiers) / f"{prefix}-{ctl.name}.safetensors"
            if not path.exists():
                raise CtrlDiffError(f"missing {path}; run `ctrldiff classifier` for {ctl.name} first")
            kw[key][ctl.name] = cls.load(path, ctl.name, ctl.num_classes)
    return build_method(name, backend, knobs, **kw)


def run_evaluate(cfg: Config, run: Run, methods: list[Method], backend, progress: bool = True,
                 terms: list[RewardTerm] | None = None) -> dict:
    """Evaluate methods against the oracles, the base always beside them; writes metrics.json/.md and grids.
    terms: the reward classifiers and gammas: adds the target p_gamma's row (importance sampling over the bank), the
    reward classifiers' and monitors' verdicts, a heat map of target vs method accuracy per (c, y), and the
    yardstick: each method's J, log Z, KL and log Z - J over the same requests, from `target.paths` meter paths per
    request (methods whose path ratio to the base exists: base, ctrl, cfg)."""
    controls = controls_of(cfg)
    digits = isinstance(backend, PixelBackend)  # the digit oracle is the embedded model's (SD: no CLIP score yet)
    oracle = digit_oracle(cfg.data.resolution) if digits else None
    real = real_features(cfg, oracle) if digits else None
    if all(m.name != "base" for m in methods):
        methods = [build_method("base", backend, steps=cfg.sampler.steps, eta=cfg.sampler.eta), *methods]
    results, target, paths = {}, None, {}
    if terms:  # the target from the bank, with the same classifiers and gammas as the reward
        bank = target_bank(cfg, backend, progress)
        target = target_metrics(backend, bank, terms, controls, cfg.eval.per_class, oracle, real, cfg.seed,
                                cfg.target.min_ess)
    for method in methods:
        metrics, images, cond = evaluate(method, backend, controls, cfg, oracle, real, reference=backend.denoiser,
                                         seed=cfg.seed, progress=progress, terms=terms)
        results[method.name] = metrics
        if terms and cfg.target.paths:
            stats = path_meter(method, backend, terms, cfg, cfg.target.paths, cfg.seed, progress)
            if stats is not None:
                paths[method.name] = stats
        save_grid(*grid_of(images, cond, controls, backend.num_c), run.path(f"samples-{method.name}.png"))
        if method.name == "base" and target is not None:  # the target's row right after the base's
            results["target"] = target[0]
            save_grid(*grid_of(*target[1:], controls, backend.num_c), run.path("samples-target.png"))
    if target is not None:
        bank_z = log_z_of(cfg, terms, backend, progress, bank)
        yard = yardstick(bank_z, bank_reward_table(target[0], bank_z.table.shape), paths, cfg.target.min_path_ess)
        results["target"]["log_z_source"] = yard.pop("log_z_source")
        for name, m in results.items():
            m["yardstick"] = yard.get(name)  # None: no path ratio to the base (not one chain, or its own last step)
            m["trusted"] = on_trusted(m.get("per_cell", m.get("cells")), target[0]["cells"], cfg.target.min_ess)
            if name not in ("base", "target"):
                plot_cells(target[0]["cells"], m["per_cell"], name, run.path(f"target-vs-{name}.png"),
                           cfg.target.min_ess, (m["yardstick"] or {}).get("requests"))
    write_json(run.path("metrics.json"), results)
    write_text(run.path("metrics.md"), results_table(results, controls))
    return results
