"""Every default in one commented place; presets are functions; overrides are dotted (`--set rl.lr_emb=0.02`)."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field

from .io import CtrlDiffError


@dataclass
class DataConfig:
    resolution: int = 16  # 16 (default, like USPS) or 28 (MNIST's own)
    heldout: int = 1000  # digits kept out of every fit; the evaluation's real reference
    split_seed: int = 0  # the train / held-out split is fixed by this
    pairs: int | None = None  # labelled training pairs per control (a subset drawn by `seed`); null = all 4,000


@dataclass
class SamplerConfig:
    steps: int = 20  # DDIM steps, the same in fine-tuning and evaluation
    eta: float = 1.0  # 1 = DDPM variance; the KL needs eta > 0


@dataclass
class PretrainConfig:
    steps: int = 8000  # optimiser steps of denoising score matching
    batch: int = 64
    lr: float = 1e-3  # AdamW, linear warm-up then constant
    warmup: int = 200
    ema: float = 0.999  # the shipped weights are the EMA
    p_uncond: float = 0.1  # digit dropped to the null class this often (CFG on c stays possible)
    channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    checkpoint_every: int = 500  # steps between checkpoints (--resume); also written at the first and last step


@dataclass
class ClassifierConfig:
    epochs: int = 15
    batch: int = 128
    lr: float = 2e-3
    val_frac: float = 0.2  # of the pairs, held back for temperature calibration
    noise: float = 0.1  # std of Gaussian pixel noise in training: without it CTRL hacked the reward (docs/tuning.md)
    shift: int = 1  # random translation, pixels (augmentation)
    width: int = 32  # channels of the CNN's first layer (x2 after); the penultimate layer has 2 x width features
    base_pairs: int = 20000  # oracle-labelled base samples added to the pairs of a control with a labeller (their
    # own cached bank, built once): they raised the target p_gamma's accuracy 0.810 -> 0.865 (docs/tuning.md)
    min_steps: int = 1000  # at least this many optimiser steps whatever the number of pairs: with epochs alone,
    # 100 pairs meant 15 steps (a barely trained classifier; docs/tuning.md, section min-steps)
    checkpoint_every: int = 100  # optimiser steps between checkpoints of each classifier (--resume)


LR_SCHEDULES = ("constant", "cosine")  # rl.lr_schedule (rl.finetune.lr_factor)
CHOICES = {"final_step": ("model", "base"), "lr_schedule": LR_SCHEDULES, "kl": ("sum", "mean"),
           "adapter": ("lora", "full"), "estimator": ("backprop", "adjoint")}  # string keys of `rl` and their values
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class RLConfig:
    controls: dict[str, float] = field(default_factory=lambda: {"compress4": 10.0})  # control -> gamma
    steps: int = 400  # optimiser steps; 400 of batch 16 (the samples of 200 of 32) ended 0.15-0.4 nats nearer the
    batch: int = 16  # target on two seeds, at 1-1.35x the wall-clock (docs/tuning.md, ctrl-tune); 800 of 8 were no
    # nearer, at 1.8x. (c, y) fresh each step
    lora_rank: int = 16  # 0 = embedding only; 16 costs what 4 does per step and ends ~1.1 nats nearer the target
    # (64: 0.4 nats more at 1.4x the step time; docs/tuning.md, ctrl-floor)
    lr_lora: float = 1e-2  # official SD: 1e-3 (compress4) / 3e-4 (multi); our small UNet tolerates more: 1e-2
    # ended 0.4-0.7 nats nearer the target than 3e-3 on two seeds at rank 16 (docs/tuning.md, ctrl-tune)
    lr_emb: float = 0.1  # the new embeddings learn faster (official: 1e-2); see docs/benchmarks.md
    weight_decay: float = 0.1
    lr_schedule: str = "cosine"  # both rates decay to zero over rl.steps; or "constant" (docs/tuning.md)
    warmup: int = 0  # both rates ramp up linearly over this many first steps; 40 of 400 ended no nearer the
    # target at lr 1e-2 and made 2e-2 trainable but no better (docs/tuning.md, warm-up)
    clip: float = 5.0  # grad-norm clip
    truncate: int | str | None = None  # None = full back-propagation; last-K steps (int) or "random" (the official
    # scheme): its biased gradient stalled log Z - J at 10-14 nats on the trusted requests where full back-propagation
    # reached 3-5 in 200 steps (docs/tuning.md, ctrl-tuning)
    checkpoint: bool = False  # gradient checkpointing (memory tool; ~50% slower on CPU)
    monitor_every: int = 25  # steps between evaluations of the independent monitor classifier; 0 = never
    checkpoint_every: int = 10  # steps between checkpoints (--resume; ~20 s of work at the default)
    kl: str = "sum"  # "sum" over dimensions (gamma is the exponent); "mean" = the official code's (gamma * d)
    final_step: str = "base"  # who takes the last, deterministic step, which the path KL cannot see: the frozen
    # "base" (closes the KL-free lever the 2-D study found; measured nearer the target on images at gamma 10) or
    # the fine-tuned "model" (docs/tuning.md, section final step)
    adapter: str = "lora"  # what trains besides the control embeddings: "lora" (rank lora_rank) or "full" (every
    # weight of a copy of the network, at rate lr_lora)
    estimator: str = "backprop"  # "backprop": the paper's back-propagation through the chain (Algorithm 2);
    # "adjoint": Adjoint Matching, a regression onto the lean adjoint (rl/adjoint.py; needs final_step "base")
    adjoint_steps: int | None = None  # "adjoint": the stochastic steps regressed per rollout, drawn at random; null = all
    adjoint_updates: int = 1  # "adjoint": optimiser updates per rollout, each on its share of the regressed steps


@dataclass
class TripletsConfig:
    """The CFG baseline: the augmented model fitted by denoising score matching on (x, c, y) triplets."""

    n: int | None = None  # triplets used (a seeded random subset); null = all 4,000 training digits
    steps: int = 2000  # optimiser steps (~0.07-0.1 s each at batch 64 on 2 CPU cores)
    batch: int = 64
    lora_rank: int = 4  # the adapter CTRL had when the bench ran (docs/benchmarks.md)
    lr_lora: float = 3e-3  # CTRL's rates when the bench ran; 1e-3 / 1e-2 for 1,000 steps reached 0.50
    lr_emb: float = 0.1  # accuracy at w = 2 against 0.67 for these (64 samples, docs/baselines.md)
    weight_decay: float = 0.0
    p_uncond: float = 0.15  # each y dropped to null this often (METHOD.md §6: ~0.1-0.2)
    checkpoint_every: int = 200  # steps between checkpoints (--resume)


@dataclass
class EvalConfig:
    per_class: int = 128  # samples per requested class (per joint class for several controls)
    guidance: float = 1.0  # weight w on y: eps(c, null) + w (eps(c, y) - eps(c, null)); 1 = no guidance
    batch: int = 256


@dataclass
class TargetConfig:
    """The target p_gamma itself, by importance sampling over a bank of base samples (ctrldiff/target.py)."""

    per_c: int = 2000  # base samples per condition c (20,000 for the digits: ~4 min on 2 cores, then cached)
    seed: int = 0  # the bank's own sampling seed (not `seed`: every run and seed reuses one bank)
    min_ess: float = 30.0  # cells (c, y) with a smaller effective sample size are flagged as not trustworthy
    bank: str | None = None  # a bank file; null = the cache (CTRLDIFF_CACHE/banks, keyed by base + sampler)
    meter: bool = True  # log log Z - J (nats to the optimum) during fine-tuning; needs the bank
    paths: int = 32  # evaluation: meter paths per request (c, y) for J, the path weights and log Z - J; 0 = none
    min_path_ess: float = 8.0  # a request whose path weights' ESS is below this (and the bank's below min_ess) is
    # flagged: its log Z, and so its gap, is a lower bound


@dataclass
class SDConfig:
    """The Stable Diffusion backend (docs/sd.md); on when `model` is set (`--model PATH`)."""

    model: str | None = None  # local diffusers pipeline folder (SD v1.5); null = the embedded digit model
    prompts: str | None = None  # prompt file, one per line (the c distribution); null = the 45 animals shipped
    guidance: float = 7.5  # text CFG scale (official 7.5; 1 = none); the unconditional branch is the empty prompt
    resolution: int | None = None  # image side in pixels; null = the UNet's own (512 for SD v1.5)
    dtype: str = "float32"  # frozen UNet/VAE/text encoder: "float16" / "bfloat16" halve their memory on a GPU
    mixed_precision: str = "no"  # accelerate's autocast in fine-tuning: "no", "fp16" or "bf16"
    accumulate: int = 1  # gradient accumulation: rollouts (of rl.batch, per process) per optimiser step
    pairs: int = 512  # base samples the oracle labels to fit each reward classifier (as many again: monitor)
    clip: str | None = None  # local CLIP folder (transformers, e.g. ViT-L/14): enables the aesthetic2 control
    aesthetic_predictor: str | None = None  # LAION aesthetic-predictor weights (safetensors) on that CLIP


@dataclass
class Config:
    name: str = "default"
    seed: int = 0
    device: str = "auto"  # where the embedded model's networks run: "auto" (a GPU if visible), "cpu" or "cuda"
    data: DataConfig = field(default_factory=DataConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    triplets: TripletsConfig = field(default_factory=TripletsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    sd: SDConfig = field(default_factory=SDConfig)
    model: str | None = None  # a local diffusers UNet2DModel pipeline folder as the base (`--model`); null = the digits

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --- presets ---------------------------------------------------------------------------------------------

def default() -> Config:
    """compress4 on 16x16 digits."""
    return Config()


def multi() -> Config:
    """The 2x2 multi-task thickness2 x compress2, each control from its own pair dataset."""
    cfg = Config(name="multi")
    cfg.rl.controls = {"thickness2": 10.0, "compress2": 10.0}
    return cfg


def res28() -> Config:
    """compress4 on 28x28 digits (slower; needs its own pre-trained base)."""
    cfg = Config(name="res28")
    cfg.data.resolution = 28
    return cfg


def tiny() -> Config:
    """Seconds-long settings for tests and smoke runs (not for results)."""
    cfg = Config(name="tiny")
    cfg.sampler.steps = 5
    cfg.pretrain.steps, cfg.pretrain.batch, cfg.pretrain.channels = 20, 16, [8, 16]
    cfg.classifier.epochs, cfg.classifier.min_steps = 1, 0
    cfg.rl.steps, cfg.rl.batch, cfg.rl.monitor_every, cfg.rl.lora_rank = 3, 8, 2, 4
    cfg.triplets.steps, cfg.triplets.batch = 3, 8
    cfg.eval.per_class = 4
    cfg.target.per_c, cfg.classifier.base_pairs = 20, 40
    cfg.target.min_ess = 1.0  # a 20-sample bank: every request counts (no cell reaches 30)
    cfg.target.paths, cfg.target.min_path_ess = 2, 1.0  # two meter paths per request
    return cfg


# The official code's KL is a per-dimension mean weighted 0.01 against a reward weighted 0.1: with the KL
# summed over the d = 4 x 64 x 64 latent dimensions of SD v1.5 at 512 px, that is gamma = 10 d (METHOD.md §3).
SD_OFFICIAL_GAMMA = 10.0 * 4 * 64 * 64


def sd_compress4() -> Config:
    """Stable Diffusion, 4 JPEG-size classes, mirroring the official configuration: DDIM 50 steps, eta = 1,
    text CFG 7.5, LoRA rank 4, lr 1e-3 (LoRA) / 1e-2 (embeddings), randomised truncation, checkpointing on."""
    cfg = Config(name="sd_compress4")
    cfg.sampler.steps, cfg.sampler.eta = 50, 1.0
    cfg.rl.controls = {"jpeg4": SD_OFFICIAL_GAMMA}
    cfg.rl.lora_rank, cfg.rl.lr_lora, cfg.rl.lr_emb = 4, 1e-3, 1e-2
    cfg.rl.batch, cfg.rl.steps, cfg.rl.monitor_every = 4, 200, 50  # batch per GPU (x sd.accumulate)
    cfg.rl.truncate, cfg.rl.checkpoint, cfg.rl.lr_schedule = "random", True, "constant"
    cfg.classifier.epochs, cfg.classifier.batch, cfg.classifier.shift, cfg.classifier.base_pairs = 10, 32, 0, 0
    cfg.classifier.min_steps = 0  # the official head fit: 10 epochs on the 512 labelled samples
    cfg.eval.per_class, cfg.eval.batch = 128, 16
    cfg.target.meter = False  # a bank of SD samples per prompt is hours of GPU time: build it on purpose
    return cfg


def sd_multi() -> Config:
    """Stable Diffusion, the 2x2 task aesthetic2 x jpeg2 (needs sd.clip and sd.aesthetic_predictor); LoRA lr
    3e-4 as in the official multi-task run, one gamma per control (the official code weights compressibility
    x2 inside one joint table; here each control has its own table and gamma)."""
    cfg = sd_compress4()
    cfg.name = "sd_multi"
    cfg.rl.controls = {"aesthetic2": SD_OFFICIAL_GAMMA, "jpeg2": SD_OFFICIAL_GAMMA}
    cfg.rl.lr_lora = 3e-4
    return cfg


def sd_tiny() -> Config:
    """Seconds-long SD settings for tests on a tiny pipeline (not for results)."""
    cfg = sd_compress4()
    cfg.name = "sd_tiny"
    cfg.sampler.steps = 3
    cfg.rl.controls = {"jpeg4": 1.0}
    cfg.rl.steps, cfg.rl.batch, cfg.rl.monitor_every, cfg.rl.checkpoint = 1, 2, 1000, False
    cfg.classifier.epochs, cfg.classifier.batch = 1, 8
    cfg.sd.pairs = 16
    cfg.eval.per_class, cfg.eval.batch = 1, 8
    return cfg


PRESETS = {"default": default, "multi": multi, "res28": res28, "tiny": tiny, "sd_compress4": sd_compress4,
           "sd_multi": sd_multi, "sd_tiny": sd_tiny}


def preset(name: str) -> Config:
    if name not in PRESETS:
        raise CtrlDiffError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name]()


def _parse(value: str):
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Return a copy of cfg with `section.key=value` overrides; values are JSON (bare strings allowed)."""
    cfg = copy.deepcopy(cfg)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise CtrlDiffError(f"override {item!r} is not of the form key=value")
        *path, last = key.split(".")
        obj = cfg
        for part in path:
            if dataclasses.is_dataclass(obj) and part in {f.name for f in dataclasses.fields(obj)}:
                obj = getattr(obj, part)
            elif isinstance(obj, dict) and part in obj:
                obj = obj[part]
            else:
                raise CtrlDiffError(f"unknown config key {key!r}; choose from {_keys(obj)}")
        value = _parse(raw)
        if isinstance(obj, dict):  # rl.controls.<name> = gamma
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise CtrlDiffError(f"{key}={raw!r}: gamma must be a number >= 0")
            obj[last] = float(value)
        elif dataclasses.is_dataclass(obj) and last in {f.name for f in dataclasses.fields(obj)}:
            old = getattr(obj, last)
            if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if key == "device" and value not in DEVICES:
                raise CtrlDiffError(f"{key}={raw!r}; choose from {DEVICES}")
            if last in CHOICES and value not in CHOICES[last]:
                raise CtrlDiffError(f"{key}={raw!r}; choose from {list(CHOICES[last])}")
            if last == "truncate":
                if not (value is None or value == "random" or (type(value) is int and value >= 1)):
                    raise CtrlDiffError(f"{key}={raw!r}; choose null, an int K >= 1 or \"random\"")
            elif last in ("n", "pairs", "adjoint_steps"):
                if not (value is None or (type(value) is int and value >= 1)):
                    raise CtrlDiffError(f"{key}={raw!r}; choose null (all) or an int n >= 1")
            elif old is not None and (not isinstance(value, type(old)) or isinstance(value, bool) != isinstance(old, bool)):
                raise CtrlDiffError(f"{key}={raw!r} has type {type(value).__name__}, expected {type(old).__name__}")
            elif old is None and value is not None:  # a null default: the annotation says what it may hold
                want = {"str | None": str, "int | None": int}.get(_field_type(obj, last))
                if want is not None and type(value) is not want:
                    raise CtrlDiffError(f"{key}={raw!r} has type {type(value).__name__}, expected {want.__name__} "
                                        "or null")
            _check_range(key, value, raw)
            setattr(obj, last, value)
        else:
            raise CtrlDiffError(f"unknown config key {key!r}; choose from {_keys(obj)}")
    return cfg


# Allowed (low, high) of numeric keys, inclusive (None: unbounded); each one a crash that fuzzing found
# (docs/reliability.md). Every float must also be finite: JSON's NaN and Infinity parse as floats. Learning
# rates stop at 10: rl.lr_emb=3.4e37 (fuzzing) overflowed Adam's float32 step inside torch.
LIMITS = {
    "seed": (0, 2**31 - 2), "data.heldout": (10, 4990), "data.split_seed": (0, 2**31 - 1),
    "sampler.steps": (1, 1000), "sampler.eta": (0, 1),
    "pretrain.steps": (1, None), "pretrain.batch": (1, None), "pretrain.lr": (0, 10), "pretrain.warmup": (1, None),
    "pretrain.ema": (0, 1), "pretrain.p_uncond": (0, 1), "pretrain.checkpoint_every": (1, None),
    "classifier.epochs": (1, None), "classifier.min_steps": (0, None), "classifier.batch": (1, None), "classifier.lr": (0, 10),
    "classifier.val_frac": (0.01, 0.99), "classifier.noise": (0, None), "classifier.shift": (0, 8),
    "classifier.checkpoint_every": (1, None), "classifier.width": (8, 512), "classifier.base_pairs": (0, None),
    "rl.steps": (1, None), "rl.batch": (1, None), "rl.lora_rank": (0, None), "rl.lr_lora": (0, 10),
    "rl.lr_emb": (0, 10), "rl.warmup": (0, None), "rl.weight_decay": (0, None), "rl.clip": (0, None), "rl.monitor_every": (0, None),
    "rl.checkpoint_every": (1, None), "rl.adjoint_updates": (1, None),
    "triplets.steps": (1, None), "triplets.batch": (1, None), "triplets.lora_rank": (0, None),
    "triplets.lr_lora": (0, 10), "triplets.lr_emb": (0, 10), "triplets.weight_decay": (0, None),
    "triplets.p_uncond": (0, 1), "triplets.checkpoint_every": (1, None),
    "eval.per_class": (1, None), "eval.batch": (1, None),
    "target.per_c": (1, None), "target.seed": (0, 2**31 - 1), "target.min_ess": (1, None),
    "target.paths": (0, None), "target.min_path_ess": (1, None),
}


def _check_range(key: str, value, raw: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise CtrlDiffError(f"{key}={raw!r}: must be a finite number")
    lo, hi = LIMITS.get(key, (None, None))
    if isinstance(value, (int, float)) and ((lo is not None and value < lo) or (hi is not None and value > hi)):
        raise CtrlDiffError(f"{key}={raw!r}: choose a value in {lo}..{'inf' if hi is None else hi}")
    if key == "pretrain.channels" and not (value and all(type(c) is int and c > 0 and c % 8 == 0 for c in value)):
        raise CtrlDiffError(f"{key}={raw!r}: choose a non-empty list of positive multiples of 8 (GroupNorm(8))")


def _field_type(obj, name: str) -> str:
    return next(str(f.type) for f in dataclasses.fields(obj) if f.name == name)


def _keys(obj) -> list[str]:
    if dataclasses.is_dataclass(obj):
        return [f.name for f in dataclasses.fields(obj)]
    return sorted(obj) if isinstance(obj, dict) else []


# Keys added after runs were written with the code before them, and the value that reproduces those runs: a run
# that lacks one had it (`config_diff`, `from_dict`), so a new option does not invalidate resuming older runs.
ADDED = {"rl.warmup": 0}


def config_diff(old: dict, new: dict, prefix: str = "") -> str | None:
    """The first key where two `Config.to_dict()`s differ, as 'key: run X, now Y' (None if equal); a key `old`
    lacks counts as its `ADDED` value; `checkpoint_every` may change on resume: it moves no number."""
    for key in sorted(set(old) | set(new), key=lambda k: (k != "name", k)):  # the preset's name first
        name = f"{prefix}{key}"
        a, b = old[key] if key in old else ADDED.get(name), new.get(key)
        if key == "checkpoint_every":
            continue
        if isinstance(a, dict) and isinstance(b, dict) and not name.endswith("controls"):
            found = config_diff(a, b, name + ".")
            if found:
                return found
        elif a != b:
            return f"{name}: run {json.dumps(a)}, now {json.dumps(b)}"
    return None


def from_dict(d: dict) -> Config:
    """Inverse of `Config.to_dict` (unknown keys raise)."""
    cfg = Config()
    for section, values in d.items():
        if isinstance(values, dict) and dataclasses.is_dataclass(getattr(cfg, section, None)):
            apply = [f"{section}.{k}={json.dumps(v)}" for k, v in values.items() if not isinstance(v, dict)]
            cfg = apply_overrides(cfg, apply)
            for k, v in values.items():
                if isinstance(v, dict):
                    setattr(getattr(cfg, section), k, dict(v))
        else:
            cfg = apply_overrides(cfg, [f"{section}={json.dumps(values)}"])
    for name, value in ADDED.items():  # what a config written before the key existed had
        section, key = name.split(".")
        if key not in d.get(section, {}):
            setattr(getattr(cfg, section), key, value)
    return cfg
