"""A float32 file with input normalization and BatchNorm, run in float64: the bounds must hold
for the float64 gradient of the FILE's network (its float32 values taken exactly), not of a
float32-rounded copy of the constants the loader derives (tolerance 1e-12 relative)."""
from __future__ import annotations

import copy
import io

import onnx
import pytest
import torch
from torch import nn

from tests.helpers import box_points
from verigrad.bounds import compute_bounds
from verigrad.bounds.base import Bounds
from verigrad.models import load_model
from verigrad.perturbation import input_box


class _Normalize(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor([[[0.1307]]], dtype=torch.float32))
        self.register_buffer("std", torch.tensor([[[0.3081]]], dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def _module() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(
        _Normalize(), nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(3), nn.MaxPool2d(2, ceil_mode=True),
        nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(16, 5),
    )
    with torch.no_grad():  # non-trivial running statistics; a tiny variance makes ε matter
        for bn in (m[3], m[7]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(1e-6, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    return m.eval()


def _export(m: nn.Module) -> onnx.ModelProto:
    buf = io.BytesIO()
    torch.onnx.export(m, (torch.zeros(2, 1, 9, 9),), buf, dynamo=False, input_names=["input"],
                      dynamic_axes={"input": {0: "batch"}})
    return onnx.load_from_string(buf.getvalue())


def _file_gradient(ref: nn.Module, x: torch.Tensor, c: int) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(ref(x)[:, c].sum(), x)
    return g


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    m = _module()
    model = _export(m)
    kinds = {n.op_type for n in model.graph.node}
    assert "BatchNormalization" in kinds and {"Sub", "Div"} <= kinds, kinds  # the file keeps them unfolded
    path = tmp_path_factory.mktemp("f32") / "norm_bn.onnx"
    onnx.save(model, str(path))
    net = load_model(path)
    assert net.dtype == torch.float64
    return net, copy.deepcopy(m).double()  # the file's network evaluated in float64


@pytest.mark.parametrize("method", ["ibp", "crown"])
def test_exact_at_zero_radius_against_the_files_float64_gradient(loaded, method):
    net, ref = loaded
    x = torch.rand(2, 1, 9, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    c = int(ref(x).argmax(1)[0])
    t = torch.full((2,), c, dtype=torch.long)
    g = _file_gradient(ref, x, c)
    res = compute_bounds(method, net, Bounds(x, x), t)
    tol = 1e-12 * (1 + g.abs())
    assert bool(((res.bounds.lower - tol <= g) & (g <= res.bounds.upper + tol)).all())
    # logits: float64 reassociation only (folding vs the unfolded graph), far below float32 rounding (~1e-7)
    torch.testing.assert_close(net.forward(x), ref(x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["ibp", "crown"])
def test_bounds_contain_the_files_float64_gradient(loaded, method):
    net, ref = loaded
    x = torch.rand(1, 1, 9, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    c = int(ref(x).argmax(1)[0])
    box = input_box(x, 0.01, (0.0, 1.0))
    res = compute_bounds(method, net, box, torch.tensor([c]))
    pts = box_points(box, 500, 500, seed=3)
    g = _file_gradient(ref, pts, c)
    lo, up = res.bounds.lower, res.bounds.upper
    tol = 1e-12 * (1 + torch.maximum(lo.abs(), up.abs()))
    assert bool(((lo - tol <= g) & (g <= up + tol)).all())
