"""One path through the losses (issue 18): public poly-2 MMD, form choice, alignment, imports."""

import ast
import inspect
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import nst_det.losses as L
from nst_det.losses import mmd2, nst_loss, poly2_mmd2
from nst_det.losses.poly2 import cheaper_form

LOSSES_DIR = Path(L.__file__).parent


def _rand(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _plain(x, y):
    """The V-statistic from its definition with autograd: (x.y)^2 kernel means."""
    def k(a, b):
        return torch.bmm(a, b.transpose(1, 2)).pow(2).mean((1, 2))

    return k(x, x) + k(y, y) - 2 * k(x, y)


@pytest.mark.parametrize("normalise", [False, True])
@pytest.mark.parametrize("form", ["samples", "features"])
@pytest.mark.parametrize("n", [5, 70])  # 70: the teacher Gram from three half-size blocks
def test_poly2_mmd2_matches_definition_values_and_gradients(normalise, form, n):
    x0, y = _rand(2, 9, 12, seed=1), _rand(2, n, 12, seed=2)
    x0[:, 4] *= 30  # rows of very different norm: normalisation matters
    eps = 1e-10 if normalise else None
    x = x0.clone().requires_grad_()
    got = poly2_mmd2(x, y, form=form, normalise_eps=eps)
    (g_got,) = torch.autograd.grad(got.sum(), x)
    x = x0.clone().requires_grad_()
    xs, ys = (F.normalize(x, dim=-1), F.normalize(y, dim=-1)) if normalise else (x, y)
    ref = _plain(xs, ys)
    (g_ref,) = torch.autograd.grad(ref.sum(), x)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(g_got, g_ref)


def test_mmd2_and_nst_loss_reach_the_same_poly2_function(monkeypatch):
    x, y = _rand(2, 6, 8, seed=3).requires_grad_(), _rand(2, 7, 8, seed=4)
    calls = []
    real = L.mmd.poly2_mmd2

    def spy(*args, **kwargs):
        calls.append(kwargs.get("normalise_eps"))
        return real(*args, **kwargs)

    monkeypatch.setattr("nst_det.losses.mmd.poly2_mmd2", spy)
    mmd2(x, y, "poly")
    nst_loss(x.view(2, 6, 2, 4), y.view(2, 7, 2, 4))
    mmd2(x, y, "poly", degree=3)  # not degree 2: the generic kernel path
    assert calls == [None, 1e-10]


def test_auto_form_is_cheaper_forms_choice(monkeypatch):
    # 7x7 maps with many channels: features; detection-sized maps: samples (as documented)
    assert cheaper_form(64, 96, 49, True) == "features"
    assert cheaper_form(64, 96, 38 * 50, True) == "samples"
    import nst_det.losses.poly2 as poly2

    fused = []  # the fused samples path runs only when "auto" chose samples
    real = poly2._Poly2SamplesMMD.apply
    monkeypatch.setattr(poly2._Poly2SamplesMMD, "apply",
                        lambda *a: fused.append(a[0].shape) or real(*a))
    x, y = _rand(1, 64, 49, seed=5).requires_grad_(), _rand(1, 96, 49, seed=6)
    torch.testing.assert_close(poly2_mmd2(x, y), poly2_mmd2(x, y, form="features"))
    assert fused == []
    x, y = _rand(1, 8, 38 * 50, seed=5).requires_grad_(), _rand(1, 8, 38 * 50, seed=6)
    assert cheaper_form(8, 8, 38 * 50, True) == "samples"
    poly2_mmd2(x, y)
    assert fused == [x.shape]


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def test_aligned_maps_are_not_pooled_or_copied_again():
    f_s = _rand(2, 4, 6, 5, seed=7).requires_grad_()
    f_t = _rand(2, 6, 6, 5, seed=8)
    with _Ops() as ops:
        nst_loss(f_s, f_t).backward()
    assert not [n for n in ops.names if "pool" in n or "clone" in n or "copy" in n]
    with _Ops() as ops:  # unaligned maps are still pooled here (the documented fallback)
        nst_loss(f_s, _rand(2, 6, 3, 5, seed=9))
    assert any("pool" in n for n in ops.names)


def test_one_autograd_function_and_no_private_cross_imports():
    functions = [
        (name, obj) for mod in LOSSES_DIR.glob("*.py")
        for name, obj in inspect.getmembers(
            __import__(f"nst_det.losses.{mod.stem}", fromlist=["_"]), inspect.isclass)
        if issubclass(obj, torch.autograd.Function) and obj.__module__.startswith("nst_det.")
    ]
    assert {obj for _, obj in functions} == {L.poly2._Poly2SamplesMMD}
    private = []
    for path in LOSSES_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                private += [f"{path.name}: {a.name}" for a in node.names
                            if a.name.startswith("_")]
    assert private == []
    # the KD^2M losses prepare their inputs in one place
    for name in ("gaussian.py", "transport.py", "mmd.py"):
        assert "def _prepare" not in (LOSSES_DIR / name).read_text()
