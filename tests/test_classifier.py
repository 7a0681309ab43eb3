"""Step 1 of CTRL: the classifier p̂(y|x), its temperature calibration, ECE and checkpoints."""

import math

import pytest
import torch
from torch.nn import functional as F

from ctrldiff.classifier import Classifier, expected_calibration_error, fit_classifier, fit_temperature
from ctrldiff.config import ClassifierConfig
from ctrldiff.io import CtrlDiffError, save_weights
from ctrldiff.models import SmallCNN

CFG = ClassifierConfig(epochs=3, batch=32)


def _pairs(n, seed, res=8):
    """Images in [-1, 1]: a random brightness offset plus pixel noise; class = mean pixel above 0."""
    g = torch.Generator().manual_seed(seed)
    offset = (torch.rand(n, generator=g) * 2 - 1) * 0.6
    x = (offset[:, None, None, None] + 0.3 * torch.randn(n, 1, res, res, generator=g)).clamp(-1, 1)
    return x, (x.mean((1, 2, 3)) > 0).long()


@pytest.fixture(scope="module")
def fitted():
    x, y = _pairs(200, seed=0)
    return fit_classifier(x, y, 2, CFG, seed=0, name="bright", progress=False)


def test_fit_classifier_beats_chance(fitted):
    clf, report = fitted
    x, y = _pairs(500, seed=1)
    assert 0.3 < y.float().mean() < 0.7  # both classes present: chance is ~50%
    acc = (clf.predict(x) == y).float().mean().item()
    assert acc > 0.85
    assert clf.num_classes == 2 and clf.name == "bright"
    assert report["pairs"] == 200 and report["temperature"] == pytest.approx(clf.temperature.item())
    assert report["temperature"] > 0
    assert set(report["calibration_split"]) >= {"accuracy", "nll_raw", "nll_calibrated", "ece_raw"}
    # calibrating T on the held-back split can only lower its NLL
    assert report["calibration_split"]["nll_calibrated"] <= report["calibration_split"]["nll_raw"] + 1e-6
    assert not any(p.requires_grad for p in clf.parameters())


def test_fit_classifier_is_seeded():
    x, y = _pairs(60, seed=2)
    cfg = ClassifierConfig(epochs=1, batch=16)
    a, _ = fit_classifier(x, y, 2, cfg, seed=0, progress=False)
    b, _ = fit_classifier(x, y, 2, cfg, seed=0, progress=False)
    for (k, u), (_, v) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(u, v), k


def test_log_prob_is_calibrated_log_softmax(fitted):
    clf, _ = fitted
    x, y = _pairs(16, seed=3)
    expected = (clf.net(x) / clf.temperature).log_softmax(-1)[torch.arange(16), y]
    torch.testing.assert_close(clf.log_prob(x, y), expected)
    assert bool((clf.log_prob(x, y) <= 0).all())


@pytest.mark.parametrize("y_bad", [torch.tensor([2]), torch.tensor([-1])])
def test_fit_classifier_rejects_bad_labels(y_bad):
    x, y = _pairs(20, seed=0)
    y = y.clone()
    y[5] = y_bad
    with pytest.raises(CtrlDiffError, match=rf"label {int(y_bad)} is outside 0\.\.1"):
        fit_classifier(x, y, 2, CFG, progress=False)


def test_fit_classifier_rejects_bad_sizes():
    x, y = _pairs(20, seed=0)
    with pytest.raises(CtrlDiffError, match="labels"):
        fit_classifier(x, y[:-1], 2, CFG, progress=False)
    with pytest.raises(CtrlDiffError, match="too few"):
        fit_classifier(x[:5], y[:5], 2, CFG, progress=False)


def _calibrated_logits(n=20000, k=5, seed=0):
    """Logits and labels drawn from their own softmax: perfectly calibrated by construction."""
    g = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(n, k, generator=g)
    y = torch.multinomial(logits.softmax(-1), 1, generator=g).squeeze(1)
    return logits, y


@pytest.mark.parametrize("scale", [3.0, 0.5, 1.0])
def test_fit_temperature_recovers_known_temperature(scale):
    logits, y = _calibrated_logits()
    t = fit_temperature(logits * scale, y)
    assert t == pytest.approx(scale, rel=0.15)
    # and it is the minimiser: nudging T either way raises the NLL
    nll = lambda T: F.cross_entropy(logits * scale / T, y).item()
    assert nll(t) <= min(nll(t * 1.1), nll(t / 1.1))


def test_expected_calibration_error():
    logits, y = _calibrated_logits()
    assert expected_calibration_error(logits, y) < 0.02
    over = expected_calibration_error(logits * 5, y)  # same ranking, far too confident
    assert over > 0.15
    # always-right, fully confident predictions are perfectly calibrated too
    onehot = 50 * F.one_hot(y, 5).float()
    assert expected_calibration_error(onehot, y) == pytest.approx(0.0, abs=1e-6)
    # always-wrong, fully confident: ECE ~ 1
    assert expected_calibration_error(onehot, (y + 1) % 5) == pytest.approx(1.0, abs=1e-4)


def test_save_load_round_trip(fitted, tmp_path):
    clf, _ = fitted
    path = tmp_path / "clf.safetensors"
    clf.save(path, {"accuracy": 0.9})
    back = Classifier.load(path, name="bright")
    assert back.name == "bright" and back.temperature.item() == clf.temperature.item()
    assert not back.training and not any(p.requires_grad for p in back.parameters())
    x, _ = _pairs(8, seed=4)
    assert torch.equal(back(x), clf(x))
    assert torch.equal(Classifier.load(path)(x), clf(x))  # name=None: no check
    with pytest.raises(CtrlDiffError, match="'bright', not 'other'"):
        Classifier.load(path, name="other")


def test_load_rejects_non_classifier_checkpoint(tmp_path):
    path = tmp_path / "unet.safetensors"
    save_weights(path, SmallCNN(2).state_dict(), {"kind": "unet"})
    with pytest.raises(CtrlDiffError, match="not a classifier"):
        Classifier.load(path)


def test_fit_temperature_survives_a_diverging_lbfgs():
    """Weak logits on which L-BFGS (lr 0.1, no line search) ends at log T = nan; the reward must not become nan."""
    g = torch.Generator().manual_seed(79)
    y = torch.randint(0, 4, (200,), generator=g)
    logits = 0.3 * torch.randn(200, 4, generator=g) + 0.3 * F.one_hot(y, 4) * torch.rand(200, 1, generator=g)
    t = fit_temperature(logits, y)
    assert math.isfinite(t) and 0.05 <= t <= 20
    grid = torch.linspace(math.log(0.05), math.log(20), 50).exp()
    best = min(F.cross_entropy(logits / g_, y).item() for g_ in grid)
    assert F.cross_entropy(logits / t, y).item() <= best + 1e-4
