"""No CROWN / alpha-CROWN coordinate bound is wider than IBP's on the same input: every
intermediate node of the gradient graph is intersected with its interval bounds inside the
pass, and the final map per coordinate. Measured on a deep sigmoid net, where the relaxation of
σ′(z)·g loosens with depth (issue: CROWN 1e12 against IBP 1e5)."""
from __future__ import annotations

import pytest
import torch

from tests.helpers import ACT_IDS, ACTS, box_points, random_cnn, random_mlp
from verigrad.bounds.ibp import ibp_bounds
from verigrad.bounds.lirpa import CrownOptions, crown_bounds
from verigrad.graph.gradient_graph import Output, saliency
from verigrad.models.network import ActKind, Activation, Linear, Network
from verigrad.perturbation import input_box


def deep_sigmoid(depth: int = 6, width: int = 24, d: int = 10, scale: float = 4.0, seed: int = 0) -> Network:
    """A sigmoid MLP with large weights (std scale/√fan_in): deep enough that CROWN's σ′ products
    loosen faster than intervals do."""
    g = torch.Generator().manual_seed(seed)
    sizes = (d,) + (width,) * depth + (5,)
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        w = torch.randn(b, a, generator=g, dtype=torch.float64) * scale / a**0.5
        layers.append(Linear(f"fc{i}", w, torch.randn(b, generator=g, dtype=torch.float64) * 0.1))
        if i < len(sizes) - 2:
            layers.append(Activation(f"a{i}", ActKind.SIGMOID))
    return Network(tuple(layers), (d,), "deep_sigmoid")


def _never_wider(net: Network, x: torch.Tensor, eps: float, output: Output, alpha: bool) -> None:
    box, t = input_box(x, eps, None), torch.tensor([1])
    c = crown_bounds(net, box, t, output, alpha=alpha, options=CrownOptions(alpha_iterations=5))
    ib = ibp_bounds(net, box, t, output, outward=True).bounds
    assert bool((c.bounds.lower >= ib.lower).all()) and bool((c.bounds.upper <= ib.upper).all())
    pts = box_points(box, 300, 300, seed=3)
    v = saliency(net, pts, t.expand(len(pts)), output)
    tol = 1e-9 * (1 + c.bounds.upper.abs().max())
    assert bool((v >= c.bounds.lower - tol).all()) and bool((v <= c.bounds.upper + tol).all())


@pytest.mark.parametrize("alpha", [False, True], ids=["crown", "alpha-crown"])
@pytest.mark.parametrize("eps", [0.05, 0.3])
def test_deep_sigmoid_net_never_wider_than_ibp_and_still_sound(alpha, eps):
    net = deep_sigmoid()
    x = torch.rand(1, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    _never_wider(net, x, eps, Output.LOGIT, alpha)


def test_the_intersection_inside_the_pass_tightens_beyond_the_final_one(monkeypatch):
    """The per-node intersection is not just the final one: without it the map is looser
    somewhere (and without both, wider than IBP, as the issue measured)."""
    from verigrad.bounds import lirpa

    net = deep_sigmoid(scale=4.0)
    x = torch.rand(1, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    box, t = input_box(x, 0.3, None), torch.tensor([1])
    with_nodes = crown_bounds(net, box, t).bounds
    monkeypatch.setattr(lirpa._GradBoundedModule, "_intersect_with_ibp", lambda self, node: None)
    monkeypatch.setattr(lirpa, "ibp_bounds", lambda *a, **k: type("R", (), {"bounds": lirpa.Bounds(
        torch.full_like(box.lower, -torch.inf), torch.full_like(box.lower, torch.inf))})())
    plain = crown_bounds(net.to(), box, t).bounds
    ib = ibp_bounds(net, box, t).bounds
    assert float(plain.width.mean()) > float(ib.width.mean())  # the blow-up the issue measured
    assert float(with_nodes.width.mean()) < float(plain.width.mean())


@pytest.mark.parametrize("output", list(Output))
@pytest.mark.parametrize("act,param", ACTS, ids=ACT_IDS)
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_never_wider_than_ibp_on_every_activation(kind, act, param, output):
    net = random_mlp(act, param, seed=4) if kind == "mlp" else random_cnn(act, param, seed=4)
    x = torch.randn(1, *net.input_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    _never_wider(net, x, 0.2, output, alpha=False)
