"""Certified quantus-style metrics (verigrad.certified_metrics, re-exported by verigrad.metrics):
quantus 0.6.0's sampled values never exceed our certified bounds; radius 0 where defined."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from verigrad import CertifiedSaliency
from verigrad.metrics import CertifiedLocalLipschitz, CertifiedMaxSensitivity, CertifiedRelativeInputStability

quantus = pytest.importorskip("quantus")
pytestmark = pytest.mark.filterwarnings("ignore")
uniform = quantus.functions.perturb_func.batch_uniform_noise


def mlp(act: type[nn.Module] = nn.Tanh, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), act(), nn.Linear(8, 3)).eval()


def data(n: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 5)).astype(np.float32), rng.integers(0, 3, n)


def explain(method: str) -> dict:
    return {"explain_func": quantus.explain, "explain_func_kwargs": {"method": method}}


def below(sampled, certified, rtol: float = 1e-4) -> bool:
    """quantus works in float32: its samples may pass the exact bound by float32 rounding."""
    s = np.asarray(sampled, dtype=np.float64)
    return bool(np.all(s <= certified * (1 + rtol) + 1e-6))


METHODS = ["Saliency", "Gradient", "InputXGradient", "IntegratedGradients"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("act", [nn.Tanh, nn.ReLU])
def test_max_sensitivity_bounds_quantus(method, act):
    model, (x, y) = mlp(act), data()
    np.random.seed(1)
    q = quantus.MaxSensitivity(nr_samples=60, lower_bound=0.1, disable_warnings=True)(model, x, y, **explain(method))
    c = CertifiedMaxSensitivity(perturb_radius=0.1)(model, x, y, **explain(method))
    assert isinstance(c, np.ndarray) and c.shape == (5,) and np.all(np.isfinite(c))
    assert below(q, c)


def test_max_sensitivity_options_and_radius_zero():
    model, (x, y) = mlp(nn.Softplus), data(6)
    for kw in ({"normalise": True, "abs": True}, {"norm_numerator": quantus.functions.norm_func.linf_norm}):
        np.random.seed(2)
        q = quantus.MaxSensitivity(nr_samples=40, lower_bound=0.05, disable_warnings=True, **kw)(
            model, x, y, batch_size=4, **explain("Saliency"))
        c = CertifiedMaxSensitivity(perturb_radius=0.05, **kw)(model, x, y, batch_size=4, **explain("Saliency"))
        assert below(q, c)
    # radius 0: quantus' value is exactly 0; ours is 0 up to the rounding allowance
    q0 = quantus.MaxSensitivity(nr_samples=3, lower_bound=0.0, disable_warnings=True)(model, x, y, **explain("Gradient"))
    c0 = CertifiedMaxSensitivity(perturb_radius=0.0)(model, x, y, **explain("Gradient"))
    np.testing.assert_allclose(c0, q0, atol=1e-10)
    # a given a_batch, tensors, a certified attribution as explain_func, return_aggregate
    a = CertifiedSaliency(model).attribute(torch.as_tensor(x), torch.as_tensor(y)).numpy()
    c1 = CertifiedMaxSensitivity(perturb_radius=0.05)(model, torch.as_tensor(x), torch.as_tensor(y), a_batch=a,
                                                      explain_func=CertifiedSaliency(model))
    c2 = CertifiedMaxSensitivity(perturb_radius=0.05)(model, x, y, **explain("Saliency"))
    np.testing.assert_allclose(c1, c2, rtol=1e-4)  # a_batch is float32
    agg = CertifiedMaxSensitivity(perturb_radius=0.05, return_aggregate=True)(model, x, y, **explain("Saliency"))
    np.testing.assert_allclose(agg, [c2.mean()])


def test_max_sensitivity_on_images_sums_channels_like_quantus():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 3 * 3, 3)).eval()
    x = np.random.default_rng(0).normal(size=(3, 2, 5, 5)).astype(np.float32)
    y = np.array([0, 1, 2])
    np.random.seed(3)
    q = quantus.MaxSensitivity(nr_samples=30, lower_bound=0.05, disable_warnings=True)(
        model, x, y, channel_first=True, **explain("InputXGradient"))
    c = CertifiedMaxSensitivity(perturb_radius=0.05)(model, x, y, **explain("InputXGradient"))
    assert below(q, c)


@pytest.mark.parametrize("method", METHODS)
def test_relative_input_stability_bounds_quantus(method):
    model, (x, y) = mlp(nn.Softplus), data()
    np.random.seed(4)
    q = quantus.RelativeInputStability(nr_samples=60, disable_warnings=True,
                                       return_nan_when_prediction_changes=False)(model, x, y, **explain(method))
    c = CertifiedRelativeInputStability()(model, x, y, **explain(method))
    assert np.all(np.isfinite(c)) and below(q, c)
    # symmetric noise reaches x' = x: no finite certificate from boxes
    assert np.all(np.isinf(CertifiedRelativeInputStability(lower_bound=0.1, upper_bound=None)(
        model, x, y, **explain(method))))


@pytest.mark.parametrize("method", METHODS)
def test_local_lipschitz_bounds_quantus_over_the_box(method):
    model, (x, y) = mlp(nn.Tanh), data()
    np.random.seed(5)
    q = quantus.LocalLipschitzEstimate(nr_samples=60, normalise=False, perturb_func=uniform,
                                       perturb_func_kwargs={"lower_bound": 0.05}, disable_warnings=True)(
        model, x, y, **explain(method))
    c = CertifiedLocalLipschitz(perturb_radius=0.05)(model, x, y, **explain(method))
    assert np.all(np.isfinite(c)) and below(q, c)


def test_local_lipschitz_at_radius_zero_is_the_jacobian_norm():
    """At r = 0 the quotient's set is empty (quantus gives 0 by its 1e-10 regulariser); our bound
    is then ‖|J(x)|‖₂ of the exact Jacobian, its limit as r → 0."""
    model, (x, y) = mlp(nn.Softplus), data(3)
    c = CertifiedLocalLipschitz(perturb_radius=0.0)(model, x, y, explain_func="Gradient")
    m64 = mlp(nn.Softplus).double()
    for i in range(3):
        def grad(z: torch.Tensor, i: int = i) -> torch.Tensor:
            (g,) = torch.autograd.grad(m64(z[None])[0, int(y[i])], z, create_graph=True)
            return g
        j = torch.autograd.functional.jacobian(grad, torch.as_tensor(x[i], dtype=torch.float64))
        np.testing.assert_allclose(c[i], torch.linalg.matrix_norm(j.abs(), ord=2).item(), rtol=1e-8)


def test_local_lipschitz_relu_needs_an_annulus():
    model, (x, y) = mlp(nn.ReLU), data()
    with pytest.raises(ValueError, match="min_distance"):
        CertifiedLocalLipschitz()(model, x, y, explain_func="Saliency")
    r, rho = 0.05, 0.02
    c = CertifiedLocalLipschitz(perturb_radius=r, min_distance=rho)(model, x, y, explain_func="Saliency")
    # quantus' uniform samples in 5 dims with radius 0.05 all have norm ≥ 0.02 here (checked below)
    np.random.seed(6)
    q = quantus.LocalLipschitzEstimate(nr_samples=60, normalise=False, perturb_func=uniform,
                                       perturb_func_kwargs={"lower_bound": r}, disable_warnings=True,
                                       abs=False)(model, x, y, **explain("Saliency"))
    np.random.seed(6)
    norms = [np.linalg.norm(uniform(arr=x, indices=np.tile(np.arange(5), (5, 1)), lower_bound=r) - x, axis=1).min()
             for _ in range(60)]
    if min(norms) >= rho:
        assert below(q, c)
    with pytest.raises(ValueError, match="normalise"):
        CertifiedLocalLipschitz(normalise=True)


def test_explain_func_is_required():
    model, (x, y) = mlp(), data()
    with pytest.raises(TypeError, match="explain_func"):
        CertifiedMaxSensitivity()(model, x, y)
    with pytest.raises(ValueError, match="no certified counterpart"):
        CertifiedMaxSensitivity()(model, x, y, explain_func="Occlusion")
