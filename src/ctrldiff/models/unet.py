"""A small class-conditional UNet for the embedded 16x16 / 28x28 digits.

Hand-written rather than diffusers' UNet2DModel: at equal size (a 0.46 M-parameter probe of this design,
channels (32, 64, 64), no attention) it trained ~2x faster on a 2-core CPU (0.13-0.22 s vs ~2x that per batch
of 64 at 16 px, ENVIRONMENT.md), and CPU time is what bounds every experiment here. The shipped base, with its
digit embedding, has 0.62 M parameters. The only extension point CTRL needs is
`emb`, an extra vector added to the timestep embedding (METHOD.md §2, the augmented model).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of integer timesteps (Transformer / DDPM style)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=1)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, emb_dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(8, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, c_out)
        self.norm2 = nn.GroupNorm(8, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb_proj(emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class SmallUNet(nn.Module):
    """eps-predictor `net(x_t, t, c, emb=None)`; c in 0..num_classes, where num_classes is the null class."""

    def __init__(self, in_channels: int = 1, channels: tuple[int, ...] = (32, 64, 64), num_classes: int = 10):
        super().__init__()
        self.config = {"in_channels": in_channels, "channels": list(channels), "num_classes": num_classes}
        self.num_classes = num_classes
        self.emb_dim = emb_dim = 4 * channels[0]
        self.time_mlp = nn.Sequential(nn.Linear(channels[0], emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_emb = nn.Embedding(num_classes + 1, emb_dim)
        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.down, self.up = nn.ModuleList(), nn.ModuleList()
        c_prev, skips = channels[0], []
        for i, ch in enumerate(channels):  # one ResBlock per level, then downsample (not after the last)
            self.down.append(ResBlock(c_prev, ch, emb_dim))
            skips.append(ch)
            c_prev = ch
        self.downsample = nn.ModuleList(nn.Conv2d(ch, ch, 3, stride=2, padding=1) for ch in channels[:-1])
        self.mid = ResBlock(c_prev, c_prev, emb_dim)
        for ch in reversed(channels):
            self.up.append(ResBlock(c_prev + skips.pop(), ch, emb_dim))
            c_prev = ch
        self.out_norm = nn.GroupNorm(8, c_prev)
        self.conv_out = nn.Conv2d(c_prev, in_channels, 3, padding=1)

    def forward(self, x: Tensor, t: Tensor, c: Tensor | None, emb: Tensor | None = None) -> Tensor:
        if c is None:
            c = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
        e = self.time_mlp(timestep_embedding(t, self.conv_in.out_channels)) + self.class_emb(c)
        if emb is not None:
            e = e + emb
        e = F.silu(e)
        h = self.conv_in(x)
        hs = []
        for i, block in enumerate(self.down):
            h = block(h, e)
            hs.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
        h = self.mid(h, e)
        for i, block in enumerate(self.up):
            skip = hs.pop()
            if h.shape[-1] != skip.shape[-1]:
                h = F.interpolate(h, size=skip.shape[-2:], mode="nearest")
            h = block(torch.cat([h, skip], dim=1), e)
        return self.conv_out(F.silu(self.out_norm(h)))
