"""Step 2 of CTRL: the augmented model g(t, c, y, x) (METHOD.md §2).

The frozen pre-trained network plus, for each new control, an embedding table with K+1 rows added to the
timestep embedding (all rows zero at init; row K is "null" and stays zero), plus LoRA through peft (or, with
adapter="full", every weight of a copy of the network trainable). At step 0 the augmented model is the
pre-trained one exactly.
"""

from __future__ import annotations

import copy

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from torch import Tensor, nn

from ..contracts import Cond, Denoiser
from ..io import CtrlDiffError, load_weights, save_weights

LORA_TARGETS = ["conv1", "conv2", "emb_proj"]  # the ResBlocks' convolutions and embedding projections
FINAL_STEPS = ("model", "base")  # who takes the last, deterministic step (see `sampling.sample`'s `final`)
ADAPTERS = ("lora", "full")  # what trains besides the control embeddings: LoRA factors, or every network weight


def frozen_copy(net: nn.Module, share: bool = False) -> nn.Module:
    """A frozen copy of the base network to carry the adapters. share: copy the modules but keep the base's own
    parameter and buffer tensors (deepcopy's memo), so a large base (SD's 860M-parameter UNet) is not held twice;
    safe because they are frozen, and `merge_lora` gives the layers it changes their own weights first."""
    memo = {id(v): v for v in [*net.parameters(), *net.buffers()]} if share else {}
    return copy.deepcopy(net, memo).requires_grad_(False)


def _zero_null_row(grad: Tensor) -> Tensor:
    grad = grad.clone()
    grad[-1] = 0
    return grad


class ControlledDenoiser(nn.Module):
    """The augmented model as a Denoiser: `model(x_t, t, Cond(c, {name: y}))`; a missing control means null."""

    def __init__(self, backend, controls: dict[str, int], lora_rank: int = 16, lora_targets=None,
                 final_step: str = "base", adapter: str = "lora"):
        super().__init__()
        if final_step not in FINAL_STEPS:
            raise CtrlDiffError(f"final_step={final_step!r}; choose from {FINAL_STEPS}")
        if adapter not in ADAPTERS:
            raise CtrlDiffError(f"adapter={adapter!r}; choose from {ADAPTERS}")
        self.backend, self.final_step, self.adapter = backend, final_step, adapter
        self.controls = dict(controls)
        self.lora_rank = lora_rank if adapter == "lora" else 0
        self.lora_targets = list(lora_targets or getattr(backend, "lora_targets", LORA_TARGETS))
        full = adapter == "full"  # a copy of its own to train (never the backend's, which stays the reference)
        net = frozen_copy(backend.net, getattr(backend, "share_weights", False) and not full)
        if full:
            net.requires_grad_(True)
        elif self.lora_rank > 0:
            cfg = LoraConfig(r=self.lora_rank, lora_alpha=self.lora_rank, target_modules=self.lora_targets,
                             init_lora_weights=True)  # B = 0: LoRA starts as the identity
            net = inject_adapter_in_model(cfg, net)
            for name, p in net.named_parameters():
                p.requires_grad_("lora_" in name)
        self.net = net
        self.embeddings = nn.ModuleDict()
        for name, k in self.controls.items():
            emb = nn.Embedding(k + 1, backend.emb_dim)
            nn.init.zeros_(emb.weight)
            emb.weight.register_hook(_zero_null_row)  # the null row never moves
            self.embeddings[name] = emb

    def control_embedding(self, y: dict[str, Tensor]) -> Tensor | None:
        unknown = set(y) - set(self.embeddings)
        if unknown:
            raise CtrlDiffError(f"unknown control {min(unknown)!r}; this model has {sorted(self.embeddings)}")
        embs = [self.embeddings[k](v) for k, v in y.items()]
        return torch.stack(embs).sum(0) if embs else None

    def forward(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        return self.backend.call(self.net, x_t, t, cond.c, self.control_embedding(cond.y))

    def final(self, backend) -> Denoiser | None:
        """The denoiser of the chain's last, deterministic step: the frozen base if `final_step == "base"`
        (the step the path KL cannot regularise; `sampling.sample`'s `final`), else this model (None)."""
        return backend.denoiser if self.final_step == "base" else None

    def merge_lora(self) -> ControlledDenoiser:
        """Fold LoRA into the frozen weights (peft's `merge`) for sampling: same outputs up to float rounding,
        no extra convolutions. Training after this would update dead adapters, so it is for inference only."""
        from peft.tuners.lora import LoraLayer

        for module in self.net.modules():
            if isinstance(module, LoraLayer) and not module.merged:
                base = module.get_base_layer()
                base.weight = nn.Parameter(base.weight.detach().clone(), requires_grad=False)  # unshare
                module.merge()
        return self.requires_grad_(False)

    def lora_parameters(self) -> list[nn.Parameter]:
        """The network's trained parameters: LoRA's factors, or every weight with adapter="full"."""
        return [p for n, p in self.net.named_parameters() if "lora_" in n or self.adapter == "full"]

    def embedding_parameters(self) -> list[nn.Parameter]:
        return list(self.embeddings.parameters())

    def adapter_state(self) -> dict[str, Tensor]:
        """Only the new parameters: peft's LoRA state dict + the control embeddings."""
        state = {f"emb.{k}": e.weight for k, e in self.embeddings.items()}
        if self.adapter == "full":
            state.update({f"net.{k}": v for k, v in self.net.state_dict().items()})
        elif self.lora_rank > 0:
            state.update({f"lora.{k}": v for k, v in get_peft_model_state_dict(self.net).items()})
        return state

    def meta(self) -> dict:
        return {"kind": "ctrl", "controls": self.controls, "lora_rank": self.lora_rank,
                "lora_targets": self.lora_targets, "final_step": self.final_step, "adapter": self.adapter}

    def save(self, path, extra: dict | None = None) -> None:
        save_weights(path, self.adapter_state(), {**self.meta(), **(extra or {})})

    @classmethod
    def load(cls, path, backend) -> ControlledDenoiser:
        """Rebuild from a checkpoint written by `save` on top of the given base."""
        state, meta = load_weights(path)
        if meta.get("kind") != "ctrl":
            raise CtrlDiffError(f"{path} is not a CTRL checkpoint (kind={meta.get('kind')!r})")
        model = cls(backend, meta["controls"], meta["lora_rank"], meta["lora_targets"],
                    meta.get("final_step", "model"), meta.get("adapter", "lora"))
        expected = model.adapter_state()
        if set(state) != set(expected) or any(state[k].shape != expected[k].shape for k in state):
            raise CtrlDiffError(f"checkpoint {path} does not match the base model it is loaded on")
        return model.load_adapter_state(state).eval()

    def load_adapter_state(self, state: dict[str, Tensor]) -> ControlledDenoiser:
        """Set the new parameters from `adapter_state()`'s dict (of this or an identically built model)."""
        with torch.no_grad():
            for k, e in self.embeddings.items():
                e.weight.copy_(state[f"emb.{k}"])
            if self.adapter == "full":
                self.net.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("net.")})
        if self.lora_rank > 0:
            set_peft_model_state_dict(self.net, {k[5:]: v for k, v in state.items() if k.startswith("lora.")})
        return self


def null_cond(cond: Cond, controls: dict[str, int]) -> Cond:
    """The same c with every control set to its null label."""
    return cond.with_y({k: torch.full((len(cond),), n, dtype=torch.long) for k, n in controls.items()})


def y_guidance(model: ControlledDenoiser, w: float) -> Denoiser:
    """Classifier-free guidance on y: eps(c, null) + w (eps(c, y) - eps(c, null)); w = 1 is the model itself."""
    if w == 1.0:
        return model

    def guided(x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        null = null_cond(cond, model.controls)
        full = cond.with_y({k: cond.y.get(k, v) for k, v in null.y.items()})
        eps = model(torch.cat([x_t, x_t]), torch.cat([t, t]), _concat(null, full))
        eps_null, eps_y = eps.chunk(2)
        return eps_null + w * (eps_y - eps_null)

    return guided


def _concat(a: Cond, b: Cond) -> Cond:
    c = None if a.c is None else torch.cat([a.c, b.c])
    return Cond(c, {k: torch.cat([a.y[k], b.y[k]]) for k in a.y})
