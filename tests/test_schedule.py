"""The schedule's Gaussian maths (parity with diffusers' DDIM) and the one sampler built on it."""

import pytest
import torch

from ctrldiff.contracts import Cond
from ctrldiff.sampling import Trajectory, _detach_mask, sample
from ctrldiff.schedule import Schedule, gaussian_kl, gaussian_log_prob, step_mean_std

B, SHAPE = 3, (1, 4, 4)


@pytest.fixture(scope="module")
def ddim():
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDIMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02, clip_sample=False,
        set_alpha_to_one=True, steps_offset=0, timestep_spacing="trailing",
    )
    sched.set_timesteps(20)
    return sched


def _cond(n=B):
    return Cond(torch.zeros(n, dtype=torch.long))


def _x_T(seed=0, n=B):
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


def _eps_model(scale):
    """An analytic eps-predictor that also depends on t (so a wrong timestep shows up)."""
    return lambda x, t, cond: scale * x + 0.05 * (t.to(x.dtype) / 1000).reshape(-1, 1, 1, 1)


# --- schedule vs diffusers ------------------------------------------------------------------------------

def test_linear_schedule_matches_diffusers(ddim):
    ours = Schedule.linear()
    assert torch.equal(ddim.timesteps, ours.timesteps(20))
    torch.testing.assert_close(ours.alphas_cumprod, ddim.alphas_cumprod.double(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_step_matches_diffusers_ddim(ddim, eta):
    schedule = Schedule.linear()
    ts = schedule.timesteps(20)
    g = torch.Generator().manual_seed(1)
    for i, t in enumerate(ts):
        x_t, eps, noise = (torch.randn(B, *SHAPE, generator=g) for _ in range(3))
        t_prev = ts[i + 1] if i + 1 < len(ts) else torch.tensor(-1)
        mean, std = step_mean_std(schedule, x_t, eps, t.expand(B), t_prev.expand(B), eta)
        ours = mean + std * noise
        ref = ddim.step(eps, t, x_t, eta=eta, variance_noise=noise).prev_sample
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5, msg=f"t={int(t)}, eta={eta}")
        if eta == 0 or i == len(ts) - 1:  # deterministic DDIM, and the last step of any eta, has no noise
            assert bool((std == 0).all())
        else:
            assert bool((std > 0).all())


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_full_chain_matches_diffusers_loop(ddim, eta):
    """The whole `sample` rollout equals diffusers' DDIM loop (same generator, same noise draw order)."""
    model = _eps_model(0.1)
    x_T = _x_T(3)
    traj = sample(model, Schedule.linear(), x_T, _cond(), steps=20, eta=eta,
                  generator=torch.Generator().manual_seed(7))
    x, g = x_T.clone(), torch.Generator().manual_seed(7)
    for t in ddim.timesteps:
        x = ddim.step(model(x, t.expand(B), None), t, x, eta=eta, generator=g).prev_sample
    torch.testing.assert_close(traj.x0, x, atol=1e-4, rtol=1e-4)


# --- Gaussian maths ---------------------------------------------------------------------------------------

def test_gaussian_kl_equal_means_is_zero():
    m = torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    kl = gaussian_kl(m, m.clone(), torch.tensor(0.3))
    assert kl.shape == (4,)
    assert torch.equal(kl, torch.zeros(4))


def test_gaussian_kl_hand_computed():
    mean_p = torch.zeros(2, 3)
    mean_q = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 3.0]])
    # sum_d d^2 / (2 std^2) with std = 2: (1 + 4) / 8 and 9 / 8
    torch.testing.assert_close(gaussian_kl(mean_p, mean_q, torch.tensor(2.0)), torch.tensor([0.625, 1.125]))
    # per-dimension std broadcasts: std = [1, 2, 3] -> 1/2 + 4/8 and 9/18
    std = torch.tensor([1.0, 2.0, 3.0])
    torch.testing.assert_close(gaussian_kl(mean_p, mean_q, std), torch.tensor([1.0, 0.5]))
    # symmetric for equal stds
    torch.testing.assert_close(gaussian_kl(mean_q, mean_p, std), gaussian_kl(mean_p, mean_q, std))


@pytest.mark.parametrize("std", [torch.tensor(0.0), torch.tensor([1.0, 0.0, 1.0])])
def test_gaussian_kl_rejects_zero_std(std):
    with pytest.raises(ValueError, match="std > 0"):
        gaussian_kl(torch.zeros(2, 3), torch.ones(2, 3), std)


def test_gaussian_log_prob_matches_torch_normal():
    g = torch.Generator().manual_seed(0)
    x, mean = torch.randn(5, 2, 3, 3, generator=g), torch.randn(5, 2, 3, 3, generator=g)
    std = 0.2 + torch.rand(5, 2, 3, 3, generator=g)
    expected = torch.distributions.Normal(mean, std).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(gaussian_log_prob(x, mean, std), expected)
    # the sampler's shared, expanded per-sample std
    s = torch.full((5, 1, 1, 1), 0.7).expand_as(x)
    torch.testing.assert_close(gaussian_log_prob(x, mean, s),
                               torch.distributions.Normal(mean, 0.7).log_prob(x).flatten(1).sum(1))


# --- sample() -----------------------------------------------------------------------------------------------

def test_sample_same_seed_same_trajectory():
    schedule, model = Schedule.linear(), _eps_model(0.1)

    def run(seed):
        return sample(model, schedule, _x_T(), _cond(), steps=6, eta=1.0, generator=torch.Generator().manual_seed(seed))

    a, b, c = run(0), run(0), run(1)
    assert isinstance(a, Trajectory)
    assert len(a.xs) == 6 + 1 and len(a.means) == len(a.stds) == 6 and a.nfe == 6
    assert torch.equal(a.xs[0], _x_T())
    assert all(torch.equal(u, v) for u, v in zip(a.xs, b.xs))
    assert not torch.equal(a.x0, c.x0)  # eta = 1 really uses the generator
    assert torch.equal(a.timesteps, schedule.timesteps(6))


def test_sample_eta0_is_deterministic():
    schedule, model = Schedule.linear(), _eps_model(0.1)
    a = sample(model, schedule, _x_T(), _cond(), steps=6, eta=0.0, generator=torch.Generator().manual_seed(0))
    b = sample(model, schedule, _x_T(), _cond(), steps=6, eta=0.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.x0, b.x0)


def test_path_kl():
    schedule, model = Schedule.linear(), _eps_model(0.1)
    same = sample(model, schedule, _x_T(), _cond(), steps=6, reference=model,
                  generator=torch.Generator().manual_seed(0))
    kl = same.path_kl()
    assert kl.shape == (B,) and torch.equal(kl, torch.zeros(B))

    other = sample(model, schedule, _x_T(), _cond(), steps=6, reference=_eps_model(0.3),
                   generator=torch.Generator().manual_seed(0))
    assert bool((other.path_kl() > 0).all())
    # the reference is evaluated at the visited states, without touching the sampled path
    assert all(torch.equal(u, v) for u, v in zip(same.xs, other.xs))

    with pytest.raises(ValueError, match="reference"):
        sample(model, schedule, _x_T(), _cond(), steps=6).path_kl()
    det = sample(model, schedule, _x_T(), _cond(), steps=6, eta=0.0, reference=_eps_model(0.3))
    with pytest.raises(ValueError, match="eta"):
        det.path_kl()


def _param_model():
    w = torch.nn.Parameter(torch.tensor(0.1))
    return w, lambda x, t, cond: w * x + 0.05 * (t.to(x.dtype) / 1000).reshape(-1, 1, 1, 1)


def test_sample_without_grad_has_no_graph():
    _w, model = _param_model()
    traj = sample(model, Schedule.linear(), _x_T(), _cond(), steps=4, generator=torch.Generator().manual_seed(0))
    assert not traj.x0.requires_grad and not any(m.requires_grad for m in traj.means)


def test_truncate_last_k():
    w, model = _param_model()
    steps = 5
    traj = sample(model, Schedule.linear(), _x_T(), _cond(), steps=steps, grad=True, truncate=2,
                  generator=torch.Generator().manual_seed(0))
    assert [m.requires_grad for m in traj.means] == [False] * (steps - 2) + [True] * 2
    assert not any(x.requires_grad for x in traj.xs[: steps - 2 + 1])
    (gw,) = torch.autograd.grad(traj.x0.sum(), w)
    assert gw.abs() > 0

    full = sample(model, Schedule.linear(), _x_T(), _cond(), steps=steps, grad=True,
                  generator=torch.Generator().manual_seed(0))
    assert all(m.requires_grad for m in full.means)
    assert torch.equal(full.x0, traj.x0)  # truncation changes the gradient, never the sample
    (gw_full,) = torch.autograd.grad(full.x0.sum(), w)
    assert not torch.allclose(gw_full, gw)


def test_truncate_random_last_step_carries_graph():
    """w enters only the last step's eps, so a gradient reaches it iff that step is not detached."""
    w = torch.nn.Parameter(torch.tensor(0.1))
    t_last = Schedule.linear().timesteps(4)[-1]

    def model(x, t, cond):
        last = (t == t_last).to(x.dtype).reshape(-1, 1, 1, 1)
        return (last * w + (1 - last) * 0.1) * x

    for seed in range(20):
        traj = sample(model, Schedule.linear(), _x_T(), _cond(), steps=4, grad=True, truncate="random",
                      generator=torch.Generator().manual_seed(seed))
        assert traj.means[-1].requires_grad and traj.x0.requires_grad
        (gw,) = torch.autograd.grad(traj.x0.sum(), w)
        assert gw.abs() > 0, seed


def test_random_detach_probabilities():
    """Step i of N is detached with probability 1 - (i + 1) / N; the last never is."""
    g, n, steps = torch.Generator().manual_seed(0), 2000, 4
    masks = torch.tensor([_detach_mask(steps, "random", g) for _ in range(n)], dtype=torch.float64)
    rates = masks.mean(0)
    expected = torch.tensor([1 - (i + 1) / steps for i in range(steps)], dtype=torch.float64)
    torch.testing.assert_close(rates, expected, atol=0.04, rtol=0)
    assert rates[-1] == 0
    assert _detach_mask(steps, None, g) == [False] * steps
    assert _detach_mask(steps, 1, g) == [True, True, True, False]


@pytest.mark.parametrize("bad", ["bad", -1, 1.5, True])
def test_invalid_truncate_raises(bad):
    _w, model = _param_model()
    with pytest.raises(ValueError, match="random") as e:
        sample(model, Schedule.linear(), _x_T(), _cond(), steps=4, grad=True, truncate=bad)
    assert "None" in str(e.value) and repr(bad) in str(e.value)


@pytest.mark.parametrize("truncate", [None, 2])
def test_checkpoint_same_result_and_gradient(truncate):
    results = []
    for ckpt in (False, True):
        w, model = _param_model()
        traj = sample(model, Schedule.linear(), _x_T(), _cond(), steps=5, grad=True, truncate=truncate,
                      checkpoint=ckpt, generator=torch.Generator().manual_seed(0))
        (gw,) = torch.autograd.grad(traj.x0.sum(), w)
        results.append((traj.x0.detach(), gw))
    (x_a, g_a), (x_b, g_b) = results
    assert torch.equal(x_a, x_b)
    assert g_a.abs() > 0
    torch.testing.assert_close(g_a, g_b, rtol=1e-6, atol=0)
