"""Backends: the frozen base model behind the Backend contract (net, schedule, shape, emb_dim, num_c,
call(net, x_t, t, c, emb), denoiser, decode, classifier_input). The embedded digits, any local diffusers
UNet2DModel pipeline (`unet2d`), Stable Diffusion (`sd`); the last two import diffusers lazily."""

from pathlib import Path

from .pixels import PixelBackend, load_base

__all__ = ["PixelBackend", "backend_for", "default_device", "load_base", "resolve_device", "sd_backend"]


def default_device():
    """This process's accelerator device (cuda:<local rank> under `accelerate launch`), else the CPU."""
    try:
        from accelerate import PartialState

        return PartialState().device
    except ImportError:
        return "cpu"


def resolve_device(device: str) -> str:
    """`device`: "auto" is "cuda" where a GPU is visible, else "cpu"; asking for cuda without one is an error."""
    import torch

    from ..io import CtrlDiffError

    cuda = torch.cuda.is_available()
    if device == "cuda" and not cuda:
        raise CtrlDiffError("device='cuda' but torch sees no GPU here; choose 'auto' or 'cpu'")
    return ("cuda" if cuda else "cpu") if device == "auto" else device


def sd_backend(cfg, device=None):
    """The SD backend of `cfg.sd` on `device` (default: this process's accelerator device, else the CPU)."""
    from .sd import load_sd, read_prompts

    device = default_device() if device is None else device
    return load_sd(cfg.sd.model, read_prompts(cfg.sd.prompts), cfg.sd.guidance, cfg.sd.resolution, device,
                   cfg.sd.dtype)


def backend_for(cfg, base: Path | None = None):
    """The base a config names: Stable Diffusion (`sd.model`, docs/sd.md), a UNet2DModel pipeline (`model`), or
    the embedded digit model (`base`: another checkpoint of it)."""
    if cfg.sd.model is not None:
        return sd_backend(cfg)
    if cfg.model is not None:
        from .unet2d import load_unet2d

        return load_unet2d(cfg.model, default_device())
    return load_base(base, cfg.data.resolution, resolve_device(cfg.device))
