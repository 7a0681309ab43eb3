"""The 2-D backend with a known answer, and a seeded check that CTRL samples p_gamma (issue 5)."""

import pytest
import torch
from one_thread import one_thread

from ctrldiff.backends.mixture import (
    MIXTURES,
    Grid,
    LogisticNet,
    exact_samples,
    fit_logistic,
    grid,
    mode_masses,
    ring,
    total_variation,
)
from ctrldiff.contracts import Cond
from ctrldiff.control import ControlledDenoiser
from ctrldiff.exactness import (
    CONTROL,
    TargetDenoiser,
    TiltedStart,
    base_rollouts,
    ctrl_samples,
    distances,
    fit_adapter,
    make_setup,
    optimum,
    requests,
    rl_config,
    start_bias,
    target_masses,
    train_ctrl,
)
from ctrldiff.tasks.controls import Control

GRID = Grid(half=4.0, bins=24, sub=4)


def test_exact_eps_is_the_noisy_mixture_score():
    mix, g = MIXTURES[1], torch.Generator().manual_seed(0)
    x = 2 * torch.randn((64, 2), generator=g)
    abar = torch.rand((64, 1), generator=g)
    x.requires_grad_(True)
    (score,) = torch.autograd.grad(mix.noisy_log_prob(x, abar).sum(), x)
    torch.testing.assert_close(mix.eps(x.detach(), abar), -(1 - abar).sqrt() * score, rtol=1e-4, atol=1e-5)


def test_grid_histogram_and_tv():
    g = torch.Generator().manual_seed(0)
    x = MIXTURES[0].sample(20_000, g)
    h = GRID.histogram(x)
    assert abs(float(h.sum()) - 1) < 1e-6
    target = GRID.masses(MIXTURES[0].log_prob(GRID.points()))
    assert abs(float(target.sum()) - 1) < 1e-5
    assert total_variation(h, target) < 0.06  # exact draws: only sampling noise
    assert total_variation(target, target) == 0
    assert total_variation(GRID.histogram(MIXTURES[1].sample(20_000, g)), target) > 0.3  # the other mixture (0.46)


def test_exact_base_samples_p_pre():
    setup = make_setup(steps=50, grid=GRID)
    g = torch.Generator().manual_seed(0)
    _, x0 = base_rollouts(setup, 0, 20_000, 1.0, g)
    d = distances(setup, x0, 0, 0, 0.0, g, reference=50_000)
    assert d["tv"] < d["tv_floor"] + 0.08, d  # 50 DDIM steps: discretisation adds ~0.05 (measured 0.087 vs 0.033)


def test_rejection_samples_follow_the_tilt():
    clf, g = LogisticNet(3), torch.Generator().manual_seed(0)
    x = exact_samples(MIXTURES[0], clf, 0, 3.0, 5_000, g)
    assert len(x) == 5_000
    assert float(x[:, 0].mean()) > 1.0  # class 0 points along +x: the tilt moves mass there


def test_logistic_fit_recovers_the_analytic_classifier():
    g = torch.Generator().manual_seed(0)
    truth = LogisticNet(3)
    x = 2 * torch.randn((4_000, 2), generator=g)
    y = torch.multinomial(truth(x).softmax(-1), 1, generator=g).squeeze(1)
    fitted = fit_logistic(x, y, 3)
    torch.testing.assert_close(fitted.head.weight, truth.head.weight, atol=0.15, rtol=0)


def test_augmented_model_equals_the_exact_base_at_init():
    setup = make_setup(steps=10, grid=GRID)
    model = ControlledDenoiser(setup.backend, {CONTROL.name: 3}, lora_rank=8)
    assert set(model.lora_targets) == {"fc1", "fc2", "fc3", "out"}
    x, t = torch.randn(16, 2), torch.randint(0, 1000, (16,))
    cond = Cond(torch.arange(16) % 2, {CONTROL.name: torch.arange(16) % 3})
    torch.testing.assert_close(model(x, t, cond), setup.backend.denoiser(x, t, cond), rtol=0, atol=0)


def test_tilted_start_moves_x_T_towards_the_requested_class():
    setup = make_setup(steps=20, grid=GRID)
    g = torch.Generator().manual_seed(0)
    start = TiltedStart(setup, 3.0, 0.5, 4_000, g)
    n = 2_000
    x_T = start(Cond(torch.zeros(n, dtype=torch.long), {CONTROL.name: torch.zeros(n, dtype=torch.long)}), g)
    assert x_T.shape == (n, 2) and float(x_T[:, 0].mean()) > 0.1  # class 0 lies along +x


@pytest.fixture(scope="module")
def trained():
    """CTRL at gamma = 3 with the KL summed (ours) and averaged over the d = 2 dims (the official convention)."""
    # One thread: 150 steps at these rates are chaotic in the last bits, so the summation order moves the favoured
    # mode's mass by a few hundredths (seed 0: +0.009 from exact on one thread, +0.039 on two; seeds 0-3 on two
    # threads: +0.037, +0.027, -0.006, +0.007). The single-threaded run reproduces the docstring's numbers.
    with one_thread():
        setup = make_setup(steps=20, grid=GRID)
        models = {kl: train_ctrl(setup, rl_config(setup, 3.0, 1.0, steps=150, batch=128, kl=kl))[0]
                  for kl in ("sum", "mean")}
    return setup, models


def test_ctrl_samples_p_gamma_and_a_broken_kl_convention_does_not(trained):
    """Seeded, small (20 DDIM steps, 150 RL steps, gamma 3): the favoured mode (0°, the ring's mode along y = 0's
    direction) gets the mass p_3 gives it (measured 0.498 against 0.488 exact; p_6 gives 0.620), and the TV to
    p_3 is within a loose bound (measured 0.194; the 20-step sampler's own error is most of it). The same run
    with the KL averaged over the d = 2 dims, the official convention, over-tilts towards p_6 (measured 0.552)."""
    setup, models = trained
    g = torch.Generator().manual_seed(1)
    exact = mode_masses(MIXTURES[0], exact_samples(MIXTURES[0], setup.classifier, 0, 3.0, 50_000, g))[0]
    x = ctrl_samples(setup, models["sum"], 0, 0, 20_000, 1.0, g)
    assert abs(float(mode_masses(MIXTURES[0], x)[0] - exact)) < 0.03
    assert distances(setup, x, 0, 0, 3.0, g, reference=50_000)["tv"] < BOUND
    x = ctrl_samples(setup, models["mean"], 0, 0, 20_000, 1.0, g)
    assert float(mode_masses(MIXTURES[0], x)[0] - exact) > 0.04


def test_target_masses_depend_on_gamma():
    setup = make_setup(steps=10, grid=GRID)
    assert total_variation(target_masses(setup, 0, 0, 1.0), target_masses(setup, 0, 0, 3.0)) > 0.1


BOUND = 0.25  # TV to p_3 of the small seeded CTRL run (measured 0.194)


def test_posterior_mean_is_tweedies_estimate():
    """The closed-form p(x_0 | x_t) behind the target's eps: its mean must be Tweedie's E[x_0 | x_t]."""
    mix, g = MIXTURES[0], torch.Generator().manual_seed(0)
    x_t, abar = 2 * torch.randn((64, 2), generator=g), torch.rand((64, 1), generator=g).clamp(0.01, 0.99)
    log_w, means, var = mix.posterior(x_t, abar)
    tweedie = (x_t - (1 - abar).sqrt() * mix.eps(x_t, abar)) / abar.sqrt()
    torch.testing.assert_close((log_w.exp()[:, :, None] * means).sum(1), tweedie, rtol=1e-4, atol=1e-5)
    assert bool((var < mix.std**2).all())  # observing x_t can only narrow a mode


def test_target_denoiser_is_the_base_at_gamma_0_and_samples_p_gamma():
    setup, g = make_setup(steps=50, grid=GRID), torch.Generator().manual_seed(0)
    x_t, t, cond = torch.randn((32, 2), generator=g), torch.randint(0, 1000, (32,), generator=g), requests(setup, 32, 1, 2)
    torch.testing.assert_close(TargetDenoiser(setup, 0.0)(x_t, t, cond), setup.backend.denoiser(x_t, t, cond))
    x = ctrl_samples(setup, TargetDenoiser(setup, 3.0), 0, 0, 4000, 1.0, g)
    _, base = base_rollouts(setup, 0, 4000, 1.0, g)
    tv_target, tv_base = (distances(setup, v, 0, 0, 3.0, g, reference=20_000)["tv"] for v in (x, base))
    assert tv_target < 0.2 and tv_base > 0.5, (tv_target, tv_base)  # measured 0.10 (floor 0.03) vs 0.63


def test_an_unseen_problem_is_data_passed_in():
    """Another base (a 5-mode ring, a 2x2 grid) and another control (4 directions) are arguments, not module
    globals: the base draws the 5-mode ring (TV 0.105 to it; 0.78 when the mixtures were ignored), the exact
    target's chain samples that problem's p_gamma (TV 0.106 against the base's 0.756; the sampling floor 0.03)
    and the grid's optimum covers its 2 x 4 requests."""
    five = ring(modes=5, radius=1.5)
    setup = make_setup(steps=50, grid=GRID, mixtures=[five, grid(side=2, spacing=2.0)],
                       control=Control("direction4", 4, None))
    g = torch.Generator().manual_seed(0)
    x = ctrl_samples(setup, TargetDenoiser(setup, 3.0), 0, 0, 4000, 1.0, g)
    _, base = base_rollouts(setup, 0, 4000, 1.0, g)
    pre = total_variation(GRID.histogram(base), GRID.masses(five.log_prob(GRID.points())))
    tv_target, tv_base = (distances(setup, v, 0, 0, 3.0, g, reference=20_000)["tv"] for v in (x, base))
    assert pre < 0.2 and tv_target < 0.2 and tv_base > 0.5, (pre, tv_target, tv_base)
    assert len(setup.conditions()) == 8 and optimum(setup, 3.0)["kl"] > 0


def test_optimum_is_log_z_and_a_nonnegative_kl():
    setup = make_setup(grid=GRID)
    flat = optimum(setup, 0.0)
    assert abs(flat["log_z"]) < 1e-3 and abs(flat["kl"]) < 1e-3  # p_pre is normalised on the grid
    one, three = optimum(setup, 1.0), optimum(setup, 3.0)
    assert 0 < one["kl"] < three["kl"] and three["log_z"] < one["log_z"] < 0  # p̂ <= 1: Z falls with gamma


def test_start_bias_is_nil_for_ddpm_and_real_for_ddim_half():
    setup, g = make_setup(steps=20, grid=GRID), torch.Generator().manual_seed(0)
    half, ddpm = (start_bias(setup, 0, eta, [3.0], g, starts=40, rollouts=300)[(3.0, 0)] for eta in (0.5, 1.0))
    assert ddpm["tv"] < 1.5 * ddpm["noise"] and half["tv"] > 3 * half["noise"], (half, ddpm)


def test_fit_adapter_moves_the_adapter_towards_the_target_eps():
    setup, g = make_setup(steps=20, grid=GRID), torch.Generator().manual_seed(0)
    teacher = TargetDenoiser(setup, 3.0)
    model = fit_adapter(setup, teacher, rl_config(setup, 3.0, 1.0), steps=150, batch=256, pool=2000)
    x_t, t = torch.randn((256, 2), generator=g), torch.randint(0, 400, (256,), generator=g)
    cond = requests(setup, 256, 0, 1)
    with torch.no_grad():
        want = teacher(x_t, t, cond)
        before = (setup.backend.denoiser(x_t, t, cond) - want).pow(2).sum(1).mean()
        after = (model(x_t, t, cond) - want).pow(2).sum(1).mean()
    assert after < 0.5 * before, (float(after), float(before))
