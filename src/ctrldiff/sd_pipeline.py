"""The CTRL pipeline on Stable Diffusion (docs/sd.md): reward classifiers from labelled base samples, then
CTRL through accelerate. Imports nothing heavy at module level; `backends/sd.py` imports diffusers lazily."""

from __future__ import annotations

from pathlib import Path

import torch

from .backends import sd_backend
from .classifier import fit_classifier
from .conditions import balanced_conditions
from .config import Config
from .contracts import Cond
from .definitions import defined
from .io import CtrlDiffError, load_weights, read_meta, save_weights, write_json
from .rl import RewardTerm, finetune
from .rl.scale import make_accelerator
from .target import base_hash


@torch.no_grad()
def base_samples(backend, cfg: Config, n: int, seed: int, progress: bool = True) -> tuple[torch.Tensor, Cond]:
    """n decoded images in [0, 1] from the pre-trained model, the prompts cycling (the pairs' x)."""
    from .evaluate import generate
    from .methods import build_method

    base = build_method("base", backend, steps=cfg.sampler.steps, eta=cfg.sampler.eta)
    cond = balanced_conditions(n, backend.num_c, {})
    return generate(base, backend, cond, cfg, seed, progress=progress)[0], cond


def clip_for(cfg: Config, device="cpu"):
    """The CLIP feature network of the aesthetic control (None if no control needs it); registers the
    labelled `aesthetic2` when `sd.aesthetic_predictor` is given."""
    from .backends.sd import ClipFeatures, aesthetic_control
    from .tasks.controls import register

    if "aesthetic2" not in cfg.rl.controls:
        return None
    if cfg.sd.clip is None:
        raise CtrlDiffError("control 'aesthetic2' needs local CLIP weights: --set sd.clip=PATH (+ "
                            "sd.aesthetic_predictor=FILE.safetensors to label pairs; docs/sd.md)")
    clip = ClipFeatures(cfg.sd.clip).to(device)
    register(aesthetic_control(clip, cfg.sd.aesthetic_predictor))
    return clip


def fit_clip_classifier(clip, x: torch.Tensor, y: torch.Tensor, num_classes: int, cfg: Config, seed: int,
                        name: str, progress: bool = True):
    """The MLP on frozen CLIP features (computed once), fitted like the CNN and temperature-calibrated."""
    from .backends.sd import ClipMLPClassifier
    from .classifier import fit_net, fit_temperature, held_back

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    with torch.no_grad():
        feats = torch.cat([clip(x[i:i + 64]) for i in range(0, len(x), 64)])
    perm = torch.randperm(len(x), generator=g)
    n_val = held_back(len(x), cfg.classifier)
    val, tr = perm[:n_val], perm[n_val:]
    clf = ClipMLPClassifier(clip, num_classes, name=name)
    fit_net(clf.head, feats[tr], y[tr], cfg.classifier, g, lambda f: f, name, progress=progress)
    with torch.no_grad():
        clf.temperature.fill_(fit_temperature(clf.head(feats[val]), y[val]))
    return clf.eval().requires_grad_(False)


def save_clip_classifier(clf, path: Path, extra: dict | None = None) -> None:
    save_weights(path, clf.state(), {"kind": "clip_classifier", "name": clf.name, "hidden": clf.head[0].out_features,
                                     "num_classes": clf.head[-1].out_features, **(extra or {})})


def load_classifier(path: Path, name: str, clip):
    """A reward or monitor classifier of a control: the CNN, or (aesthetic2) the MLP on CLIP features."""
    from .backends.sd import ClipMLPClassifier
    from .classifier import Classifier

    if read_meta(path).get("kind") != "clip_classifier":
        return Classifier.load(path, name)
    tensors, meta = load_weights(path)
    if clip is None or meta.get("name") != name:
        raise CtrlDiffError(f"{path} is a CLIP classifier for {meta.get('name')!r}; it needs sd.clip and control {name!r}")
    clf = ClipMLPClassifier(clip, meta["num_classes"], meta["hidden"], name)
    clf.head.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("head.")})
    clf.temperature.copy_(tensors["temperature"])
    return clf.eval().requires_grad_(False)


def load_sd_reward_terms(cfg: Config, folder: Path, clip=None) -> list[RewardTerm]:
    """Reward terms from a `ctrldiff classifier --model` run folder."""
    from .tasks.controls import controls_of

    return [RewardTerm(ctl, load_classifier(Path(folder) / f"classifier-{ctl.name}.safetensors", ctl.name, clip),
                       cfg.rl.controls[ctl.name],
                       load_classifier(Path(folder) / f"monitor-{ctl.name}.safetensors", ctl.name, clip))
            for ctl in controls_of(cfg)]


def fit_sd_reward_terms(backend, cfg: Config, run=None, progress: bool = True,
                        clip=None) -> tuple[list[RewardTerm], dict]:
    """Step 1 on SD: pairs are base samples labelled by each control's oracle (JPEG size, LAION score: rewards
    no gradient passes through), fitted on the decoded RGB images (the small CNN; aesthetic2: an MLP on CLIP
    features) and calibrated; an independent monitor is fitted on a second, disjoint set of samples."""
    from .tasks.controls import controls_of

    n = cfg.sd.pairs
    if n < 10:
        raise CtrlDiffError(f"sd.pairs={n}: too few to fit and calibrate a classifier (need >= 10)")
    controls = controls_of(cfg)
    for ctl in controls:
        if ctl.labeller is None:
            raise CtrlDiffError(f"control {ctl.name!r} has no oracle to label base samples (aesthetic2: set "
                                "sd.aesthetic_predictor), or pass --classifiers")
    images, _ = base_samples(backend, cfg, n, cfg.seed, progress)
    images_ho, _ = base_samples(backend, cfg, n, cfg.seed + 1, progress)
    terms, reports = [], {}
    for ctl in controls:
        y, y_ho = ctl.label(images), ctl.label(images_ho)
        x, x_ho = images * 2 - 1, images_ho * 2 - 1
        if ctl.name == "aesthetic2":
            clf = fit_clip_classifier(clip, x, y, 2, cfg, cfg.seed, ctl.name, progress)
            mon = fit_clip_classifier(clip, x_ho, y_ho, 2, cfg, cfg.seed + 1, ctl.name, progress)
            rep = {"pairs": n, "temperature": clf.temperature.item()}
            save = save_clip_classifier
        else:
            clf, rep = fit_classifier(x, y, ctl.num_classes, cfg.classifier, cfg.seed, ctl.name, progress=progress)
            mon, _ = fit_classifier(x_ho, y_ho, ctl.num_classes, cfg.classifier, cfg.seed + 1, ctl.name,
                                    progress=progress)
            save = type(clf).save
        rep["heldout"] = {"accuracy": (clf.predict(x_ho) == y_ho).float().mean().item()}
        rep["class_counts"] = torch.bincount(y, minlength=ctl.num_classes).tolist()
        terms.append(RewardTerm(ctl, clf, cfg.rl.controls[ctl.name], mon))
        reports[ctl.name] = rep
        if run is not None:
            save(clf, run.path(f"classifier-{ctl.name}.safetensors"), {"report": rep})
            save(mon, run.path(f"monitor-{ctl.name}.safetensors"))
    if run is not None:
        write_json(run.path("classifiers.json"), reports)
    return terms, reports


def finetune_sd(cfg: Config, make_run, classifiers: Path | None = None, progress: bool = True, cpu: bool = False):
    """CTRL on SD under accelerate (one process, or one per GPU with `accelerate launch`); only the main
    process writes the run folder (`make_run()`), the checkpoints and the log. Returns (model, backend)."""
    from .pipeline import monitor_grid

    accelerator = make_accelerator(cfg.sd.mixed_precision, cfg.sd.accumulate, cpu)
    main = accelerator.is_main_process
    if accelerator.num_processes > 1 and classifiers is None:
        raise CtrlDiffError("with several processes fit the classifiers first (`ctrldiff classifier --model "
                            "PATH`, one process) and pass --classifiers RUN_DIR: every process needs the same ones")
    backend = sd_backend(cfg, accelerator.device)  # before the run folder: a bad --model leaves nothing behind
    run = make_run() if main else None
    clip = clip_for(cfg, accelerator.device)
    terms = (load_sd_reward_terms(cfg, classifiers, clip) if classifiers
             else fit_sd_reward_terms(backend, cfg, run, progress, clip)[0])
    ckpt = run.checkpointer("ctrl", cfg.rl.checkpoint_every) if run is not None else None
    model, summary = finetune(backend, terms, cfg, log=run.log if run else None, progress=progress and main,
                              ckpt=ckpt, accelerator=accelerator, log_images=monitor_grid(run))
    if run is not None:
        model.save(run.path("ctrl.safetensors"), {"method": "ctrl", "resolution": cfg.data.resolution,
                                                  "sd_resolution": backend.resolution, "summary": summary["seconds"],
                                                  "defined_controls": defined(model.controls),
                                                  "base": base_hash(backend)})  # `ctrldiff export` checks it
    accelerator.wait_for_everyone()
    return model, backend
