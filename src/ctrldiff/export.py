"""`ctrldiff export`: a fine-tuned model as a standard diffusers pipeline folder that needs no ctrldiff.

For a fixed y the augmented model is exactly a plain UNet of the base's own architecture: LoRA merges into the
weights (peft's `merge`), and the control embedding, which ctrldiff adds to the output of the UNet's time
embedding (`backends.sd.added_to_time_embedding`), is then a constant added to `time_embedding.linear_2.bias`
(exact when linear_2 ends the time embedding: no post-activation). `all_y` instead writes every (c, y) into the
UNet's class table, which diffusers adds at that same place, so one folder serves every request.

The folder holds the base's pipeline class (DDPMPipeline for a UNet2DModel, StableDiffusionPipeline) with a
scheduler on ctrldiff's chain (`chain_scheduler`), so the pipeline's own call samples that chain, but for two
things: the last, deterministic step, which the base takes under `rl.final_step="base"`, and, on SD, the
unconditional half of text CFG, which ctrldiff runs without the control. `assets/ctrl_pipeline.py`, copied into
the folder, is the same pipeline class with both restored from `base_unet/` (the untouched base) by hooks.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import torch
from torch import nn

from .backends.pixels import asset_path
from .backends.sd import added_to_time_embedding
from .control import ControlledDenoiser
from .io import CtrlDiffError, atomic_dir, read_json, read_meta, write_json
from .schedule import Schedule

PIPELINE_FILE = "ctrl_pipeline.py"  # the exact pipeline, from assets/
# what the folder's scheduler keeps of the base's: its noise schedule and prediction type, not how it samples
SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                 "prediction_type", "rescale_betas_zero_snr", "steps_offset")
CHECKED_REQUESTS = 8  # (c, y) requests at which the written UNets are compared with ctrldiff's before renaming


def parse_y(items: list[str], controls: dict[str, int]) -> dict[str, int]:
    """`--y NAME=k` items checked against the checkpoint's controls {name: K}; a control left out is null."""
    y: dict[str, int] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise CtrlDiffError(f"--y {item!r} is not of the form NAME=k")
        if name not in controls:
            raise CtrlDiffError(f"--y {item!r}: the checkpoint has no control {name!r}; choose from {sorted(controls)}")
        if name in y:
            raise CtrlDiffError(f"--y {item!r}: control {name!r} is given twice")
        k = int(value) if value.strip().lstrip("-").isdigit() else None
        if k is None or not 0 <= k < controls[name]:
            raise CtrlDiffError(f"--y {item!r}: the class must be an integer in 0..{controls[name] - 1}")
        y[name] = k
    return y


def load_base(model_dir: Path, kind: str, cfg):
    """The backend of a local diffusers folder ("unet2d" or "sd"), on the CPU (SD's networks in `sd.dtype`)."""
    if kind == "unet2d":
        from .backends.unet2d import load_unet2d

        return load_unet2d(model_dir)
    from .backends.sd import load_sd

    return load_sd(model_dir, guidance=cfg.sd.guidance, resolution=cfg.sd.resolution, dtype=cfg.sd.dtype)


def check_base(meta: dict, backend, ckpt: Path, model_dir: Path) -> str:
    """The base's weights hash; a checkpoint that recorded another base's is refused."""
    from .target import base_hash

    actual, recorded = base_hash(backend), meta.get("base")
    if recorded is not None and recorded != actual:
        raise CtrlDiffError(f"{ckpt} was fine-tuned on a base with weights hash {recorded}, but --model {model_dir} "
                            f"has {actual}; pass the base it was fine-tuned on (and its --preset/--set)")
    return actual


def chain_scheduler(base_config: dict, schedule: Schedule):
    """A DDPMScheduler on ctrldiff's chain: the base's noise schedule, trailing spacing, no clipping. Its step,
    the DDPM posterior between two points of its grid, is ctrldiff's DDIM(eta = 1) step. Not DDIMScheduler:
    DDIMPipeline and StableDiffusionPipeline pass eta = 0 unless told, and DDIM steps to t - T // N, which leaves
    the trailing grid when N does not divide T."""
    from diffusers import DDPMScheduler

    kept = {k: base_config[k] for k in SCHEDULE_KEYS if k in base_config}
    try:
        scheduler = DDPMScheduler(**kept, timestep_spacing="trailing", clip_sample=False, thresholding=False,
                                  variance_type="fixed_small")
    except (ValueError, NotImplementedError) as e:
        raise CtrlDiffError(f"the base's scheduler config does not fit a DDPMScheduler: {str(e).splitlines()[0]}") from None
    if not torch.allclose(Schedule.from_betas(scheduler.betas).alphas_cumprod, schedule.alphas_cumprod):
        raise CtrlDiffError("a DDPMScheduler built from the base's scheduler config has another noise schedule than "
                            f"the base's (beta_schedule={kept.get('beta_schedule')!r}): it cannot sample the chain")
    return scheduler


def merged_net(model: ControlledDenoiser) -> nn.Module:
    """The augmented network with LoRA merged and each peft layer replaced by its base layer: a module of the
    base's own class whose parameter names are the base's."""
    from peft.tuners.lora import LoraLayer

    model.merge_lora()
    for name, module in list(model.net.named_modules()):
        if isinstance(module, LoraLayer):
            parent, _, child = name.rpartition(".")
            setattr(model.net.get_submodule(parent), child, module.get_base_layer())
    return model.net


def _rebuild(net: nn.Module, state: dict, **config) -> nn.Module:
    """A new module of `net`'s class, from its config (with `config`'s changes), holding `state` (the tensors
    themselves, no copy), strictly: a name that does not fit raises instead of leaving a weight at random."""
    with torch.device("meta"):
        fresh = type(net).from_config(net.config, **config)  # kwargs: the config marks defaults as unset
    try:
        fresh.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise CtrlDiffError(f"the merged weights do not fit a {type(net).__name__}: {str(e).splitlines()[0]}") from None
    return fresh.eval().requires_grad_(False)


def with_control(model: ControlledDenoiser, y: dict[str, int]) -> nn.Module:
    """The UNet of the augmented model at one y: LoRA merged, the control embedding in time_embedding.linear_2's
    bias."""
    net = merged_net(model)
    if getattr(net.time_embedding, "post_act", None) is not None or not hasattr(net.time_embedding, "linear_2"):
        raise CtrlDiffError("this base's time embedding does not end in linear_2 (it has a post-activation), so the "
                            "control is no bias there; export needs a time embedding that ends in linear_2 (SD 1.x, "
                            "UNet2DModel's default), or --all-y on a UNet2DModel")
    emb = model.control_embedding({k: torch.tensor([v]) for k, v in y.items()})[0]
    state = net.state_dict()
    bias = state["time_embedding.linear_2.bias"]
    state["time_embedding.linear_2.bias"] = bias + emb.to(bias)
    return _rebuild(net, state)


def request_grid(num_c: int, controls: dict[str, int]) -> torch.Tensor:
    """(rows, 1 + len(controls)): every (c, y_1, y_2, ...) in the order of the class table `with_class_table`
    writes, row (c K_1 + y_1) K_2 + y_2 ... (c first, then the controls in the checkpoint's order)."""
    return torch.tensor(list(itertools.product(range(num_c), *map(range, controls.values()))))


def with_class_table(model: ControlledDenoiser, backend) -> tuple[nn.Module, nn.Module]:
    """The augmented model with every (c, y) in its class table (row = `request_grid`'s: the base's class embedding
    of c + the controls' rows, both added where the time embedding is) and the base with the same table
    without the controls (the exact pipeline's last step)."""
    grid = request_grid(backend.num_c, model.controls)
    control = model.control_embedding({k: grid[:, i + 1] for i, k in enumerate(model.controls)})
    base_rows = (backend.net.class_embedding.weight[grid[:, 0]] if backend.conditional
                 else torch.zeros_like(control))
    net = merged_net(model)
    state, base_state = net.state_dict(), backend.net.state_dict()
    state["class_embedding.weight"] = base_rows + control.to(base_rows)
    base_state["class_embedding.weight"] = base_rows
    return _rebuild(net, state, num_class_embeds=len(grid)), _rebuild(backend.net, base_state, num_class_embeds=len(grid))


def build_pipeline(kind: str, backend, unet: nn.Module, scheduler):
    import diffusers

    if kind == "unet2d":
        return diffusers.DDPMPipeline(unet=unet, scheduler=scheduler)
    return diffusers.StableDiffusionPipeline(vae=backend.vae, text_encoder=backend.text_encoder,
                                             tokenizer=backend.tokenizer, unet=unet, scheduler=scheduler,
                                             safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)


def pipeline_file(settings: dict) -> str:
    """assets/ctrl_pipeline.py with this export's settings (kind, steps, final step, SD's guidance and size)."""
    text = asset_path(PIPELINE_FILE).read_text()
    return re.sub(r"^SETTINGS = .*$", lambda _: f"SETTINGS = {settings!r}", text, count=1, flags=re.MULTILINE)


@torch.no_grad()
def check_written(folder: Path, kind: str, model: ControlledDenoiser, backend, requests: list[tuple]) -> None:
    """Reload unet/ and base_unet/ from `folder` and compare them with the augmented model and the base at seeded
    (x_t, t), per request (c, y, the export's class label or None): a save that lost or misnamed a weight fails
    here, before the folder is renamed into place. Tolerance: sqrt(machine eps) relative to the output."""
    dtype = backend.net.dtype
    g = torch.Generator().manual_seed(0)
    for part in ("unet", "base_unet"):
        written = type(backend.net).from_pretrained(folder, subfolder=part, local_files_only=True,
                                                    use_safetensors=True, torch_dtype=dtype)
        for c, y, label in requests:
            x = torch.randn((1, *backend.shape), generator=g).to(dtype)
            t = torch.randint(0, backend.schedule.num_train_timesteps, (1,), generator=g)
            own = _inputs(kind, backend, c, c if getattr(backend, "conditional", False) else None)
            emb = model.control_embedding({k: torch.tensor([v]) for k, v in y.items()}) if part == "unet" else None
            with added_to_time_embedding(model.net, emb):
                want = (model.net if part == "unet" else backend.net)(x, t, **own).sample
            gap = (written(x, t, **_inputs(kind, backend, c, label)).sample - want).abs().max().item()
            if not gap <= torch.finfo(dtype).eps ** 0.5 * (1 + want.abs().max().item()):
                raise CtrlDiffError(f"the written {part}/ does not reproduce ctrldiff's network at c={c}, y={y} (max "
                                    f"|difference| {gap:.2e}); nothing was written")
        del written  # one UNet read back at a time


def _inputs(kind: str, backend, c: int, label: int | None) -> dict:
    if kind == "sd":
        return {"encoder_hidden_states": backend.prompt_embeddings()[c:c + 1]}
    return {} if label is None else {"class_labels": torch.tensor([label])}


def export(ckpt: Path, model_dir: Path, out: Path, y: list[str], all_y: bool, cfg, overwrite: bool = False,
           command: str = "") -> dict:
    """Write the pipeline folder `out` (see the module docstring): built in a temp folder beside it, checked
    (`check_written`), then renamed; every check on the request runs before anything is written. Returns what
    the folder's README.md says."""
    ckpt, model_dir, out = Path(ckpt), Path(model_dir), Path(out)
    if out.exists() and not overwrite:
        raise CtrlDiffError(f"{out} already exists; pass --overwrite or choose another --out")
    if bool(y) == all_y:
        raise CtrlDiffError("export takes --y NAME=k (one class per control: a plain UNet) or --all-y (every class "
                            "in the UNet's class table), not " + ("both" if all_y else "neither"))
    meta = read_meta(ckpt)
    if meta.get("kind") != "ctrl":
        raise CtrlDiffError(f"{ckpt} is not a checkpoint of `ctrldiff finetune` (kind={meta.get('kind')!r})")
    labels = parse_y(y, meta["controls"])
    if cfg.sampler.eta != 1.0:
        raise CtrlDiffError(f"sampler.eta={cfg.sampler.eta}: the exported scheduler samples ctrldiff's chain at "
                            "eta = 1 only (DDPM's posterior)")
    from .backends.unet2d import model_kind

    kind = model_kind(model_dir)
    if all_y and kind == "sd":
        raise CtrlDiffError("--all-y writes every (c, y) into the UNet's class table, read through class_labels; "
                            "StableDiffusionPipeline passes none: export SD with --y NAME=k")
    backend = load_base(model_dir, kind, cfg)
    base_id = check_base(meta, backend, ckpt, model_dir)
    scheduler = chain_scheduler(read_json(model_dir / "scheduler" / "scheduler_config.json"), backend.schedule)
    model = ControlledDenoiser.load(ckpt, backend)
    unet, base_unet, requests = exported_unets(model, backend, labels, all_y)
    info = {"folder": str(out), "base": str(model_dir), "base_hash": base_id, "hash_checked": "base" in meta,
            "checkpoint": str(ckpt), "kind": kind, "net": type(unet).__name__,
            "pipeline": "DDPMPipeline" if kind == "unet2d" else "StableDiffusionPipeline",
            "controls": model.controls, "gammas": meta.get("gammas", cfg.rl.controls), "y": labels, "all_y": all_y,
            "rows": len(request_grid(backend.num_c, model.controls)) if all_y else None,
            "class_labels": all_y or getattr(backend, "conditional", False),
            "settings": {"kind": kind, "steps": cfg.sampler.steps, "final_step": model.final_step,
                         "guidance": cfg.sd.guidance, "resolution": getattr(backend, "resolution", None)},
            "command": command}
    with atomic_dir(out) as tmp:
        build_pipeline(kind, backend, unet, scheduler).save_pretrained(tmp, safe_serialization=True)
        base_unet.save_pretrained(tmp / "base_unet", safe_serialization=True)
        index = read_json(tmp / "model_index.json")
        write_json(tmp / "model_index.json", {**index, "base_unet": ["diffusers", type(base_unet).__name__]},
                   sort_keys=False)
        (tmp / PIPELINE_FILE).write_text(pipeline_file(info["settings"]))
        (tmp / "README.md").write_text(folder_readme(info))
        check_written(tmp, kind, model, backend, requests)
    return info


def exported_unets(model: ControlledDenoiser, backend, y: dict[str, int], all_y: bool):
    """(unet, base_unet, the requests (c, y, class label) `check_written` compares them at)."""
    if all_y:
        unet, base_unet = with_class_table(model, backend)
        grid = request_grid(backend.num_c, model.controls)
        rows = torch.randperm(len(grid), generator=torch.Generator().manual_seed(0))[:CHECKED_REQUESTS].tolist()
        return unet, base_unet, [(int(grid[i, 0]), dict(zip(model.controls, grid[i, 1:].tolist())), i) for i in rows]
    conditional = getattr(backend, "conditional", False)
    requests = [(c, y, c if conditional else None) for c in range(min(backend.num_c, CHECKED_REQUESTS))]
    return with_control(model, y), backend.net, requests


def folder_readme(info: dict) -> str:
    """What the folder holds and how to sample it, so that it explains itself."""
    s, sd = info["settings"], info["kind"] == "sd"
    gammas = info["gammas"]
    control = ", ".join(f"`{k}` ({n} classes, γ = {gammas.get(k, 'not recorded')})" for k, n in info["controls"].items())
    if info["all_y"]:
        requests = (f"every (c, y), {info['rows']} rows of the UNet's class table: `class_labels = "
                    f"{_label_formula(info['controls'])}` (c = 0 on an unconditional base)")
    else:
        nulls = [k for k in info["controls"] if k not in info["y"]]
        requests = (", ".join(f"`{k}={v}`" for k, v in info["y"].items()) + (f" ({', '.join(nulls)}: null)" if nulls
                    else "") + ", folded into `unet/`'s `time_embedding.linear_2.bias`"
                    + ("; c through `class_labels`" if info["class_labels"] else ""))
    final = {"base": "the untouched base (`base_unet/`), as ctrldiff's `rl.final_step=\"base\"`",
             "model": "the fine-tuned UNet (`rl.final_step=\"model\"`)"}[s["final_step"]]
    rows = [("base", f"`{info['base']}`, weights hash `{info['base_hash']}`"
             + ("" if info["hash_checked"] else " (the checkpoint recorded none: not checked)")),
            ("checkpoint", f"`{info['checkpoint']}`"), ("control", control), ("requests", requests),
            ("chain", f"{s['steps']} steps, trailing, η = 1 (`scheduler/`: DDPMScheduler); the last one by {final}")]
    if sd:
        rows.append(("text CFG", f"guidance scale {s['guidance']}, {s['resolution']} px (the fine-tune's)"))
    rows.append(("command", f"`{info['command']}`" if info["command"] else "the library's `ctrldiff.export.export`"))
    gen = "generator=torch.Generator().manual_seed(0)"
    call = (f'pipe("a photo of a cat", {gen})' if sd
            else f"pipe(batch_size=4, {gen}" + (", class_labels=[0, 1, 2, 3])" if info["class_labels"] else ")"))
    plain = [line for line, applies in [
        (f"- the last, deterministic step is taken by the fine-tuned UNet, not by {final}", s["final_step"] == "base"),
        (("- text CFG adds the control to both halves of the batch, so the guidance scale does not amplify it as "
          "in ctrldiff's eps(empty, null y) + s (eps(prompt, y) - eps(empty, null y))"), sd),
        ("- `class_labels` cannot be passed: DDPMPipeline's call has no such argument", info["class_labels"] and not sd)]
        if applies] or ["- nothing: it is ctrldiff's chain"]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    nl = "\n"
    return f"""# A {info['pipeline']} fine-tuned by CTRL, exported by ctrldiff

| | |
|---|---|
{table}

`unet/`: a plain {info['net']} of the base's architecture, the LoRA merged. `base_unet/`: the untouched base{
" with the same class table (each row the base's class embedding of c)" if info["all_y"] else ""}.
The rest is the base's. Safetensors only.

## Sample it

```python
import torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{info['folder']}", custom_pipeline="ctrl_pipeline",
                                         trust_remote_code=True, local_files_only=True)
images = {call}.images
```

That is ctrldiff's chain (equal to float rounding): `ctrl_pipeline.py` is {info['pipeline']} with its own call
run inside hooks, defaulting to {s['steps']} steps{" and the guidance scale above" if sd else ""}.
`DiffusionPipeline.from_pretrained(folder)` without it loads the plain {info['pipeline']} (diffusers warns that
it ignores `base_unet`), whose call with `num_inference_steps={s['steps']}` differs from ctrldiff's chain in:

{nl.join(plain)}

Your own loop: `unet/` and `scheduler/` (`scheduler.set_timesteps({s['steps']})`, then `scheduler.step`).
As the base of another control: `ctrldiff finetune --model {info['folder']} ...`: its KL is measured against
this model, and its last step is this model's.
"""


def _label_formula(controls: dict[str, int]) -> str:
    """The class-table row of a request: (c K_1 + y_1) K_2 + y_2 ..."""
    formula = "c"
    for name, k in controls.items():
        formula = f"({formula}) * {k} + y_{name}" if "+" in formula else f"c * {k} + y_{name}"
    return formula
