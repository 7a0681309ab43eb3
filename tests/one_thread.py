"""Bit-identical runs need one summation order: torch on one thread inside the block, its count restored after."""

from contextlib import contextmanager

import torch


@contextmanager
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
