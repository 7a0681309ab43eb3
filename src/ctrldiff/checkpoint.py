"""Training checkpoints shared by every loop (pretrain, classifiers, CTRL, CFG): `--resume` continues bit-for-bit.

One safetensors file per loop holds its tensors (weights, optimiser moments, RNG states); everything else
(step, scheduler, optimiser hyper-parameters, the resolved config, the metrics.jsonl length) is JSON in the
same file's header, so a single atomic rename updates all of it together. Nothing is pickled.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from .config import config_diff
from .io import CtrlDiffError, load_weights, save_weights


class Trainable:
    """The state of a module's trainable parameters only (a LoRA adapter needs no copy of the frozen base)."""

    def __init__(self, module: nn.Module):
        self.params = {n: p for n, p in module.named_parameters() if p.requires_grad}

    def state_dict(self) -> dict[str, Tensor]:
        return {n: p.detach() for n, p in self.params.items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(state[n])


def _encode(obj, tensors: dict, key: str):
    """A JSON tree of `obj` with each tensor replaced by {"__tensor__": name} and stored in `tensors`."""
    if isinstance(obj, Tensor):
        tensors[key] = obj.detach().cpu().clone()  # clone: safetensors refuses tensors that share storage
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _encode(v, tensors, f"{key}.{k}") for k, v in obj.items()}
        # the optimiser's state is keyed by int; JSON would turn the keys into strings and torch would drop them
        return {"__items__": [[k, _encode(v, tensors, f"{key}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [_encode(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint {type(obj).__name__} at {key}")


def _decode(tree, tensors: dict):
    if isinstance(tree, dict):
        if "__tensor__" in tree:
            return tensors[tree["__tensor__"]]
        if "__items__" in tree:
            return {k: _decode(v, tensors) for k, v in tree["__items__"]}
        return {k: _decode(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_decode(v, tensors) for v in tree]
    return tree


def rng_state(generators: dict[str, torch.Generator]) -> dict:
    """Every random state a loop draws from: its generators and torch's global CPU (and CUDA) RNG. numpy's and
    Python's RNGs are left out: ctrldiff never draws from them and never seeds them, so no run depends on them."""
    state = {f"gen.{k}": g.get_state() for k, g in generators.items()}
    state["torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, generators: dict[str, torch.Generator]) -> None:
    for k, g in generators.items():
        g.set_state(state[f"gen.{k}"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    """Periodic checkpoints of one training loop, written atomically to `path`; `start` resumes from one.

    A checkpoint is written at step 0, every `every` steps and at the last step; the one at step 0 records
    where this loop's records begin in metrics.jsonl, so a resumed run never duplicates a record.
    path None: no checkpoints (a library call without a run folder); the loop code stays the same."""

    def __init__(self, path: str | Path | None, config: dict, every: int, metrics: Path | None = None):
        self.path, self.config, self.every, self.metrics = path and Path(path), config, every, metrics
        self.objects: dict = {}
        self.generators: dict[str, torch.Generator] = {}
        self.total, self.t0, self.saved = 0, time.time(), None

    def start(self, total: int, objects: dict, generators: dict[str, torch.Generator]) -> tuple[int, dict]:
        """Bind the loop's state (objects with state_dict/load_state_dict, generators); load the checkpoint if
        there is one. Returns (first step to run, the `extra` saved with it; {} on a fresh start)."""
        self.total, self.objects, self.generators = total, objects, generators
        if self.path is None or not self.path.exists():
            self.t0 = time.time()
            self.save(0, {})
            return 0, {}
        tensors, meta = load_weights(self.path)
        if meta.get("kind") != "checkpoint":
            raise CtrlDiffError(f"{self.path} is not a training checkpoint (kind={meta.get('kind')!r})")
        key = config_diff(meta.get("config", {}), self.config)
        if key is not None:
            raise CtrlDiffError(f"checkpoint {self.path} was written with a different config ({key}); "
                                f"resume with the run's --preset and --set")
        if meta.get("total") != total:
            raise CtrlDiffError(f"checkpoint {self.path} is for {meta.get('total')} steps, this run has {total}")
        try:
            state = _decode(meta["state"], tensors)
            for name, obj in objects.items():
                obj.load_state_dict(state[name])
            set_rng_state(state["rng"], generators)
        except (KeyError, ValueError, RuntimeError, TypeError) as e:
            raise CtrlDiffError(f"checkpoint {self.path} does not match this run: {str(e).splitlines()[0]}") from None
        metrics_bytes = meta.get("metrics_bytes", 0)
        if meta["step"] < total and self.metrics is not None and self.metrics.exists() \
                and self.metrics.stat().st_size > metrics_bytes:
            with open(self.metrics, "r+b") as f:  # drop records logged after this checkpoint: they are re-made
                f.truncate(metrics_bytes)
        self.t0, self.saved = time.time() - meta["seconds"], meta["step"]
        return meta["step"], state["extra"]

    def seconds(self) -> float:
        """Training time so far, carried across a resume."""
        return time.time() - self.t0

    def step(self, step: int, extra: dict) -> None:
        """Call after step `step` - 1 completed (its records logged): saves every `every` steps and at the end."""
        if step % self.every == 0 or step == self.total:
            self.save(step, extra)

    def save(self, step: int, extra: dict) -> None:
        if self.path is None:
            return
        tensors: dict = {}
        state = {name: obj.state_dict() for name, obj in self.objects.items()}
        state.update(rng=rng_state(self.generators), extra=extra)
        tree = _encode(state, tensors, "s")
        size = self.metrics.stat().st_size if self.metrics is not None and self.metrics.exists() else 0
        save_weights(self.path, tensors, {"kind": "checkpoint", "step": step, "total": self.total,
                                          "seconds": self.seconds(), "metrics_bytes": size,
                                          "config": self.config, "state": tree})
        self.saved = step


def grad_norm(params) -> float:
    """The global L2 norm of the gradients (what clip_grad_norm_ reports), without touching them."""
    grads = [p.grad for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item() if grads else 0.0


def check_finite(step: int, loss: float, norm: float, ckpt: Checkpointer | None = None) -> None:
    """Stop on a non-finite loss or gradient before the optimiser step, so no bad state reaches a checkpoint."""
    if math.isfinite(loss) and math.isfinite(norm):
        return
    kept = "" if ckpt is None or ckpt.path is None else \
        f"; the last good checkpoint (step {ckpt.saved}) is kept in {ckpt.path}"
    raise CtrlDiffError(f"non-finite loss or gradient at step {step} (loss={loss}, grad norm={norm}){kept}; "
                        f"lower the learning rates or gamma")
