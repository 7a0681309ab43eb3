from .pixels import PixelBackend, load_base

__all__ = ["PixelBackend", "load_base"]
