"""What a CTRL step on Stable Diffusion v1.5 costs: seconds and peak memory per CTRL step and per sampled image,
on an SD pipeline built from the configs shipped in `assets/sd_<size>.json` with random weights. The shapes
alone decide time and memory, so no download is needed.

    python benchmarks/sd_scale.py --size sd15                 # a GPU: the sweep (GRIDS); a CPU: one step, batch 1
    python benchmarks/sd_scale.py --size tiny --docs DIR      # seconds (CI)
    python benchmarks/sd_scale.py --from-json OUT/sd_scale.json   # the section from a run made elsewhere

The components are wrapped as the SD backend exactly as `--model` wraps a pipeline folder (`wrap_sd`) and
fine-tuned by `finetune` under accelerate as `ctrldiff finetune --model` does, with the `sd_compress4` preset
(plus `--set` overrides and each grid row's own settings). The reward classifier is the pipeline's small CNN
(random weights); the monitor is off (rl.monitor_every = 0: it samples 64 images every 50 steps, not part of a
step). One image is then sampled by the fine-tuned model as `ctrldiff sample` does (LoRA merged).

Each row runs in its own subprocess: its peak memory is its own (`torch.cuda.max_memory_allocated` on a GPU,
the peak RSS on a CPU), an out-of-memory ends only that row, and accelerate's mixed-precision state is per
process. Writes `<out>/sd_scale.json` and, for `--size sd15` (or with `--docs`), the `sd_scale` section of
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ctrldiff import config as C
from ctrldiff.io import CtrlDiffError, read_json, write_json, write_section

ROOT = Path(__file__).resolve().parents[1]
PRECISIONS = [  # (sd.dtype of the frozen networks, sd.mixed_precision of the fine-tune)
    ("float32", "no"), ("float32", "fp16"), ("float32", "bf16"), ("float16", "fp16"), ("bfloat16", "bf16")]
GRIDS = {  # rows as overrides of the base config (sd_compress4: batch 4, float32, no autocast, checkpointing, random)
    "one": [{"rl.batch": 1}],
    "sweep": [{}, {"rl.batch": 1}, {"rl.batch": 2},
              *[{"sd.dtype": d, "sd.mixed_precision": m} for d, m in PRECISIONS[1:]],
              {"sd.dtype": "float16"}, {"sd.dtype": "bfloat16"},  # half weights without autocast
              {"rl.checkpoint": False}, {"rl.truncate": 1}],
    "full": [{"rl.batch": b, "sd.dtype": d, "sd.mixed_precision": m, "rl.checkpoint": ck, "rl.truncate": tr}
             for b, (d, m), ck, tr in itertools.product([1, 2, 4], PRECISIONS, [True, False], ["random", 1])],
}
COLUMNS = ["rl.batch", "sd.dtype", "sd.mixed_precision", "rl.checkpoint", "rl.truncate"]


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    from ctrldiff.bench import machine

    return f"CPU only: {machine()}, torch threads {torch.get_num_threads()}"


class PeakMemory:
    """Peak memory of this process since `reset()`, in GiB: the GPU's allocated bytes, else the peak RSS
    (Linux: writing 5 to /proc/self/clear_refs resets VmHWM)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def reset(self) -> None:
        self.sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            Path("/proc/self/clear_refs").write_text("5")

    def peak(self) -> float:
        self.sync()
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**30
        status = Path("/proc/self/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))) / 2**20


def checksum(modules) -> torch.Tensor:
    """One float64 sum per parameter tensor: any update of a frozen weight changes it."""
    return torch.stack([p.detach().double().sum() for m in modules for p in m.parameters()]).cpu()


def measure(size: str, cfg: C.Config, warmup: int, steps: int, device: str) -> dict:
    """One row, in this process: `warmup` + `steps` CTRL steps, then as many sampled images."""
    from ctrldiff.backends.sd import build_sd_parts, read_prompts, wrap_sd
    from ctrldiff.classifier import Classifier
    from ctrldiff.contracts import Cond
    from ctrldiff.evaluate import generate
    from ctrldiff.methods import build_method
    from ctrldiff.models import SmallCNN
    from ctrldiff.rl import RewardTerm, finetune
    from ctrldiff.rl.scale import make_accelerator
    from ctrldiff.tasks.controls import get_control

    mem = PeakMemory(device)
    with tempfile.TemporaryDirectory() as tmp, torch.device(device):  # random init on the device itself
        parts = build_sd_parts(size, Path(tmp) / "tokenizer", cfg.seed)
    backend = wrap_sd(**parts, prompts=read_prompts(cfg.sd.prompts), guidance=cfg.sd.guidance,
                      resolution=cfg.sd.resolution, device=device, dtype=cfg.sd.dtype)
    backend.prompt_embeddings()  # once per run (cached), not per step
    frozen = (backend.net, backend.vae, backend.text_encoder)
    before = checksum(frozen)
    torch.manual_seed(cfg.seed)
    terms = [RewardTerm(get_control(name), Classifier(SmallCNN(get_control(name).num_classes, in_channels=3))
                        .requires_grad_(False), gamma) for name, gamma in cfg.rl.controls.items()]
    cfg.rl.steps, cfg.rl.monitor_every = warmup + steps, 0
    marks = []

    def log(stats):
        mem.sync()
        marks.append(time.perf_counter())

    mem.reset()
    marks.append(time.perf_counter())
    model, _ = finetune(backend, terms, cfg, log=log, progress=False,
                        accelerator=make_accelerator(cfg.sd.mixed_precision, cfg.sd.accumulate, device == "cpu"))
    row = {"step_seconds": [b - a for a, b in itertools.pairwise(marks)][warmup:], "step_peak_gib": mem.peak(),
           "frozen_unchanged": bool(torch.equal(before, checksum(frozen))),
           "adapters_changed": bool(all(p.abs().sum() > 0 for n, p in model.named_parameters()
                                        if "lora_B" in n or n.startswith("embeddings.")))}
    method = build_method("ctrl", backend, {"w": cfg.eval.guidance}, steps=cfg.sampler.steps, eta=cfg.sampler.eta,
                          model=model.merge_lora())
    cond = Cond(torch.tensor([0]), {name: torch.tensor([0]) for name in cfg.rl.controls})
    mem.reset()
    seconds = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        generate(method, backend, cond, cfg, seed=i, progress=False)  # images come back to the CPU: synced
        seconds.append(time.perf_counter() - t0)
    row.update(sample_seconds=seconds[warmup:], sample_peak_gib=mem.peak(), resolution=backend.resolution,
               weights_gib=sum(p.numel() * p.element_size() for m in frozen for p in m.parameters()) / 2**30)
    return row


def run_row(args, overrides: list[str]) -> dict:
    """A row in a subprocess; an error (out of memory, a refused setting) becomes the row's `error`."""
    cmd = [sys.executable, __file__, "--row", json.dumps(overrides), "--size", args.size, "--device", args.device,
           "--steps", str(args.steps), "--warmup", str(args.warmup)]
    t0 = time.time()
    out = subprocess.run(cmd, check=False, capture_output=True, text=True)
    found = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode == 0 and found:
        row = json.loads(found[-1][7:])
    else:
        lines = (out.stderr.strip() or f"exit code {out.returncode} (killed?)").splitlines()
        row = {"error": lines[-1][:200]}
    return {**row, "wall_seconds": time.time() - t0}


def fmt(row: dict, settings: dict) -> str:
    cells = [str(settings[k]).lower() if isinstance(settings[k], bool) else str(settings[k]) for k in COLUMNS]
    if "error" in row:
        return "| " + " | ".join(cells) + f" | failed: {row['error'].replace('|', '/')} | | | | |"
    ok = "yes" if row["frozen_unchanged"] and row["adapters_changed"] else "**no**"
    return ("| " + " | ".join(cells) + f" | {statistics.mean(row['step_seconds']):.2f} | {row['step_peak_gib']:.2f} | "
            f"{statistics.mean(row['sample_seconds']):.2f} | {row['sample_peak_gib']:.2f} | {ok} |")


def table(rows: list[dict], memory: str) -> str:
    head = ["batch", "sd.dtype", "sd.mixed_precision", "checkpointing", "truncation", "s / CTRL step",
            f"peak {memory}, GiB (step)", "s / image", f"peak {memory}, GiB (sampling)", "only adapters changed"]
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
                      *[fmt(r["result"], r["settings"]) for r in rows]])


def document(record: dict) -> str:
    """The sd_scale section of docs/benchmarks.md from a run's record (`<out>/sd_scale.json`)."""
    r, memory = record, record["memory"]
    done = next((row for row in r["rows"] if "error" not in row["result"]), None)
    weights = (f"{done['result']['weights_gib']:.2f} GiB of frozen weights in {done['settings']['sd.dtype']}; "
               f"{done['result']['resolution']} px") if done else "no row finished"
    return "\n".join([
        f"# Stable Diffusion v1.5 shapes: time and memory per CTRL step (`--size {r['size']}`)\n",
        (f"Produced by `{r['command']}` on {r['device']}, {r['date']}; total wall time {r['seconds']:.0f} s. Every "
         f"number below comes from that run.\n"),
        (f"UNet, VAE and CLIP text encoder built from `src/ctrldiff/assets/sd_{r['size']}.json` with random "
         f"weights (the same time and memory as the real ones; {weights}), wrapped as `--model` wraps a "
         f"pipeline. Preset `sd_compress4` with `--set` {', '.join(f'`{o}`' for o in r['overrides']) or 'none'}: "
         f"{r['preset']}; monitor off. "
         f"A row's settings replace the preset's. Time: mean over {r['steps']} CTRL step(s) after {r['warmup']} "
         f"warm-up step(s), then the same for sampling one image (DDIM chain with CFG + VAE decode, LoRA "
         f"merged). Peak {memory}: of the row's own process during the steps (weights included), reset before "
         f"sampling. \"Only adapters changed\": the frozen UNet, VAE and text encoder are bit-for-bit unchanged "
         f"(a checksum per tensor) and every LoRA B factor and control embedding moved.\n"),
        table(r["rows"], memory)])


def write_doc(record: dict, docs: Path | None) -> None:
    text = document(record)
    if docs is not None:
        write_section(docs / "benchmarks.md", "sd_scale", text)
    print(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["tiny", "sd15"], default="sd15", help="the pipeline's shape")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="where the networks run (default: cuda if there is one, else cpu)")
    ap.add_argument("--grid", choices=sorted(GRIDS), help="rows (default: sweep on a GPU, one on a CPU): one = "
                    "batch 1; sweep = the preset, then one setting changed at a time; full = every combination")
    ap.add_argument("--steps", type=int, default=2, help="timed CTRL steps (and sampled images) per row")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps (and images) before them")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override of every row (e.g. sampler.steps=2), before the row's own")
    ap.add_argument("--out", type=Path, default=Path("runs/sd-scale"), help="folder of sd_scale.json")
    ap.add_argument("--docs", type=Path, help="write the sd_scale section of DIR/benchmarks.md "
                    "(default: docs/ for --size sd15, nothing for tiny)")
    ap.add_argument("--from-json", type=Path, metavar="FILE", help="no run: write the section from a run's "
                    "sd_scale.json (e.g. one fetched from a GPU machine) into --docs (default: docs/)")
    ap.add_argument("--row", help=argparse.SUPPRESS)  # internal: one row's overrides (JSON), print its result
    args = ap.parse_args()
    if args.steps < 1 or args.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")
    try:
        run(args)
    except CtrlDiffError as e:  # a bad --set or --from-json: one line, exit code 2, nothing written
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def run(args) -> None:
    if args.row:
        cfg = C.apply_overrides(C.sd_compress4(), json.loads(args.row))
        print("RESULT " + json.dumps(measure(args.size, cfg, args.warmup, args.steps, args.device)))
        return
    if args.from_json:
        write_doc(read_json(args.from_json), args.docs or ROOT / "docs")
        return
    grid = GRIDS[args.grid or ("sweep" if args.device.startswith("cuda") else "one")]
    base = C.apply_overrides(C.sd_compress4(), args.overrides)  # a bad --set fails here, in one line
    record = {"size": args.size, "device": device_name(args.device), "steps": args.steps, "warmup": args.warmup,
              "memory": "GPU memory allocated" if args.device.startswith("cuda") else "RSS",
              "command": "python benchmarks/sd_scale.py " + " ".join(sys.argv[1:]), "date": time.strftime("%Y-%m-%d"),
              "overrides": args.overrides, "rows": [],
              "preset": (f"DDIM {base.sampler.steps} steps, η {base.sampler.eta}, text CFG {base.sd.guidance}, "
                         f"LoRA rank {base.rl.lora_rank}, control(s) {', '.join(base.rl.controls)}")}
    t0 = time.time()
    for diff in grid:
        overrides = args.overrides + [f"{k}={json.dumps(v)}" for k, v in diff.items()]
        cfg = C.apply_overrides(C.sd_compress4(), overrides)
        settings = {k: getattr(getattr(cfg, k.split(".")[0]), k.split(".")[1]) for k in COLUMNS}
        record["rows"].append({"settings": settings, "overrides": overrides, "result": run_row(args, overrides)})
        record["seconds"] = time.time() - t0
        print(fmt(record["rows"][-1]["result"], settings), flush=True)
        write_json(args.out / "sd_scale.json", record)
    write_doc(record, args.docs or (ROOT / "docs" if args.size == "sd15" else None))


if __name__ == "__main__":
    main()
