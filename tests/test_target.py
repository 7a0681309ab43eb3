"""The target p_gamma by importance sampling over a bank of base samples, log Z, the convergence meter (issue 14)."""

import math

import gaussian_chain
import numpy as np
import pytest
import torch
from test_control_rl import MeanBrightness

from ctrldiff.backends.mixture import MIXTURES, mode_masses
from ctrldiff.conditions import balanced_conditions, request_index
from ctrldiff.config import tiny
from ctrldiff.contracts import Cond
from ctrldiff.control import ControlledDenoiser
from ctrldiff.evaluate import evaluate, path_meter
from ctrldiff.exactness import CONTROL, exact_samples, make_setup, optimum, rl_config
from ctrldiff.io import CtrlDiffError
from ctrldiff.methods import build_method
from ctrldiff.rl import RewardTerm, finetune
from ctrldiff.sampling import sample
from ctrldiff.schedule import gaussian_log_prob
from ctrldiff.target import (
    bank_log_probs,
    bank_log_z,
    build_bank,
    estimate,
    load_bank,
    meter,
    on_trusted,
    target_metrics,
)
from ctrldiff.tasks.controls import Control
from ctrldiff.yardstick import PathLogZ, PathStats, path_stats, yardstick


def _exact_bank(setup, n, seed=0):
    """A bank of exact p_pre(x | c) draws for the 2-D mixtures (num_c, n, 2)."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([MIXTURES[c].sample(n, g) for c in range(setup.backend.num_c)])


def test_importance_sampling_matches_the_exact_target_on_2d_mixtures():
    """Mode masses of p_3 by importance weights agree with exact rejection draws, and log Z with the grid's."""
    setup = make_setup(steps=20)
    bank = _exact_bank(setup, 40_000)
    lp = bank_log_probs(setup.backend, bank, {CONTROL.name: setup.classifier})
    est = estimate(lp, {CONTROL.name: 3.0})
    g = torch.Generator().manual_seed(1)
    for c, y in [(0, 0), (1, 2)]:
        mix = MIXTURES[c]
        nearest = torch.cdist(bank[c], mix.means).argmin(1)
        weighted = torch.zeros(len(mix.means)).index_add_(0, nearest, est.weights[(c, (y,))])
        exact = mode_masses(mix, exact_samples(mix, setup.classifier, y, 3.0, 40_000, g))
        assert (weighted - exact).abs().max() < 0.02, (weighted, exact)
    grid = optimum(setup, 3.0)["log_z"]
    assert abs(est.log_z.table.mean().item() - grid) < 0.02, (est.log_z.table.mean().item(), grid)
    assert min(est.ess.values()) > 1000  # gamma 3 on this task keeps thousands of effective samples


def _bright_term(backend, gamma):
    g = torch.Generator().manual_seed(1)
    x0 = sample(backend.denoiser, backend.schedule, torch.randn(64, 1, 8, 8, generator=g),
                Cond(torch.randint(0, 10, (64,), generator=g)), steps=5, generator=g).x0
    clf = MeanBrightness((backend.decode(x0) * 2 - 1).mean((1, 2, 3)).median().item())
    return RewardTerm(Control("bright2", 2, lambda im: clf.predict(im * 2 - 1)), clf, gamma, clf)


class DigitsByBrightness:
    """A stand-in digit oracle: 'digit' = a bucket of mean brightness (so fidelity is not constant)."""

    def predict(self, x):
        return (x.mean((1, 2, 3)) * 40 + 5).long().clamp(0, 9)


def test_gamma_zero_is_the_base_and_gamma_tilts_towards_y(tiny_backend):
    bank = build_bank(tiny_backend, 40, steps=5, eta=1.0, progress=False)
    term = _bright_term(tiny_backend, 0.0)
    out, images, cond = target_metrics(tiny_backend, bank, [term], [term.control], per_class=10,
                                       oracle=DigitsByBrightness())
    images_all = tiny_backend.decode(bank.flatten(0, 1))
    fid_base = (DigitsByBrightness().predict(images_all * 2 - 1).view(10, 40) == torch.arange(10)[:, None]).float()
    assert out["bright2"]["accuracy"] == pytest.approx(0.5)  # uniform weights: each y gets the base's share
    assert out["digit_fidelity"] == pytest.approx(fid_base.mean().item(), abs=1e-6)
    assert out["log_z"] == pytest.approx(0.0, abs=1e-6) and out["mean_kl"] == pytest.approx(0.0, abs=1e-6)
    assert all(r["ess"] == pytest.approx(40.0) for r in out["cells"])
    labels = term.control.label(images_all)  # the expected confusion's rows are the base's label frequencies
    freq = torch.bincount(labels, minlength=2).double() / len(labels)
    cm = np.array(out["bright2"]["confusion"])
    np.testing.assert_allclose(cm.sum(1), [10, 10], atol=0.05)  # per_class requests of each y
    np.testing.assert_allclose(cm[0] / cm[0].sum(), freq.numpy(), atol=0.01)
    assert images.shape == (20, 1, 8, 8) and len(cond) == 20

    term = _bright_term(tiny_backend, 5.0)
    tilted, _, _ = target_metrics(tiny_backend, bank, [term], [term.control], per_class=10)
    assert tilted["bright2"]["accuracy"] > 0.7 and tilted["log_z"] < 0 < tilted["mean_kl"]
    c, y = 3, 1  # one cell by hand: weights p̂(y|x)^gamma over the bank of c
    lp = term.classifier.log_prob(tiny_backend.classifier_input(bank[c]), torch.full((40,), y))
    w = (5.0 * lp).softmax(0)
    ok = (term.control.label(tiny_backend.decode(bank[c])) == y).float()
    row = next(r for r in tilted["cells"] if r["c"] == c and r["y"] == [y])
    assert row["accuracy"] == pytest.approx(float(w @ ok), abs=1e-5)
    assert row["log_z"] == pytest.approx(float(torch.logsumexp(5.0 * lp, 0) - math.log(40)), abs=1e-5)
    assert row["ess"] == pytest.approx(float(1 / (w**2).sum()), rel=1e-4)
    assert tilted["untrusted_cells"] == sum(r["ess"] < 30 for r in tilted["cells"])


def test_bank_is_cached_and_a_mismatched_one_is_refused(tiny_backend, tmp_path, monkeypatch):
    bank = load_bank(tiny_backend, 4, steps=3, eta=1.0, folder=tmp_path, progress=False)
    (path,) = tmp_path.glob("bank-*")  # beside it only its lock file (io.build_once)
    before = path.read_bytes()
    monkeypatch.setattr("ctrldiff.target.build_bank", lambda *a, **k: pytest.fail("the cached bank was rebuilt"))
    assert torch.equal(load_bank(tiny_backend, 4, steps=3, eta=1.0, folder=tmp_path, progress=False), bank)
    with pytest.raises(CtrlDiffError, match=r"^bank .* was built with steps=3, this run needs 5; delete it") as e:
        load_bank(tiny_backend, 4, steps=5, eta=1.0, path=path)
    assert "\n" not in str(e.value)
    with torch.no_grad():
        next(tiny_backend.net.parameters()).add_(1e-3)  # another base
    with pytest.raises(CtrlDiffError, match="was built with base="):
        load_bank(tiny_backend, 4, steps=3, eta=1.0, path=path)
    assert path.read_bytes() == before


def test_a_killed_bank_build_leaves_no_file(tiny_backend, tmp_path, monkeypatch):
    calls = []

    def dies(*args, **kwargs):
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt  # killed mid-build
        return sample(*args, **kwargs)

    monkeypatch.setattr("ctrldiff.target.sample", dies)
    with pytest.raises(KeyboardInterrupt):
        load_bank(tiny_backend, 4, steps=3, eta=1.0, folder=tmp_path, progress=False)
    assert [p.suffix for p in tmp_path.iterdir()] == [".lock"]  # no bank, no temp file: only the lock's file


def test_evaluate_judges_with_reward_classifier_and_monitor_and_the_meter_paths_by_hand(tiny_backend):
    """evaluate: the mean reward and the joint verdicts of the reward classifier and the monitor; path_meter: per
    request, J = reward - path KL and the path weights' log-mean-exp, recomputed here from the same draws."""
    cfg = tiny()
    cfg.eval.per_class, cfg.eval.batch, cfg.sampler.steps = 4, 64, 5
    term = _bright_term(tiny_backend, 3.0)
    term.monitor = MeanBrightness(10.0)  # an independent judge that calls every image dark (class 0)
    model = ControlledDenoiser(tiny_backend, {"bright2": 2}, lora_rank=0)
    with torch.no_grad():
        model.embeddings["bright2"].weight[:2] = torch.randn(2, tiny_backend.emb_dim)
    method = build_method("ctrl", tiny_backend, steps=5, model=model)
    out, images, cond = evaluate(method, tiny_backend, [term.control], cfg, None, None,
                                 reference=tiny_backend.denoiser, seed=3, progress=False, terms=[term])
    x = images * 2 - 1
    assert out["reward"] == pytest.approx(3.0 * term.classifier.log_prob(x, cond.y["bright2"]).mean().item(), abs=1e-5)
    for key, clf in [("classifier_accuracy", term.classifier), ("monitor_accuracy", term.monitor)]:
        ok = clf.predict(x) == cond.y["bright2"]
        assert out[key] == pytest.approx(ok.float().mean().item())
        for r in out["per_cell"]:  # one sample per cell
            i = int(torch.nonzero((cond.c == r["c"]) & (cond.y["bright2"] == r["y"][0]))[0, 0])
            assert r[key] == float(ok[i])
    assert out["classifier_accuracy"] != out["monitor_accuracy"]  # two judges, two verdicts

    stats = path_meter(method, tiny_backend, [term], cfg, per_request=3, seed=4, progress=False)
    pcond = balanced_conditions(3 * 20, 10, {"bright2": 2})
    g = torch.Generator().manual_seed(4)  # the same draws by hand: x_T then the chain's noise, one batch
    with torch.no_grad():
        traj = sample(model, tiny_backend.schedule, torch.randn((60, 1, 8, 8), generator=g), pcond, steps=5,
                      generator=g, reference=tiny_backend.denoiser, final=model.final(tiny_backend))
        r = 3.0 * term.classifier.log_prob(tiny_backend.classifier_input(traj.x0), pcond.y["bright2"])
    j, log_w = r - traj.path_kl(), r + traj.log_ratio()
    assert bool((stats.n == 3).all())
    for c, y in [(0, 0), (7, 1)]:
        m = (pcond.c == c) & (pcond.y["bright2"] == y)
        assert stats.j[c, y].item() == pytest.approx(j[m].mean().item(), abs=1e-4)
        assert stats.log_z[c, y].item() == pytest.approx((torch.logsumexp(log_w[m], 0) - math.log(3)).item(), abs=1e-4)
        assert stats.kl[c, y].item() == pytest.approx(traj.path_kl()[m].mean().item(), abs=1e-4)
    own_last = ControlledDenoiser(tiny_backend, {"bright2": 2}, lora_rank=0, final_step="model")
    own_last.load_adapter_state(model.adapter_state())
    assert path_meter(build_method("ctrl", tiny_backend, steps=5, model=own_last), tiny_backend, [term], cfg, 1,
                      progress=False) is None  # its own last step: no path ratio to the base
    assert path_meter(build_method("best_of_n", tiny_backend, steps=5, classifiers={"bright2": term.classifier}),
                      tiny_backend, [term], cfg, 1, progress=False) is None  # not one chain


def test_log_ratio_is_the_gaussian_log_density_ratio_and_undefined_on_a_foreign_last_step(tiny_backend):
    model = ControlledDenoiser(tiny_backend, {"a": 2}, lora_rank=0)
    with torch.no_grad():
        model.embeddings["a"].weight[:2] = torch.randn(2, tiny_backend.emb_dim)
    cond = Cond(torch.arange(4), {"a": torch.arange(4) % 2})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        traj = sample(model, tiny_backend.schedule, torch.randn((4, 1, 8, 8), generator=g), cond, steps=4,
                      generator=g, reference=tiny_backend.denoiser, final=model.final(tiny_backend))
        by_hand = sum(gaussian_log_prob(traj.xs[i + 1], r, s) - gaussian_log_prob(traj.xs[i + 1], m, s)
                      for i, (m, r, s) in enumerate(zip(traj.means, traj.ref_means, traj.stds)) if (s > 0).all())
        torch.testing.assert_close(traj.log_ratio(), by_hand, rtol=1e-4, atol=1e-3)
        own = sample(model, tiny_backend.schedule, torch.randn((4, 1, 8, 8), generator=g), cond, steps=4,
                     generator=g, reference=tiny_backend.denoiser)
    assert traj.shares_deterministic_steps() and not own.shares_deterministic_steps()
    with pytest.raises(ValueError, match="path ratio to the base is undefined"):
        own.log_ratio()


def test_path_meter_is_the_closed_form_kl_on_a_linear_gaussian_chain():
    """Gaussian base, linear reward: log Z, J and KL(P_theta || P*) are closed form, for the base and for a chain
    whose eps is moved by a constant per step; the path weights' estimates agree within Monte-Carlo error."""
    be, steps, n = gaussian_chain.backend(), 6, 20_000
    coefs = gaussian_chain.affine_steps(be, steps)
    # half the optimal control at every stochastic step: u_i = k_i shift_i / sigma_i = u*_i / 2
    shifts = [torch.zeros(2) if u is None else 0.5 * u * s / k
              for u, (_, _, s, k) in zip(gaussian_chain.optimal_controls(coefs), coefs)]

    class Shifted:  # eps_pre + a constant per step (the last step stays the base's)
        def __call__(self, x, t, cond):
            i = int((be.schedule.timesteps(steps) == t[0]).nonzero())
            return be.denoiser(x, t, cond) + shifts[i]

    exact_z = gaussian_chain.log_z(coefs)
    for net, sh in [(be.denoiser, None), (Shifted(), shifts)]:
        mean, _ = gaussian_chain.chain_moments(coefs, sh)
        kl = sum(0.5 * float(((k * d) / s) @ ((k * d) / s)) for (_, _, s, k), d in zip(coefs, sh) if s > 0) if sh else 0.0
        exact_gap = exact_z - (float(gaussian_chain.A @ mean) - kl)
        cond = Cond(torch.zeros(n, dtype=torch.long), {"linear": torch.zeros(n, dtype=torch.long)})
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            traj = sample(net, be.schedule, torch.randn((n, 2), generator=g), cond, steps=steps, generator=g,
                          reference=be.denoiser)
        r = traj.x0 @ gaussian_chain.A
        stats = path_stats(request_index(cond, ["linear"]), (1, 1), r, traj.path_kl(), traj.log_ratio())
        se = math.sqrt(stats.j_std[0, 0].item() ** 2 / n + 1 / stats.ess[0, 0].item())
        assert stats.kl[0, 0].item() == pytest.approx(kl, rel=1e-3, abs=1e-6)
        assert stats.log_z[0, 0].item() == pytest.approx(exact_z, abs=4 * se)
        assert (stats.log_z - stats.j)[0, 0].item() == pytest.approx(exact_gap, abs=4 * se)
        assert exact_gap > 5 * se  # neither chain is the target (the half-way one: a quarter of the base's gap)


def test_the_fine_tunes_meters_agree_with_the_exact_gap_on_2d_mixtures():
    """KL(P_theta || P*) = log Z - J: a briefly fine-tuned CTRL on the 2-D mixtures, measured by the bank's log Z
    (40,000 base-chain samples per c: near exact) and by its own path weights, request by request, agree within
    Monte-Carlo error; during the fine-tune both meters are logged and fall."""
    setup = make_setup(steps=10)
    cfg = rl_config(setup, 3.0, 1.0, steps=60, batch=128)
    bank = build_bank(setup.backend, 40_000, steps=10, eta=1.0, progress=False)
    log_z = bank_log_z(bank_log_probs(setup.backend, bank, {CONTROL.name: setup.classifier}), {CONTROL.name: 3.0})
    records = []
    term = RewardTerm(CONTROL, setup.classifier, 3.0)
    model, _ = finetune(setup.backend, [term], cfg, log=records.append, progress=False, log_z=log_z)
    for key in ("gap", "gap_all"):
        gaps = [r[key] for r in records]
        assert np.mean(gaps[-10:]) < np.mean(gaps[:10]), key  # the meter falls as the fine-tune converges
    cfg.eval.batch = 4096
    stats = path_meter(build_method("ctrl", setup.backend, steps=10, model=model), setup.backend, [term], cfg, 1500,
                       seed=5, progress=False)
    gap_bank, gap_paths = log_z.table - stats.j, stats.log_z - stats.j
    se = (stats.j_std**2 / stats.n + 1 / stats.ess + 1 / log_z.ess).sqrt()
    assert bool((gap_bank > -4 * se).all()), gap_bank  # >= 0 up to Monte-Carlo error
    assert bool(((gap_paths - gap_bank).abs() < 4 * se).all()), (gap_paths, gap_bank, se)
    assert 0.01 < gap_bank.mean().item() < 1.0  # a fine-tune between its start and its optimum


def test_base_gap_from_sampling_the_base_is_log_z_minus_its_mean_reward():
    """The base's own meter paths: KL = 0, J = E[gamma log p̂], and its gap log Z - J agrees with log Z from an
    independent bank minus the mean reward of independent base samples (Jensen's gap, > 0)."""
    setup = make_setup(steps=10)
    cfg, term = rl_config(setup, 3.0, 1.0), RewardTerm(CONTROL, setup.classifier, 3.0)
    cfg.eval.batch = 4096
    bank = build_bank(setup.backend, 40_000, steps=10, eta=1.0, seed=7, progress=False)
    lp = bank_log_probs(setup.backend, bank, {CONTROL.name: setup.classifier})
    log_z = bank_log_z(lp, {CONTROL.name: 3.0})
    mean_reward = 3.0 * lp[CONTROL.name].mean(1)  # (num_c, K): E_pre[gamma log p̂(y | x)]
    stats = path_meter(build_method("base", setup.backend, steps=10), setup.backend, [term], cfg, 2000, seed=8,
                       progress=False)
    assert bool((stats.kl == 0).all())
    se = (stats.j_std**2 / stats.n + 1 / stats.ess + 1 / log_z.ess).sqrt()
    expected = log_z.table - mean_reward
    assert bool(((stats.log_z - stats.j - expected).abs() < 4 * se).all()), (stats.log_z - stats.j, expected)
    assert bool((expected > 0.1).all())


def test_untrusted_cells_are_left_out_of_the_trusted_meter_and_flagged_in_the_yardstick():
    """A cell whose weight sits on one bank sample is not trusted at min_ess > 1 (its log-mean is biased low):
    the batch meter leaves it out; the yardstick takes there the larger of the bank's and the paths' log Z, and
    flags it when the paths' ESS is small too."""
    # 2 digits x 100 samples, one control with 2 classes: class 1 is near-certain for exactly one sample of c = 0
    lp = torch.full((2, 100, 2), math.log(0.5))
    lp[0, :, 1], lp[0, 0, 1] = math.log(1e-6), 0.0
    lp[0, :, 0] = torch.log1p(-lp[0, :, 1].exp())
    z = bank_log_z({"a": lp}, {"a": 5.0}, min_ess=10)
    assert torch.equal(z.trusted, torch.tensor([[True, False], [True, True]]))
    assert torch.allclose(z.table[1], torch.full((2,), 5 * math.log(0.5)))  # every weight equal: log Z = gamma log p
    assert z.ess[0, 1].item() == pytest.approx(1.0, abs=1e-3)
    cond = Cond(torch.tensor([0, 0, 1]), {"a": torch.tensor([1, 0, 1])})
    j = torch.tensor([-100.0, -5.0, -5.0])
    assert meter(z, cond, ["a"], j) == pytest.approx(((z.table[0, 0] + 5) + (z.table[1, 1] + 5)).item() / 2)
    assert math.isnan(meter(z, Cond(torch.tensor([0]), {"a": torch.tensor([1])}), ["a"], torch.tensor([0.0])))

    def stats(log_z, ess, j):
        full = (lambda v: torch.full((2, 2), float(v)))
        return PathStats(n=full(8), j=j, j_std=full(1), kl=full(2), reward=j + 2, log_z=log_z, ess=ess,
                         tilted_reward=j + 3)

    j = torch.full((2, 2), -9.0)
    high = stats(torch.tensor([[-20.0, -2.0], [-20.0, -20.0]]), torch.tensor([[2.0, 3.0], [2.0, 2.0]]), j)
    out = yardstick(z, torch.zeros(2, 2), {"ctrl": high}, min_path_ess=5)
    assert out["ctrl"]["trusted"]["requests"] == 3 and out["ctrl"]["all"]["requests"] == 4
    assert out["ctrl"]["trusted"]["gap"] == pytest.approx((z.table[z.trusted] + 9).mean().item())
    best = z.table.clone()
    best[0, 1] = -2.0  # the paths' estimate is the larger one there (the bank's: log(1/100))
    assert out["ctrl"]["all"]["gap"] == pytest.approx((best + 9).mean().item())
    assert out["ctrl"]["all"]["flagged"] == 1 and out["log_z_source"] == {"bank": 3, "ctrl": 1}
    assert out["target"]["all"]["J"] == pytest.approx(best.mean().item()) and math.isnan(out["target"]["all"]["gap"])
    sure = stats(high.log_z, torch.full((2, 2), 50.0), j)  # the same estimate with a large ESS: nothing flagged
    assert yardstick(z, torch.zeros(2, 2), {"ctrl": sure}, min_path_ess=5)["ctrl"]["all"]["flagged"] == 0


def test_running_path_log_z_is_the_log_mean_exp_of_every_weight_so_far():
    paths = PathLogZ((2, 3))
    paths.add((torch.tensor([0, 0, 1]), torch.tensor([1, 1, 2])), torch.tensor([0.0, 1.0, -2.0]))
    paths.add((torch.tensor([0]), torch.tensor([1])), torch.tensor([3.0]))
    lz = paths.log_z()
    assert lz[0, 1].item() == pytest.approx(math.log((1 + math.e + math.e**3) / 3), abs=1e-5)
    assert lz[1, 2].item() == pytest.approx(-2.0) and lz[0, 0].item() == -math.inf
    back = PathLogZ((2, 3))
    back.load_state_dict(paths.state_dict())
    assert torch.equal(back.log_z(), lz)


def test_on_trusted_compares_only_the_cells_the_target_is_sure_of():
    target = [{"c": 0, "y": [0], "ess": 500.0, "accuracy": 0.9, "digit_fidelity": 0.8, "classifier_accuracy": 1.0,
               "monitor_accuracy": 0.8},
              {"c": 0, "y": [1], "ess": 2.0, "accuracy": 0.1, "digit_fidelity": 0.0, "classifier_accuracy": 0.0,
               "monitor_accuracy": 0.0},
              {"c": 1, "y": [0], "ess": 40.0, "accuracy": 0.7, "digit_fidelity": 1.0, "classifier_accuracy": 0.5,
               "monitor_accuracy": 0.6}]
    method = [{"c": 0, "y": [0], "accuracy": 0.5, "n": 10}, {"c": 0, "y": [1], "accuracy": 1.0, "n": 10},
              {"c": 1, "y": [0], "accuracy": 0.3, "n": 10}]
    assert on_trusted(target, target, 30) == pytest.approx({"cells": 2, "accuracy": 0.8, "digit_fidelity": 0.9,
                                                            "classifier_accuracy": 0.75, "monitor_accuracy": 0.7})
    out = on_trusted(method, target, 30)
    assert out["cells"] == 2 and out["accuracy"] == pytest.approx(0.4) and math.isnan(out["digit_fidelity"])


def test_the_shipped_banks_are_the_shipped_bases_own_and_spare_the_first_run_its_build(monkeypatch, tmp_path):
    """The banks in the package (8-bit images, benchmarks/banks.py) are keyed by the shipped base's hash and the
    default sampler: load_bank takes them without building anything, the first 500 samples of the yardstick's
    regenerate from its seed, and a key they do not match (another seed) finds none."""
    from ctrldiff.backends import load_base
    from ctrldiff.config import default
    from ctrldiff.target import bank_key, shipped_bank

    cfg, backend = default(), load_base()
    monkeypatch.setenv("CTRLDIFF_CACHE", str(tmp_path))
    monkeypatch.setattr("ctrldiff.target.build_bank", lambda *a, **k: pytest.fail("a shipped bank was rebuilt"))
    for seed in (cfg.target.seed, cfg.target.seed + 1):  # the yardstick's and seed 0's base pairs
        bank = load_bank(backend, cfg.target.per_c, cfg.sampler.steps, cfg.sampler.eta, seed, progress=False)
        assert bank.shape == (10, cfg.target.per_c, 1, 16, 16)
    assert shipped_bank(bank_key(backend, cfg.target.per_c, cfg.sampler.steps, cfg.sampler.eta, 5)) is None
    g = torch.Generator().manual_seed(cfg.target.seed)  # build_bank's first batch: digit 0, 500 samples
    x0 = sample(backend.denoiser, backend.schedule, torch.randn((500, 1, 16, 16), generator=g),
                Cond(torch.zeros(500, dtype=torch.long)), steps=cfg.sampler.steps, eta=cfg.sampler.eta, generator=g).x0
    shipped = load_bank(backend, cfg.target.per_c, cfg.sampler.steps, cfg.sampler.eta, cfg.target.seed)[0, :500]
    diff = (backend.decode(x0) - backend.decode(shipped)).abs()
    assert diff.max() <= 1 / 255 + 1e-6 and (diff < 0.5 / 255).float().mean() > 0.999  # 8 bits, rounding apart
