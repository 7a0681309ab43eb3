"""The embedded backend: a small class-conditional UNet on 16x16 (or 28x28) digits, pixels = latents."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from torch import Tensor

from ..contracts import Cond
from ..io import CtrlDiffError, load_state, load_weights
from ..models import SmallUNet
from ..schedule import Schedule
from ..tasks.mnist import NUM_DIGITS, to_unit


@dataclass
class PixelBackend:
    """A Backend: the frozen pre-trained eps-network, how to call it, the latent shape and `decode`."""

    net: SmallUNet
    schedule: Schedule
    resolution: int
    device: str = "cpu"  # where the networks run; every other tensor (chains, rewards, labels) stays on the CPU

    def __post_init__(self):
        self.net.eval().requires_grad_(False).to(self.device)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (1, self.resolution, self.resolution)

    @property
    def emb_dim(self) -> int:
        return self.net.emb_dim

    @property
    def num_c(self) -> int:
        """Number of values of the base model's own condition c (digits); c = num_c is its null class."""
        return NUM_DIGITS

    def call(self, net, x_t: Tensor, t: Tensor, c: Tensor | None, emb: Tensor | None = None) -> Tensor:
        """Run `net` (the base network, or a copy carrying adapters) with `emb` added to its time embedding, on
        `device`: the inputs go there and eps comes back (differentiably) to x_t's device. The small model's
        convolutions are the only heavy work, so this one boundary is all a GPU needs."""
        if self.device == "cpu":
            return net(x_t, t, c, emb)
        on = [None if v is None else v.to(self.device) for v in (x_t, t, c, emb)]
        return net(*on).to(x_t.device)

    def denoiser(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        """The pre-trained model as a Denoiser; it ignores cond.y (it has never seen a control)."""
        return self.call(self.net, x_t, t, cond.c)

    def decode(self, x: Tensor) -> Tensor:
        """Latents -> images in [0, 1] (here: the clamp every saved image undergoes)."""
        return to_unit(x)

    def classifier_input(self, x0: Tensor) -> Tensor:
        """What every classifier reads: the decoded image in [-1, 1], clamped like every saved image (so a
        reward cannot come from out-of-range pixels that evaluation clips away; ENVIRONMENT.md)."""
        return self.decode(x0) * 2 - 1


def asset_path(name: str) -> Path:
    return Path(str(resources.files("ctrldiff") / "assets" / name))


def base_checkpoint(resolution: int) -> Path:
    return asset_path(f"base{resolution}.safetensors")


def load_base(path: str | Path | None = None, resolution: int = 16, device: str = "cpu") -> PixelBackend:
    """Load a pre-trained base (default: the checkpoint shipped in the package for this resolution) onto `device`."""
    path = Path(path) if path is not None else base_checkpoint(resolution)
    if not path.exists():
        raise CtrlDiffError(f"missing base checkpoint {path}; train one with `ctrldiff pretrain`")
    state, meta = load_weights(path)
    if meta.get("kind") != "base":
        raise CtrlDiffError(f"{path} is not a base-model checkpoint (kind={meta.get('kind')!r})")
    if meta["resolution"] != resolution:
        raise CtrlDiffError(f"{path} was trained at resolution {meta['resolution']}, the config asks {resolution}")
    net = SmallUNet(**meta["model"])
    load_state(net, state, path)
    return PixelBackend(net, Schedule.linear(), resolution, device)
