"""Any local diffusers UNet2DModel pipeline (DDPMPipeline / DDIMPipeline, or a folder with unet/ and scheduler/)
as a Backend: pixel-space eps-prediction, unconditional or class-conditional (`num_class_embeds`, c = class).

Imports diffusers only inside functions. The control embedding goes on the UNet's time embedding through the
SD backend's hook (`added_to_time_embedding`), LoRA on its attention projections and ResNet layers; like SD,
the chain stays on the CPU and the UNet runs on `backend.device`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..contracts import Cond
from ..io import CtrlDiffError
from ..schedule import Schedule
from .sd import added_to_time_embedding

PIPELINES = ("DDPMPipeline", "DDIMPipeline")
# LoRA on every attention projection and on the ResNet blocks' convolutions and time-embedding projections
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "time_emb_proj"]
PREDICTIONS = ("epsilon", "v_prediction")  # "sample" (x0-prediction) is refused: eps from it divides by
# sqrt(1 - abar_t), which is ~0.01 at the first timestep


@dataclass(eq=False)
class UNet2DBackend:
    """A Backend on a diffusers UNet2DModel: images are the latents (in [-1, 1]); v-prediction is turned into
    eps at every call (eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t), so the sampler only ever sees eps.

    Unconditional models have num_c = 1 (c is ignored); class-conditional ones num_c = num_class_embeds and no
    null class (`has_null_c` is False: a c must be given)."""

    net: nn.Module  # UNet2DModel, frozen
    schedule: Schedule
    prediction_type: str = "epsilon"
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    share_weights: bool = True  # ControlledDenoiser shares the frozen tensors instead of copying them
    has_null_c: ClassVar[bool] = False  # diffusers' class table has no "no class" row

    def __post_init__(self):
        self.net.eval().requires_grad_(False)
        abar = self.schedule.alphas_cumprod
        self._v_coef = (abar.sqrt().float(), (1 - abar).sqrt().float())

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @property
    def conditional(self) -> bool:
        return self.net.config.num_class_embeds is not None

    @property
    def num_c(self) -> int:
        return self.net.config.num_class_embeds if self.conditional else 1

    @property
    def shape(self) -> tuple[int, int, int]:
        size = self.net.config.sample_size
        h, w = (size, size) if isinstance(size, int) else size
        return (self.net.config.in_channels, h, w)

    @property
    def emb_dim(self) -> int:
        return self.net.time_embedding.linear_2.out_features

    def to(self, device) -> UNet2DBackend:
        self.net.to(device)
        return self

    def call(self, net, x_t: Tensor, t: Tensor, c: Tensor | None, emb: Tensor | None = None) -> Tensor:
        """eps of `net` (the base UNet or a copy carrying LoRA) with `emb` added to its time embedding."""
        labels = None
        if self.conditional:
            if c is None or bool((c >= self.num_c).any()):
                raise CtrlDiffError(f"this class-conditional model needs a class c in 0..{self.num_c - 1}")
            labels = c.to(self.device)
        with added_to_time_embedding(net, emb):
            out = net(x_t.to(self.device), t.to(self.device), class_labels=labels).sample.to(x_t.device, x_t.dtype)
        if self.prediction_type == "v_prediction":
            a, s = (coef[t.long().cpu()].to(x_t.device, x_t.dtype).view(-1, 1, 1, 1) for coef in self._v_coef)
            out = a * out + s * x_t
        return out

    def denoiser(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        """The pre-trained model as a Denoiser; it ignores cond.y."""
        return self.call(self.net, x_t, t, cond.c)

    def decode(self, x: Tensor) -> Tensor:
        """Images in [0, 1]: the clamp every saved image undergoes."""
        return ((x + 1) / 2).clamp(0, 1)

    def classifier_input(self, x0: Tensor) -> Tensor:
        return self.decode(x0) * 2 - 1


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CtrlDiffError(f"cannot read {path}: {str(e).splitlines()[0]}") from None


def model_kind(path: str | Path) -> str:
    """"unet2d" for a UNet2DModel pipeline folder, "sd" for anything else (the SD loader names what is wrong)."""
    path = Path(path)
    index = path / "model_index.json"
    if index.is_file():
        name = _json(index).get("_class_name")
        if name in PIPELINES:
            return "unet2d"
        if not str(name).startswith("StableDiffusion"):
            raise CtrlDiffError(f"--model {path}: model_index.json names {name!r}, not a UNet2DModel pipeline; "
                                f"choose a folder of {list(PIPELINES)} or a Stable Diffusion pipeline")
        return "sd"
    return "unet2d" if (path / "unet").is_dir() and (path / "scheduler").is_dir() else "sd"


def _check_folder(path: Path) -> None:
    for part in ("unet", "scheduler"):
        if not (path / part).is_dir():
            raise CtrlDiffError(f"--model {path} lacks {part}/; a UNet2DModel pipeline has unet/ and scheduler/")
    unet = _json(path / "unet" / "config.json") if (path / "unet" / "config.json").is_file() else {}
    if unet.get("_class_name") != "UNet2DModel":
        raise CtrlDiffError(f"--model {path}: unet/ holds {unet.get('_class_name')!r}, not a UNet2DModel")
    if not list((path / "unet").glob("*.safetensors")):
        found = sorted(p.name for p in (path / "unet").iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        what = f"only pickle weights {found}" if found else "no weights"
        raise CtrlDiffError(f"--model {path}: unet/ has {what}; ctrldiff reads safetensors only (never unpickles): "
                            "re-save with save_pretrained(safe_serialization=True)")
    if unet.get("time_embedding_type", "positional") != "positional":
        raise CtrlDiffError(f"--model {path}: time_embedding_type={unet['time_embedding_type']!r} (a score-SDE "
                            "model); only positional (DDPM/DDIM) UNets are supported")
    if unet.get("class_embed_type") is not None:
        raise CtrlDiffError(f"--model {path}: class_embed_type={unet['class_embed_type']!r}; only the plain "
                            "class table (num_class_embeds) is supported")
    if unet.get("out_channels", 3) != unet.get("in_channels", 3):
        raise CtrlDiffError(f"--model {path}: out_channels != in_channels (learned variance); only eps or v "
                            "outputs of the image's shape are supported")


def load_unet2d(path: str | Path, device: str | torch.device = "cpu") -> UNet2DBackend:
    """Load a local UNet2DModel pipeline folder (never a download; safetensors only) with its scheduler's betas
    and prediction type; the scheduler's sampling settings (clip_sample, spacing) are not used: ctrldiff's
    sampler is its own (trailing DDIM, unclipped chain, images clamped when decoded)."""
    path = Path(path)
    if not path.is_dir():
        raise CtrlDiffError(f"--model {path}: no such folder (expected a local diffusers pipeline folder)")
    _check_folder(path)
    from diffusers import DDPMScheduler, UNet2DModel

    try:
        unet = UNet2DModel.from_pretrained(path, subfolder="unet", local_files_only=True, use_safetensors=True)
        scheduler = DDPMScheduler.from_config(_json(path / "scheduler" / "scheduler_config.json"))
    except (OSError, ValueError, KeyError, TypeError, NotImplementedError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CtrlDiffError(f"cannot load the UNet2DModel pipeline in {path}: {first}") from None
    prediction = scheduler.config.prediction_type
    if prediction not in PREDICTIONS:
        raise CtrlDiffError(f"{path}: prediction_type={prediction!r}; choose a model predicting {list(PREDICTIONS)}")
    return UNet2DBackend(unet, Schedule.from_betas(scheduler.betas), prediction).to(device)
