import os

import pytest
import torch
from hypothesis import settings
from torch import nn

from ctrldiff.backends.pixels import PixelBackend
from ctrldiff.models import SmallUNet
from ctrldiff.schedule import Schedule

# The fuzz tests draw the same examples on every run (CI stays reproducible); HYPOTHESIS_PROFILE=explore draws
# fresh ones to search for new failures (docs/reliability.md).
settings.register_profile("seeded", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "seeded"))


class GaussianBase(nn.Module):
    """The exact eps-predictor for N(0, s^2 I) data, sqrt(1 - abar) x_t / (abar s^2 + 1 - abar), plus a small
    seeded UNet: a fixed, sensible base in milliseconds. CTRL's maths needs a base, not a good one."""

    def __init__(self, schedule: Schedule, s: float = 0.5):
        super().__init__()
        torch.manual_seed(0)
        self.unet = SmallUNet(channels=(8, 16), num_classes=10)
        self.emb_dim = self.unet.emb_dim
        a = schedule.alphas_cumprod.float()
        self.register_buffer("gain", (1 - a).sqrt() / (a * s**2 + 1 - a))
        self.shift = nn.Linear(self.emb_dim, 1, bias=False)  # lets a control embedding move the whole image coherently

    def forward(self, x, t, c, emb=None):
        eps = self.gain[t].view(-1, 1, 1, 1) * x + self.unet(x, t, c, emb)
        return eps if emb is None else eps + self.shift(emb)[:, :, None, None]


@pytest.fixture
def tiny_backend() -> PixelBackend:
    schedule = Schedule.linear()
    return PixelBackend(GaussianBase(schedule), schedule, 8)
