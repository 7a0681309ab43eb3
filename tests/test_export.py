"""`ctrldiff export` (issue 28): a fine-tuned model as a standard diffusers pipeline folder, checked for what it
samples, not only for loading. Tiny UNet2DModels (unconditional eps; class-conditional v-prediction) and the
tiny SD pipeline, built from configs; each checkpoint's LoRA and control rows are set to seeded non-zero values
(a fine-tune's stand-in: the export must reproduce whatever the adapters hold). References are ctrldiff's own
`sample` with the same noise."""

import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_unet2d import save_pipeline

from ctrldiff.backends.sd import build_sd_parts, load_sd
from ctrldiff.backends.unet2d import load_unet2d
from ctrldiff.cli import main
from ctrldiff.contracts import Cond
from ctrldiff.control import ControlledDenoiser
from ctrldiff.sampling import sample
from ctrldiff.target import base_hash

STEPS = 3  # 1000 is no multiple of 3: the trailing grid 999, 666, 332 is not DDIM's t - T // N
CONTROLS = {"mine": 2, "other": 3}
PROMPTS = ["cat", "dog"]
UNET_ARGS = ["--preset", "tiny", "--set", f"sampler.steps={STEPS}"]
SD_ARGS = ["--preset", "sd_tiny", "--set", f"sampler.steps={STEPS}"]  # text CFG 7.5


def fine_tuned(backend, path: Path, seed: int = 1) -> Path:
    """A checkpoint as `finetune` writes one, with seeded non-zero LoRA and control rows (null rows zero)."""
    torch.manual_seed(seed)  # LoRA's A
    model = ControlledDenoiser(backend, CONTROLS, lora_rank=4, final_step="base")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or name.startswith("embeddings."):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
        for emb in model.embeddings.values():
            emb.weight[-1].zero_()
    model.save(path, {"method": "ctrl", "gammas": {"mine": 10.0, "other": 5.0}, "base": base_hash(backend)})
    return path


def save_sd(folder: Path, **unet_config) -> Path:
    from diffusers import StableDiffusionPipeline

    parts = build_sd_parts("tiny", folder.parent / f"{folder.name}-vocab")
    if unet_config:
        parts["unet"] = type(parts["unet"]).from_config(parts["unet"].config, **unet_config)
    StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder)
    return folder


def _export(base: Path, ckpt: Path, out: Path, *flags: str) -> int:
    return main(["export", "--model", str(base), "--ckpt", str(ckpt), "--out", str(out), *flags])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (base folder, checkpoint, exported folder, backend): four exports of three bases."""
    root = tmp_path_factory.mktemp("export")
    uncond = save_pipeline(root / "uncond")
    cond = save_pipeline(root / "cond", channels=1, classes=3, prediction="v_prediction", pipeline="DDIMPipeline")
    sd = save_sd(root / "sd")
    cases = {"uncond": (uncond, ["--y", "mine=1"]), "cond": (cond, ["--y", "mine=0", "--y", "other=2"]),
             "cond-all": (cond, ["--all-y"]), "sd": (sd, ["--y", "mine=1"])}
    out = {}
    for name, (base, flags) in cases.items():
        backend = load_sd(base, PROMPTS) if name == "sd" else load_unet2d(base)
        ckpt = fine_tuned(backend, root / f"{name}.safetensors")
        assert _export(base, ckpt, root / f"{name}-exported", *flags, *(SD_ARGS if name == "sd" else UNET_ARGS)) == 0
        out[name] = (base, ckpt, root / f"{name}-exported", backend)
    return out


def _eps(backend, raw, x, t):
    """eps from a UNet2DModel's raw output (v-prediction: eps = sqrt(abar) v + sqrt(1 - abar) x)."""
    if backend.prediction_type != "v_prediction":
        return raw
    a = backend.schedule.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    return a.sqrt() * raw + (1 - a).sqrt() * x


def _requests(name):
    """(c, y, the exported UNet's class label) of each export's checked requests."""
    if name == "cond-all":  # row (c * 2 + y_mine) * 3 + y_other, as the folder's README says
        rows = [0, 5, 7, 17]
        return [((r // 3) // 2, {"mine": (r // 3) % 2, "other": r % 3}, r) for r in rows]
    y = {"uncond": {"mine": 1}, "cond": {"mine": 0, "other": 2}, "sd": {"mine": 1}}[name]
    cs = {"uncond": [0, 0], "cond": [0, 1, 2], "sd": [0, 1]}[name]
    return [(c, y, c) for c in cs]


@pytest.mark.parametrize("name", ["uncond", "cond", "cond-all", "sd"])
def test_the_exported_unet_is_the_augmented_model(exported, name):
    _, ckpt, out, backend = exported[name]
    if name == "sd":  # one UNet call, without text CFG
        backend = dataclasses.replace(backend, guidance=1.0)
    model = ControlledDenoiser.load(ckpt, backend)  # LoRA not merged: the model as trained
    unet = type(backend.net).from_pretrained(out, subfolder="unet", local_files_only=True)
    g = torch.Generator().manual_seed(0)
    for c, y, label in _requests(name):
        x, t = torch.randn((1, *backend.shape), generator=g), torch.randint(0, 1000, (1,), generator=g)
        cond = Cond(torch.tensor([c]), {k: torch.tensor([v]) for k, v in y.items()})
        want = model(x, t, cond)
        with torch.no_grad():
            if name == "sd":
                got = backend.call(unet, x, t, cond.c)
            else:
                labels = torch.tensor([label]) if name != "uncond" else None
                got = _eps(backend, unet(x, t, class_labels=labels).sample, x, t)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert (got - backend.denoiser(x, t, cond)).abs().max() > 1e-2  # the control is there, not the base


CALLS = """
import sys
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import save_file

folders, out = dict(a.split("=", 1) for a in sys.argv[1:-1]), sys.argv[-1]
plain = {n: DiffusionPipeline.from_pretrained(f, local_files_only=True) for n, f in folders.items()}
exact = {n: DiffusionPipeline.from_pretrained(f, custom_pipeline="ctrl_pipeline", trust_remote_code=True,
                                              local_files_only=True) for n, f in folders.items()}  # all, then calls
results, names = {}, []
for n in folders:
    names += [type(plain[n]).__name__, type(exact[n]).__bases__[-1].__name__]
    g = lambda: torch.Generator().manual_seed(3)
    if n == "sd":
        kw = {"prompt": ["cat", "dog"], "output_type": "latent"}
        results[f"{n}.plain"] = plain[n](**kw, generator=g(), num_inference_steps=3, guidance_scale=7.5).images
    elif n == "uncond":
        kw = {"batch_size": 2, "output_type": "np"}
        results[f"{n}.plain"] = torch.tensor(plain[n](**kw, generator=g(), num_inference_steps=3).images)
    else:
        kw = {"class_labels": [0, 5, 7, 17] if n == "cond-all" else [0, 1, 2], "output_type": "np"}
    results[f"{n}.exact"] = torch.as_tensor(exact[n](**kw, generator=g()).images)
save_file({k: v.contiguous() for k, v in results.items()}, out,
          metadata={"classes": ",".join(names), "ctrldiff": str("ctrldiff" in sys.modules)})
"""


def _no_ctrldiff_env(tmp_path):
    """For a process that does not import ctrldiff (its scripts assert so): offline, one thread, and diffusers'
    copy of ctrl_pipeline.py written under tmp_path, not into ~/.cache."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _ctrldiff_samples(backend, denoiser, cond, final=None, steps=STEPS):
    g = torch.Generator().manual_seed(3)
    x_T = torch.randn((len(cond), *backend.shape), generator=g)
    with torch.no_grad():
        return sample(denoiser, backend.schedule, x_T, cond, steps=steps, generator=g, final=final).x0


def _images(backend, x0):
    return backend.decode(x0).permute(0, 2, 3, 1)  # NHWC in [0, 1], as the pipelines' output_type="np"


def test_diffusers_own_call_samples_ctrldiffs_chain_without_ctrldiff(exported, tmp_path):
    names = ["uncond", "cond", "cond-all", "sd"]
    script = tmp_path / "calls.py"
    script.write_text(CALLS)
    done = subprocess.run([sys.executable, str(script), *(f"{n}={exported[n][2]}" for n in names),
                           str(tmp_path / "out.safetensors")], cwd=tmp_path, env=_no_ctrldiff_env(tmp_path),
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    from safetensors import safe_open

    with safe_open(tmp_path / "out.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["ctrldiff"] == "False"
    assert meta["classes"].split(",") == ["DDPMPipeline"] * 6 + ["StableDiffusionPipeline"] * 2
    got = load_file(tmp_path / "out.safetensors")
    for name in names:
        _, ckpt, out, backend = exported[name]
        model = ControlledDenoiser.load(ckpt, backend)
        requests = _requests(name)
        cond = Cond(torch.tensor([c for c, _, _ in requests]),
                    {k: torch.tensor([y[k] for _, y, _ in requests]) for k in requests[0][1]})
        want = _ctrldiff_samples(backend, model, cond, model.final(backend))
        base = _ctrldiff_samples(backend, backend.denoiser, cond)
        if name != "sd":
            want, base = _images(backend, want), _images(backend, base)
        # ctrldiff's chain, to float rounding (seen: 3e-5 on the images, 2e-4 on SD's latents of size ~30)
        torch.testing.assert_close(got[f"{name}.exact"], want, rtol=1e-4, atol=1e-4)
        assert (got[f"{name}.exact"] - base).abs().max() > 0.05  # and not the base's
        if f"{name}.plain" in got:  # the plain pipeline: what the folder's README says it differs in
            unet = type(backend.net).from_pretrained(out, subfolder="unet", local_files_only=True)
            plain = _ctrldiff_samples(backend, lambda x, t, cond, b=backend, u=unet: b.call(u, x, t, cond.c), cond)
            plain = plain if name == "sd" else _images(backend, plain)
            torch.testing.assert_close(got[f"{name}.plain"], plain, rtol=1e-4, atol=1e-4)
            assert (got[f"{name}.plain"] - got[f"{name}.exact"]).abs().max() > 1e-3


def test_the_folder_says_what_it_holds(exported):
    base, ckpt, out, _ = exported["cond-all"]
    readme = (out / "README.md").read_text()
    for words in [str(base), str(ckpt), "`mine` (2 classes, γ = 10.0)", "`other` (3 classes, γ = 5.0)",
                  "class_labels = (c * 2 + y_mine) * 3 + y_other", "18 rows", f"{STEPS} steps, trailing, η = 1",
                  "the untouched base", "--all-y"]:
        assert words in readme, words
    assert "`mine=1` (other: null)" in (exported["sd"][2] / "README.md").read_text()
    assert "guidance scale 7.5" in (exported["sd"][2] / "README.md").read_text()
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"unet/diffusion_pytorch_model.safetensors", "base_unet/diffusion_pytorch_model.safetensors",
            "ctrl_pipeline.py", "README.md", "model_index.json", "scheduler/scheduler_config.json"} <= files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]  # safetensors only
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["timestep_spacing"] == "trailing" and scheduler["clip_sample"] is False
    assert scheduler["prediction_type"] == "v_prediction"  # the base's


def test_an_exported_folder_is_a_base_again(exported):
    for name, load in [("uncond", load_unet2d), ("cond-all", load_unet2d), ("sd", lambda p: load_sd(p, PROMPTS))]:
        out, backend = exported[name][2], exported[name][3]
        again = load(out)
        unet = type(backend.net).from_pretrained(out, subfolder="unet", local_files_only=True)
        assert base_hash(again) == base_hash(SimpleNamespace(net=unet))  # its base is the exported UNet
        model = ControlledDenoiser(again, {"second": 2})  # a second control on top: equal to it at init
        x, t = torch.randn((3, *again.shape)), torch.tensor([5, 500, 900])
        cond = Cond(torch.tensor([0, 1, 1]), {"second": torch.tensor([0, 1, 2])})
        assert torch.equal(model(x, t, cond), again.denoiser(x, t, cond))
    assert load_unet2d(exported["cond-all"][2]).num_c == 18


def _snapshot(root: Path) -> dict:
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _one_line_error(capsys, *words):
    """ctrldiff's error is one line (the libraries may log their loading progress around it)."""
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith("ctrldiff:")]
    assert len(ours) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in ours[0], err


def test_errors_are_one_line_and_write_nothing(exported, tmp_path, capsys):
    base, ckpt, _, _ = exported["uncond"]
    sd_base, sd_ckpt = exported["sd"][:2]
    other = save_pipeline(tmp_path / "other")  # the same architecture, one weight moved
    from diffusers import UNet2DModel

    unet = UNet2DModel.from_pretrained(other, subfolder="unet")
    with torch.no_grad():
        unet.conv_in.bias[0] += 1e-3
    unet.save_pretrained(other / "unet")
    post_act = save_sd(tmp_path / "post-act", timestep_post_act="silu")
    post_ckpt = fine_tuned(load_sd(post_act, PROMPTS), tmp_path / "post.safetensors")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("keep me")
    recorded, moved = base_hash(load_unet2d(base)), base_hash(load_unet2d(other))
    cases = [((base, ckpt, taken, "--y", "mine=1", *UNET_ARGS), [f"{taken} already exists", "--overwrite"]),
             ((base, ckpt, tmp_path / "o", "--y", "nope=1", *UNET_ARGS), ["no control 'nope'", "['mine', 'other']"]),
             ((base, ckpt, tmp_path / "o", "--y", "mine=2", *UNET_ARGS), ["'mine=2'", "integer in 0..1"]),
             ((base, ckpt, tmp_path / "o", "--y", "mine", *UNET_ARGS), ["'mine' is not of the form NAME=k"]),
             ((base, ckpt, tmp_path / "o", *UNET_ARGS), ["--y NAME=k", "--all-y", "not neither"]),
             ((other, ckpt, tmp_path / "o", "--y", "mine=1", *UNET_ARGS), [recorded, moved, str(other)]),
             ((sd_base, sd_ckpt, tmp_path / "o", "--all-y", *SD_ARGS), ["--all-y", "StableDiffusionPipeline"]),
             ((post_act, post_ckpt, tmp_path / "o", "--y", "mine=1", *SD_ARGS), ["post-activation"]),
             ((base, ckpt, tmp_path / "o", "--y", "mine=1", "--set", "sampler.eta=0.5"), ["sampler.eta=0.5"])]
    for args, words in cases:
        before, entries = {**_snapshot(tmp_path), **_snapshot(base.parent)}, sorted(tmp_path.iterdir())
        capsys.readouterr()
        assert _export(*args) == 2, args
        _one_line_error(capsys, *words)
        assert sorted(tmp_path.iterdir()) == entries  # no --out, no temp folder left behind
        assert {**_snapshot(tmp_path), **_snapshot(base.parent)} == before  # no file changed


def test_a_failed_check_leaves_nothing_and_overwrite_replaces(exported, tmp_path, capsys, monkeypatch):
    import ctrldiff.export as E

    base, ckpt, _, _ = exported["uncond"]
    out = tmp_path / "out"
    real = E.exported_unets
    # the bug class of flow_grpo issue 87: weights that silently sample like the untouched base
    monkeypatch.setattr(E, "exported_unets", lambda model, b, y, all_y: (b.net, *real(model, b, y, all_y)[1:]))
    assert _export(base, ckpt, out, "--y", "mine=1", *UNET_ARGS) == 2
    _one_line_error(capsys, "the written unet/ does not reproduce ctrldiff's network", "nothing was written")
    assert list(tmp_path.iterdir()) == []  # no folder, no temp folder
    monkeypatch.setattr(E, "exported_unets", real)
    out.mkdir()
    (out / "old.txt").write_text("old")
    assert _export(base, ckpt, out, "--y", "mine=0", "--overwrite", *UNET_ARGS) == 0
    assert not (out / "old.txt").exists() and (out / "unet").is_dir()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def readme_section() -> str:
    """docs/export.md's "Use the result elsewhere" (moved there from the README), up to a next "## "."""
    text = (Path(__file__).parents[1] / "docs" / "export.md").read_text()
    return text.split("# Use the result elsewhere", 1)[1].split("\n## ", 1)[0]


def test_readme_section_runs_at_tiny_size(tmp_path, monkeypatch):
    """The `ctrldiff` lines of docs/export.md's "Use the result elsewhere" (with --preset tiny), then its
    Python block in a process without ctrldiff, on a tiny UNet2DModel pipeline `my-ddpm` and pairs
    `my-images`."""
    section = readme_section()
    commands = [line.split("  #")[0].strip() for block in re.findall(r"```bash\n(.*?)```", section, re.DOTALL)
                for line in block.splitlines() if line.startswith("ctrldiff ")]
    python = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    monkeypatch.chdir(tmp_path)
    save_pipeline(tmp_path / "my-ddpm")
    rng = np.random.default_rng(0)
    y = np.arange(60) % 2
    np.savez(tmp_path / "my-images.npz", x=(rng.integers(0, 128, (60, 8, 8, 3)) + 127 * y[:, None, None, None])
             .astype(np.uint8), y=y)
    assert [c.split()[1] for c in commands] == ["finetune", "export", "export", "finetune"]
    for line in commands:
        args = shlex.split(line)[1:]
        assert main([*args, "--preset", "tiny"]) == 0, line
    readme = (tmp_path / "my-ddpm-bright" / "README.md").read_text()
    assert "not checked" not in readme  # finetune recorded the base's hash and export checked it
    script = tmp_path / "use.py"
    script.write_text(python + "\nimport sys\nassert 'ctrldiff' not in sys.modules\n")
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=_no_ctrldiff_env(tmp_path),
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
