"""Adjoint Matching (`rl.estimator="adjoint"`, rl/adjoint.py) and the full-network adapter: the lean adjoint's
maths, its fixed point against the closed-form optimum, and the loop's bookkeeping."""

import copy
import math

import gaussian_chain
import pytest
import torch
from test_control_rl import _brightness_task

from ctrldiff.backends.mixture import mixture_backend
from ctrldiff.checkpoint import Checkpointer
from ctrldiff.conditions import balanced_conditions
from ctrldiff.config import Config, tiny
from ctrldiff.contracts import Cond
from ctrldiff.control import ControlledDenoiser
from ctrldiff.evaluate import path_meter
from ctrldiff.exactness import CONTROL, make_setup, rl_config
from ctrldiff.io import CtrlDiffError, read_json, read_meta
from ctrldiff.methods import build_method
from ctrldiff.pipeline import run_finetune
from ctrldiff.rl import RewardTerm, finetune
from ctrldiff.rl.adjoint import lean_adjoints, matching_loss, regressed_steps
from ctrldiff.runs import Run
from ctrldiff.sampling import sample, step_times
from ctrldiff.schedule import step_mean_std
from ctrldiff.target import bank_log_probs, bank_log_z, build_bank


def test_lean_adjoint_is_the_gradient_of_the_reward_through_the_frozen_chain():
    """With the model equal to the base, a_i is d reward(x_0) / d x_i along the chain with its noise held fixed:
    central finite differences in float64 agree (a generic, learned-style MLP base)."""
    torch.manual_seed(0)
    be = mixture_backend(exact=False, seed=3)
    be.net.double()  # the schedule is float64 already
    steps, n = 6, 5
    cond = Cond(torch.tensor([0, 1, 0, 1, 0]), {"direction3": torch.tensor([0, 1, 2, 0, 1])})
    w = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def reward(x0):
        return 4.0 * (x0 @ w).log_softmax(-1).gather(1, cond.y["direction3"][:, None]).squeeze(1)

    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        traj = sample(be.denoiser, be.schedule, torch.randn((n, 2), generator=g, dtype=torch.float64), cond,
                      steps=steps, generator=g)
    adj = lean_adjoints(be, traj, cond, reward)
    times = step_times(be.schedule, steps)
    noise = [(traj.xs[i + 1] - traj.means[i]) / traj.stds[i] if (traj.stds[i] > 0).all() else 0 for i in range(steps)]

    def from_state(i, x):  # the rest of the chain through the base, the trajectory's own noise
        with torch.no_grad():
            for k in range(i, steps):
                t, t_prev = (v.expand(n) for v in times[k])
                mean, std = step_mean_std(be.schedule, x, be.denoiser(x, t, cond), t, t_prev, 1.0)
                x = mean + std * noise[k]
            return reward(x)

    v, h = torch.randn((n, 2), dtype=torch.float64, generator=g), 1e-5
    for i in (1, 3, steps - 1, steps):
        fd = (from_state(i, traj.xs[i] + h * v) - from_state(i, traj.xs[i] - h * v)) / (2 * h)
        torch.testing.assert_close((adj[i] * v).sum(1), fd, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(torch.stack(traj.ref_means), torch.stack(traj.means))  # the base's own means


def test_adjoint_matching_target_is_the_optimal_control_on_a_linear_gaussian_chain():
    """Gaussian base, linear reward: the regression target sigma_i a_{i+1} is, for every path, the closed-form
    optimal control u*_i = sigma_i grad V_{i+1} (the loss's minimiser); and the loss at u* is 0."""
    be, steps = gaussian_chain.backend(), 6
    coefs = gaussian_chain.affine_steps(be, steps)
    cond = Cond(torch.zeros(64, dtype=torch.long))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        traj = sample(be.denoiser, be.schedule, torch.randn((64, 2), generator=g), cond, steps=steps, generator=g)
    adj = lean_adjoints(be, traj, cond, lambda x0: x0 @ gaussian_chain.A)
    for i, u in enumerate(gaussian_chain.optimal_controls(coefs)):
        if u is None:
            assert i == steps - 1  # the last, deterministic step has no control
            continue
        torch.testing.assert_close(traj.stds[i] * adj[i + 1], u.expand(64, 2), rtol=1e-4, atol=1e-5)

    class Optimal:  # eps_pre + the shift that makes mu_theta - mu_pre = sigma_i u*_i
        def __call__(self, x, t, c):
            i = int((be.schedule.timesteps(steps) == t[0]).nonzero())
            u, (_, _, s, k) = gaussian_chain.optimal_controls(coefs)[i], coefs[i]
            return be.denoiser(x, t, c) + (0 if u is None else u * s / k)

    stochastic = [i for i in range(steps) if (traj.stds[i] > 0).all()]
    assert matching_loss(Optimal(), be, traj, cond, adj, stochastic).item() < 1e-6
    assert matching_loss(be.denoiser, be, traj, cond, adj, stochastic).item() > 0.1


@pytest.mark.parametrize("estimator", ["backprop", "adjoint"])
def test_both_estimators_reach_the_closed_form_optimum(estimator):
    """Fine-tuned on the linear-Gaussian chain, both estimators end near P*: the path meter's KL(P_theta || P*)
    falls to a small fraction of the base's (both share the optimum; the tilted kernel is exactly Gaussian)."""
    be, steps = gaussian_chain.backend(), 6
    term = gaussian_chain.term(gamma=1.0)
    cfg = Config(name="linear-gaussian")
    cfg.sampler.steps, cfg.rl.controls = steps, {"linear": 1.0}
    cfg.rl.steps, cfg.rl.batch, cfg.rl.estimator, cfg.rl.monitor_every = 150, 64, estimator, 0
    cfg.rl.lora_rank, cfg.rl.lr_lora, cfg.rl.lr_emb, cfg.rl.weight_decay = 8, 1e-2, 0.1, 0.0
    model, _ = finetune(be, [term], cfg, progress=False)
    cfg.eval.batch = 4096
    before = path_meter(build_method("base", be, steps=steps), be, [term], cfg, 4096, progress=False)
    after = path_meter(build_method("ctrl", be, steps=steps, model=model), be, [term], cfg, 4096, progress=False)
    base_gap, gap = (before.log_z - before.j).item(), (after.log_z - after.j).item()
    assert gap < 0.1 * base_gap, (estimator, gap, base_gap)


def test_a_short_adjoint_fine_tune_lowers_the_meter_on_2d_mixtures():
    setup = make_setup(steps=10)
    cfg = rl_config(setup, 3.0, 1.0, steps=40, batch=64)
    cfg.rl.estimator = "adjoint"
    bank = build_bank(setup.backend, 5000, steps=10, eta=1.0, progress=False)
    log_z = bank_log_z(bank_log_probs(setup.backend, bank, {CONTROL.name: setup.classifier}), {CONTROL.name: 3.0})
    records = []
    finetune(setup.backend, [RewardTerm(CONTROL, setup.classifier, 3.0)], cfg, log=records.append, progress=False,
             log_z=log_z)
    gaps = [r["gap_all"] for r in records]
    assert sum(gaps[-10:]) < 0.5 * sum(gaps[:10]), gaps


def test_regressed_steps_are_the_stochastic_ones_or_a_random_subset_in_groups():
    traj = type("T", (), {"stds": [torch.ones(1)] * 4 + [torch.zeros(1)]})()
    g = torch.Generator().manual_seed(0)
    assert regressed_steps(traj, None, g) == [[0, 1, 2, 3]] and regressed_steps(traj, 9, g) == [[0, 1, 2, 3]]
    (two,) = regressed_steps(traj, 2, g)
    assert len(two) == 2 and set(two) < {0, 1, 2, 3}
    halves = regressed_steps(traj, None, g, groups=2)
    assert sorted(halves[0] + halves[1]) == [0, 1, 2, 3] and all(len(h) == 2 for h in halves)
    assert len(regressed_steps(traj, 3, g, groups=9)) == 3  # never an empty group


def test_adjoint_resume_is_bit_identical_and_the_settings_are_recorded(tiny_backend, tmp_path):
    cfg = tiny()
    cfg.rl.steps, cfg.rl.monitor_every, cfg.rl.estimator, cfg.rl.adjoint_steps = 6, 100, "adjoint", 3
    cfg.rl.adjoint_updates = 2
    term = _brightness_task(tiny_backend, cfg)
    whole, _ = finetune(tiny_backend, [term], cfg, progress=False)

    def stop_after_three(stats):
        if stats["step"] == 3:
            raise KeyboardInterrupt

    path = tmp_path / "ctrl.ckpt.safetensors"
    with pytest.raises(KeyboardInterrupt):
        finetune(tiny_backend, [term], cfg, log=stop_after_three, progress=False, ckpt=Checkpointer(path, {}, 3))
    resumed, _ = finetune(tiny_backend, [term], cfg, progress=False, ckpt=Checkpointer(path, {}, 3))
    for (k, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    backprop = copy.deepcopy(cfg)
    backprop.rl.estimator = "backprop"
    other, _ = finetune(tiny_backend, [term], backprop, progress=False)
    assert not torch.equal(other.embeddings["bright2"].weight, whole.embeddings["bright2"].weight)
    cfg.rl.final_step = "model"
    with pytest.raises(CtrlDiffError, match="adjoint.*final_step='base'"):
        finetune(tiny_backend, [term], cfg, progress=False)


def test_the_pipeline_records_estimator_and_adapter(tiny_backend, tmp_path):
    cfg = tiny()
    cfg.rl.estimator, cfg.rl.adapter, cfg.rl.steps, cfg.target.meter = "adjoint", "full", 2, False
    cfg.rl.controls = {"bright2": 5.0}
    run = Run(tmp_path / "run", cfg)
    run_finetune(cfg, run, [_brightness_task(tiny_backend, cfg)], tiny_backend, progress=False)
    meta = read_meta(run.path("ctrl.safetensors"))
    assert meta["adapter"] == "full" and meta["estimator"] == "adjoint"
    assert read_json(run.path("config.json"))["rl"]["estimator"] == "adjoint"
    loaded = ControlledDenoiser.load(run.path("ctrl.safetensors"), tiny_backend)
    assert loaded.adapter == "full" and loaded.lora_rank == 0


def test_full_adapter_starts_as_the_base_trains_every_weight_and_round_trips(tiny_backend, tmp_path):
    model = ControlledDenoiser(tiny_backend, {"a": 3}, adapter="full")
    cond = balanced_conditions(6, 10, {"a": 3})
    x, t = torch.randn(6, 1, 8, 8), torch.full((6,), 500)
    assert torch.equal(model(x, t, cond), tiny_backend.denoiser(x, t, cond))
    n_net = sum(p.numel() for p in tiny_backend.net.parameters())
    assert sum(p.numel() for p in model.lora_parameters()) == n_net
    assert not any(p.requires_grad for p in tiny_backend.net.parameters())  # the base stays frozen
    with torch.no_grad():
        next(model.net.parameters()).add_(0.1)
        model.embeddings["a"].weight[:3] = 1.0
    assert not torch.equal(next(model.net.parameters()), next(tiny_backend.net.parameters()))
    model.save(tmp_path / "full.safetensors")
    back = ControlledDenoiser.load(tmp_path / "full.safetensors", tiny_backend)
    torch.testing.assert_close(back(x, t, cond), model(x, t, cond))
    with pytest.raises(CtrlDiffError, match="adapter='half'"):
        ControlledDenoiser(tiny_backend, {"a": 3}, adapter="half")
    assert math.isfinite(model(x, t, cond).sum().item())
