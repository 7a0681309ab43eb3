"""ctrldiff.methods: neutral settings are the base sampler, guidance helps on a toy task, costs count what
ran, bad knobs are one-line errors, SMC's shapes, the CFG baseline's training and the noise-aware classifier
file."""

import math

import pytest
import torch
from conftest import GaussianBase

from ctrldiff.backends.pixels import PixelBackend
from ctrldiff.classifier import Classifier, NoisyClassifier, fit_classifier, fit_noisy_classifier
from ctrldiff.conditions import balanced_conditions
from ctrldiff.config import ClassifierConfig, TripletsConfig
from ctrldiff.contracts import Cond
from ctrldiff.control import ControlledDenoiser, y_guidance
from ctrldiff.io import CtrlDiffError
from ctrldiff.methods import KNOBS, Cost, Likelihood, build_method, check_knobs
from ctrldiff.methods.particles import _resample, smc
from ctrldiff.methods.triplets import fit_cfg
from ctrldiff.models import SmallCNN
from ctrldiff.sampling import sample
from ctrldiff.schedule import Schedule

STEPS = 5
CONTROL = "bright2"


def _classifiers(seed: int = 0):
    """Untrained, seeded p̂(y|x) and p̂(y|x_t, t) for one 2-class control (where values do not matter)."""
    torch.manual_seed(seed)
    clf = Classifier(SmallCNN(2), CONTROL).eval().requires_grad_(False)
    noisy = NoisyClassifier(SmallCNN(2, in_channels=2), name=CONTROL).eval().requires_grad_(False)
    return {CONTROL: clf}, {CONTROL: noisy}


def _cond(n: int) -> Cond:
    return balanced_conditions(n, 10, {CONTROL: 2})


def _draw(method, cond, seed=3, cost=None):
    return method(cond, torch.Generator().manual_seed(seed), cost)[0]


def _base_x0(backend, cond, seed=3, denoiser=None, final=None):
    """The base sampler (or `denoiser`, `final` taking the last step) from the x_T that build_method's chain draws
    first."""
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn((len(cond), *backend.shape), generator=g)
    with torch.no_grad():
        denoiser = backend.denoiser if denoiser is None else denoiser
        return sample(denoiser, backend.schedule, x_T, cond, steps=STEPS, eta=1.0,
                      generator=g, final=final).x0


# --- 1. neutral settings reproduce the base sampler ---------------------------------------------------------

NEUTRAL = [("dps", {"w": 0}), ("classifier", {"w": 0}), ("mpgd", {"w": 0}), ("smc", {"particles": 1, "w": 0}),
           ("svdd", {"candidates": 1}), ("best_of_n", {"n": 1})]


@pytest.mark.parametrize(("name", "knobs"), NEUTRAL, ids=[n for n, _ in NEUTRAL])
def test_neutral_setting_is_the_base_sampler(tiny_backend, name, knobs):
    classifiers, noisy = _classifiers()
    cond = _cond(6)
    base = build_method("base", tiny_backend, steps=STEPS)
    method = build_method(name, tiny_backend, knobs, steps=STEPS, classifiers=classifiers, noisy=noisy)
    x0 = _draw(method, cond)
    assert torch.equal(x0, _draw(base, cond))
    assert torch.equal(x0, _base_x0(tiny_backend, cond))
    assert not torch.equal(x0, _draw(base, cond, seed=4))  # the seed matters: the comparison can fail


def _moved_model(backend) -> ControlledDenoiser:
    model = ControlledDenoiser(backend, {CONTROL: 2}, lora_rank=4)
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        model.embeddings[CONTROL].weight[:2] = torch.randn(2, backend.emb_dim, generator=g)
    return model.eval()


@pytest.mark.parametrize("name", ["ctrl", "cfg"])
def test_ctrl_and_cfg_sample_the_model(tiny_backend, name):
    model, cond = _moved_model(tiny_backend), _cond(6)
    final = model.final(tiny_backend)  # the base's last step (rl.final_step="base", the model's default)
    x0 = _draw(build_method(name, tiny_backend, {"w": 1}, steps=STEPS, model=model), cond)
    assert torch.equal(x0, _base_x0(tiny_backend, cond, denoiser=model, final=final))
    assert not torch.equal(x0, _base_x0(tiny_backend, cond))  # the model is not the base: the check can fail
    guided = _draw(build_method(name, tiny_backend, {"w": 2.5}, steps=STEPS, model=model), cond)
    assert torch.equal(guided, _base_x0(tiny_backend, cond, denoiser=y_guidance(model, 2.5), final=final))
    assert not torch.equal(guided, x0)


def test_fresh_ctrl_model_is_the_base(tiny_backend):
    model, cond = ControlledDenoiser(tiny_backend, {CONTROL: 2}, lora_rank=4).eval(), _cond(6)
    base = _draw(build_method("base", tiny_backend, steps=STEPS), cond)
    # zero-initialised embeddings and LoRA B = 0 add exact zeros: the same numbers, not just close ones
    ctrl = build_method("ctrl", tiny_backend, {"w": 1}, steps=STEPS, model=model)
    assert torch.equal(_draw(ctrl, cond), base)


# --- 2. guidance raises a toy oracle's accuracy -------------------------------------------------------------

@pytest.fixture(scope="module")
def brightness():
    """A 2-class control: is the decoded image brighter than the median base sample? (base accuracy ~ 0.5).
    p̂(y|x) and p̂(y|x_t, t) fitted on 512 labelled base samples, once for the module."""
    schedule = Schedule.linear()
    backend = PixelBackend(GaussianBase(schedule), schedule, 8)
    n, g = 512, torch.Generator().manual_seed(1)
    with torch.no_grad():
        x0 = sample(backend.denoiser, schedule, torch.randn(n, *backend.shape, generator=g),
                    Cond(torch.randint(0, 10, (n,), generator=g)), steps=STEPS, generator=g).x0
    images = backend.decode(x0)
    m = images.mean((1, 2, 3)).median().item()

    def labeller(im):
        return (im.mean((1, 2, 3)) > m).long()

    y = labeller(images)
    cfg = ClassifierConfig(epochs=20, batch=32, lr=3e-3, noise=0.0, shift=0)
    clf, _ = fit_classifier(images * 2 - 1, y, 2, cfg, seed=1, name=CONTROL, progress=False)
    noisy = fit_noisy_classifier(x0, y, 2, cfg, schedule, seed=1, name=CONTROL, progress=False)

    def accuracy(name, knobs=None):
        method = build_method(name, backend, knobs, steps=STEPS, classifiers={CONTROL: clf},
                              noisy={CONTROL: noisy})
        cond = _cond(64)  # balanced y
        x = _draw(method, cond, seed=7)
        return (labeller(backend.decode(x)) == cond.y[CONTROL]).float().mean().item()

    return accuracy, accuracy("base")


GUIDED = [("dps", {"w": 1.0}), ("classifier", {"w": 4.0}), ("mpgd", {"w": 1.0}),
          ("smc", {"particles": 4, "w": 1.0}), ("svdd", {"candidates": 4, "alpha": 0.0}),
          ("best_of_n", {"n": 4})]


@pytest.mark.parametrize(("name", "knobs"), GUIDED, ids=[n for n, _ in GUIDED])
def test_guidance_raises_oracle_accuracy(brightness, name, knobs):
    accuracy, base = brightness
    assert 0.35 < base < 0.65, base  # the toy control is not already satisfied by the base
    acc = accuracy(name, knobs)
    # measured (3 fit seeds x 3 request seeds): base 0.47-0.53, every method >= 0.73
    assert acc > base + 0.2, (name, base, acc)


# --- 3. cost counters ---------------------------------------------------------------------------------------

def _per_sample(cost: Cost, n: int) -> tuple:
    d = cost.per_sample(n)
    return tuple(d.get(k, 0) for k in ("forward_denoiser", "backward_denoiser", "forward_classifier",
                                       "backward_classifier"))


# (denoiser fwd, denoiser bwd, classifier fwd, classifier bwd) per sample, 5 DDIM steps; the last step of
# the trailing spacing goes to t = -1 with std = 0 (deterministic)
COSTS = [
    ("base", {}, (5, 0, 0, 0)),
    ("dps", {"w": 1}, (5, 5, 5, 5)),  # every step: eps with a graph, p̂ at x0_hat, one backward through both
    ("classifier", {"w": 1}, (5, 0, 5, 5)),  # the noise-aware classifier's gradient only
    ("mpgd", {"w": 1}, (5, 0, 5, 5)),  # gradient at x0_hat, not through the denoiser
    # 1 initial eps + 4 stochastic steps x M candidates (eps and p̂ at x0_hat); the deterministic last step
    # has nothing to choose between
    ("svdd", {"candidates": 3}, (1 + 4 * 3, 0, 4 * 3, 0)),
    ("best_of_n", {"n": 3}, (5 * 3, 0, 3, 0)),  # N chains, one score per final sample
    # K particles: eps and twist at x_T and after each of the 4 non-final steps, with a gradient only where a
    # stochastic proposal follows (not before the deterministic last step); the clean end's twist is p̂ at x0
    ("smc", {"particles": 3, "w": 1}, (5 * 3, 4 * 3, 6 * 3, 4 * 3)),
    ("smc", {"particles": 3, "w": 0}, (5 * 3, 0, 6 * 3, 0)),  # unguided proposal: twists only
    ("smc", {"particles": 1, "w": 0}, (5, 0, 0, 0)),  # one particle: no weights to compute
]


@pytest.mark.parametrize(("name", "knobs", "expected"), COSTS,
                         ids=[f"{n}-{'-'.join(map(str, k.values()))}" for n, k, _ in COSTS])
def test_cost_counts_what_ran(tiny_backend, name, knobs, expected):
    classifiers, noisy = _classifiers()
    method = build_method(name, tiny_backend, knobs, steps=STEPS, classifiers=classifiers, noisy=noisy)
    cost, b = Cost(), 4
    x0 = _draw(method, _cond(b), cost=cost)
    assert x0.shape == (b, *tiny_backend.shape)
    assert _per_sample(cost, b) == expected
    assert cost.seconds > 0
    width_knob = {"svdd": "candidates", "best_of_n": "n", "smc": "particles"}.get(name)
    assert method.width == (knobs[width_knob] if width_knob else 1)


def test_cost_of_ctrl_and_of_several_controls(tiny_backend):
    model, b = _moved_model(tiny_backend), 4
    cost = Cost()
    _draw(build_method("ctrl", tiny_backend, {"w": 1}, steps=STEPS, model=model), _cond(b), cost=cost)
    assert _per_sample(cost, b) == (5, 0, 0, 0)
    cost = Cost()  # guidance on y batches (null, y): two network passes per sample and step, the base's last one
    _draw(build_method("cfg", tiny_backend, {"w": 3}, steps=STEPS, model=model), _cond(b), cost=cost)
    assert _per_sample(cost, b) == (2 * (STEPS - 1) + 1, 0, 0, 0)
    # two controls: one p̂ each, so the "classifier" kind counts twice per step
    (a,), (c,) = _classifiers(0)[0].values(), _classifiers(1)[0].values()
    cond = Cond(torch.arange(b), {"a": torch.tensor([0, 1, 0, 1]), "b": torch.tensor([1, 1, 0, 0])})
    cost = Cost()
    dps = build_method("dps", tiny_backend, {"w": 1}, steps=STEPS, classifiers={"a": a, "b": c})
    _draw(dps, cond, cost=cost)
    assert _per_sample(cost, b) == (5, 5, 10, 10)


def test_cost_watch_removes_its_hooks(tiny_backend):
    net, cond = tiny_backend.net, _cond(4)
    x, t = torch.randn(4, *tiny_backend.shape), torch.full((4,), 500)
    cost = Cost()
    with cost.watch([("denoiser", net)]):
        tiny_backend.denoiser(x, t, cond)
    assert cost.forward == {"denoiser": 4} and cost.backward == {}
    tiny_backend.denoiser(x, t, cond)
    assert cost.forward == {"denoiser": 4} and not net._forward_hooks
    with pytest.raises(RuntimeError), cost.watch([("denoiser", net)]):  # removed on an error too
        raise RuntimeError
    tiny_backend.denoiser(x, t, cond)
    assert cost.forward == {"denoiser": 4} and not net._forward_hooks


# --- 4. knob and build errors -------------------------------------------------------------------------------

def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(CtrlDiffError, match="unknown method 'dsp'") as err:
        check_knobs("dsp")
    assert all(name in str(err.value) for name in KNOBS)


def test_foreign_knob_names_the_methods_knobs():
    with pytest.raises(CtrlDiffError, match=r"'particles' does not belong to method 'dps'; its knobs: w$"):
        check_knobs("dps", {"particles": 4})
    with pytest.raises(CtrlDiffError, match="its knobs: particles, gamma, w, ess"):
        check_knobs("smc", {"candidates": 4})
    with pytest.raises(CtrlDiffError, match="its knobs: none"):
        check_knobs("base", {"w": 1})


@pytest.mark.parametrize(("method", "knobs", "match"), [
    ("smc", {"particles": 2.5}, "integer >= 1"),
    ("smc", {"particles": 0}, "integer >= 1"),
    ("svdd", {"candidates": 1.5}, "integer >= 1"),
    ("smc", {"ess": 1.5}, r"in \[0.0, 1.0\]"),
    ("dps", {"w": -1}, r"in \[0.0, inf\]"),
    ("dps", {"w": "1"}, "must be a finite number"),
    ("best_of_n", {"n": True}, "must be a finite number"),
])
def test_bad_knob_values(method, knobs, match):
    with pytest.raises(CtrlDiffError, match=match):
        check_knobs(method, knobs)


def test_knobs_are_filled_and_typed():
    knobs = check_knobs("smc", {"particles": 2.0, "w": 0})
    assert knobs == {"particles": 2, "gamma": 10.0, "w": 0.0, "ess": 0.5}
    assert type(knobs["particles"]) is int and type(knobs["w"]) is float
    assert check_knobs("svdd") == KNOBS["svdd"] and check_knobs("svdd") is not KNOBS["svdd"]


def test_build_errors(tiny_backend):
    classifiers, noisy = _classifiers()
    with pytest.raises(CtrlDiffError, match="unknown method"):
        build_method("nope", tiny_backend)
    with pytest.raises(CtrlDiffError, match="does not belong"):
        build_method("dps", tiny_backend, {"n": 2}, classifiers=classifiers)
    for name in ("ctrl", "cfg"):
        with pytest.raises(CtrlDiffError, match=f"method '{name}' needs .*--ckpt"):
            build_method(name, tiny_backend, classifiers=classifiers, noisy=noisy)
    for name in ("dps", "mpgd", "smc", "svdd", "best_of_n"):
        with pytest.raises(CtrlDiffError, match=f"method '{name}' needs reward classifiers"):
            build_method(name, tiny_backend, noisy=noisy)
    with pytest.raises(CtrlDiffError, match="method 'classifier' needs noise-aware classifiers"):
        build_method("classifier", tiny_backend, classifiers=classifiers)
    for name in ("dps", "smc"):  # an empty set of controls is no likelihood at all
        with pytest.raises(CtrlDiffError, match=f"method '{name}' needs reward classifiers"):
            build_method(name, tiny_backend, classifiers={})
    with pytest.raises(CtrlDiffError, match="finite number"):
        build_method("dps", tiny_backend, {"w": float("inf")}, classifiers=classifiers)
    assert build_method("base", tiny_backend).nets == [("denoiser", tiny_backend.net)]


# --- 5. SMC's shapes ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("ess", [0.0, 1.0])  # never / (almost) always resample
def test_smc_returns_one_particle_per_request(tiny_backend, ess):
    classifiers, _ = _classifiers()
    lik, cond, k = Likelihood(tiny_backend, classifiers), _cond(3), 4

    def run(**kw):
        return smc(tiny_backend.denoiser, tiny_backend.schedule, lik, cond, tiny_backend.shape,
                   torch.Generator().manual_seed(2), steps=STEPS, eta=1.0, particles=k, gamma=10.0, w=1.0,
                   ess=ess, **kw)

    with torch.no_grad():
        one, (every, _) = run(), run(return_all=True)
    assert one.shape == (3, *tiny_backend.shape) and every.shape == (3 * k, *tiny_backend.shape)
    assert torch.isfinite(every).all()
    for i in range(3):  # request-major: request i's answer is one of its own K particles
        assert any(torch.equal(one[i], p) for p in every[i * k:(i + 1) * k])


def test_smc_weights_start_from_the_twist_at_x_T(tiny_backend):
    """One step (t = 999 -> x_0, deterministic): x_0 is x0_hat(x_T), so the whole weight is the initial twist
    p̂(y | x0_hat(x_T))^gamma. The particle returned must be (almost always) its request's likeliest; without
    the initial twist every weight is equal and the pick is uniform."""
    classifiers, _ = _classifiers()
    lik, cond, k = Likelihood(tiny_backend, classifiers), _cond(64), 8

    def run(**kw):
        return smc(tiny_backend.denoiser, tiny_backend.schedule, lik, cond, tiny_backend.shape,
                   torch.Generator().manual_seed(3), steps=1, eta=1.0, particles=k, gamma=1e4, w=0.0, ess=0.0, **kw)

    with torch.no_grad():
        one, (every, _) = run(), run(return_all=True)
        ll = lik(every, cond.index(torch.arange(64).repeat_interleave(k))).view(64, k)
    best = every.view(64, k, *every.shape[1:])[torch.arange(64), ll.argmax(1)]
    assert (one == best).flatten(1).all(1).float().mean() > 0.9


def test_smc_resampling_keeps_shapes_and_stays_within_requests():
    b, k = 3, 4
    x = torch.arange(b * k, dtype=torch.float32).view(b * k, 1, 1, 1).expand(b * k, 1, 2, 2).clone()
    ll, grad = torch.arange(b * k, dtype=torch.float32), x * 10
    log_w = torch.tensor([[0.0, 0.0, 0.0, 0.0],  # ESS 4: kept
                          [0.0, -50.0, -50.0, -50.0],  # ESS ~1 < 0.5 K: resampled, all onto particle 0
                          [0.0, 0.0, -50.0, -50.0]])  # ESS ~2, not below 0.5 K = 2: kept
    x2, eps2, ll2, grad2, log_w2 = _resample(x, None, ll, grad, log_w, 0.5, torch.Generator().manual_seed(0))
    assert x2.shape == x.shape and ll2.shape == ll.shape and grad2.shape == grad.shape and eps2 is None
    assert log_w2.shape == log_w.shape
    assert torch.equal(x2[:4], x[:4]) and torch.equal(x2[8:], x[8:])
    assert torch.equal(log_w2[0], log_w[0]) and torch.equal(log_w2[2], log_w[2])
    assert torch.equal(x2[4:8], x[4:5].expand(4, 1, 2, 2)) and torch.equal(ll2[4:8], torch.full((4,), 4.0))
    assert torch.equal(grad2, x2 * 10)  # the state's companions move with it
    assert torch.equal(log_w2[1], torch.zeros(4))
    uniform = torch.zeros(b, k)  # nothing below the threshold: the very same tensors back
    out = _resample(x, None, ll, grad, uniform, 0.5, None)
    assert out[0] is x and out[-1] is uniform


# --- 6. the CFG baseline on triplets ------------------------------------------------------------------------

def test_fit_cfg_trains_only_the_adapter(tiny_backend):
    g = torch.Generator().manual_seed(0)
    n = 32
    x, c = 0.5 * torch.randn(n, *tiny_backend.shape, generator=g), torch.randint(0, 10, (n,), generator=g)
    y = {CONTROL: torch.randint(0, 2, (n,), generator=g)}
    base_state = {k: v.clone() for k, v in tiny_backend.net.state_dict().items()}
    model, summary = fit_cfg(tiny_backend, x, c, y, {CONTROL: 2}, TripletsConfig(steps=3, batch=8, n=20),
                             progress=False)
    assert summary["triplets"] == 20 and summary["steps"] == 3
    for k, v in tiny_backend.net.state_dict().items():  # the backend's base never moved
        assert torch.equal(v, base_state[k]), k
    for k, v in model.net.state_dict().items():  # nor did the model's frozen copy of it
        if "lora_" not in k:
            assert torch.equal(v, base_state[k.replace(".base_layer", "")]), k
    lora_b = [p for name, p in model.net.named_parameters() if "lora_B" in name]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # LoRA B starts at zero: it moved
    emb = model.embeddings[CONTROL].weight
    assert torch.equal(emb[-1], torch.zeros_like(emb[-1])) and (emb[:-1].abs().sum(1) > 0).all()


def test_fit_cfg_errors(tiny_backend):
    x, c = torch.zeros(10, *tiny_backend.shape), torch.zeros(10, dtype=torch.long)
    y = {CONTROL: torch.zeros(10, dtype=torch.long)}
    with pytest.raises(CtrlDiffError, match=r"triplets.n=11: choose 1..10"):
        fit_cfg(tiny_backend, x, c, y, {CONTROL: 2}, TripletsConfig(steps=1, batch=2, n=11), progress=False)
    with pytest.raises(CtrlDiffError, match="labels given for"):
        fit_cfg(tiny_backend, x, c, y, {"other": 2}, TripletsConfig(steps=1, batch=2), progress=False)


# --- 7. the noise-aware classifier's file -------------------------------------------------------------------

def test_noisy_classifier_round_trip(tmp_path):
    (clf,), (noisy,) = (d.values() for d in _classifiers(3))
    noisy.save(tmp_path / "noisy.safetensors")
    loaded = NoisyClassifier.load(tmp_path / "noisy.safetensors", name=CONTROL)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(5, 1, 8, 8, generator=g), torch.randint(0, 1000, (5,), generator=g)
    assert torch.equal(loaded(x, t), noisy(x, t))
    assert loaded.num_train_timesteps == noisy.num_train_timesteps and loaded.name == CONTROL
    with pytest.raises(CtrlDiffError, match="is a classifier for 'bright2', not 'other'"):
        NoisyClassifier.load(tmp_path / "noisy.safetensors", name="other")
    clf.save(tmp_path / "clf.safetensors")
    with pytest.raises(CtrlDiffError, match=r"not a noise-aware classifier \(kind='classifier'\)"):
        NoisyClassifier.load(tmp_path / "clf.safetensors")
    with pytest.raises(CtrlDiffError, match="not a classifier checkpoint"):
        Classifier.load(tmp_path / "noisy.safetensors")


# --- 6. CTRL as the proposal of an exact sampler --------------------------------------------------------------

def test_ctrl_smc_with_a_model_equal_to_the_base_is_smc_from_the_base(tiny_backend):
    classifiers, _ = _classifiers()
    cond, knobs = _cond(6), {"particles": 4, "gamma": 10.0, "ess": 0.5}
    ctrl_smc = build_method("ctrl_smc", tiny_backend, knobs, steps=STEPS, classifiers=classifiers,
                            model=ControlledDenoiser(tiny_backend, {CONTROL: 2}))
    smc_base = build_method("smc", tiny_backend, knobs | {"w": 0.0}, steps=STEPS, classifiers=classifiers)
    assert torch.equal(_draw(ctrl_smc, cond), _draw(smc_base, cond))
    moved = build_method("ctrl_smc", tiny_backend, knobs, steps=STEPS, classifiers=classifiers,
                         model=_moved_model(tiny_backend))
    assert not torch.equal(_draw(moved, cond), _draw(smc_base, cond))  # the proposal is the model's chain
    with pytest.raises(CtrlDiffError, match="ctrl_smc.*needs a fine-tuned checkpoint"):
        build_method("ctrl_smc", tiny_backend, knobs, steps=STEPS, classifiers=classifiers)


class Uniform(torch.nn.Module):
    """p̂(y | x) = 1 / 2 whatever x: a twist that weighs nothing."""

    def forward(self, x):
        return torch.zeros((len(x), 2))

    def log_prob(self, x, y):
        return self(x).log_softmax(-1).gather(1, y[:, None]).squeeze(1)


def test_ctrl_smc_weights_are_the_path_ratio_when_the_classifier_is_constant(tiny_backend):
    """With p̂ constant the target is the base's own chain: the weights are 1 for a proposal equal to the base, and
    dP_pre / dP_theta (mean 1) for a fine-tuned one."""
    lik, k = Likelihood(tiny_backend, {CONTROL: Uniform()}), 2000
    cond = Cond(torch.zeros(1, dtype=torch.long), {CONTROL: torch.zeros(1, dtype=torch.long)})

    def run(model):  # log weights less the constant twist gamma log(1/2)
        with torch.no_grad():
            return smc(tiny_backend.denoiser, tiny_backend.schedule, lik, cond, tiny_backend.shape,
                       torch.Generator().manual_seed(1), steps=STEPS, eta=1.0, particles=k, gamma=10.0, w=0.0,
                       ess=0.0, proposal=model, return_all=True)[1] - 10.0 * math.log(0.5)

    assert run(ControlledDenoiser(tiny_backend, {CONTROL: 2})).abs().max() < 1e-5
    moved = ControlledDenoiser(tiny_backend, {CONTROL: 2}, lora_rank=0)
    with torch.no_grad():
        moved.embeddings[CONTROL].weight[:2] = 0.01 * torch.randn(2, tiny_backend.emb_dim)
    log_w = run(moved.eval())
    w = log_w.exp()
    assert log_w.std() > 0.05 and abs(w.mean().item() - 1) < 4 * w.std().item() / k**0.5
