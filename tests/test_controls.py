"""Controls: the pixel labellers (oracles), their frozen thresholds, label checks and the registry."""

import pytest
import torch

from ctrldiff.io import CtrlDiffError
from ctrldiff.tasks.controls import (
    COMPRESS4,
    CONTROLS,
    THICKNESS2,
    Control,
    get_control,
    jpeg_size,
    register,
    stroke_thickness,
    thresholds_from_data,
)
from ctrldiff.tasks.mnist import load_digits, to_unit


def _blank(n=1, res=16):
    return torch.zeros(n, 1, res, res)


def _noise(n=3, res=16, seed=0):
    return torch.rand(n, 1, res, res, generator=torch.Generator().manual_seed(seed))


def _bars():
    """A 1-pixel vertical line and a 3-pixel-wide bar, both 14 pixels long, on 16x16."""
    ims = _blank(2)
    ims[0, 0, 1:15, 8] = 1
    ims[1, 0, 1:15, 7:10] = 1
    return ims


@pytest.mark.parametrize("resolution", [16, 28])
def test_the_frozen_thresholds_are_the_training_splits_quantiles(resolution):
    """The labels' constants are what their comment says: quartiles of the JPEG size and the median stroke
    thickness of the 4,000 training digits (split seed 0), recomputed here."""
    found = thresholds_from_data(to_unit(load_digits("train", resolution).x))
    assert found == {"compress4": COMPRESS4[resolution], "thickness2": THICKNESS2[resolution]}


# --- stroke_thickness ------------------------------------------------------------------------------------

def test_stroke_thickness_line_and_bar():
    thin, thick = stroke_thickness(_bars()).tolist()
    assert thin == pytest.approx(1.0, abs=0.1)
    assert 2.5 <= thick <= 4.0  # ink 42 px over a skeleton slightly shorter than the bar's 14
    assert thick > 2 * thin


def test_stroke_thickness_blank_is_zero():
    out = stroke_thickness(_blank(2))
    assert out.shape == (2,) and torch.equal(out, torch.zeros(2, dtype=torch.float64))


def test_stroke_thickness_binarises_at_half():
    ims = _bars()
    faint = ims * 0.4  # below the 0.5 ink threshold: no ink at all
    assert torch.equal(stroke_thickness(faint), torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(stroke_thickness(ims * 0.9), stroke_thickness(ims))


# --- jpeg_size and the binned labellers ---------------------------------------------------------------------

def test_jpeg_size_blank_smaller_than_noise():
    blank, noise = jpeg_size(_blank()), jpeg_size(_noise())
    assert blank.shape == (1,) and noise.shape == (3,)
    assert bool((blank < noise).all())


def test_compress4_blank_and_noise():
    c = get_control("compress4")
    assert c.num_classes == 4 and c.null == 4
    assert c.label(_blank()).tolist() == [0]
    assert c.label(_noise()).tolist() == [3, 3, 3]


@pytest.mark.parametrize("name", ["compress2", "thickness2", "compress4"])
@pytest.mark.parametrize("res", [16, 28])
def test_labellers_return_ints_in_range(name, res):
    c = get_control(name)
    ims = torch.cat([_blank(1, res), _noise(3, res), torch.ones(1, 1, res, res)])
    y = c.label(ims)
    assert y.shape == (5,) and not y.dtype.is_floating_point
    assert int(y.min()) >= 0 and int(y.max()) < c.num_classes
    assert len(c.class_names) == c.num_classes
    c.check_labels(y)  # a labeller's own output always passes the label check


def test_thickness2_separates_line_from_bar():
    assert get_control("thickness2").label(_bars()).tolist() == [0, 1]
    assert get_control("compress2").label(torch.cat([_blank(), _noise(1)])).tolist() == [0, 1]


@pytest.mark.parametrize("name", ["compress4", "compress2", "thickness2"])
def test_unsupported_resolution_raises(name):
    with pytest.raises(CtrlDiffError, match="resolution 20") as e:
        get_control(name).label(_blank(1, 20))
    assert "16" in str(e.value) and "28" in str(e.value)


# --- registry and label checks -------------------------------------------------------------------------------

def test_get_control_unknown_lists_choices():
    with pytest.raises(CtrlDiffError, match="nope") as e:
        get_control("nope")
    for name in ("compress4", "compress2", "thickness2"):
        assert name in str(e.value)


def test_check_labels():
    c = Control("a", 3)
    assert c.check_labels(torch.tensor([0, 1, 2])).tolist() == [0, 1, 2]
    for bad in (3, -1):
        with pytest.raises(CtrlDiffError, match=rf"label {bad} for control 'a' is outside 0\.\.2"):
            c.check_labels(torch.tensor([0, bad, 1]))
    y = c.check_labels(torch.tensor([3, 0], dtype=torch.int32), allow_null=True)
    assert y.tolist() == [3, 0] and y.dtype == torch.long
    with pytest.raises(CtrlDiffError, match=r"outside 0\.\.3"):
        c.check_labels(torch.tensor([4]), allow_null=True)
    with pytest.raises(CtrlDiffError):
        c.check_labels(torch.tensor([-1]), allow_null=True)
    with pytest.raises(CtrlDiffError):  # float labels are not labels
        c.check_labels(torch.tensor([1.0]))
    assert c.check_labels(torch.tensor([], dtype=torch.long)).numel() == 0


def test_control_without_labeller_raises():
    with pytest.raises(CtrlDiffError, match="no labeller"):
        Control("pairs_only", 2).label(_blank())


@pytest.fixture
def mine():
    assert "mine" not in CONTROLS
    yield
    CONTROLS.pop("mine", None)


def test_register_user_control(mine):
    def labeller(images):
        return (images.mean((1, 2, 3)) > 0.5).long()

    c = register(Control("mine", 2, labeller))
    assert get_control("mine") is c
    assert c.label(torch.cat([_blank(), torch.ones(1, 1, 16, 16)])).tolist() == [0, 1]
    with pytest.raises(CtrlDiffError, match="mine"):  # now listed among the choices
        get_control("nope")
