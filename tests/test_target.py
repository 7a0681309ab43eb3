"""The target p_gamma by importance sampling over a bank of base samples, log Z, the convergence meter (issue 14)."""

import math

import numpy as np
import pytest
import torch
from test_control_rl import MeanBrightness

from ctrldiff.backends.mixture import MIXTURES, mode_masses
from ctrldiff.config import tiny
from ctrldiff.contracts import Cond
from ctrldiff.control import ControlledDenoiser
from ctrldiff.evaluate import evaluate
from ctrldiff.exactness import CONTROL, exact_samples, make_setup, optimum, rl_config
from ctrldiff.io import CtrlDiffError
from ctrldiff.methods import build_method
from ctrldiff.rl import RewardTerm, finetune
from ctrldiff.rl.finetune import balanced_conditions
from ctrldiff.sampling import sample
from ctrldiff.target import (
    bank_log_probs,
    build_bank,
    estimate,
    load_bank,
    log_z_table,
    lookup,
    meter,
    on_trusted,
    target_metrics,
)
from ctrldiff.tasks.controls import Control


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
    assert abs(est.log_z.mean().item() - grid) < 0.02, (est.log_z.mean().item(), grid)
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


def test_objective_j_is_the_hand_computed_one_and_the_gap_uses_log_z(tiny_backend):
    cfg = tiny()
    cfg.eval.per_class, cfg.eval.batch, cfg.sampler.steps = 4, 64, 5
    term = _bright_term(tiny_backend, 3.0)
    model = ControlledDenoiser(tiny_backend, {"bright2": 2}, lora_rank=0)
    with torch.no_grad():
        model.embeddings["bright2"].weight[:2] = torch.randn(2, tiny_backend.emb_dim)
    log_z = torch.randn(10, 2)
    method = build_method("ctrl", tiny_backend, steps=5, model=model)
    out, _, cond = evaluate(method, tiny_backend, [term.control], cfg, None, None, reference=tiny_backend.denoiser,
                            seed=3, progress=False, terms=[term], log_z=log_z)
    g = torch.Generator().manual_seed(3)  # the same draws by hand: x_T then the chain's noise, one batch
    x_T = torch.randn((8, 1, 8, 8), generator=g)
    with torch.no_grad():
        traj = sample(model, tiny_backend.schedule, x_T, cond, steps=5, generator=g, reference=tiny_backend.denoiser)
        reward = 3.0 * term.classifier.log_prob(tiny_backend.classifier_input(traj.x0), cond.y["bright2"])
    j = (reward - traj.path_kl()).mean().item()
    assert out["objective"] == pytest.approx(j, abs=1e-4)
    assert out["log_z"] == pytest.approx(log_z[cond.c, cond.y["bright2"]].mean().item())
    assert out["gap"] == pytest.approx(out["log_z"] - j, abs=1e-4)
    assert len(out["per_cell"]) == 8 and all(r["n"] == 1 for r in out["per_cell"])
    clf_ok = term.classifier(tiny_backend.classifier_input(traj.x0)).argmax(-1) == cond.y["bright2"]
    assert out["classifier_accuracy"] == pytest.approx(clf_ok.float().mean().item())
    for r in out["per_cell"]:  # one sample per cell
        i = int(torch.nonzero((cond.c == r["c"]) & (cond.y["bright2"] == r["y"][0]))[0, 0])
        assert r["classifier_accuracy"] == float(clf_ok[i])


def test_log_z_minus_j_is_nonnegative_on_2d_and_logged_while_fine_tuning():
    """KL(P_theta || P*) >= 0: J of a briefly fine-tuned CTRL (last step by the base) stays below log Z up to
    Monte-Carlo error, and the loop logs the gap it closes."""
    setup = make_setup(steps=10)
    cfg = rl_config(setup, 3.0, 1.0, steps=60, batch=128)
    bank = build_bank(setup.backend, 20_000, steps=10, eta=1.0, progress=False)
    table = log_z_table(bank_log_probs(setup.backend, bank, {CONTROL.name: setup.classifier}), {CONTROL.name: 3.0})
    records = []
    term = RewardTerm(CONTROL, setup.classifier, 3.0)
    model, _ = finetune(setup.backend, [term], cfg, log=records.append, progress=False, log_z=table)
    gaps = [r["gap"] for r in records]
    assert np.mean(gaps[-10:]) < np.mean(gaps[:10])  # the meter falls as the fine-tune converges
    cond = balanced_conditions(6000, setup.backend.num_c, {CONTROL.name: 3})
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        traj = sample(model, setup.backend.schedule, torch.randn((6000, 2), generator=g), cond, steps=10,
                      generator=g, reference=setup.backend.denoiser, final=model.final(setup.backend))
        per = lookup(table, cond, [CONTROL.name]) - (3.0 * setup.classifier.log_prob(traj.x0, cond.y[CONTROL.name])
                                                      - traj.path_kl())
    assert per.mean().item() > -3 * per.std().item() / math.sqrt(len(per)), per.mean().item()


def test_base_model_gap_is_jensens_and_positive(tiny_backend):
    """For the base itself (KL = 0), J = E[gamma log p̂] <= log E[p̂^gamma] = log Z on the same bank."""
    bank = build_bank(tiny_backend, 200, steps=5, eta=1.0, progress=False)
    term = _bright_term(tiny_backend, 4.0)
    lp = bank_log_probs(tiny_backend, bank, {"bright2": term.classifier})
    table = log_z_table(lp, {"bright2": 4.0})
    j = 4.0 * lp["bright2"].mean(1)  # (num_c, K)
    assert bool((table >= j - 1e-5).all())


def test_untrusted_cells_are_left_out_of_log_z_and_the_meter():
    """A cell whose weight sits on one bank sample gets log Z = NaN at min_ess > 1 (its log-mean is biased low);
    the meter averages log Z - J over the other requests only."""
    # 2 digits x 100 samples, one control with 2 classes: class 1 is near-certain for exactly one sample of c = 0
    lp = torch.full((2, 100, 2), math.log(0.5))
    lp[0, :, 1], lp[0, 0, 1] = math.log(1e-6), 0.0
    lp[0, :, 0] = torch.log1p(-lp[0, :, 1].exp())
    table = log_z_table({"a": lp}, {"a": 5.0}, min_ess=10)
    assert torch.isnan(table[0, 1]) and torch.isfinite(table[[0, 1, 1], [0, 0, 1]]).all()
    assert torch.allclose(table[1], torch.full((2,), 5 * math.log(0.5)))  # every weight equal: log Z = gamma log p
    assert torch.equal(torch.isfinite(log_z_table({"a": lp}, {"a": 5.0})), torch.ones(2, 2, dtype=torch.bool))
    rows, j = torch.tensor([math.nan, -1.0, -2.0]), torch.tensor([-100.0, -3.0, -3.0])
    assert meter(rows, j) == pytest.approx(1.5)  # ((-1 + 3) + (-2 + 3)) / 2; the NaN row left out
    assert math.isnan(meter(torch.tensor([math.nan]), torch.tensor([0.0])))


def test_on_trusted_compares_only_the_cells_the_target_is_sure_of():
    target = [{"c": 0, "y": [0], "ess": 500.0, "accuracy": 0.9, "digit_fidelity": 0.8, "classifier_accuracy": 1.0},
              {"c": 0, "y": [1], "ess": 2.0, "accuracy": 0.1, "digit_fidelity": 0.0, "classifier_accuracy": 0.0},
              {"c": 1, "y": [0], "ess": 40.0, "accuracy": 0.7, "digit_fidelity": 1.0, "classifier_accuracy": 0.5}]
    method = [{"c": 0, "y": [0], "accuracy": 0.5, "n": 10}, {"c": 0, "y": [1], "accuracy": 1.0, "n": 10},
              {"c": 1, "y": [0], "accuracy": 0.3, "n": 10}]
    assert on_trusted(target, target, 30) == pytest.approx({"cells": 2, "accuracy": 0.8, "digit_fidelity": 0.9,
                                                            "classifier_accuracy": 0.75})
    out = on_trusted(method, target, 30)
    assert out["cells"] == 2 and out["accuracy"] == pytest.approx(0.4) and math.isnan(out["digit_fidelity"])
