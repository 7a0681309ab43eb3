from .classifier_net import SmallCNN
from .unet import SmallUNet

__all__ = ["SmallCNN", "SmallUNet"]
