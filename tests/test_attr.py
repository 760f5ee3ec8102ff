"""The captum-style certified attribution classes (verigrad.attr): captum's values, the library's
bounds, soundness at sampled points, the user's module left untouched, batched targets, errors."""
from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from verigrad import CertifiedInputXGradient, CertifiedIntegratedGradients, CertifiedSaliency
from verigrad.attr import AttributionBounds
from verigrad.bounds import Bounds, compute_bounds
from verigrad.explanations import Explainer, explanation_bounds
from verigrad.models import ModelError, from_module
from verigrad.perturbation import input_box
from verigrad.properties import Property, Verdict

from tests.helpers import box_points

captum_attr = pytest.importorskip("captum.attr")

ROOT = Path(__file__).resolve().parents[1]


def mlp(act: type[nn.Module] = nn.Tanh, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), act(), nn.Linear(8, 6), act(), nn.Linear(6, 3)).to(dtype).eval()


def cnn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.Softplus(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4)).eval()


CASES = [
    (CertifiedSaliency, "Saliency", {}),
    (CertifiedSaliency, "Saliency", {"abs": False}),
    (CertifiedInputXGradient, "InputXGradient", {}),
    (CertifiedIntegratedGradients, "IntegratedGradients", {}),
    (CertifiedIntegratedGradients, "IntegratedGradients", {"n_steps": 12, "method": "riemann_trapezoid",
                                                           "baselines": 0.3}),
    (CertifiedIntegratedGradients, "IntegratedGradients", {"n_steps": 7, "method": "riemann_middle"}),
]
IDS = ["saliency_abs", "saliency_signed", "ixg", "ig_gl", "ig_trapezoid_b", "ig_middle"]


def _captum(name: str, model: nn.Module, x: torch.Tensor, target, **kw) -> torch.Tensor:
    return getattr(captum_attr, name)(model).attribute(x.clone().requires_grad_(True), target=target, **kw).detach()


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(("cls", "name", "kw"), CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_attribute_equals_captum(cls, name, kw, dtype):
    model = mlp(dtype=dtype)
    x = torch.randn(4, 5, dtype=dtype)
    target = torch.tensor([0, 2, 1, 2])
    ours = cls(model).attribute(x, target, **kw)
    ref = _captum(name, model, x, target, **kw)
    assert ours.dtype == dtype and ours.shape == x.shape
    # captum's Gauss–Legendre nodes differ from numpy's by ~1e-10 (its own quadrature code)
    tol = 1e-5 if dtype == torch.float32 else 1e-8 if cls is CertifiedIntegratedGradients else 1e-12
    torch.testing.assert_close(ours, ref, rtol=tol, atol=tol)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_attribute_equals_captum_images_and_per_sample_baselines():
    model = cnn().double()
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    base = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    t = [1, 3, 0]
    for cls, name, kw in [(CertifiedSaliency, "Saliency", {}), (CertifiedInputXGradient, "InputXGradient", {}),
                          (CertifiedIntegratedGradients, "IntegratedGradients", {"baselines": base, "n_steps": 9})]:
        ref = _captum(name, model, x, t, **kw)
        torch.testing.assert_close(cls(model).attribute(x, t, **kw), ref, rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("engine", ["ibp", "crown"])
def test_bounds_equal_the_library_pipeline(engine):
    model = mlp(dtype=torch.float64)
    x = torch.randn(3, 5, dtype=torch.float64)
    t = torch.tensor([0, 1, 2])
    net = from_module(model, (5,))
    box = input_box(x, 0.05, None)
    b = CertifiedSaliency(model).attribute_bounds(x, t, epsilon=0.05, method=engine, abs=False)
    ref = compute_bounds(engine, net, box, t).bounds
    assert isinstance(b, AttributionBounds) and b.method == engine
    assert torch.equal(b.lower, ref.lower) and torch.equal(b.upper, ref.upper)
    # captum's abs: the exact range of |g| over the signed bounds
    a = CertifiedSaliency(model).attribute_bounds(x, t, epsilon=0.05, method=engine)
    amax = torch.maximum(ref.lower.abs(), ref.upper.abs())
    amin = torch.where(ref.lower > 0, ref.lower, torch.where(ref.upper < 0, -ref.upper, torch.zeros_like(amax)))
    assert torch.equal(a.upper, amax) and torch.equal(a.lower, amin)
    got = CertifiedInputXGradient(model).attribute_bounds(x, t, epsilon=0.05, method=engine)
    want = explanation_bounds(Explainer("input_x_gradient"), engine, net, box, t).bounds
    assert torch.equal(got.lower, want.lower) and torch.equal(got.upper, want.upper)
    got = CertifiedIntegratedGradients(model).attribute_bounds(x, t, epsilon=0.05, method=engine, n_steps=8,
                                                               ig_method="riemann_left", baselines=0.5)
    want = explanation_bounds(Explainer("integrated_gradients", 8, "riemann_left", 0.5), engine, net, box, t).bounds
    assert torch.equal(got.lower, want.lower) and torch.equal(got.upper, want.upper)


def test_ig_method_name_selects_the_rule_and_crown():
    model = mlp(dtype=torch.float64)
    x = torch.randn(2, 5, dtype=torch.float64)
    ig = CertifiedIntegratedGradients(model)
    a = ig.attribute_bounds(x, [0, 1], epsilon=0.02, method="riemann_trapezoid", n_steps=5)
    b = ig.attribute_bounds(x, [0, 1], epsilon=0.02, method="crown", ig_method="riemann_trapezoid", n_steps=5)
    assert torch.equal(a.lower, b.lower) and torch.equal(a.upper, b.upper)
    with pytest.raises(ValueError, match="unknown bound method"):
        CertifiedSaliency(model).attribute_bounds(x, [0, 1], method="riemann_trapezoid")


def _autograd_saliency(model: nn.Module, pts: torch.Tensor, c: int) -> torch.Tensor:
    m = copy.deepcopy(model)
    p = pts.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(m(p)[:, c].sum(), p)
    return g


@pytest.mark.parametrize(("act", "engine"), [(nn.Tanh, "crown"), (nn.ReLU, "crown"), (nn.Softplus, "ibp")])
def test_bounds_contain_autograd_at_sampled_points(act, engine):
    model = mlp(act, seed=3, dtype=torch.float64)
    x = torch.randn(2, 5, dtype=torch.float64)
    eps = 0.1
    t = [2, 0]
    sal = CertifiedSaliency(model).attribute_bounds(x, t, epsilon=eps, method=engine, abs=False)
    ixg = CertifiedInputXGradient(model).attribute_bounds(x, t, epsilon=eps, method=engine)
    ig = CertifiedIntegratedGradients(model).attribute_bounds(x, t, epsilon=eps, method=engine, n_steps=6,
                                                              ig_method="riemann_right", baselines=0.2)
    # tolerance 1e-12: tight CROWN bounds on ReLU nets are attained at corners, up to round-off
    for i in range(2):
        pts = box_points(input_box(x[i:i + 1], eps, None), n_interior=40, n_corners=40, seed=i)
        g = _autograd_saliency(model, pts, t[i])
        assert bool(Bounds(sal.lower[i:i + 1].expand_as(g), sal.upper[i:i + 1].expand_as(g)).contains(g, 1e-12).all())
        v = pts * g
        assert bool(Bounds(ixg.lower[i:i + 1].expand_as(v), ixg.upper[i:i + 1].expand_as(v)).contains(v, 1e-12).all())
        alphas = torch.arange(1, 7, dtype=torch.float64) / 6
        s = sum(_autograd_saliency(model, 0.2 + a * (pts - 0.2), t[i]) for a in alphas) / 6
        w = (pts - 0.2) * s
        assert bool(Bounds(ig.lower[i:i + 1].expand_as(w), ig.upper[i:i + 1].expand_as(w)).contains(w, 1e-12).all())


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(("cls", "name", "kw"), CASES, ids=IDS)
def test_bounds_at_epsilon_zero_are_captums_attribution(cls, name, kw):
    model = mlp(dtype=torch.float64)
    x = torch.randn(3, 5, dtype=torch.float64)
    t = torch.tensor([1, 1, 0])
    ref = _captum(name, model, x, t, **kw)
    kw = dict(kw)
    rule = kw.pop("method", None)
    extra = {"ig_method": rule} if rule else {}
    b = cls(model).attribute_bounds(x, t, epsilon=0.0, **kw, **extra)
    tol = 1e-8 if cls is CertifiedIntegratedGradients else 1e-12
    torch.testing.assert_close(b.lower, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(b.upper, ref, rtol=tol, atol=tol)


def test_float32_bounds_are_rounded_outward():
    model = mlp()
    x = torch.randn(3, 5)
    b32 = CertifiedInputXGradient(model).attribute_bounds(x, 1, epsilon=0.03)
    b64 = CertifiedInputXGradient(model).attribute_bounds(x.double(), 1, epsilon=0.03)
    assert b32.lower.dtype == torch.float32 and b32.lower.device == x.device
    assert bool((b32.lower.double() <= b64.lower).all()) and bool((b32.upper.double() >= b64.upper).all())


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_the_users_module_is_untouched():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 8), nn.Dropout(0.5), nn.Tanh(), nn.Linear(8, 3))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 5)
    for cls in (CertifiedSaliency, CertifiedInputXGradient, CertifiedIntegratedGradients):
        c = cls(model)
        c.attribute(x, [0, 1])
        c.attribute_bounds(x, [0, 1], epsilon=0.05)
        c.certify(x, {"kind": "untargeted", "metric": "l2", "threshold": 10.0}, [0, 1], epsilon=0.05)
    assert model.training and all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]) and v.dtype == before[k].dtype
    # existing .grad fields are kept as they were
    model.eval()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    CertifiedSaliency(model).attribute_bounds(x, 0, epsilon=0.1)
    assert not model.training
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_dropout_in_train_mode_is_explained_at_inference():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 8), nn.Dropout(0.5), nn.Tanh(), nn.Linear(8, 3)).train()
    x = torch.randn(2, 5)
    ours = CertifiedSaliency(model).attribute(x, 1)
    ref = _captum("Saliency", copy.deepcopy(model).eval(), x, 1)
    torch.testing.assert_close(ours, ref)


def test_batched_targets_in_every_form():
    model = mlp(dtype=torch.float64)
    x = torch.randn(4, 5, dtype=torch.float64)
    sal = CertifiedInputXGradient(model)
    per = torch.cat([sal.attribute(x[i:i + 1], c) for i, c in enumerate([2, 0, 1, 1])])
    for t in ([2, 0, 1, 1], (2, 0, 1, 1), torch.tensor([2, 0, 1, 1]), np.array([2, 0, 1, 1])):
        torch.testing.assert_close(sal.attribute(x, t), per, rtol=1e-13, atol=1e-15)
    bper = [sal.attribute_bounds(x[i:i + 1], c, epsilon=0.02) for i, c in enumerate([2, 0, 1, 1])]
    b = sal.attribute_bounds(x, torch.tensor([2, 0, 1, 1]), epsilon=0.02)
    torch.testing.assert_close(b.lower, torch.cat([r.lower for r in bper]), rtol=1e-12, atol=1e-13)
    same = sal.attribute(x, 1)
    torch.testing.assert_close(same, sal.attribute(x, [1, 1, 1, 1]), rtol=1e-13, atol=1e-15)
    with pytest.raises(ValueError, match="3 classes for a batch of 4"):
        sal.attribute(x, [0, 1, 2])
    with pytest.raises(ValueError, match=r"in \[0, 3\)"):
        sal.attribute(x, 3)
    with pytest.raises(ValueError, match="target is required"):
        sal.attribute(x)


def test_input_shape_inferred_or_given():
    model = mlp(dtype=torch.float64)
    sal = CertifiedSaliency(model)
    with pytest.raises(ValueError, match="input shape is not known"):
        sal.network  # noqa: B018
    sal.attribute(torch.randn(1, 5, dtype=torch.float64), 0)
    assert sal.input_shape == (5,)
    with pytest.raises(ValueError, match=r"per-sample shape \(4,\)"):
        sal.attribute(torch.randn(1, 4, dtype=torch.float64), 0)
    assert CertifiedSaliency(model, input_shape=(5,)).network.num_classes == 3


def test_unsupported_layer_is_named():
    model = nn.Sequential(nn.Linear(4, 5), nn.LSTM(5, 3))
    with pytest.raises(ModelError, match=r"layer '1' \(LSTM\)"):
        CertifiedSaliency(model, input_shape=(4,))
    lazy = CertifiedInputXGradient(model)
    with pytest.raises(ModelError, match="LSTM"):
        lazy.attribute(torch.randn(2, 4), 0)


def test_unknown_captum_arguments_are_refused():
    model = mlp()
    with pytest.raises(TypeError, match="additional_forward_args"):
        CertifiedSaliency(model).attribute(torch.randn(1, 5), 0, additional_forward_args=1)
    with pytest.raises(ValueError, match="return_convergence_delta"):
        CertifiedIntegratedGradients(model).attribute(torch.randn(1, 5), 0, return_convergence_delta=True)


def test_certify_verdicts_and_worst_cases():
    model = mlp(act=nn.Softplus, dtype=torch.float64)
    x = torch.randn(3, 5, dtype=torch.float64)
    t = [0, 1, 2]
    sal = CertifiedSaliency(model)
    props = [{"kind": "untargeted", "metric": "l2", "threshold": 5.0},
             Property("tight", "untargeted", "l2", 1e-9),
             {"name": "top", "kind": "topk", "k": 2, "threshold": 1.0},
             {"kind": "feature_bound", "features": [0, 3], "threshold": 100.0}]
    out = sal.certify(x, props, t, epsilon=0.01, abs=False)
    assert len(out) == 3 and [r.name for r in out[0]] == ["p0_untargeted_l2", "tight", "top", "p3_feature_bound"]
    for rows in out:
        assert rows[0].verdict == Verdict.CERTIFIED and rows[0].threshold == 5.0
        assert rows[1].verdict == Verdict.UNKNOWN
        assert rows[3].verdict == Verdict.CERTIFIED
    # the worst case bounds the sampled deviations of the signed map
    for i in range(3):
        pts = box_points(input_box(x[i:i + 1], 0.01, None), 30, 30, seed=i)
        g = _autograd_saliency(model, pts, t[i])
        dev = (g - g[0:1]).norm(dim=1).max()
        assert float(dev) <= out[i][0].worst_case
    with pytest.raises(Exception, match="threshold"):
        sal.certify(x, {"kind": "untargeted", "metric": "l2"}, t, epsilon=0.01)
    with pytest.raises(ValueError, match="k = 9 exceeds"):
        sal.certify(x, Property("big", "topk", None, 0.5, k=9), t)


def test_example_script_runs():
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "captum_style.py")], capture_output=True,
                       text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "certified" in r.stdout


def test_bounds_equal_the_clis_on_the_same_model_and_box(tmp_path):
    """The model exported to ONNX and verified by `verigrad verify` (same box — no input_range
    clip — and class); the class runs on the loaded weights as an nn.Module. The CLI's bounds are the class's widened outward by the rounding allowance only (float64:
    ~1e-12 of the map's scale), so they contain the class's and differ by less than 1e-9."""
    import yaml
    from click.testing import CliRunner

    from verigrad.cli import main

    model = mlp(dtype=torch.float64).eval()
    x = torch.rand(2, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    path = tmp_path / "m.onnx"
    torch.onnx.export(model.float(), (x[:1].float(),), str(path), dynamo=False)
    np.savez(tmp_path / "d.npz", x=x.numpy(), y=np.array([1, 2]))
    spec = {"model": {"path": str(path), "input_range": None}, "data": {"path": str(tmp_path / "d.npz"), "end": 2},
            "explanation": {"target": "label"}, "perturbation": {"input": {"epsilon": 0.05}},
            "properties": [{"name": "l2", "kind": "untargeted", "metric": "l2", "threshold": 10.0}],
            "bounds": {"methods": ["crown"]}, "attack": {"order": "skip"}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    res = CliRunner().invoke(main, ["verify", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "r.json"),
                                    "--bounds-npz", str(tmp_path / "r.npz")])
    assert res.exit_code == 0, res.output
    arrays = np.load(tmp_path / "r.npz")
    from verigrad.models import load_model

    net = load_model(str(path)).to(torch.float64)  # the same weights as the module (exported in float32)
    ours = CertifiedSaliency(_as_module(net)).attribute_bounds(x, torch.tensor([1, 2]), epsilon=0.05, method="crown",
                                                               abs=False)
    for i in range(2):
        lo, up = arrays[f"i{i}/crown/lower"].reshape(-1), arrays[f"i{i}/crown/upper"].reshape(-1)
        ol, ou = ours.lower[i].numpy(), ours.upper[i].numpy()
        assert (lo <= ol).all() and (up >= ou).all()
        assert np.abs(lo - ol).max() < 1e-9 and np.abs(up - ou).max() < 1e-9


def _as_module(net) -> nn.Sequential:
    """The loaded network back as an nn.Sequential of Linear / Tanh (the mlp's layout)."""
    layers: list[nn.Module] = []
    for node in net.layers:
        if node.op == "linear":
            lin = nn.Linear(node.weight.shape[1], node.weight.shape[0]).double()
            lin.weight.data, lin.bias.data = node.weight.clone(), node.bias.clone()
            layers.append(lin)
        elif node.op == "activation":
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)
