"""Training-time regularisers for robust gradient explanations.

Every regulariser is a function ``(model, net, x, y, cfg, step_frac) -> (penalty, info)``
where ``net`` is a *live* view of ``model`` (:func:`network_from_module`: the same
``nn.Parameter`` objects, no copy), so the penalty is differentiable with respect to the
model's parameters. ``training_loss`` = CE(model(x), y) + α · penalty.

The explanation is the saliency v(x) = ∂z_y/∂x (the logit of the label, verify's default
output); ``grad_norm`` alone uses the loss gradient, as its source defines it.

  none       0
  gradcert   ‖u − l‖ of the IBP bounds [l, u] on v over the ε_t input box (and the γ_t
             parameter box): ℓ2 norm per sample averaged over the batch (default, the paper's
             "size" of the gradient box) or the mean width (the reference code's choice).
             Wicker et al. 2023, "Robust explanation constraints", appendix F. ε_t, γ_t ramp
             linearly from 0 over the first ``ramp_fraction`` of training.
  grad_norm  mean_i ‖∇_x CE(x_i + ξ_i, y_i)‖₂², ξ ~ N(0, σ²I): double backpropagation,
             Drucker & LeCun 1992 (Gaussian-noised inputs as the brief asks).
  gnorm      mean_i ‖v(x'_i) − v(x_i)‖₂ with x' found by PGD in the ε-box maximising that
             difference: Chen et al. 2019, "Robust attribution regularization".
  pgd_at     CE(x_adv, y) with x_adv found by PGD on CE in the ε-box (Madry et al. 2018).
             ``training_loss`` then is CE(x) + α·CE(x_adv) (the "adds" variant, as in
             TRADES-style mixed objectives); Madry's pure objective CE(x_adv) is the limit of
             large α up to scale — use ``pgd_at_replace=True`` to get exactly CE(x_adv).
  hessian    mean_i E_w ‖∇²_x z_y(x_i) w‖₂², w ~ N(0, I): Hutchinson's estimate of
             ‖∇²_x z_y‖_F² (Dombrowski et al. 2022, §3.1); needs twice-differentiable
             activations (relu / leaky_relu / PReLU have ∇² = 0 almost everywhere: refused).
  alignment  mean_i ‖v(x_i + δ_i) − v(x_i)‖₂ + λ_cos · ½(1 − cos(v(x_i + δ_i), v(x_i))),
             δ ~ U([−ε, ε]^d), v(x) treated as a constant (Joo et al. 2023, eq. 5 and their
             training detail).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from verigrad.bounds.ibp import Product, ibp_bounds
from verigrad.graph.gradient_graph import Output, saliency
from verigrad.models.network import ActKind, Activation, Network, PReLU
from verigrad.models.torch_loader import LayerRefused, module_network
from verigrad.perturbation import input_box, param_box

__all__ = [
    "Regularizer", "RegularizerConfig", "REGULARIZERS", "network_from_module", "ramp",
    "gradcert_penalty", "training_loss",
]


# ----------------------------------------------------------------------------------------
# live network view


def network_from_module(model: nn.Sequential, input_shape: Sequence[int]) -> Network:
    """A live, differentiable :class:`Network` view of ``model``.

    The nodes hold the module's own ``nn.Parameter`` tensors (no copy, no detach), so the
    view follows optimiser updates and everything computed from it (saliency, IBP bounds,
    parameter boxes) back-propagates into the module. A thin wrapper of
    :func:`verigrad.models.torch_loader.module_network` with ``live=True`` (layer names: module
    paths): the torch.nn layers it walks, except BatchNorm (its folded constants would be
    derived from trainable parameters) and Dropout with p > 0. Anything else raises
    ``ValueError`` naming the layer's index (module path) and type.
    """
    if not isinstance(model, nn.Sequential):
        raise ValueError(f"network_from_module needs an nn.Sequential, got {type(model).__name__}")
    try:
        return module_network(model, input_shape, live=True)
    except LayerRefused as e:
        raise ValueError(f"layer {e.path} ({e.kind}) is not supported by network_from_module: {e.reason}") from None


# ----------------------------------------------------------------------------------------
# configuration


class Regularizer(str, Enum):
    NONE = "none"
    GRADCERT = "gradcert"
    GRAD_NORM = "grad_norm"
    GNORM = "gnorm"
    PGD_AT = "pgd_at"
    HESSIAN = "hessian"
    ALIGNMENT = "alignment"


_SIZE_NORMS = ("l2", "mean")


@dataclass(frozen=True)
class RegularizerConfig:
    """Settings of one regulariser.

    ``weight`` is α in CE + α·penalty. ``epsilon`` is the ℓ∞ input radius (gradcert box, PGD
    box of gnorm / pgd_at, uniform box of alignment, Gaussian σ of grad_norm unless
    ``noise_std`` is given); ``gamma`` the relative parameter-box radius (gradcert only).
    ``ramp_fraction`` ∈ [0, 1]: ε and γ grow linearly from 0 to their targets over that
    fraction of training (0: full size from the start). ``pgd_steps`` / ``pgd_step_size``
    (default 2.5·ε/steps, Madry's rule) drive PGD; ``samples`` is the number of noise / probe
    draws (grad_norm, hessian, alignment). ``size_norm`` is gradcert's box size ("l2": ℓ2
    norm of the width map per sample, the paper's; "mean": mean width, the reference
    code's). ``domain`` clips input boxes and PGD points. ``smooth_beta`` is the softplus β
    used *only to steer gnorm's PGD* on relu networks (whose saliency is piecewise constant
    in x, so its x-gradient is zero); the penalty itself uses the true network.
    """

    name: Regularizer | str = Regularizer.NONE
    weight: float = 1.0
    epsilon: float = 0.01
    gamma: float = 0.0
    ramp_fraction: float = 0.5
    pgd_steps: int = 5
    pgd_step_size: float | None = None
    samples: int = 4
    noise_std: float | None = None
    cos_weight: float = 1.0
    size_norm: str = "l2"
    domain: tuple[float, float] | None = None
    smooth_beta: float = 10.0
    pgd_at_replace: bool = False
    product: Product | str = Product.MIDPOINT_RADIUS

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "name", Regularizer(self.name))
        except ValueError:
            raise ValueError(f"unknown regularizer {self.name!r}; choose from "
                             f"{[r.value for r in Regularizer]}") from None
        object.__setattr__(self, "product", Product(self.product))

        def finite_nonneg(field: str) -> None:
            v = getattr(self, field)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{field} must be a finite number >= 0, got {v!r}")

        for f in ("weight", "epsilon", "gamma", "cos_weight"):
            finite_nonneg(f)
        if not 0.0 <= self.ramp_fraction <= 1.0:
            raise ValueError(f"ramp_fraction must lie in [0, 1], got {self.ramp_fraction!r}")
        if isinstance(self.pgd_steps, bool) or not isinstance(self.pgd_steps, int) or self.pgd_steps < 1:
            raise ValueError(f"pgd_steps must be an int >= 1, got {self.pgd_steps!r}")
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 1:
            raise ValueError(f"samples must be an int >= 1, got {self.samples!r}")
        if self.pgd_step_size is not None and not (math.isfinite(self.pgd_step_size) and self.pgd_step_size > 0):
            raise ValueError(f"pgd_step_size must be > 0, got {self.pgd_step_size!r}")
        if self.noise_std is not None:
            finite_nonneg("noise_std")
        if self.size_norm not in _SIZE_NORMS:
            raise ValueError(f"size_norm must be one of {_SIZE_NORMS}, got {self.size_norm!r}")
        if self.domain is not None and not (len(self.domain) == 2 and self.domain[0] < self.domain[1]):
            raise ValueError(f"domain must be (lo, hi) with lo < hi, got {self.domain!r}")
        if not self.smooth_beta > 0:
            raise ValueError(f"smooth_beta must be > 0, got {self.smooth_beta!r}")
        if self.name in (Regularizer.GNORM, Regularizer.PGD_AT, Regularizer.ALIGNMENT) and self.epsilon <= 0:
            # a zero ball makes these penalties identically zero / plain CE: almost surely a mistake
            raise ValueError(f"regularizer {Regularizer(self.name).value} needs epsilon > 0")


def ramp(target: float, step_frac: float, ramp_fraction: float) -> float:
    """Linear warm-up: target · min(1, step_frac / ramp_fraction) (target itself when
    ramp_fraction = 0). GradCert appendix F ramps ε and γ from 0 this way."""
    if not 0.0 <= step_frac <= 1.0:
        raise ValueError(f"step_frac must lie in [0, 1], got {step_frac!r}")
    if ramp_fraction <= 0.0:
        return float(target)
    return float(target) * min(1.0, step_frac / ramp_fraction)


# ----------------------------------------------------------------------------------------
# helpers


def _grad(net: Network, x: torch.Tensor, y: torch.Tensor, output: Output = Output.LOGIT,
          smooth_beta: float | None = None) -> torch.Tensor:
    """∂o/∂x at (a fresh leaf copy of) x, kept in the graph so it back-propagates into the
    parameters (double backpropagation)."""
    xr = x.detach().clone().requires_grad_(True)
    return saliency(net, xr, y, output, smooth_beta=smooth_beta, create_graph=True)


def _clip(xp: torch.Tensor, x: torch.Tensor, eps: float, domain: tuple[float, float] | None) -> torch.Tensor:
    """Projection onto the same box ``input_box`` certifies: [x − ε, x + ε] ∩ domain."""
    box = input_box(x, eps, domain)
    return torch.maximum(torch.minimum(xp, box.upper), box.lower)


def _random_start(x: torch.Tensor, eps: float, domain: tuple[float, float] | None) -> torch.Tensor:
    return _clip(x + (torch.rand_like(x) * 2 - 1) * eps, x, eps, domain)


def _pgd(objective: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, cfg: RegularizerConfig,
         eps: float) -> torch.Tensor:
    """ℓ∞ PGD (random start, signed steps) maximising ``objective`` (a per-batch sum) in the
    ε-box; returns a detached point. Uses ``autograd.grad`` on x only, so no parameter
    ``.grad`` is touched."""
    step = cfg.pgd_step_size if cfg.pgd_step_size is not None else 2.5 * eps / cfg.pgd_steps
    xp = _random_start(x.detach(), eps, cfg.domain)
    for _ in range(cfg.pgd_steps):
        xp = xp.detach().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(objective(xp), xp)
        xp = _clip(xp.detach() + step * g.sign(), x.detach(), eps, cfg.domain)
    return xp.detach()


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


# ----------------------------------------------------------------------------------------
# penalties


def gradcert_penalty(net: Network, x: torch.Tensor, y: torch.Tensor, eps: float, gamma: float,
                     domain: tuple[float, float] | None = None, norm: str = "l2",
                     output: Output = Output.LOGIT,
                     product: Product | str = Product.MIDPOINT_RADIUS) -> torch.Tensor:
    """GradCert size of the certified gradient box (Wicker et al. 2023, appendix F).

    [l, u] = IBP bounds on v = ∂o/∂x over x' ∈ input_box(x, ε, domain) and, when γ > 0,
    θ' ∈ param_box(net, γ) (relative). ``norm="l2"`` (default, the paper's "size"):
    mean_i ‖u_i − l_i‖₂; ``norm="mean"`` (the reference code): mean over batch and
    features of u − l. Differentiable w.r.t. the parameters of a live ``net``.
    """
    if norm not in _SIZE_NORMS:
        raise ValueError(f"norm must be one of {_SIZE_NORMS}, got {norm!r}")
    box = input_box(x.detach(), eps, domain)
    params = param_box(net, gamma) if gamma > 0 else None
    res = ibp_bounds(net, box, y, output, params, product=product)
    width = _flat(res.bounds.upper - res.bounds.lower)
    if norm == "l2":
        return torch.linalg.vector_norm(width, dim=1).mean()
    return width.mean()


Info = dict[str, float]
RegFn = Callable[[nn.Module, Network, torch.Tensor, torch.Tensor, RegularizerConfig, float],
                 tuple[torch.Tensor, Info]]


def _none(model: nn.Module, net: Network, x: torch.Tensor, y: torch.Tensor, cfg: RegularizerConfig,
          step_frac: float) -> tuple[torch.Tensor, Info]:
    return torch.zeros((), dtype=net.dtype, device=net.device), {}


def _gradcert(model: nn.Module, net: Network, x: torch.Tensor, y: torch.Tensor, cfg: RegularizerConfig,
              step_frac: float) -> tuple[torch.Tensor, Info]:
    eps = ramp(cfg.epsilon, step_frac, cfg.ramp_fraction)
    gamma = ramp(cfg.gamma, step_frac, cfg.ramp_fraction)
    p = gradcert_penalty(net, x, y, eps, gamma, cfg.domain, cfg.size_norm, product=cfg.product)
    return p, {"epsilon": eps, "gamma": gamma}


def _grad_norm(model: nn.Module, net: Network, x: torch.Tensor, y: torch.Tensor, cfg: RegularizerConfig,
               step_frac: float) -> tuple[torch.Tensor, Info]:
    sigma = cfg.noise_std if cfg.noise_std is not None else cfg.epsilon
    total = torch.zeros((), dtype=x.dtype, device=x.device)
    for _ in range(cfg.samples):
        xn = x.detach() + sigma * torch.randn_like(x)
        # reduction "sum" in saliency(LOSS): per-sample gradients of the per-sample losses
        g = _grad(net, xn, y, Output.LOSS)
        total = total + _flat(g).pow(2).sum(1).mean()
    return total / cfg.samples, {"noise_std": float(sigma)}


def _uses_piecewise_linear(net: Network) -> bool:
    """A relu / leaky_relu / PReLU activation (MaxPool only routes: not counted)."""
    return any(isinstance(l, PReLU) or (isinstance(l, Activation) and l.kind in (ActKind.RELU, ActKind.LEAKY_RELU))
               for l in net.layers)


def _gnorm(model: nn.Module, net: Network, x: torch.Tensor, y: torch.Tensor, cfg: RegularizerConfig,
           step_frac: float) -> tuple[torch.Tensor, Info]:
    eps = ramp(cfg.epsilon, step_frac, cfg.ramp_fraction)
    g0 = _grad(net, x, y)
    if eps == 0.0:
        return torch.zeros((), dtype=x.dtype, device=x.device), {"epsilon": 0.0}
    # relu saliency is piecewise constant in x: steer the attack by a softplus surrogate
    beta = cfg.smooth_beta if _uses_piecewise_linear(net) else None
    ref = g0.detach()

    def objective(xp: torch.Tensor) -> torch.Tensor:
        gp = saliency(net, xp, y, smooth_beta=beta, create_graph=True)
        return _flat(gp - ref).pow(2).sum()

    xadv = _pgd(objective, x, cfg, eps)
    gadv = _grad(net, xadv, y)
    diff = torch.linalg.vector_norm(_flat(gadv - g0), dim=1).mean()
    return diff, {"epsilon": eps}


def _pgd_at(model: nn.Module, net: Network, x: torch.Tensor, y: torch.Tensor, cfg: RegularizerConfig,
            step_frac: float) -> tuple[torch.Tensor, Info]:
    eps = ramp(cfg.epsilon, step_frac, cfg.ramp_fraction)
    if eps == 0.0:
        return F.cross_entropy(net.forward(x), y), {"epsilon": 0.0}
    xadv = _pgd(lambda xp: F.cross_entropy(net.forward(xp), y, reduction="sum"), x, cfg, eps)
    return F.cross_entropy(net.forward(xadv), y), {"epsilon": eps}


def check_applies(net: Network, cfg: RegularizerConfig) -> None:
    """Raise ValueError when the regulariser cannot act on ``net``."""
    if Regularizer(cfg.name) == Regularizer.HESSIAN and _uses_piecewise_linear(net):
        raise ValueError("the hessian regularizer needs twice-differentiable activations (softplus, sigmoid, "
                         "tanh): relu / leaky_relu / PReLU have a zero input Hessian almost everywhere")


def _hessian(model: nn.Module, net: Network, x: torch.Tensor, y: torch.Tensor, cfg: RegularizerConfig,
             step_frac: float) -> tuple[torch.Tensor, Info]:
    check_applies(net, cfg)
    xr = x.detach().clone().requires_grad_(True)
    g = saliency(net, xr, y, create_graph=True)
    total = torch.zeros((), dtype=x.dtype, device=x.device)
    for _ in range(cfg.samples):
        w = torch.randn_like(xr)
        # Hw = ∇_x (wᵀ ∇_x z_y): one more backward pass, kept in the graph for the parameters
        (hw,) = torch.autograd.grad((g * w).sum(), xr, create_graph=True)
        total = total + _flat(hw).pow(2).sum(1).mean()
    return total / cfg.samples, {"samples": float(cfg.samples)}


def _alignment(model: nn.Module, net: Network, x: torch.Tensor, y: torch.Tensor, cfg: RegularizerConfig,
               step_frac: float) -> tuple[torch.Tensor, Info]:
    eps = ramp(cfg.epsilon, step_frac, cfg.ramp_fraction)
    # Joo et al. treat ∇g_y(x) as a constant (their training detail); only ∇g_y(x + δ) is trained
    g0 = _flat(saliency(net, x, y)).detach()
    l2 = torch.zeros((), dtype=x.dtype, device=x.device)
    cos = torch.zeros((), dtype=x.dtype, device=x.device)
    for _ in range(cfg.samples):
        xp = _random_start(x.detach(), eps, cfg.domain)
        gp = _flat(_grad(net, xp, y))
        l2 = l2 + torch.linalg.vector_norm(gp - g0, dim=1).mean()
        cos = cos + (0.5 * (1 - F.cosine_similarity(gp, g0, dim=1, eps=1e-12))).mean()
    l2, cos = l2 / cfg.samples, cos / cfg.samples
    return l2 + cfg.cos_weight * cos, {"epsilon": eps, "l2": float(l2.detach()), "cos_distance": float(cos.detach())}


REGULARIZERS: dict[Regularizer, RegFn] = {
    Regularizer.NONE: _none,
    Regularizer.GRADCERT: _gradcert,
    Regularizer.GRAD_NORM: _grad_norm,
    Regularizer.GNORM: _gnorm,
    Regularizer.PGD_AT: _pgd_at,
    Regularizer.HESSIAN: _hessian,
    Regularizer.ALIGNMENT: _alignment,
}


def training_loss(model: nn.Module, net: Network, x: torch.Tensor, y: torch.Tensor, cfg: RegularizerConfig,
                  step_frac: float) -> tuple[torch.Tensor, Info]:
    """CE(model(x), y) + α · penalty, with penalty = REGULARIZERS[cfg.name](...).

    For ``pgd_at`` the penalty is CE at the PGD point, so the default is
    CE(x) + α·CE(x_adv); with ``cfg.pgd_at_replace`` the loss is Madry's CE(x_adv) alone.
    ``info`` holds the floats "ce", "penalty", "loss" and the regulariser's own entries
    (e.g. the ramped "epsilon").
    """
    if not 0.0 <= step_frac <= 1.0:
        raise ValueError(f"step_frac must lie in [0, 1], got {step_frac!r}")
    ce = F.cross_entropy(model(x), y)
    penalty, info = REGULARIZERS[Regularizer(cfg.name)](model, net, x, y, cfg, step_frac)
    if cfg.name == Regularizer.PGD_AT and cfg.pgd_at_replace:
        loss = penalty
    else:
        loss = ce + cfg.weight * penalty
    out = {"ce": float(ce.detach()), "penalty": float(penalty.detach()), "loss": float(loss.detach())}
    out.update(info)
    return loss, out
