"""The bench's stages on disk: classifiers, CTRL and CFG per config (kept, continued or redone on --resume), each
method's measurements cached beside its models, and CTRL's γ sweep."""

from __future__ import annotations

import copy
import shutil
import time
from concurrent.futures import FIRST_COMPLETED, wait
from pathlib import Path

import numpy as np
import torch

from .. import config as C
from ..control import ControlledDenoiser
from ..evaluate import evaluate, path_meter
from ..io import atomic_path, read_json, read_meta, worker_pool
from ..metrics import features, frechet_distance
from ..pipeline import (
    backend_for,
    controls_of,
    digit_oracle,
    fit_reward_terms,
    load_reward_terms,
    log_z_of,
    method_for,
    real_features,
    run_cfg_finetune,
    run_finetune,
)
from ..runs import Run, read_records
from ..tasks.mnist import load_digits, to_unit
from .fronts import common_meter, point
from .grid import TASKS, TUNE_SEED, BenchSize, efficiency_config, swept, task_config, task_seeds


def stage(root: Path, cfg: C.Config, done: str, resume: bool, report_to: str) -> Run | None:
    """One training stage's run folder. With `resume`, None where the stage finished (`done` written) under this
    very config, and an unfinished one under it continues from its checkpoints; anything else starts afresh."""
    same = (resume and (root / "config.json").is_file()
            and C.config_diff(read_json(root / "config.json"), cfg.to_dict()) is None)
    if same and (root / done).is_file():
        return None
    return Run(root, cfg, overwrite=not same, resume=same, report_to=report_to)

def prepare(cfg: C.Config, root: Path, progress: bool = False, seconds: dict | None = None,
            report_to: str = "none", resume: bool = False, noisy: bool = True) -> dict:
    """Classifiers (reward, monitor, and with `noisy` the noise-aware one of classifier guidance), CTRL and CFG for
    one config, under root; the wall time of each stage goes into `seconds` if given; each run reports to the
    `report_to` experiment trackers. resume: keep the stages that finished under this config (and their
    measurements), continue the others."""
    backend, t0, times, trained = backend_for(cfg), time.time(), {}, False
    if run := stage(root / "classifiers", cfg, "classifiers.json", resume, report_to):
        terms, _ = fit_reward_terms(cfg, run, progress, noisy=noisy)
    else:
        terms = load_reward_terms(cfg, root / "classifiers")
    times["classifiers (reward, monitor, noise-aware)"], t0, trained = time.time() - t0, time.time(), run is not None
    if run := stage(root / "ctrl", cfg, "ctrl.safetensors", resume, report_to):
        run_finetune(cfg, run, terms, backend, progress)
    times["CTRL fine-tuning"], t0, trained = time.time() - t0, time.time(), trained or run is not None
    if run := stage(root / "cfg", cfg, "cfg.safetensors", resume, report_to):
        run_cfg_finetune(cfg, run, backend, progress)
    times["CFG on triplets"], trained = time.time() - t0, trained or run is not None
    if trained:  # what a resume kept was derived from other models: their measurements and gamma sweep
        for derived in ("measured", "gamma"):
            shutil.rmtree(root / derived, ignore_errors=True)
    if seconds is not None:
        seconds.update(times)
    return {"classifiers": root / "classifiers", "ctrl": root / "ctrl" / "ctrl.safetensors",
            "cfg": root / "cfg" / "cfg.safetensors", "measured": root / "measured"}

def measure(cfg: C.Config, paths: dict, name: str, knobs: dict, env: dict, seed: int):
    """One method's metrics (and its images and conditions) at `cfg.eval.per_class`, kept under paths["measured"]
    and reused by any later request for the same (the folder is emptied whenever its models are retrained)."""
    knob_key = "-".join(f"{k}{v:g}" for k, v in knobs.items())
    cache = paths["measured"] / f"{name}{knob_key and '-' + knob_key}-n{cfg.eval.per_class}-s{seed}.pt"
    if cache.is_file():
        return torch.load(cache, weights_only=False)
    ckpt = paths.get("ctrl" if name == "ctrl_smc" else name) if name in ("ctrl", "cfg", "ctrl_smc") else None
    method = method_for(cfg, name, env["backend"], knobs, ckpt, paths["classifiers"])
    result = evaluate(method, env["backend"], controls_of(cfg), cfg, env["oracle"], env["real"],
                      reference=env["backend"].denoiser, seed=seed, progress=False,
                      terms=load_reward_terms(cfg, paths["classifiers"]))  # the reward classifiers' and monitors' verdicts
    with atomic_path(cache) as tmp:
        torch.save(result, tmp)
    return result

def measure_meter(cfg: C.Config, paths: dict, env: dict, seed: int) -> dict:
    """CTRL's meter on every request: `target.paths` meter paths per request (`evaluate.path_meter`) beside the bank's
    log Z and ESS, per request as nested lists (num_c, K_1, ...), cached like `measure`."""
    cache = paths["measured"] / f"meter-n{cfg.target.paths}-s{seed}.pt"
    if cache.is_file():
        return torch.load(cache, weights_only=False)
    terms = load_reward_terms(cfg, paths["classifiers"])
    bank = log_z_of(cfg, terms, env["backend"], progress=False)
    method = method_for(cfg, "ctrl", env["backend"], {"w": cfg.eval.guidance}, paths["ctrl"], paths["classifiers"])
    stats = path_meter(method, env["backend"], terms, cfg, cfg.target.paths, seed, progress=False)
    result = {"bank_log_z": bank.table.tolist(), "bank_ess": bank.ess.tolist(), "j": stats.j.tolist(),
              "path_log_z": stats.log_z.tolist(), "path_ess": stats.ess.tolist(), "min_ess": cfg.target.min_ess,
              "min_path_ess": cfg.target.min_path_ess}
    with atomic_path(cache) as tmp:
        torch.save(result, tmp)
    return result

def gamma_dir(out: Path, task: str, seed: int, gamma: float) -> Path:
    """The gamma sweep's fine-tune of one task, seed and gamma (besides the task's own) under a bench folder."""
    return out / task / f"seed{seed}" / "gamma" / f"g{gamma:g}"

def final_gap(run_dir: Path) -> float:
    """The meter log Z - J at the end of a CTRL fine-tune: the mean over the last tenth of its steps (NaN
    without the meter)."""
    gaps = [r["gap"] for r in read_records(run_dir) if "gap" in r]
    return float(np.mean(gaps[-max(1, len(gaps) // 10):])) if gaps else float("nan")

def gamma_model(size: BenchSize, task: str, seed: int, gamma: float, out: Path, backend, resume: bool,
                report_to: str) -> tuple[C.Config, Path]:
    """CTRL of one task and seed at `gamma` (every control at it): its config and run folder. The task's own gamma
    is the seed's CTRL model; any other is a fine-tune that starts from it (its new parameters) and runs
    `size.gamma_steps` steps at `size.gamma_rate` times the rates (None: from scratch, `rl.steps` at the rates),
    trained here unless `resume` finds it finished."""
    cfg, seed_dir = task_config(size, dict.fromkeys(TASKS[task], gamma), seed), out / task / f"seed{seed}"
    if gamma not in swept(size, task):
        return cfg, seed_dir / "ctrl"
    warm, root = size.gamma_steps is not None, gamma_dir(out, task, seed, gamma)
    if warm:
        cfg.rl.steps, cfg.rl.lr_lora, cfg.rl.lr_emb = (size.gamma_steps, size.gamma_rate * cfg.rl.lr_lora,
                                                       size.gamma_rate * cfg.rl.lr_emb)
    if run := stage(root, cfg, "ctrl.safetensors", resume, report_to):
        init = ControlledDenoiser.load(seed_dir / "ctrl" / "ctrl.safetensors", backend) if warm else None
        run_finetune(cfg, run, load_reward_terms(cfg, seed_dir / "classifiers"), backend, progress=False, init=init)
        shutil.rmtree(root / "measured", ignore_errors=True)
    return cfg, root

def gamma_sweep(size: BenchSize, task: str, seed: int, out: Path, env: dict, bar, table: bool = True) -> dict:
    """CTRL on one task and seed for each gamma (`gamma_model`; the seed's classifiers): its point on the front as
    the grid search measures, and with `table` also accuracy, feature-FID, fidelity and path KL at the reported
    sample count. The meter log Z - J at the end of a gamma's own fine-tune says how near its optimum it got
    (`final_gap`, the mean over the last tenth of its steps; NaN without the meter)."""
    result, controls = {}, list(TASKS[task])
    knobs = {"w": C.preset(size.preset).eval.guidance}  # CTRL as the main table samples it: gamma = 10 is reused
    seed_dir = out / task / f"seed{seed}"  # the main table's models and classifiers
    main = {"classifiers": seed_dir / "classifiers", "ctrl": seed_dir / "ctrl" / "ctrl.safetensors",
            "measured": seed_dir / "measured"}
    for gamma in size.gammas:
        bar.set_postfix_str(f"{task} seed {seed}: gamma {gamma:g}")
        cfg, root = gamma_model(size, task, seed, gamma, out, env["backend"], env["resume"], env["report_to"])
        paths = dict(main)
        if gamma in swept(size, task):
            paths |= {"ctrl": root / "ctrl.safetensors", "measured": root / "measured"}
        tune_cfg = copy.deepcopy(cfg)
        tune_cfg.eval.per_class = size.tune_per_class
        front = point("ctrl", {"gamma": gamma}, measure(tune_cfg, paths, "ctrl", knobs, env, TUNE_SEED)[0], controls)
        result[gamma] = {"front": front, "final_gap": final_gap(root)}
        if table:
            m = measure(cfg, paths, "ctrl", knobs, env, seed)[0]
            result[gamma] |= point("ctrl", {"gamma": gamma}, m, controls) | {"mean_kl": m["mean_kl"]}
            result[gamma]["meter"] = measure_meter(cfg, paths, env, seed)
    if table:
        for gamma, row in common_meter({g: r.pop("meter") for g, r in result.items()}).items():
            result[gamma] |= row
    return result

def training_waves(size: BenchSize, out: Path, resume: bool = False, report_to: str = "none") -> list[list]:
    """`train_all`'s jobs, (kind, args), in two waves: each pipeline's classifiers, CTRL and CFG (`prepare`), then
    the gamma sweep's fine-tunes, which start from those CTRL models (`gamma_model`)."""
    return [[("prepare", (task_config(size, TASKS[t], s), out / t / f"seed{s}", False, None, report_to, resume))
             for t in TASKS for s in task_seeds(size, t)]
            + [("prepare", (efficiency_config(size, n, s), out / "efficiency" / f"n{n}-seed{s}", False, None,
                            report_to, resume, False)) for n in size.pairs for s in size.efficiency_seeds],
            [("gamma", (size, t, s, g, out, resume, report_to))
             for t in TASKS for s in task_seeds(size, t) for g in swept(size, t)]]

def _train(job: str, args: tuple, threads: int) -> None:
    """One of `training_waves`' jobs in a worker process of `threads` CPU threads."""
    torch.set_num_threads(threads)
    if job == "prepare":
        prepare(*args)
    else:
        size = args[0]
        gamma_model(*args[:5], backend_for(C.preset(size.preset)), *args[5:])

def _doing(job: str, args: tuple, since: float) -> str | None:
    """What a training job is at, from the newest of its run folders written since `since` (None: not started)."""
    if job == "prepare":
        root, steps = args[1], args[0].rl.steps
        name, stages = f"{root.parent.name}/{root.name}", [("classifiers", root / "classifiers"),
                                                           ("CTRL", root / "ctrl"), ("CFG", root / "cfg")]
    else:
        size, task, seed, gamma, out = args[:5]
        steps = size.gamma_steps or C.preset(size.preset).rl.steps
        name, stages = f"{task}/seed{seed}", [(f"CTRL at gamma {gamma:g}", gamma_dir(out, task, seed, gamma))]
    fresh = [(n, d) for n, d in stages if (d / "metrics.jsonl").is_file()
             and (d / "metrics.jsonl").stat().st_mtime >= since]
    if not fresh:
        return None
    stage, folder = fresh[-1]
    done = [r["step"] + 1 for r in read_records(folder) if "kl" in r and "step" in r]
    return f"{name} {stage}" + (f" {max(done)}/{steps}" if stage.startswith("CTRL") and done else "")

def train_all(size: BenchSize, out: Path, resume: bool, report_to: str, jobs: int, progress: bool = True) -> None:
    """Every model the bench measures (`training_waves`), `jobs` at a time in worker processes with a share of the
    cores each (a fine-tune's step on one core beside another costs 1.2x its time alone on two, so two side by
    side train 1.7x as fast). What measures them afterwards finds them finished (`stage` under the same config).
    The bar counts finished jobs and names what the running ones are at."""
    from tqdm import tqdm

    waves, t0 = training_waves(size, out, resume, report_to), time.time()
    with (tqdm(total=sum(map(len, waves)), desc=f"training, {jobs} at a time", unit="job", disable=not progress,
               dynamic_ncols=True) as bar, worker_pool(jobs) as (pool, threads)):
        for wave in waves:
            pending = {pool.submit(_train, job, args, threads): (job, args) for job, args in wave}
            while pending:
                done, _ = wait(pending, timeout=10.0, return_when=FIRST_COMPLETED)
                for future in done:
                    pending.pop(future)
                    if future.exception() is not None:
                        pool.shutdown(cancel_futures=True)
                        raise future.exception()
                    bar.update()
                bar.set_postfix_str("; ".join(filter(None, (_doing(*job, t0) for job in pending.values()))))

def training_time(size: BenchSize, out: Path) -> dict[str, list]:
    """The fine-tunes of this (perhaps restricted) bench under `out`, each pipeline's with its gamma sweep's, and their
    summed wall time in seconds, from each model's metadata (so a resumed bench counts the runs that earlier
    invocations finished): what a bench's time goes to."""
    roots = [args[1] for _, args in training_waves(size, out)[0]]  # each pipeline's folder

    def models(name: str) -> list[dict]:
        return [read_meta(p) for root in roots for p in sorted(root.rglob(name)) if "checkpoints" not in p.parts]

    ctrl, cfg = models("ctrl.safetensors"), models("cfg.safetensors")
    return {"ctrl": [len(ctrl), sum(m["summary"] for m in ctrl)],
            "cfg": [len(cfg), sum(m["summary"]["seconds"] for m in cfg)]}

def environment(preset: str, report_to: str = "none", resume: bool = False) -> dict:
    """What every measurement shares: the backend, the digit oracle, the real digits' features; and the options."""
    cfg = C.preset(preset)
    backend, oracle = backend_for(cfg), digit_oracle(cfg.data.resolution)
    return {"backend": backend, "oracle": oracle, "real": real_features(cfg, oracle), "report_to": report_to,
            "resume": resume}

def real_floor(env: dict, preset: str, n: int = 1000) -> dict:
    """What real digits score against the held-out ones: the floor of feature-FID at this sample size, and the
    digit oracle's accuracy on them (the ceiling of digit fidelity)."""
    cfg = C.preset(preset)
    train = load_digits("train", cfg.data.resolution, cfg.data.heldout, cfg.data.split_seed)
    keep = torch.randperm(len(train.c), generator=torch.Generator().manual_seed(cfg.seed))[:n]  # sorted by digit
    images, c = to_unit(train.x[keep]), train.c[keep]
    return {"feature_fid": frechet_distance(features(env["oracle"], images), env["real"]),
            "digit_fidelity": (env["oracle"].predict(images * 2 - 1) == c).float().mean().item(), "n": n}
