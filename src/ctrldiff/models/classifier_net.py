"""The small CNN used for every classifier of images here: rewards p(y|x), monitors and the digit oracle."""

from __future__ import annotations

from torch import Tensor, nn


class SmallCNN(nn.Module):
    """3 conv + 2 linear layers on (B, C, H, W) images in [-1, 1]; `features` is the penultimate layer."""

    def __init__(self, num_classes: int, in_channels: int = 1, width: int = 32, feat_dim: int = 64):
        super().__init__()
        self.config = {"num_classes": num_classes, "in_channels": in_channels, "width": width,
                       "feat_dim": feat_dim}
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(),
            nn.Linear(8 * width, feat_dim), nn.SiLU(),
        )
        self.head = nn.Linear(feat_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))
