"""ctrldiff's sampling chain, exactly, for a folder written by `ctrldiff export`; needs torch and diffusers only.

    pipe = DiffusionPipeline.from_pretrained(folder, custom_pipeline="ctrl_pipeline", trust_remote_code=True)

The folder is a plain diffusers pipeline (`DiffusionPipeline.from_pretrained(folder)` loads it without this
file). This class is that same pipeline, whose own `__call__` (loop, scheduler, noise draws) runs unchanged
inside three hooks that make it ctrldiff's chain:

- the last, deterministic step (to t = -1) is taken by `base_unet`, the untouched base, when SETTINGS says
  final_step "base" (ctrldiff's default `rl.final_step`: the fine-tune's path KL cannot see that step);
- Stable Diffusion: the unconditional half of text CFG runs without the control, as in ctrldiff
  (eps(empty, null y) + s (eps(prompt, y) - eps(empty, null y))): the control vector, the difference of the
  two UNets' `time_embedding.linear_2.bias`, is taken off those rows of the time embedding;
- a class-conditional UNet gets `class_labels=` (DDPMPipeline's own call has no such argument).

The defaults of the call (steps, and for SD the guidance scale and image size) are the fine-tune's.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from diffusers import DDPMPipeline, StableDiffusionPipeline

SETTINGS = {"kind": "unet2d", "steps": 20, "final_step": "base", "guidance": 7.5, "resolution": None}


def _with_labels(labels):
    def hook(module, args, kwargs):
        return args, {**kwargs, "class_labels": labels}

    return hook


class _ExactChain:
    """The three hooks around the pipeline class's own `__call__`."""

    # bound here, not read as a global: diffusers runs every folder's copy of this file in one module, so a
    # second folder loaded in the same process would otherwise change the first one's settings
    settings: ClassVar[dict] = SETTINGS

    def __call__(self, *args, class_labels=None, **kwargs):
        kwargs.setdefault("num_inference_steps", self.settings["steps"])
        hooks = []
        if self.settings["kind"] == "sd":
            kwargs.setdefault("guidance_scale", self.settings["guidance"])
            if self.settings["resolution"] is not None:
                kwargs.setdefault("height", self.settings["resolution"])
                kwargs.setdefault("width", self.settings["resolution"])
            hooks.append(self.unet.time_embedding.register_forward_hook(self._unconditional_without_control))
        if class_labels is not None:  # the base's last step below sees them too (hooks get the new kwargs)
            labels = torch.as_tensor(class_labels, device=self.unet.device).long().reshape(-1)
            kwargs.setdefault("batch_size", len(labels))
            hooks.append(self.unet.register_forward_pre_hook(_with_labels(labels), with_kwargs=True))
        if self.settings["final_step"] == "base":
            hooks.append(self.unet.register_forward_hook(self._last_step_by_base, with_kwargs=True))
        try:
            return super().__call__(*args, **kwargs)
        finally:
            for hook in hooks:
                hook.remove()

    def _last_step_by_base(self, unet, args, kwargs, output):
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        if bool((torch.as_tensor(t).cpu() == self.scheduler.timesteps[-1].cpu()).all()):
            return self.base_unet(*args, **kwargs)
        return None

    def _unconditional_without_control(self, module, args, emb):
        if not self.do_classifier_free_guidance:
            return None
        control = self.unet.time_embedding.linear_2.bias - self.base_unet.time_embedding.linear_2.bias
        half = len(emb) // 2  # the pipeline's batch is [unconditional; prompts]
        return torch.cat([emb[:half] - control, emb[half:]])


if SETTINGS["kind"] == "sd":

    class CtrlPipeline(_ExactChain, StableDiffusionPipeline):
        _optional_components: ClassVar[list[str]] = [*StableDiffusionPipeline._optional_components, "base_unet"]

        def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, safety_checker=None,
                     feature_extractor=None, image_encoder=None, requires_safety_checker=False, base_unet=None):
            super().__init__(vae, text_encoder, tokenizer, unet, scheduler, safety_checker, feature_extractor,
                             image_encoder, requires_safety_checker)
            self.register_modules(base_unet=base_unet)

else:

    class CtrlPipeline(_ExactChain, DDPMPipeline):
        _optional_components: ClassVar[list[str]] = ["base_unet"]

        def __init__(self, unet, scheduler, base_unet=None):
            super().__init__(unet, scheduler)
            self.register_modules(base_unet=base_unet)
