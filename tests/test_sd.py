"""The Stable Diffusion backend on a tiny pipeline built from configs (no download): CTRL's contracts in latent
space, checkpoints, accelerate, and the CLI's errors."""

import json
import math

import pytest
import torch

from ctrldiff.backends.sd import build_sd_parts, load_sd
from ctrldiff.checkpoint import Checkpointer
from ctrldiff.classifier import Classifier
from ctrldiff.cli import main
from ctrldiff.config import apply_overrides, sd_tiny
from ctrldiff.contracts import Cond
from ctrldiff.control import ControlledDenoiser
from ctrldiff.io import load_weights
from ctrldiff.models import SmallCNN
from ctrldiff.rl import RewardTerm, finetune
from ctrldiff.sampling import sample
from ctrldiff.tasks.controls import get_control

PROMPTS = ["cat", "dog", "cow"]


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    """A tiny SD pipeline folder built from the shipped config `sd_tiny.json` (UNet (32, 64) on 8x8 latents,
    VAE (32, 64) -> 16x16 RGB, a 2-layer CLIP, a local tokenizer), saved as diffusers saves a pipeline."""
    from diffusers import StableDiffusionPipeline

    root = tmp_path_factory.mktemp("sd")
    StableDiffusionPipeline(**build_sd_parts("tiny", root / "vocab"), safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(root / "pipe")
    return root / "pipe"


@pytest.fixture(scope="module")
def backend(pipe_dir):
    return load_sd(pipe_dir, PROMPTS)


def _cfg(**sets):
    return apply_overrides(sd_tiny(), [f"{k}={json.dumps(v)}" for k, v in sets.items()])


def _terms(gamma=1.0):
    torch.manual_seed(1)
    return [RewardTerm(get_control("jpeg4"), Classifier(SmallCNN(4, in_channels=3)).requires_grad_(False), gamma)]


def _batch(backend, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *backend.shape), generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    return x, t, Cond(torch.tensor([0, 1, 2, 3])[:n], {"jpeg4": torch.tensor([0, 1, 2, 4])[:n]})


def test_backend_reads_the_pipeline(backend):
    assert backend.shape == (4, 8, 8) and backend.resolution == 16 and backend.num_c == 3
    assert backend.emb_dim == 128  # 4 x block_out_channels[0]
    assert backend.prompt_embeddings().shape == (4, 77, 32)  # 3 prompts + the empty one
    torch.testing.assert_close(backend.schedule.alphas_cumprod[[0, 999]],
                               torch.tensor([0.99915, 0.0047], dtype=torch.float64), atol=1e-4, rtol=0)


def test_equal_to_base_at_init(backend):
    model = ControlledDenoiser(backend, {"jpeg4": 4}, lora_rank=4)
    x, t, cond = _batch(backend)
    assert torch.equal(model(x, t, cond), backend.denoiser(x, t, cond))
    lora = [n for n, _ in model.net.named_parameters() if "lora_" in n]
    assert len(lora) == 4 * 2 * 4 * 2  # 4 transformer blocks (down, mid, 2 up) x 2 attentions x 4 targets x A, B
    # the frozen weights are the backend's own tensors (no second copy of the UNet), the modules are not
    q = model.net.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    assert q.base_layer.weight is backend.net.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight
    assert q is not backend.net.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q


def test_control_embedding_reaches_the_unet(backend):
    model = ControlledDenoiser(backend, {"jpeg4": 4}, lora_rank=0)
    with torch.no_grad():
        model.embeddings["jpeg4"].weight[:4].normal_()
    x, t, cond = _batch(backend)
    eps, base = model(x, t, cond), backend.denoiser(x, t, cond)
    assert not torch.allclose(eps[:3], base[:3])  # y = 0, 1, 2 move eps
    assert torch.equal(eps[3], base[3])  # y = null (4) is the base


def test_one_ctrl_step_changes_only_lora_and_embeddings(backend):
    before = {k: v.clone() for k, v in backend.net.state_dict().items()}
    model, _ = finetune(backend, _terms(), _cfg(), progress=False)
    assert all(torch.equal(v, before[k]) for k, v in backend.net.state_dict().items())  # the base is untouched
    changed = {n for n, p in model.named_parameters() if "lora_B" in n or n.startswith("embeddings.")
               if p.abs().sum() > 0}
    assert any("lora_B" in n for n in changed) and "embeddings.jpeg4.weight" in changed
    assert model.embeddings["jpeg4"].weight[-1].abs().sum() == 0  # the null row stays zero
    for n, p in model.net.named_parameters():  # every non-LoRA weight is still the base's
        if "lora_" not in n:
            assert torch.equal(p, before[n.replace(".base_layer", "")]), n


def _draw(model_or_denoiser, backend, cond, seed=3):
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn((len(cond), *backend.shape), generator=g)
    with torch.no_grad():
        return sample(model_or_denoiser, backend.schedule, x_T, cond, steps=3, generator=g).x0


def test_sampling_with_and_without_control(backend, tmp_path):
    model, _ = finetune(backend, _terms(), _cfg(**{"rl.lr_emb": 1.0}), progress=False)
    cond = Cond(torch.tensor([0, 1]), {"jpeg4": torch.tensor([0, 0])})
    null = cond.with_y({"jpeg4": torch.tensor([4, 4])})
    base, with_y, without = _draw(backend.denoiser, backend, cond), _draw(model, backend, cond), _draw(model, backend, null)
    assert not torch.allclose(with_y, without)
    images = backend.decode(with_y)
    assert images.shape == (2, 3, 16, 16) and 0 <= images.min() and images.max() <= 1
    assert base.shape == with_y.shape


@pytest.mark.parametrize("name,knobs", [("dps", {}), ("mpgd", {}), ("smc", {"particles": 2}),
                                        ("svdd", {"candidates": 2}), ("best_of_n", {"n": 2})])
def test_baselines_run_in_latent_space(backend, name, knobs):
    from ctrldiff.methods import build_method

    classifiers = {"jpeg4": _terms()[0].classifier}
    cond = Cond(torch.tensor([0, 1]), {"jpeg4": torch.tensor([0, 3])})
    x0, _ = build_method(name, backend, knobs, steps=3, classifiers=classifiers)(cond, torch.Generator().manual_seed(0))
    assert x0.shape == (2, *backend.shape) and torch.isfinite(x0).all()
    # at a neutral setting a baseline is the base sampler
    base = build_method("base", backend, steps=3)(cond, torch.Generator().manual_seed(0))[0]
    neutral = {"dps": {"w": 0}, "mpgd": {"w": 0}, "smc": {"particles": 1, "w": 0}, "svdd": {"candidates": 1},
               "best_of_n": {"n": 1}}[name]
    same = build_method(name, backend, neutral, steps=3, classifiers=classifiers)(cond, torch.Generator().manual_seed(0))
    assert torch.equal(same[0], base)


def test_save_load_gives_identical_samples(backend, tmp_path):
    cfg = _cfg(**{"rl.steps": 2, "rl.lr_emb": 1.0})
    ckpt = Checkpointer(tmp_path / "ckpt.safetensors", cfg.to_dict(), every=1)
    model, _ = finetune(backend, _terms(), cfg, progress=False, ckpt=ckpt)
    model.save(tmp_path / "ctrl.safetensors")
    loaded = ControlledDenoiser.load(tmp_path / "ctrl.safetensors", backend)
    cond = Cond(torch.tensor([0, 2]), {"jpeg4": torch.tensor([1, 3])})
    assert torch.equal(_draw(model, backend, cond), _draw(loaded, backend, cond))
    tensors, meta = load_weights(tmp_path / "ctrl.safetensors")
    assert any(k.startswith("lora.") for k in tensors) and "emb.jpeg4" in tensors
    tensors, meta = load_weights(tmp_path / "ckpt.safetensors")  # the training state: optimiser and step
    assert meta["step"] == 2 and any("exp_avg" in k for k in tensors)
    # merging LoRA for sampling (the CLI does) must not write into the base's shared weights
    base_before = _draw(backend.denoiser, backend, cond)
    merged = _draw(loaded.merge_lora(), backend, cond)  # equal up to float rounding (x CFG's 7.5)
    torch.testing.assert_close(merged, _draw(model, backend, cond), atol=1e-3, rtol=0)
    assert torch.equal(_draw(backend.denoiser, backend, cond), base_before)


def test_resume_from_the_training_checkpoint_is_exact(backend, tmp_path):
    """LoRA + embeddings + optimiser + step + RNG in one safetensors file: resuming after step 1 of 2 ends
    where the uninterrupted run does."""
    import shutil

    cfg = _cfg(**{"rl.steps": 2, "rl.lr_emb": 1.0})
    full, mid = tmp_path / "full.safetensors", tmp_path / "mid.safetensors"

    def keep_step_1(stats):  # called after step 1's update, before its checkpoint: the file holds step 1
        if stats["step"] == 1:
            shutil.copy(full, mid)

    done, _ = finetune(backend, _terms(), cfg, log=keep_step_1, progress=False,
                       ckpt=Checkpointer(full, cfg.to_dict(), every=1))
    assert load_weights(mid)[1]["step"] == 1
    resumed, _ = finetune(backend, _terms(), cfg, progress=False, ckpt=Checkpointer(mid, cfg.to_dict(), every=1))
    a, b = done.adapter_state(), resumed.adapter_state()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_accelerator_cpu_runs_the_same_step(backend):
    from accelerate import Accelerator

    plain, _ = finetune(backend, _terms(), _cfg(), progress=False)
    # through accelerate, and with the official gradient checkpointing: the same numbers
    accel, _ = finetune(backend, _terms(), _cfg(**{"rl.checkpoint": True}), progress=False,
                        accelerator=Accelerator(cpu=True))
    a, b = plain.adapter_state(), accel.adapter_state()
    assert a["emb.jpeg4"].abs().sum() > 0
    assert all(torch.equal(a[k], b[k]) for k in a)  # one process, no accumulation: the plain step exactly


def test_gradient_accumulation_steps_once_per_cycle(backend, tmp_path):
    from accelerate import Accelerator

    cfg = _cfg(**{"rl.steps": 2})
    ckpt = Checkpointer(tmp_path / "ckpt.safetensors", cfg.to_dict(), every=1)
    finetune(backend, _terms(), cfg, progress=False, ckpt=ckpt,
             accelerator=Accelerator(cpu=True, gradient_accumulation_steps=2))
    tensors, _ = load_weights(tmp_path / "ckpt.safetensors")
    adam_steps = {v.item() for k, v in tensors.items() if k.endswith(".step")}
    assert adam_steps == {1.0}  # two rollouts, one optimiser step


def test_cli_bad_model_paths_are_one_line_errors(tmp_path, capsys):
    not_pipe = tmp_path / "not-a-pipeline"
    not_pipe.mkdir()
    (not_pipe / "unet").mkdir()
    for path, words in [(tmp_path / "missing", "no such folder"), (not_pipe, "not a diffusers pipeline folder")]:
        out = tmp_path / f"run-{path.name}"
        assert main(["finetune", "--model", str(path), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err and "Traceback" not in err
        assert not out.exists()
    assert main(["finetune", "--preset", "sd_tiny", "--out", str(tmp_path / "r")]) == 2  # an SD preset, no model
    assert "pass --model PATH" in capsys.readouterr().err


def test_cli_finetune_then_sample(pipe_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("cat\n\ndog\n")
    run = tmp_path / "ft"
    args = ["--model", str(pipe_dir), "--prompts", str(prompts), "--preset", "sd_tiny"]
    assert main(["finetune", *args, "--report-to", "tensorboard", "--out", str(run)]) == 0
    assert (run / "ctrl.safetensors").is_file() and (run / "classifier-jpeg4.safetensors").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
    events.Reload()  # the fine-tune's numbers and its monitoring grid reached the tracker
    assert "reward" in events.Tags()["scalars"] and [e.step for e in events.Images("samples")] == [0]
    assert json.loads((run / "config.json").read_text())["sd"]["model"] == str(pipe_dir)
    from ctrldiff.target import base_hash

    assert load_weights(run / "ctrl.safetensors")[1]["base"] == base_hash(load_sd(pipe_dir))  # `export` checks it
    assert main(["sample", *args, "--ckpt", str(run / "ctrl.safetensors"), "--y", "jpeg4=0", "--c", "1",
                 "-n", "2", "--out", str(tmp_path / "s")]) == 0
    images = load_weights(tmp_path / "s" / "samples.safetensors")[0]["images"]
    assert images.shape == (2, 3, 16, 16)
    assert main(["evaluate", *args, "--ckpt", str(run / "ctrl.safetensors"), "--out", str(tmp_path / "e")]) == 0
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert set(metrics) == {"base", "ctrl"} and metrics["ctrl"]["samples"] == 4  # per_class 1 x 4 jpeg classes
    assert 0 <= metrics["ctrl"]["jpeg4"]["accuracy"] <= 1 and metrics["ctrl"]["mean_kl"] >= 0
    assert math.isnan(metrics["ctrl"]["digit_fidelity"])  # no digit oracle on SD: n/a, not a made-up number


def test_cli_a_control_from_pairs_on_sd(pipe_dir, tmp_path):
    """Pairs from disk define a control on SD too: classifier --pairs (RGB at the decoded size), finetune
    --classifiers, evaluate judged by the monitor."""
    import numpy as np

    x = np.random.default_rng(0).integers(0, 256, (60, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "pairs.npz", x=x, y=np.arange(60) % 2)
    args = ["--model", str(pipe_dir), "--preset", "sd_tiny"]
    assert main(["classifier", *args, "--pairs", str(tmp_path / "pairs.npz"), "--control", "mine",
                 "--out", str(tmp_path / "clf")]) == 0
    assert (tmp_path / "clf" / "controls.json").is_file() and not (tmp_path / "clf" / "noisy-mine.safetensors").exists()
    assert main(["finetune", *args, "--classifiers", str(tmp_path / "clf"), "--control", "mine",
                 "--out", str(tmp_path / "ft")]) == 0
    assert load_weights(tmp_path / "ft" / "ctrl.safetensors")[1]["defined_controls"]["mine"]["num_classes"] == 2
    assert main(["evaluate", *args, "--ckpt", str(tmp_path / "ft" / "ctrl.safetensors"),
                 "--out", str(tmp_path / "e")]) == 0
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["ctrl"]["mine"]["judge"] == "monitor"


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    """A tiny CLIP vision tower (transformers, from a config) and random LAION-predictor weights."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from ctrldiff.backends.sd import AestheticPredictor
    from ctrldiff.io import save_weights

    root = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                                   num_attention_heads=4, image_size=32, patch_size=8,
                                                   projection_dim=16)).save_pretrained(root / "clip")
    save_weights(root / "aesthetic.safetensors", AestheticPredictor(16).state_dict())
    return root / "clip", root / "aesthetic.safetensors"


def test_cli_aesthetic_x_compressible_from_classifier_run(pipe_dir, clip_files, tmp_path):
    from ctrldiff.sd_pipeline import clip_for, load_sd_reward_terms

    clip, predictor = clip_files
    args = ["--model", str(pipe_dir), "--preset", "sd_tiny", "--set", 'rl.controls={"aesthetic2": 1, "jpeg2": 1}',
            "--set", f"sd.clip={clip}", "--set", f"sd.aesthetic_predictor={predictor}"]
    assert main(["classifier", *args, "--out", str(tmp_path / "clf")]) == 0
    cfg = _cfg(**{"rl.controls": {"aesthetic2": 1, "jpeg2": 1}, "sd.clip": str(clip)})
    terms = load_sd_reward_terms(cfg, tmp_path / "clf", clip_for(cfg))
    x = torch.rand(2, 3, 16, 16, requires_grad=True)
    terms[0].classifier.log_prob(x * 2 - 1, torch.tensor([0, 1])).sum().backward()
    assert x.grad.abs().sum() > 0  # the aesthetic reward is differentiable through CLIP
    assert main(["finetune", *args, "--classifiers", str(tmp_path / "clf"), "--out", str(tmp_path / "ft")]) == 0
    state = load_weights(tmp_path / "ft" / "ctrl.safetensors")[0]
    assert state["emb.aesthetic2"][:2].abs().sum() > 0 and state["emb.jpeg2"][:2].abs().sum() > 0


SYNC_SCRIPT = """
import json, sys, torch
from ctrldiff.backends.sd import build_sd_parts, load_sd
from ctrldiff.classifier import Classifier
from ctrldiff.config import apply_overrides, sd_tiny
from ctrldiff.models import SmallCNN
from ctrldiff.rl import RewardTerm, finetune
from ctrldiff.rl.scale import make_accelerator
from ctrldiff.tasks.controls import get_control
acc = make_accelerator(cpu=True)
torch.manual_seed(1)
terms = [RewardTerm(get_control("jpeg4"), Classifier(SmallCNN(4, in_channels=3)).requires_grad_(False), 1.0)]
cfg = apply_overrides(sd_tiny(), ["rl.lr_emb=1.0"])
model, _ = finetune(load_sd(sys.argv[1], ["cat", "dog"]), terms, cfg, progress=False, accelerator=acc)
row = [acc.process_index, acc.num_processes, model.embeddings["jpeg4"].weight.tolist()]
open(f"{sys.argv[2]}/rank{acc.process_index}.json", "w").write(json.dumps(row))  # not stdout: lines interleave
"""


def test_two_processes_average_gradients_and_stay_equal(pipe_dir, tmp_path):
    """`accelerate launch` on 2 GPUs, here as 2 CPU processes (torchrun, gloo): each draws its own batch, the
    averaged gradient keeps the adapters identical (without the average they diverge)."""
    import os
    import subprocess
    import sys

    script = tmp_path / "sync.py"
    script.write_text(SYNC_SCRIPT)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), str(pipe_dir), str(tmp_path)], check=False, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    rows = [json.loads(f.read_text()) for f in sorted(tmp_path.glob("rank*.json"))]
    assert out.returncode == 0 and len(rows) == 2, out.stderr[-2000:]
    assert {r[1] for r in rows} == {2}
    assert rows[0][2] == rows[1][2] and torch.tensor(rows[0][2]).abs().sum() > 0
