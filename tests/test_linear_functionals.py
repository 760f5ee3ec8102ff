"""Linear functionals of the map bounded as a whole (issue 16, tightness: the property's own
objective): CROWN / alpha-CROWN on spec·v are sound (float64 autograd at sampled points, float32
with no tolerance), tighter than the coordinatewise Σ c_i [l_i, u_i], alpha-CROWN never looser
than CROWN; the cosine bounds take them; the pipeline uses them for cosine properties."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from tests.graph_nets import GRAPHS
from tests.helpers import ACT_IDS, ACTS, box_points, random_mlp
from verigrad import properties as props
from verigrad.bounds import Bounds, linear_bounds
from verigrad.bounds.lirpa import crown_bounds, crown_linear_bounds
from verigrad.bounds.options import CrownOptions
from verigrad.cli import main
from verigrad.graph.gradient_graph import Output, saliency
from verigrad.perturbation import input_box

F32, F64 = torch.float32, torch.float64
ROOT = Path(__file__).resolve().parents[1]
FAST_ALPHA = CrownOptions(alpha_iterations=8)


def _setup(net, eps: float, k: int = 3, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(1, *net.input_shape, generator=gen, dtype=net.dtype)
    box, t = input_box(x, eps, (0.0, 1.0)), torch.tensor([1])
    v0 = saliency(net, x, t).reshape(1, -1)
    rand = torch.randn(k - 1, v0.shape[1], generator=gen, dtype=net.dtype)
    spec = torch.cat([v0, rand]).unsqueeze(0)  # v0 (the cosine functional) and random rows
    return box, t, spec


def _values(net, box, t, spec, output=Output.LOGIT, times_input=False, n=150):
    pts = box_points(box.to(F64), n, n, seed=3)
    net64 = net.to(dtype=F64)
    v = saliency(net64, pts, t.expand(len(pts)), output)
    if times_input:
        v = pts * v
    return v.reshape(len(pts), -1) @ spec[0].to(F64).T  # (points, k)


@pytest.mark.parametrize("output", [Output.LOGIT, Output.LOSS], ids=["logit", "loss"])
@pytest.mark.parametrize("name", list(GRAPHS))
def test_functional_bounds_contain_sampled_values_on_every_graph(name, output):
    net = GRAPHS[name]()
    box, t, spec = _setup(net, 0.05)
    b = crown_linear_bounds(net, box, t, spec, output)
    vals = _values(net, box, t, spec, output)
    assert b.lower.shape == (1, 3)
    assert bool((vals >= b.lower).all() and (vals <= b.upper).all())


@pytest.mark.parametrize("act, param", ACTS, ids=ACT_IDS)
def test_float32_functional_bounds_are_rigorous_and_alpha_never_looser(act, param):
    net = random_mlp(act, param, sizes=(12, 16, 16, 5), seed=3, dtype=F32)
    for eps in (0.0, 0.05):
        box, t, spec = _setup(net, eps)
        crown = crown_linear_bounds(net, box, t, spec)
        alpha = crown_linear_bounds(net, box, t, spec, alpha=True, options=FAST_ALPHA)
        vals = _values(net, box, t, spec)
        for b in (crown, alpha):
            lo, up = b.lower.double(), b.upper.double()
            assert bool((vals >= lo).all() and (vals <= up).all()), (eps, float((lo - vals).max()))
        assert bool((alpha.lower >= crown.lower).all() and (alpha.upper <= crown.upper).all())


def test_functional_of_x_times_g_is_sound():
    net = GRAPHS["residual_mlp_tanh"]()
    box, t, spec = _setup(net, 0.05)
    b = linear_bounds("crown", net, box, t, spec, times_input=True)
    assert b is not None
    vals = _values(net, box, t, spec, times_input=True)
    assert bool((vals >= b.lower).all() and (vals <= b.upper).all())


def test_one_row_is_tighter_than_the_coordinatewise_sum():
    # a ReLU MLP at a box where many neurons are unstable: the coordinates' bounds are met at
    # different points, the functional's bound keeps their correlation
    net = random_mlp(ACTS[0][0], sizes=(20, 32, 32, 4), seed=7)
    box, t, spec = _setup(net, 0.1, k=1, seed=1)
    joint = crown_linear_bounds(net, box, t, spec)
    coord = crown_bounds(net, box, t).bounds
    c = spec[0, 0]
    lo = torch.minimum(c * coord.lower[0], c * coord.upper[0]).sum()
    up = torch.maximum(c * coord.lower[0], c * coord.upper[0]).sum()
    assert float(joint.lower[0, 0]) > float(lo) + 1e-6 and float(joint.upper[0, 0]) < float(up) - 1e-6


def test_unsupported_engines_and_bad_specs():
    net = random_mlp(ACTS[0][0], sizes=(6, 8, 3), seed=1)
    box, t, spec = _setup(net, 0.05)
    assert linear_bounds("ibp", net, box, t, spec) is None
    with pytest.raises(ValueError, match="spec must be"):
        crown_linear_bounds(net, box, t, spec[:, :, :5])


def test_cosine_bounds_take_a_functional_bound():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(1, 10, generator=gen, dtype=F64)
    b = Bounds(a - 1.2, a + 1.2)  # wide enough that the ratio bound (the one taking a·v) binds
    plain = props.cosine_lower_bound(a, b)
    # a sound lower bound of a·v over the box larger than the coordinatewise one sharpens it
    s_coord = torch.minimum(a * b.lower, a * b.upper).sum(-1)
    exact_min = s_coord  # on a box the coordinatewise sum is the exact minimum of a·v
    assert float(props.cosine_lower_bound(a, b, exact_min - 1.0)) == float(plain)  # a looser one is ignored
    better = props.cosine_lower_bound(a, b, torch.full((1,), float((a * a).sum()) * 0.9))
    assert float(better) > float(plain)
    t = torch.randn(1, 10, generator=gen, dtype=F64)
    assert float(props.cosine_upper_bound(t, b, torch.full((1,), -1.0))) < float(props.cosine_upper_bound(t, b))
    cos = props.Property("cos", props.Kind.UNTARGETED, props.Metric.COSINE, 0.9)
    assert props.functional(cos, a)[1] is True and props.functional(
        props.Property("l2", props.Kind.UNTARGETED, props.Metric.L2, 1.0), a) is None
    l2n = props.Property("l2n", props.Kind.UNTARGETED, props.Metric.L2, 0.3, normalize="l2")
    assert props.functional(l2n, a)[1] is True and props.functional(
        props.Property("l1n", props.Kind.UNTARGETED, props.Metric.L1, 0.3, normalize="l2"), a) is None
    with pytest.raises(ValueError, match="no linear functional"):
        props.worst_case(props.Property("l2", props.Kind.UNTARGETED, props.Metric.L2, 1.0), a, b, torch.zeros(1))


def test_the_pipeline_bounds_the_cosine_functional_with_crown(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({
        "model": {"path": str(ROOT / "examples/models/mnist_fc.onnx")},
        "data": {"dataset": "mnist_sample", "start": 0, "end": 1}, "perturbation": {"input": {"epsilon": 0.01}},
        "properties": [{"name": "cos", "kind": "untargeted", "metric": "cosine", "threshold": 0.9},
                       {"name": "l2", "kind": "untargeted", "metric": "l2", "threshold": 1.0}],
        "bounds": {"methods": ["crown"]}, "attack": {"order": "skip"},
        "general": {"results": str(tmp_path / "res")}}))
    r = CliRunner().invoke(main, ["verify", str(spec)])
    assert r.exit_code == 3, r.output
    run = json.loads((tmp_path / "res/s.json").read_text())["instances"][0]["engines"]["crown"]
    (note,) = [n for n in run["notes"] if n.startswith("cos: its functional bounded as one row")]
    joint, coord = (float(part.split()[-1].rstrip(")")) for part in note.split(";"))
    assert joint > coord  # measured on this input: 9.79 against −0.039
    cos = run["properties"][0]
    npz = np.load(tmp_path / "res/s.npz")
    bounds = Bounds(torch.as_tensor(npz["i0/crown/lower"])[None], torch.as_tensor(npz["i0/crown/upper"])[None])
    v0 = torch.as_tensor(npz["i0/explanation"])[None]
    prop = props.Property("cos", props.Kind.UNTARGETED, props.Metric.COSINE, 0.9)
    coordinatewise = float(props.worst_case(prop, v0, bounds))  # −0.009 here (measured)
    assert cos["worst_case"] > coordinatewise + 0.2  # 0.295 with the functional's bound


@pytest.mark.parametrize("kind", [props.Kind.UNTARGETED, props.Kind.TARGETED])
def test_normalised_l2_takes_the_functional_through_the_chord(kind):
    """‖v̂ − â‖₂ = √(2 − 2 cos(a, v)): the ℓ2 distance of ℓ2-normalised maps rests on the cosine
    bound, so a bound of the functional (here exact, over maps v = Jx + c of an input box whose
    coordinate hull is the bound map) sharpens it; sampled maps stay inside it, and the box
    may contain v = 0 (where the identity does not hold)."""
    gen = torch.Generator().manual_seed(3)
    n, m = 12, 5
    sharper = 0
    for _ in range(40):
        jac = torch.randn(n, m, generator=gen, dtype=F64)
        c = torch.randn(n, generator=gen, dtype=F64)
        r = 0.1 + 0.4 * torch.rand(m, generator=gen, dtype=F64)  # x ∈ [−r, r]; some hulls hold 0
        hull = Bounds((c - jac.abs() @ r)[None], (c + jac.abs() @ r)[None])
        v0 = (c + jac @ (r * (2 * torch.rand(m, generator=gen, dtype=F64) - 1)))[None]
        target = torch.randn(n, generator=gen, dtype=F64)
        p = props.Property("l2n", kind, props.Metric.L2, 0.5, normalize="l2",
                           target=target if kind == props.Kind.TARGETED else None)
        f, lower = props.functional(p, v0)
        fj = f[0] @ jac
        dot = (f[0] @ c + (-1 if lower else 1) * (fj.abs() @ r))[None]  # exact min / max of f·v
        with_dot, plain = props.worst_case(p, v0, hull, dot), props.worst_case(p, v0, hull)
        xs = (2 * torch.rand(4000, m, generator=gen, dtype=F64) - 1) * r
        xs = torch.cat([xs, torch.sign(torch.randn(200, m, generator=gen, dtype=F64)) * r])
        vals = props.metric(p, v0.expand(len(xs), n), c + xs @ jac.T)
        if kind == props.Kind.UNTARGETED:
            assert float(vals.max()) <= float(with_dot) <= float(plain) + 1e-15
            sharper += float(with_dot) < float(plain) - 1e-3
        else:
            assert float(vals.min()) >= float(with_dot) >= float(plain) - 1e-15
            sharper += float(with_dot) > float(plain) + 1e-3
    assert sharper >= 10
    # v = 0 in the box: the untargeted distance there is 1 (N(0) = 0), inside the bound
    zero = Bounds(torch.full((1, 3), -1.0, dtype=F64), torch.ones(1, 3, dtype=F64))
    p = props.Property("l2n", props.Kind.UNTARGETED, props.Metric.L2, 0.5, normalize="l2")
    v0 = torch.tensor([[0.5, 0.2, 0.1]], dtype=F64)
    assert float(props.worst_case(p, v0, zero, torch.zeros(1, dtype=F64))) >= 1.0


def test_the_ball_bound_on_the_cosine_is_sound_exact_at_a_point_and_sharper():
    """cos(â, v) ≥ √(1 − ρ²) with ρ the radius of a ball about â holding the scaled box
    (properties._ball_cos): sampled points and corners of random boxes stay above it, boxes
    holding v = 0 get no bound (−1), a point box gets its own cosine (to 1e-12), and on boxes
    around a map close to a it beats the other three bounds (measured: on most of them)."""
    gen = torch.Generator().manual_seed(5)
    n = 16
    sharper = 0
    for k in range(60):
        a = torch.randn(1, n, generator=gen, dtype=F64)
        c = a * (0.5 + torch.rand(1, generator=gen, dtype=F64)) + 0.3 * torch.randn(1, n, generator=gen, dtype=F64)
        r = (0.02 + 0.3 * torch.rand(1, n, generator=gen, dtype=F64)) * (k % 3 + 1)
        b = Bounds(c - r, c + r)
        n_lo = props._norm2_range(b)[0]
        ball = props._ball_cos(a / a.norm(), b, n_lo)
        pts = torch.cat([c + r * (2 * torch.rand(3000, n, generator=gen, dtype=F64) - 1),
                         c + r * torch.sign(torch.randn(500, n, generator=gen, dtype=F64))])
        cos = torch.nn.functional.cosine_similarity(pts, a.expand_as(pts), dim=1)
        assert float(ball) <= float(cos.min()), k
        if bool(((b.lower <= 0) & (b.upper >= 0)).all()):
            assert float(ball) == -1.0
        whole = props.cosine_lower_bound(a, b)
        assert float(whole) >= float(ball)
        # the other three bounds, written out here (an independent reference): ratio, linear, chord
        n_hi = props._norm2_range(b)[1]
        s_min = torch.minimum(a * b.lower, a * b.upper).sum(-1)
        ratio = s_min / (a.norm() * (n_hi if float(s_min) >= 0 else n_lo)) if float(n_lo) > 0 else -1.0
        nb, ahat = props.normalized_bounds(b, "l2"), a / a.norm()
        lin = torch.minimum(ahat * nb.lower, ahat * nb.upper).sum(-1)
        chord = 1 - torch.maximum((nb.lower - ahat) ** 2, (nb.upper - ahat) ** 2).sum(-1) / 2 if float(n_lo) > 0 else -1
        old = max(float(ratio), float(lin), float(chord))
        assert float(whole) == max(old, float(ball)) or abs(float(whole) - max(old, float(ball))) <= 1e-12
        sharper += float(ball) > old + 1e-3
    assert sharper >= 20, sharper
    zero = Bounds(torch.tensor([[-1.0, 0.5]], dtype=F64), torch.tensor([[1.0, 2.0]], dtype=F64))
    assert float(props._ball_cos(torch.tensor([[0.6, 0.8]], dtype=F64), zero, props._norm2_range(zero)[0])) == -1.0
    v = torch.tensor([[3.0, 1.0, -2.0, 0.5]], dtype=F64)
    a = torch.tensor([[2.0, 2.0, -1.0, 0.0]], dtype=F64)
    point = Bounds(v, v)
    exact = float(torch.nn.functional.cosine_similarity(v, a))
    assert abs(float(props._ball_cos(a / a.norm(), point, v.norm(dim=1))) - exact) <= 1e-12
