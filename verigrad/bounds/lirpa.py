"""CROWN and alpha-CROWN bounds on the saliency map through auto_LiRPA 0.3.

The gradient graph x ↦ ∂o/∂x (:class:`~verigrad.graph.gradient_graph.GradientGraph`) is an
ordinary module, so a linear bound propagator can bound it: every coordinate of v = ∂o/∂x gets
lower/upper linear functions of (x, θ) concretized over the input box (and parameter box).
This is the only verigrad module that imports auto_LiRPA (through the compat shim).

Relaxations (see :mod:`verigrad.bounds.lirpa_ops`):
- relu'(z)·g: our own joint relaxation in (z, g), stable neurons exact, α-mixed planes;
- softplus forward: chord above, midpoint tangent below; its gradient sigmoid(βz)·g, and the
  sigmoid / tanh derivatives (s − s²)·g, (1 − t²)·g, use auto_LiRPA's Sigmoid / Tanh / Mul
  (McCormick) relaxations;
- the cross-entropy seed softmax(z) − e_c: the exact softmax range over the logit box
  (constant planes).
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import math
import warnings
from dataclasses import dataclass
from typing import Iterator, Mapping, cast

import torch
from torch import nn

from verigrad.errors import InternalError
from verigrad.bounds.base import Bounds, EngineResult, EngineUnsupported, check_inputs, uncross
from verigrad.bounds.ibp import ibp_bounds, mul_interval
from verigrad.operators.interval import round_outward
from verigrad.bounds.lirpa_compat import import_auto_lirpa
from verigrad.bounds.options import CrownOptions, available_memory_bytes
from verigrad.bounds.rounding import crown_chain_length, gamma
from verigrad.graph.gradient_graph import GradientGraph, Output
from verigrad.models.network import ActKind, Activation, Conv2d, Network, PReLU
from verigrad.perturbation import ParamBox

auto_LiRPA = import_auto_lirpa()
from auto_LiRPA import BoundedModule, BoundedParameter, BoundedTensor  # noqa: E402
from auto_LiRPA.operators import BoundBuffers, BoundConstant, BoundMatMul, BoundParams  # noqa: E402
from auto_LiRPA.perturbations import PerturbationLpNorm  # noqa: E402

from verigrad.bounds.lirpa_magnitude import Magnitudes  # noqa: E402
from verigrad.bounds.lirpa_ops import (  # noqa: E402
    CUSTOM_OPS,
    BoundMaxPoolGrad,
    BoundProbabilitySeed,
    BoundReluGrad,
    BoundSoftmaxBox,
    ParamBoxPerturbation,
)

__all__ = ["CrownOptions", "LirpaError", "crown_bounds", "crown_linear_bounds", "memory_budget_bytes",
           "pick_output_chunk"]


class LirpaError(InternalError):
    """auto_LiRPA failed on a configuration verigrad claims to support (a bug to report);
    the original exception is chained as ``__cause__``."""


# ---------------------------------------------------------------------------------------------
# Chunk sizes for the output (and g-node) specifications

# The auto budget: a quarter of the available memory, at most AUTO_MEMORY_CAP_MB. Chunks cost
# no time in tools/bench_crown_memory.py (a 3×32×32 CNN was faster in 128-row chunks than in
# one pass), so a modest budget loses nothing and leaves room for parallel batch workers,
# each of which sees the same free memory. At 512 MiB the 3×32×32 CNN peaks at 0.65 GB (process
# included) in the same time as at 1024 MiB, which peaked at 1.0 GB (tools/bench_bounds.py --targets).
AUTO_MEMORY_FRACTION = 0.25
AUTO_MEMORY_CAP_MB = 512.0
FALLBACK_MEMORY_MB = 512.0  # budget where the available memory cannot be read
# measured resident memory per row over the estimate 2·B·Σn·bytes (3×32×32 CNN, float64): 1.1 for
# CROWN, 4.5 for alpha-CROWN
SAFETY_CROWN = 2.0
SAFETY_ALPHA = 6.0


def memory_budget_bytes(device: torch.device | str, memory_mb: float | None) -> float:
    """The budget for one CROWN pass: ``memory_mb`` MiB if given, else AUTO_MEMORY_FRACTION of the
    available memory capped at AUTO_MEMORY_CAP_MB (FALLBACK_MEMORY_MB where unknown)."""
    if memory_mb is not None:
        return float(memory_mb) * 2.0**20
    avail = available_memory_bytes(device)
    if not avail:
        return FALLBACK_MEMORY_MB * 2.0**20
    return min(AUTO_MEMORY_FRACTION * avail, AUTO_MEMORY_CAP_MB * 2.0**20)


def pick_output_chunk(d: int, row_bytes: float, budget_bytes: float) -> int:
    """Rows per backward pass: all d if d rows of ``row_bytes`` fit in the budget, else the most
    that fit, at least 1 (a single row is the least a pass can carry)."""
    if d < 1:
        raise ValueError(f"d must be >= 1, got {d}")
    if not row_bytes > 0:
        raise ValueError(f"row_bytes must be > 0, got {row_bytes}")
    if d * row_bytes <= budget_bytes:
        return d
    return int(max(1, min(d, math.floor(budget_bytes / row_bytes))))


def _graph_width(model: BoundedModule) -> int:
    """Σ n over the nodes that can carry an A matrix: every node with a per-sample output
    (constants, shape arithmetic and unperturbed weights excluded; boxed weights, whose A has
    the weight's full shape per row, included)."""
    total = 0
    for node in model._modules.values():
        shape = getattr(node, "output_shape", None)
        if shape is None or len(shape) == 0:
            continue
        if isinstance(node, (BoundParams, BoundBuffers)):
            if getattr(node, "perturbation", None) is not None:
                total += math.prod(shape)
            continue
        if isinstance(node, BoundConstant) or len(shape) < 2:
            continue
        total += math.prod(shape[1:])
    return max(total, 1)


def _row_bytes(model: BoundedModule, batch: int, dtype: torch.dtype, alpha: bool) -> float:
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2.0 * batch * _graph_width(model) * itemsize * (SAFETY_ALPHA if alpha else SAFETY_CROWN)


def _row_ranges(d: int, rows: int) -> list[tuple[int, int]]:
    return [(r0, min(r0 + rows, d)) for r0 in range(0, d, rows)]


def _selection(batch: int, d: int, r0: int, r1: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """C (B, r1 − r0, d) with C[:, j, r0 + j] = 1: row j of the chunk is output coordinate r0 + j."""
    c = torch.zeros(r1 - r0, d, dtype=dtype, device=device)
    c[torch.arange(r1 - r0, device=device), torch.arange(r0, r1, device=device)] = 1.0
    return c.unsqueeze(0).expand(batch, -1, -1)


# auto_LiRPA options (measured on auto_LiRPA 0.3: the other settings fail on these graphs): matrix mode for convolutions (our custom ops take dense
# A matrices, not patches); dense alphas. Sparse intermediate bounds are switched on per call,
# only without weight perturbation (they hand a perturbed Linear a one-hot C it cannot multiply).
_BOUND_OPTS = {"conv_mode": "matrix", "sparse_spec_alpha": False, "sparse_features_alpha": False}


def crown_bounds(
    net: Network,
    box: Bounds,
    target: torch.Tensor,
    output: Output = Output.LOGIT,
    params: ParamBox | None = None,
    *,
    alpha: bool = False,
    options: CrownOptions | None = None,
    times_input: bool = False,
    pre_bounds: Mapping[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> EngineResult:
    """Bounds l ≤ ∂o/∂x ≤ u holding for every x in ``box`` (and every parameter in ``params``);
    with ``times_input``, bounds on x ⊙ ∂o/∂x instead (the product is part of the bounded graph).
    ``pre_bounds``: activation index → (B, *shape) bounds that the input of that ReLU / LeakyReLU
    is known to satisfy (a branch-and-bound domain), used instead of computing them: the result
    then holds for the points of the box where they hold.

    box: Bounds of shape (B, *net.input_shape), already clipped to the input domain, in the
    network's dtype; it fixes the device. target: LongTensor (B,), the class c of each sample.
    output: o = z_c (logit) or the softmax cross-entropy at c (loss). params: interval boxes on
    Linear layers (perturbed conv weights raise :class:`EngineUnsupported`). alpha: optimise the
    relaxations (alpha-CROWN), starting from and intersected with CROWN's bounds.
    """
    opts = options if options is not None else CrownOptions()
    output = Output(output)
    net, params, target = _prepare(net, box, target, params, alpha)
    lower, upper, chunk_notes = _per_class(net, box, target, output, params, alpha, opts, times_input, None,
                                           pre_bounds)

    # never wider than interval arithmetic, per coordinate (both are sound; IBP costs milliseconds).
    # The outward-rounded IBP: a round-to-nearest one could fix a ReLU mask by round-off and
    # carry that discrete error into the intersection
    ibp = ibp_bounds(net, box, target, output, params, outward=True).bounds
    if times_input:
        ibp = Bounds(*mul_interval((box.lower, box.upper), (ibp.lower, ibp.upper)))
    tighter = int(((ibp.lower > lower) | (ibp.upper < upper)).sum())
    combined = Bounds(lower, upper).intersect(ibp)
    lower, upper = combined.lower, combined.upper
    notes = [
        "auto_LiRPA 0.3 backward (CROWN) bounds on the gradient graph; relu'(z)·g relaxed jointly in (z, g); "
        "every intermediate node intersected with its IBP bounds; every bound widened by its rigorous "
        "round-off bound γ_n·M (M the magnitude of its back-substituted sum, verigrad.bounds.lirpa_magnitude)",
        f"intersected per coordinate with (outward-rounded) IBP: IBP tighter on {tighter} of {lower.numel()} "
        "coordinate bounds",
    ]
    if output == Output.LOSS:
        notes.append("cross-entropy seed softmax(z) − e_c bounded by the exact softmax range over the logit box")
    if output == Output.PROBABILITY:
        notes.append("probability seed p_c(e_c − p) bounded by its range over the logit box")
    if params is not None:
        notes.append(f"parameter box on {sorted(params.layers)}")
    if times_input:
        notes.append("x ⊙ g bounded as one graph (the product relaxed jointly in x and g by auto_LiRPA), "
                     "intersected with the interval product of the box and IBP's g")
    if alpha:
        notes.append(
            f"alpha-CROWN: {opts.alpha_iterations} Adam steps (lr {opts.alpha_lr}) from CROWN's relaxation, "
            "intermediate bounds fixed to CROWN's; result intersected with CROWN"
        )
    notes.extend(chunk_notes)
    return EngineResult(Bounds(lower, upper), "alpha-crown" if alpha else "crown", tuple(notes), rigorous=True)


def _prepare(net: Network, box: Bounds, target: torch.Tensor, params: ParamBox | None, alpha: bool
             ) -> tuple[Network, ParamBox | None, torch.Tensor]:
    """Checks shared by the CROWN entry points; the network and classes on the box's device."""
    check_inputs(net, box, target)
    params = params if params is not None and not params.empty else None
    if params is not None:
        _check_params(net, params)
    engine = "alpha-crown" if alpha else "crown"
    for i, node in enumerate(net.layers):  # each kind says what auto_LiRPA cannot bound (e.g. perturbed conv)
        node.check_engine(engine, net.in_shapes(i), perturbed=params is not None and node.name in params)
    device = box.lower.device
    if net.device != device:
        net = net.to(device=device)
    return net, params, target.to(device)


def _per_class(net: Network, box: Bounds, target: torch.Tensor, output: Output, params: ParamBox | None,
               alpha: bool, opts: CrownOptions, times_input: bool, spec: torch.Tensor | None,
               pre_bounds: Mapping[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
               ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """_bound_chunk over the samples grouped by class (at most opts.max_batch per call)."""
    shape = box.lower.shape if spec is None else spec.shape[:2]
    lower = torch.empty(shape, dtype=box.lower.dtype, device=box.lower.device)
    upper = torch.empty_like(lower)
    chunk_notes: list[str] = []
    for c in torch.unique(target).tolist():
        idx = (target == c).nonzero().flatten()
        for start in range(0, idx.numel(), opts.max_batch):
            chunk = idx[start : start + opts.max_batch]
            pre = None if pre_bounds is None else {i: (b[0][chunk], b[1][chunk]) for i, b in pre_bounds.items()}
            lo, up, plan = _bound_chunk(net, int(c), box.lower[chunk], box.upper[chunk], output, params, alpha, opts,
                                        times_input, None if spec is None else spec[chunk], pre)
            lower[chunk] = lo
            upper[chunk] = up
            note = plan.note()
            if note is not None and note not in chunk_notes:
                chunk_notes.append(note)
    return lower, upper, chunk_notes


def crown_linear_bounds(
    net: Network,
    box: Bounds,
    target: torch.Tensor,
    spec: torch.Tensor,
    output: Output = Output.LOGIT,
    params: ParamBox | None = None,
    *,
    alpha: bool = False,
    options: CrownOptions | None = None,
    times_input: bool = False,
) -> Bounds:
    """Bounds (B, m) on the linear functionals spec·v, spec (B, m, d), over the box: one CROWN
    back-substitution from the rows themselves, so the relaxation's correlations between the
    coordinates of v are kept (Σ_i c_i [l_i, u_i] from coordinate bounds loses them); with
    ``alpha`` the α of every relaxation are optimised for these rows — a property's own
    objective rather than every coordinate's width. Rigorous (γ_n·|spec|·M, as crown_bounds)."""
    opts = options if options is not None else CrownOptions()
    net, params, target = _prepare(net, box, target, params, alpha)
    d = math.prod(net.input_shape)
    if spec.dim() != 3 or spec.shape[0] != box.lower.shape[0] or spec.shape[2] != d:
        raise ValueError(f"spec must be (B, m, {d}) for a batch of {box.lower.shape[0]}, got {tuple(spec.shape)}")
    spec = spec.to(dtype=box.lower.dtype, device=box.lower.device)
    lower, upper, _ = _per_class(net, box, target, Output(output), params, alpha, opts, times_input, spec)
    return Bounds(lower, upper)


def _check_params(net: Network, params: ParamBox) -> None:
    names = {l.name: l for l in net.affine_layers()}
    for name, lb in params.layers.items():
        if name not in names:
            raise KeyError(f"parameter box names layer {name!r}; the network's affine layers are {sorted(names)}")
        layer = names[name]
        if lb.weight.shape != layer.weight.shape or lb.bias.shape != layer.bias.shape:
            raise ValueError(
                f"parameter box of layer {name!r} has shapes {tuple(lb.weight.shape)}, {tuple(lb.bias.shape)}; "
                f"the layer has {tuple(layer.weight.shape)}, {tuple(layer.bias.shape)}"
            )


class _GradBoundedModule(BoundedModule):
    """BoundedModule that bounds the g input of each relu'(z)·g node only where z is unstable.

    The relaxation of 1[z > 0]·g never reads [g_l, g_u] at stable neurons (h = g or h = 0
    exactly there), yet auto_LiRPA would run one CROWN pass per coordinate of g: a dense
    identity specification over every neuron of the layer, the most expensive part of the
    whole computation on conv nets. Here the specification only has the union over the
    batch of the unstable neurons; the other coordinates keep interval (IBP) bounds, which are
    sound, and computed coordinates take the tighter of CROWN and IBP. The k unstable neurons are
    bounded in passes of at most ``spec_chunk`` rows (CrownOptions.output_chunk: memory ∝ rows);
    row j of a pass selects neuron idx[r0 + j] and its bounds are written back to that neuron."""

    # rows per backward pass of a g-node specification (None: all k unstable neurons at once) and
    # the largest number of passes one g-node needed (for the engine's notes); set by _bound_chunk
    spec_chunk: int | None = None
    spec_chunks_used: int = 0
    # γ_n of verigrad.bounds.rounding for this network and dtype (set by _bound_chunk): every
    # intermediate bound is widened by γ_n·M before use (_widen_for_rounding), M the magnitude of
    # its back-substituted sum (verigrad.bounds.lirpa_magnitude)
    rounding_gamma: float = 0.0
    _magnitudes: Magnitudes | None = None

    @property
    def magnitudes(self) -> Magnitudes:
        if self._magnitudes is None:
            self._magnitudes = Magnitudes(self)
        return self._magnitudes

    def compute_bounds(self, *args, **kwargs):
        # magnitudes read the bounds of this call's box: recompute them lazily for each call
        self.magnitudes.reset()
        return super().compute_bounds(*args, **kwargs)

    def rounding_allowance(self, node) -> torch.Tensor:
        """γ_n·M(node): a bound on the round-off of any CROWN bound of ``node`` computed here."""
        return self.rounding_gamma * self.magnitudes(node)

    def check_prior_bounds(self, node):
        """auto_LiRPA's MatMul asks for bounds on both operands, which only its bilinear case
        (both perturbed) reads; with one operand constant it is the linear case, which reads
        the constant alone. The gradient graph's backward products gᵀW are all of that kind
        without a parameter box, and each such request cost a CROWN pass over every coordinate
        of g (a third of the intermediate bounds on the MNIST MLP): ask only for the constant's."""
        if isinstance(node, BoundMatMul) and not node.prior_checked and not all(i.perturbed for i in node.inputs):
            saved = node.requires_input_bounds
            node.requires_input_bounds = [i for i, inp in enumerate(node.inputs) if not inp.perturbed]
            try:
                return super().check_prior_bounds(node)
            finally:
                node.requires_input_bounds = saved
        return super().check_prior_bounds(node)

    def compute_intermediate_bounds(self, node, prior_checked=False):
        if getattr(node, "lower", None) is not None:
            return
        consumer = self._relu_grad_consumer(node)
        if consumer is None or not node.perturbed or self.use_forward:
            super().compute_intermediate_bounds(node, prior_checked)
            self._intersect_with_ibp(node)
            self._widen_for_rounding(node)
            return
        if not prior_checked:
            self.check_prior_bounds(node)
        z = consumer.inputs[0]
        self.compute_intermediate_bounds(z)
        batch = z.lower.shape[0]
        unstable = ((z.lower <= 0) & (z.upper > 0)).reshape(batch, -1).any(dim=0)
        self._fill_constants(node)
        with torch.no_grad():
            ref_lo, ref_up = self.IBP_general(node=node, delete_bounds_after_use=True)
        lo, up = ref_lo.detach().clone(), ref_up.detach().clone()
        idx = unstable.nonzero().flatten()
        k = int(idx.numel())
        if k:
            dim = unstable.numel()
            rows = self.spec_chunk if self.spec_chunk is not None else k
            flat_lo, flat_up = lo.reshape(batch, -1), up.reshape(batch, -1)
            for r0, r1 in _row_ranges(k, rows):
                part = idx[r0:r1]  # this chunk's neurons: spec row j selects neuron part[j]
                n = r1 - r0
                spec = torch.zeros(batch, n, dim, dtype=lo.dtype, device=lo.device)
                spec[:, torch.arange(n, device=lo.device), part] = 1.0
                spec = spec.reshape(batch, n, *lo.shape[1:])
                c_lo, c_up = self.backward_general(C=spec, node=node)
                flat_lo[:, part] = torch.maximum(flat_lo[:, part], c_lo.reshape(batch, n))
                flat_up[:, part] = torch.minimum(flat_up[:, part], c_up.reshape(batch, n))
                del spec, c_lo, c_up
            if rows < k:
                self.spec_chunks_used = max(self.spec_chunks_used, len(_row_ranges(k, rows)))
                # each pass appended this node to the lists of the nodes it reached: keep one entry
                for name, starts in self.backward_from.items():
                    self.backward_from[name] = list({id(s): s for s in starts}.values())
        node.lower, node.upper = lo, up
        node.interval = (lo, up)
        self._widen_for_rounding(node)

    def _widen_for_rounding(self, node) -> None:
        """Widen an intermediate node's bounds outward by γ_n·M(node) (its rigorous round-off
        bound, :mod:`verigrad.bounds.lirpa_magnitude`) and one ulp: auto_LiRPA computes in
        round-to-nearest, and a pre-activation bound a rounding put on the wrong side of 0 would
        fix a ReLU mask (or a relaxation) that the exact bounds leave open — a discrete error no
        final allowance covers."""
        lo, up = getattr(node, "lower", None), getattr(node, "upper", None)
        if (not self.rounding_gamma or not node.perturbed or not isinstance(lo, torch.Tensor)
                or not isinstance(up, torch.Tensor) or lo.dim() == 0):
            return
        new_lo, new_up = round_outward((lo, up), self.rounding_allowance(node))
        node.lower, node.upper = new_lo, new_up
        node.interval = (new_lo, new_up)

    def _intersect_with_ibp(self, node) -> None:
        """[max(l_CROWN, l_IBP), min(u_CROWN, u_IBP)] for an intermediate node, IBP taken from
        its inputs' (already intersected) bounds: both are sound, so the intersection is, and a
        relaxation that loosens with depth (σ′ of deep sigmoid nets) can no longer compound
        past interval arithmetic. Inputs without bounds (the perturbed operand of a constant
        product, see check_prior_bounds) get temporary IBP ones."""
        lo, up = getattr(node, "lower", None), getattr(node, "upper", None)
        if not node.perturbed or not isinstance(lo, torch.Tensor) or not isinstance(up, torch.Tensor):
            return
        missing = [n for n in node.inputs if not hasattr(n, "interval")]
        with torch.no_grad():
            try:
                for n in missing:
                    self.IBP_general(node=n, delete_bounds_after_use=True)
                ref_lo, ref_up = node.interval_propagate(*[n.interval for n in node.inputs])
            except (AttributeError, NotImplementedError, RuntimeError, TypeError):
                # an op without an interval rule here only forgoes this tightening (CROWN's
                # bounds stand alone, as sound as before); the final map is still intersected
                return
            finally:
                for n in missing:  # perturbed ones only: constants keep their forward values
                    if n.perturbed:
                        for attr in ("interval", "lower", "upper"):
                            if hasattr(n, attr):
                                delattr(n, attr)
        if not isinstance(ref_lo, torch.Tensor) or ref_lo.shape != lo.shape:
            return
        new_lo, new_up = uncross(torch.maximum(lo, ref_lo), torch.minimum(up, ref_up), f"node {node.name}", LirpaError)
        node.lower, node.upper = new_lo, new_up
        node.interval = (new_lo, new_up)

    def batched_backward(self, node, C, unstable_idx, batch_size, bound_lower=True, bound_upper=True):
        """auto_LiRPA's own chunked CROWN for the intermediate nodes it bounds itself (pre-activations
        of ReLUs with more unstable neurons than bound_opts['crown_batch_size'], which _bound_chunk
        sets to the same row limit): the same passes, without its print and progress bar."""
        from auto_LiRPA import backward_bound

        rows = int(self.bound_opts["crown_batch_size"])
        size = unstable_idx[0].numel() if isinstance(unstable_idx, tuple) else unstable_idx.numel()
        self.spec_chunks_used = max(self.spec_chunks_used, -(-size // rows))
        bar = backward_bound.tqdm
        backward_bound.tqdm = lambda it, *a, **k: it
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                return super().batched_backward(node, C, unstable_idx, batch_size, bound_lower, bound_upper)
        finally:
            backward_bound.tqdm = bar

    def _fill_constants(self, node) -> None:
        """Give every unperturbed ancestor of ``node`` its forward value, so interval
        propagation treats it as a constant (auto_LiRPA clears forward values at each call and
        has no interval rule for shape arithmetic such as Equal / Where)."""
        stack, seen = [node], set()
        while stack:
            n = stack.pop()
            if n.name in seen:
                continue
            seen.add(n.name)
            if not n.perturbed:
                self.get_forward_value(n)
            elif not hasattr(n, "interval"):
                stack.extend(n.inputs)

    def _relu_grad_consumer(self, node):
        """The ReluGrad node that takes ``node`` as its g input, if any."""
        for name in node.output_name:
            user = self[name]
            if isinstance(user, BoundReluGrad) and user.inputs[1] is node and user.inputs[0] is not node:
                return user
        return None


class _Flat(nn.Module):
    """The gradient graph with its output flattened to (B, d) (auto_LiRPA sizes the
    specification and the alphas from the last output dimension). For row-seed graphs the seed
    W_L[c] is a second, batched input: auto_LiRPA mishandles batch-free tensors of shape (1, n)
    broadcast against the batch, and as an input it can carry the last layer's row box."""

    def __init__(self, graph: GradientGraph, times_input: bool = False) -> None:
        super().__init__()
        self.graph = graph
        self.times_input = times_input

    def forward(self, x: torch.Tensor, seed: torch.Tensor | None = None) -> torch.Tensor:
        v = self.graph(x, seed)
        if self.times_input:  # x ⊙ g as one graph: CROWN relaxes the product jointly in (x, g)
            v = x * v
        return v.reshape(v.shape[0], -1)


def _perturbed_graph(net: Network, target: int, output: Output, params: ParamBox | None) -> GradientGraph:
    """GradientGraph whose boxed parameters are auto_LiRPA BoundedParameters. Each weight is
    one node used by both the forward and the backward pass, so both see the same θ'. (The
    row-seed W_L[c] is not a parameter of the graph: see _seed_input.)"""
    graph = GradientGraph(net, target, output)
    if params is None:
        return graph
    for name, lb in params.layers.items():
        w_name, b_name = graph.param_names[name]
        for attr, bnd in ((w_name, lb.weight), (b_name, lb.bias)):
            value = getattr(graph, attr).data
            setattr(graph, attr, _bounded_parameter(value, bnd, f"{name}.{attr[0]}"))
    return graph


def _seed_input(graph: GradientGraph, net: Network, target: int, batch: int, params: ParamBox | None) -> torch.Tensor:
    """The per-sample seed rows W_L[c] (B, n), boxed by the last layer's parameter box if any.
    In a row-seed graph the last layer is used by nothing else (the logits are never formed),
    so an independent box on this input loses no correlation."""
    row = cast(torch.Tensor, graph.seed_row).expand(batch, -1).clone()  # a registered buffer or parameter
    last = net.layers[-1]
    if params is None or last.name not in params:
        return row
    wb = params.layers[last.name].weight
    lo = wb.lower[target : target + 1].to(row).expand(batch, -1)
    up = wb.upper[target : target + 1].to(row).expand(batch, -1)
    return BoundedTensor(row, PerturbationLpNorm(norm=math.inf, x_L=lo, x_U=up))


def _bounded_parameter(value: torch.Tensor, bnd: Bounds, what: str) -> nn.Parameter:
    lo = bnd.lower.to(device=value.device, dtype=value.dtype)
    up = bnd.upper.to(device=value.device, dtype=value.dtype)
    if not bool(((lo <= value) & (value <= up)).all()):
        # auto_LiRPA keeps the nominal value beside the box; a box around other values is
        # almost certainly a caller's mistake (boxes are built around the network's θ)
        raise ValueError(f"parameter box of {what} does not contain the network's own values")
    return BoundedParameter(value.clone(), ParamBoxPerturbation(lo, up), requires_grad=False)


@contextlib.contextmanager
def _lirpa_context(dtype: torch.dtype) -> Iterator[list[str]]:
    """auto_LiRPA creates many tensors with the default dtype (identity C, slice and alpha
    buffers): make it the network's dtype for the duration. Also silence the tracer's
    warnings about Python control flow on shapes (constant per network, so harmless) and
    collect auto_LiRPA's error log lines (it lists unsupported ops there before raising)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    lines: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger = logging.getLogger("auto_LiRPA")
    handler = _Collect(level=logging.ERROR)
    old_propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message=".*torch.jit.script.*deprecated")
            warnings.filterwarnings("ignore", message=".*Creating an identity matrix.*")
            yield lines
    finally:
        torch.set_default_dtype(old)
        logger.removeHandler(handler)
        logger.propagate = old_propagate


def _unsupported_ops(lines: list[str]) -> list[str]:
    # auto_LiRPA logs "Name: <op>, Attr: {...}" for each node it has no bound class for
    return sorted({l.split("Name: ", 1)[1].split(",", 1)[0] for l in lines if l.startswith("Name: ")})


def _bound_chunk(
    net: Network,
    target: int,
    lo: torch.Tensor,
    up: torch.Tensor,
    output: Output,
    params: ParamBox | None,
    alpha: bool,
    opts: CrownOptions,
    times_input: bool = False,
    spec: torch.Tensor | None = None,
    pre_bounds: Mapping[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, "_ChunkPlan"]:
    """CROWN (then alpha-CROWN) for samples that share one target class, and how the output
    rows were chunked. ``spec`` (B, m, d): bound the m linear functionals spec·v instead of the
    d coordinates of v (one pass; alpha-CROWN then optimises exactly those rows)."""
    b = lo.shape[0]
    centre = (lo + up) / 2
    where = f"{net.source}, class {target}, output {output.value}"
    bound_opts = dict(_BOUND_OPTS, sparse_intermediate_bounds=params is None)
    with _lirpa_context(net.dtype) as log_lines:
        def convert() -> tuple[GradientGraph, _GradBoundedModule]:
            graph = _perturbed_graph(net, target, output, params)
            inputs: tuple[torch.Tensor, ...] = (centre,)
            if graph.uses_row_seed:
                inputs = (centre, _seed_input(graph, net, target, b, params))
            try:
                model = _GradBoundedModule(_Flat(graph, times_input), inputs, bound_opts=bound_opts,
                                           custom_ops=CUSTOM_OPS, device=lo.device)
            except AssertionError as e:
                raise EngineUnsupported(f"auto_LiRPA 0.3 asserted while converting the gradient graph of {where}: "
                                        f"{_first_line(e) or 'assertion failed'}") from e
            except NotImplementedError as e:
                ops = _unsupported_ops(log_lines)
                if ops:
                    raise EngineUnsupported(f"auto_LiRPA 0.3 has no bound for op(s) {ops} in the gradient graph of "
                                            f"{where}") from e
                raise EngineUnsupported(f"auto_LiRPA 0.3 cannot convert the gradient graph of {where}: {e}") from e
            except Exception as e:
                raise LirpaError(f"auto_LiRPA failed to convert the gradient graph of {where}: "
                                 f"{type(e).__name__}: {e}") from e
            return graph, model

        if params is None:
            # tracing and conversion cost as much as the bounds on small nets: once per class,
            # output and batch size for this network, reused across inputs (every call sets the
            # new box as the input and recomputes all bounds from it)
            key = ("crown-gradient-graph", target, output, b, str(lo.device), net.dtype, times_input)
            graph, model = net.memo(key, convert)
        else:  # the parameter box is part of the traced graph (its BoundedParameters)
            graph, model = convert()
        model.spec_chunks_used = 0
        model.rounding_gamma = gamma(crown_chain_length(net, len(model._modules)), net.dtype)
        seed = (_seed_input(graph, net, target, b, params),) if graph.uses_row_seed else ()
        x = (BoundedTensor(centre, PerturbationLpNorm(norm=math.inf, x_L=lo, x_U=up)), *seed)
        d = math.prod(net.input_shape)
        rows = d if spec is None else spec.shape[1]
        chunking = _ChunkPlan.make(opts, model, rows, b, net.dtype, lo.device, alpha)
        model.spec_chunk = chunking.pass_rows
        # auto_LiRPA's own intermediate specifications (ReLU pre-activations) to the same row limit
        model.bound_opts["crown_batch_size"] = chunking.pass_rows
        ranges = _row_ranges(rows, chunking.rows if spec is None else rows)
        try:
            with torch.no_grad():
                cl, cu = _crown_rows(model, x, ranges, rows, b, spec, _preset(model, net, pre_bounds))
        except AssertionError as e:
            raise EngineUnsupported(f"auto_LiRPA 0.3 asserted while bounding {where}: "
                                    f"{_first_line(e) or 'assertion failed'}") from e
        except NotImplementedError as e:
            raise EngineUnsupported(f"auto_LiRPA 0.3 cannot bound the gradient graph of {where}: {_first_line(e)}") from e
        except Exception as e:
            raise LirpaError(f"auto_LiRPA CROWN failed on {where}: {type(e).__name__}: {e}") from e

        if alpha:
            try:
                al, au = _alpha_crown(model, x, opts, ranges, rows, b, spec)
            except AssertionError as e:
                raise EngineUnsupported(f"auto_LiRPA 0.3 asserted while optimising {where}: "
                                        f"{_first_line(e) or 'assertion failed'}") from e
            except NotImplementedError as e:
                raise EngineUnsupported(f"auto_LiRPA 0.3 cannot optimise the bounds of {where}: {_first_line(e)}") from e
            except Exception as e:
                raise LirpaError(f"auto_LiRPA alpha-CROWN failed on {where}: {type(e).__name__}: {e}") from e
            # both are sound; keep the tighter side of each (alpha-CROWN never loses to CROWN).
            # On point boxes the two can differ by round-off: _uncross settles that, and
            # reports a real disagreement (one of them unsound)
            cl, cu = torch.maximum(cl, al), torch.minimum(cu, au)
        # the final map's own round-off (the relaxations, hence M, are CROWN's and alpha-CROWN's alike);
        # a functional spec·v adds its own reduction of length d: γ_{n+d}·|spec|·M
        final = model[model.final_name]
        if spec is None:
            allowance = model.rounding_allowance(final).reshape(b, d)
        else:
            n = crown_chain_length(net, len(model._modules)) + d
            allowance = gamma(n, net.dtype) * (spec.abs() @ model.magnitudes(final).reshape(b, d, 1)).reshape(b, rows)
        cl, cu = round_outward((cl, cu), allowance)
        _release(model)
    cl, cu = _uncross(cl, cu, where)
    shape = (b, *net.input_shape) if spec is None else (b, rows)
    chunking = dataclasses.replace(chunking, chunks=len(ranges), spec_chunks=model.spec_chunks_used)
    return cl.reshape(shape), cu.reshape(shape), chunking


@dataclass(frozen=True)
class _ChunkPlan:
    """Rows per backward pass for one auto_LiRPA call, how they were chosen, and (after the call)
    how many passes the output and the largest intermediate specification took."""

    d: int
    rows: int  # output rows per pass (≤ d)
    pass_rows: int  # the most rows any pass may carry (intermediate specifications are split to this)
    auto: bool
    budget_bytes: float = 0.0
    row_bytes: float = 0.0
    chunks: int = 1
    spec_chunks: int = 0

    @staticmethod
    def make(opts: CrownOptions, model: BoundedModule, d: int, batch: int, dtype: torch.dtype,
             device: torch.device, alpha: bool) -> "_ChunkPlan":
        if opts.output_chunk is not None:
            return _ChunkPlan(d, min(opts.output_chunk, d), opts.output_chunk, auto=False)
        row_bytes = _row_bytes(model, batch, dtype, alpha)
        budget = memory_budget_bytes(device, opts.memory_mb)
        fit = max(1, math.floor(budget / row_bytes))
        return _ChunkPlan(d, pick_output_chunk(d, row_bytes, budget), fit, True, budget, row_bytes)

    def note(self) -> str | None:
        if self.chunks <= 1 and self.spec_chunks == 0:
            return None
        how = ("output_chunk" if not self.auto else
               f"auto: {self.budget_bytes / 2**20:.0f} MiB budget, ≈{self.row_bytes / 2**20:.2f} MiB per row")
        parts = []
        if self.chunks > 1:
            parts.append(f"output ({self.d} coordinates) bounded in {self.chunks} chunks of {self.rows} rows, "
                         "intermediate bounds computed once and reused")
        if self.spec_chunks:
            parts.append(f"intermediate specifications in up to {self.spec_chunks} chunks of {self.pass_rows} rows")
        return "; ".join(parts) + f" ({how})"


def _preset(model: BoundedModule, net: Network, pre_bounds: Mapping[int, tuple[torch.Tensor, torch.Tensor]] | None
            ) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
    """auto_LiRPA node name → bounds for the input z of each ReLU / LeakyReLU / PReLU named by
    node index in ``pre_bounds``: the z of its relu'(z)·g node (one per such node — a PReLU's
    gradient rule is r + a·(g − r) with r = relu'(z)·g — traced in backward order; the forward
    ReLU of the last activation is not traced at all when nothing reads it)."""
    if not pre_bounds:
        return None
    acts = [i for i, node in enumerate(net.layers) if isinstance(node, (Activation, PReLU))]
    nodes = [n for n in model._modules.values() if isinstance(n, BoundReluGrad)][::-1]
    kinds = {node.kind for i in acts if isinstance(node := net.layers[i], Activation)}
    if len(acts) != len(nodes) or not kinds <= {ActKind.RELU, ActKind.LEAKY_RELU}:
        raise LirpaError(f"pre-activation bounds need a ReLU / LeakyReLU / PReLU net whose activations map one to one to "
                         f"the traced graph's ({len(acts)} activations, {len(nodes)} traced)")
    index = {i: k for k, i in enumerate(acts)}
    return {nodes[index[i]].inputs[0].name: (lo.detach(), up.detach()) for i, (lo, up) in pre_bounds.items()}


def _crown_rows(model: BoundedModule, x: tuple[torch.Tensor, ...], ranges: list[tuple[int, int]], d: int,
                batch: int, spec: torch.Tensor | None = None,
                preset: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """CROWN bounds (B, d) on the output, one backward pass per row range. The first pass computes
    the intermediate bounds; the others take them as fixed (they do not depend on the final
    specification C), so each further chunk costs one final backward pass. ``spec``: the rows are
    those of this specification (one range)."""
    if len(ranges) == 1:  # all rows at once: auto_LiRPA's own identity specification (or ``spec``)
        cl, cu = model.compute_bounds(x=x, C=spec, method="backward", intermediate_layer_bounds=preset)
        _drop_final_A(model)
        return cl.detach().reshape(batch, d), cu.detach().reshape(batch, d)
    ref = x[0]
    lower = torch.empty(batch, d, dtype=ref.dtype, device=ref.device)
    upper = torch.empty_like(lower)
    fixed = preset
    for r0, r1 in ranges:
        c = _selection(batch, d, r0, r1, ref.dtype, ref.device)
        cl, cu = model.compute_bounds(x=x, C=c, method="backward", intermediate_layer_bounds=fixed)
        if fixed is preset:
            fixed = _intermediate_bounds(model)
        lower[:, r0:r1] = cl.detach().reshape(batch, r1 - r0)
        upper[:, r0:r1] = cu.detach().reshape(batch, r1 - r0)
        _drop_final_A(model)
    return lower, upper


def _release(model: BoundedModule) -> None:
    """Free what one call leaves on a model that is kept for reuse: the final A matrices and
    alpha-CROWN's α (dense: rows × neurons per activation; init_slope creates them afresh)."""
    _drop_final_A(model)
    for node in model.optimizable_activations:
        node.opt_init()


def _drop_final_A(model: BoundedModule) -> None:
    """auto_LiRPA 0.3 keeps the A matrices of the final pass on every node: free them (the next
    backward pass starts by resetting them anyway)."""
    for node in model._modules.values():
        node.lA = node.uA = None


def _intermediate_bounds(model: BoundedModule) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The bounds every non-root, non-final node holds after a CROWN pass (what later passes and
    alpha-CROWN take as fixed intermediate bounds)."""
    roots = set(model.root_name) | set(model.input_name)
    return {
        node.name: (node.lower.detach(), node.upper.detach())
        for node in model._modules.values()
        if node.name not in roots
        and node.name != model.final_name
        and isinstance(getattr(node, "lower", None), torch.Tensor)
        and isinstance(getattr(node, "upper", None), torch.Tensor)
    }


def _uncross(lo: torch.Tensor, up: torch.Tensor, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    return uncross(lo, up, where, LirpaError)


def _first_line(e: BaseException) -> str:
    return str(e).strip().split("\n", 1)[0]


def _alpha_crown(model: BoundedModule, x: tuple[torch.Tensor, ...], opts: CrownOptions,
                 ranges: list[tuple[int, int]], d: int, batch: int,
                 spec: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Optimise α with CROWN's intermediate bounds held fixed (re-bounding every gradient node at
    each step is ~15× slower: 759 s instead of 54 s on the small MNIST CNN, measured). The CROWN pass that just ran left its
    bounds on the nodes; they are collected and handed back as fixed intermediate bounds.
    With several row ranges, α (one per spec row already) is initialised and optimised for
    each range in turn, with the same fixed intermediate bounds."""
    fixed = _intermediate_bounds(model)
    # Only activations that the final node's backward pass reaches get relaxation variables.
    # The cross-entropy seed's softmax passes no A to the logits (constant planes), so the
    # forward activations behind it are never visited, and auto_LiRPA would fail to initialise
    # their alphas (it reads values saved by the visit).
    reached = _backward_reachable(model)
    model.optimizable_activations = [n for n in model.optimizable_activations if n.name in reached]
    model.set_bound_opts(
        {
            "optimize_bound_args": {
                "iteration": opts.alpha_iterations,
                "lr_alpha": opts.alpha_lr,
                "lr_decay": opts.alpha_lr_decay,
                "fix_intermediate_layer_bounds": True,
                "keep_best": True,
                # initialise the alphas once, here, from a pass over the fixed intermediate
                # bounds (auto_LiRPA would otherwise re-run full CROWN before each side)
                "init_alpha": False,
            }
        }
    )
    ref = x[0]
    lower = torch.empty(batch, d, dtype=ref.dtype, device=ref.device)
    upper = torch.empty_like(lower)
    for r0, r1 in ranges:
        c = spec if spec is not None else None if len(ranges) == 1 else _selection(batch, d, r0, r1, ref.dtype,
                                                                                    ref.device)
        # auto_LiRPA prints progress ("Early stop at ...") to stdout: keep it out of our output
        with contextlib.redirect_stdout(io.StringIO()):
            model.init_slope(x, method="backward", c=c, intermediate_layer_bounds=fixed)
            lo, up = model.compute_bounds(x=x, C=c, method="CROWN-Optimized", intermediate_layer_bounds=fixed)
        lower[:, r0:r1] = lo.detach().reshape(batch, r1 - r0)
        upper[:, r0:r1] = up.detach().reshape(batch, r1 - r0)
        _drop_final_A(model)
    return lower, upper


def _backward_reachable(model: BoundedModule) -> set[str]:
    """Names of the nodes an A matrix can reach from the final node (all ancestors, except
    through nodes that return no A for their inputs: our softmax)."""
    seen: set[str] = set()
    stack = [model[model.final_name]]
    while stack:
        node = stack.pop()
        if node.name in seen:
            continue
        seen.add(node.name)
        if isinstance(node, BoundMaxPoolGrad):
            stack.append(node.inputs[1])  # its planes pass no A to x
        elif not isinstance(node, (BoundSoftmaxBox, BoundProbabilitySeed)):
            stack.extend(node.inputs)
    return seen


# ---------------------------------------------------------------------------------------------
# Second order: CROWN bounds on the Hessian H = ∂²z_c/∂x² (used by verigrad.bounds.hessian)

from verigrad.graph import ops as _ops  # noqa: E402
from verigrad.models.network import Linear as _Linear, Reshape as _Reshape  # noqa: E402

# inputs d of the largest Hessian bounded here: the graph has d² outputs and d tangents per
# neuron, and every tangent product needs CROWN bounds on both factors. Measured (one CPU
# thread): MLP 6-8-7-4 0.1–0.2 s, 16-32-32-10 0.2 s, 64-32-16-10 13–18 s per sample
HESSIAN_MAX_INPUTS = 64


class _HessianGraph(nn.Module):
    """x ↦ H(x) flattened to (B, d²) for o = z_c, in the sum form H = Σ_k J_kᵀ diag(σ''(z_k) ⊙ γ_k) J_k,
    written with ops auto_LiRPA 0.3 bounds: Linear / MatMul, Sigmoid / Tanh, our
    Softplus, products of perturbed tensors of equal shape (broadcasts are made explicit with
    Concat: auto_LiRPA's Mul cannot bound a broadcast of two perturbed tensors, nor a weight-derived
    tensor with a leading 1). Tangents J_k (B, d, n) start as the batch-free W_1ᵀ. Reshape layers
    are skipped (the graph is an MLP on flattened vectors: reshapes permute nothing). The seed
    W_L[c] is a second, batched input, as in :class:`_Flat`."""

    eye: torch.Tensor  # a parameter, registered only when the chain starts with an activation

    def __init__(self, net: Network) -> None:
        super().__init__()
        self.kinds: list[tuple[str, int]] = []  # ("linear", index) / ("act", index) in chain order
        self.acts: dict[int, Activation] = {}
        layers = [l for l in net.layers if not isinstance(l, _Reshape)][:-1]  # the logits are never formed
        for i, layer in enumerate(layers):
            if isinstance(layer, _Linear):
                self.register_parameter(f"w{i}", nn.Parameter(layer.weight.detach().clone(), requires_grad=False))
                self.register_parameter(f"b{i}", nn.Parameter(layer.bias.detach().clone(), requires_grad=False))
                self.kinds.append(("linear", i))
            else:
                # a chain (require_chain) of Linear, Reshape and activations (_check_hessian_graph: no conv)
                assert isinstance(layer, Activation), f"no Hessian graph for layer {layer.name!r}"
                self.acts[i] = layer
                self.kinds.append(("act", i))
        self.d = math.prod(net.input_shape)
        if self.kinds and self.kinds[0][0] == "act":  # an activation on the raw input: J starts as I
            eye = torch.eye(self.d, dtype=net.dtype, device=net.device)
            self.register_parameter("eye", nn.Parameter(eye, requires_grad=False))

    @staticmethod
    def _derivatives(layer: Activation, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(σ'(z), σ''(z)) from sigmoid / tanh nodes and products."""
        if layer.kind == ActKind.SOFTPLUS:
            s = torch.sigmoid(z * layer.param)
            return s, layer.param * (s - s * s)
        if layer.kind == ActKind.SIGMOID:
            s = torch.sigmoid(z)
            d1 = s - s * s
            return d1, d1 * (1.0 - 2.0 * s)
        t = torch.tanh(z)
        d1 = 1.0 - t * t
        return d1, -2.0 * t * d1

    def _spread(self, s: torch.Tensor) -> torch.Tensor:
        """(B, n) → (B, d, n), every tangent row a copy (Concat, see the class docstring)."""
        return torch.cat([s.unsqueeze(1)] * self.d, dim=1)

    def forward(self, x: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
        h = x.reshape(x.shape[0], -1)
        pre: dict[int, torch.Tensor] = {}
        for kind, i in self.kinds:
            if kind == "linear":
                h = nn.functional.linear(h, getattr(self, f"w{i}"), getattr(self, f"b{i}"))
            else:
                pre[i] = h
                layer = self.acts[i]
                h = _ops.softplus(h, layer.param) if layer.kind == ActKind.SOFTPLUS else layer(h)
        deriv = {i: self._derivatives(self.acts[i], z) for i, z in pre.items()}
        gam: dict[int, torch.Tensor] = {}
        g = seed
        for kind, i in reversed(self.kinds):
            if kind == "act":
                gam[i] = g
                g = deriv[i][0] * g
            elif i != self.kinds[0][1]:
                g = g @ getattr(self, f"w{i}")
        hess = None
        tangent: torch.Tensor | None = None  # None: J = I (no layer yet)
        for kind, i in self.kinds:
            if kind == "linear":
                w = getattr(self, f"w{i}")
                tangent = w.t() if tangent is None else tangent @ w.t()
                continue
            jk = self.eye if tangent is None else tangent
            scaled = jk * self._spread(deriv[i][1] * gam[i])
            term = scaled @ (jk.t() if jk.dim() == 2 else jk.transpose(1, 2))
            hess = term if hess is None else hess + term
            tangent = jk * self._spread(deriv[i][0])
        assert hess is not None  # _check_hessian_graph requires an activation
        return hess.reshape(hess.shape[0], -1)


def _check_hessian_graph(net: Network, output: Output) -> None:
    if output != Output.LOGIT:
        raise EngineUnsupported(
            "CROWN Hessian bounds cover o = z_c only: the cross-entropy's softmax term diag(p) − ppᵀ "
            "has no auto_LiRPA relaxation here"
        )
    for layer in net.layers:
        if isinstance(layer, Conv2d):
            raise EngineUnsupported(
                f"CROWN Hessian bounds cover MLPs only (conv layer {layer.name!r}: its tangents need a "
                "batch-mixing reshape auto_LiRPA 0.3 cannot bound)"
            )
        if isinstance(layer, Activation) and layer.kind not in (ActKind.SOFTPLUS, ActKind.SIGMOID, ActKind.TANH):
            raise EngineUnsupported(f"no second derivative for activation {layer.kind.value} ({layer.name!r})")
    if not any(isinstance(l, Activation) for l in net.layers):
        raise EngineUnsupported("the network has no activation: its Hessian is zero")
    if not isinstance(net.layers[-1], _Linear):
        raise EngineUnsupported("CROWN Hessian bounds need a Linear last layer (its row W_L[c] seeds γ)")
    d = math.prod(net.input_shape)
    if d > HESSIAN_MAX_INPUTS:
        raise EngineUnsupported(
            f"CROWN Hessian bounds are limited to inputs of at most {HESSIAN_MAX_INPUTS} values "
            f"(this one has {d}: {d * d} outputs, each tangent product bounded by CROWN)"
        )


def crown_hessian_bounds(net: Network, box: Bounds, target: torch.Tensor, output: Output = Output.LOGIT) -> EngineResult:
    """CROWN (auto_LiRPA 0.3 backward) bounds (B, d, d) on H(x') = ∂²z_c/∂x'² for every x' in
    ``box``, one compute_bounds call per sample on one traced graph. Small MLPs only (d ≤ HESSIAN_MAX_INPUTS, logit output, smooth
    activations): anything else raises :class:`EngineUnsupported`. The caller intersects with IBP."""
    output = Output(output)
    _check_hessian_graph(net, output)
    check_inputs(net, box, target)
    device = box.lower.device
    if net.device != device:
        net = net.to(device=device)
    target = target.to(device)
    b, d = box.lower.shape[0], math.prod(net.input_shape)
    lower = torch.empty(b, d, d, dtype=box.lower.dtype, device=device)
    upper = torch.empty_like(lower)
    last = net.layers[-1]
    assert isinstance(last, _Linear)  # _check_hessian_graph
    where = f"{net.source}, Hessian"
    with _lirpa_context(net.dtype) as log_lines:
        graph = _HessianGraph(net)
        seeds = last.weight[target].detach().clone()  # (B, n): W_L[c] per sample
        centre = box.center
        try:
            # one traced graph serves every sample: the class enters through the seed input
            model = BoundedModule(
                graph, (centre[:1], seeds[:1]), bound_opts=dict(_BOUND_OPTS), custom_ops=CUSTOM_OPS, device=device
            )
        except NotImplementedError as e:
            ops = _unsupported_ops(log_lines)
            why = ops or _first_line(e)
            raise EngineUnsupported(f"auto_LiRPA 0.3 cannot convert the Hessian graph of {where}: {why}") from e
        except Exception as e:
            raise LirpaError(f"auto_LiRPA failed to convert the Hessian graph of {where}: {type(e).__name__}: {e}") from e
        for k in range(b):
            sl = slice(k, k + 1)
            x = BoundedTensor(centre[sl], PerturbationLpNorm(norm=math.inf, x_L=box.lower[sl], x_U=box.upper[sl]))
            try:
                with torch.no_grad():
                    cl, cu = model.compute_bounds(x=(x, seeds[sl]), method="backward")
            except NotImplementedError as e:
                raise EngineUnsupported(f"auto_LiRPA 0.3 cannot bound the Hessian graph of {where}: {_first_line(e)}") from e
            except Exception as e:
                raise LirpaError(f"auto_LiRPA CROWN failed on the Hessian graph of {where}: {type(e).__name__}: {e}") from e
            cl, cu = _uncross(cl.detach(), cu.detach(), f"{where}, sample {k}")
            lower[k], upper[k] = cl.reshape(d, d), cu.reshape(d, d)
    notes = (
        "auto_LiRPA 0.3 backward (CROWN) bounds on the sum-form Hessian graph; products of perturbed "
        "tensors by McCormick planes",
    )
    return EngineResult(Bounds(lower, upper), "crown", notes)
