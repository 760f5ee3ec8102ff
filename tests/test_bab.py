"""Branch and bound (engine ``bab``): exact on small ReLU nets against the region oracle,
never wider than CROWN, sound at sampled points, verdicts equal to the exact range's, input
splits on smooth nets, and the pipeline (spec, witnesses, errors)."""
from __future__ import annotations

import math
import time
from pathlib import Path

import pytest

pytest.importorskip("scipy")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from click.testing import CliRunner  # noqa: E402

import verigrad.verify as vmod  # noqa: E402
from tests.exact_oracle import containment_violations, exact_gradient_range  # noqa: E402
from tests.helpers import assert_contains_true_gradients, random_mlp  # noqa: E402
from verigrad import properties as props  # noqa: E402
from verigrad.bounds import Bounds, EngineOptions, compute_bounds  # noqa: E402
from verigrad.bounds.bab import BabOptions, Branching, Mode, Objective, neuron_split_reason, search  # noqa: E402
from verigrad.cli import main  # noqa: E402
from verigrad.graph.gradient_graph import Output, saliency  # noqa: E402
from verigrad.models.network import ActKind  # noqa: E402
from verigrad.perturbation import input_box  # noqa: E402
from verigrad.properties import Property  # noqa: E402
from verigrad.spec import load_spec  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FC = str(ROOT / "examples/models/mnist_fc.onnx")
TOL = 1e-9
# (sizes, activation, slope, seed, radius): ≤ 12 inputs, ≤ 3 hidden layers of ≤ 12 units
NETS = [
    ((4, 6, 5, 3), ActKind.RELU, 0.0, 10, 0.3),
    ((3, 10, 3), ActKind.RELU, 0.0, 11, 1.0),
    ((5, 7, 4), ActKind.LEAKY_RELU, 0.1, 12, 0.3),
    ((3, 6, 6, 6, 2), ActKind.RELU, 0.0, 14, 0.6),
    ((6, 8, 4), ActKind.LEAKY_RELU, 0.1, 15, 0.2),
]
IDS = ["-".join(map(str, n[0])) + f"-{n[1].value}" for n in NETS]


def _case(k: int):
    sizes, act, slope, seed, radius = NETS[k]
    net = random_mlp(act, slope, sizes=sizes, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(1, sizes[0], generator=gen, dtype=torch.float64)
    return net, input_box(x, radius, None), torch.tensor([seed % sizes[-1]])


def bab_bounds(net, box, t, opts: BabOptions):
    """The registered engine (root: CROWN) with these options."""
    return compute_bounds("bab", net, box, t, Output.LOGIT, None, EngineOptions(bab=opts))


def _crown(net):
    return lambda b, t: compute_bounds("crown", net, b, t).bounds


def _np(b: Bounds) -> tuple[np.ndarray, np.ndarray]:
    return b.lower[0].numpy(), b.upper[0].numpy()


@pytest.mark.parametrize("k", range(len(NETS)), ids=IDS)
def test_bab_to_completion_is_the_exact_range(k):
    """Run to completion, bab's bounds equal the exact range of every gradient coordinate
    (1e-9); CROWN's are wider on these cases, so the equality is not CROWN's."""
    net, box, t = _case(k)
    lo, hi, regions = exact_gradient_range(net, *_np(box), int(t))
    res = bab_bounds(net, box, t, opts=BabOptions(timeout_s=120, max_domains=10**6))
    assert "(complete)" in res.notes[0], res.notes
    lower, upper = _np(res.bounds)
    assert np.abs(lower - lo).max() <= TOL and np.abs(upper - hi).max() <= TOL, res.notes
    crown = compute_bounds("crown", net, box, t)
    assert float(crown.bounds.width.sum()) > float((hi - lo).sum()) + 1e-6


@pytest.mark.parametrize("k", range(len(NETS)), ids=IDS)
def test_bab_never_wider_than_crown_and_contains_true_gradients(k):
    """Also under a budget that stops it early: never wider than CROWN (per coordinate, up to
    round-off: an exact leaf value may sit an ulp outside CROWN's float64 bound), and autograd's
    gradient at the centre, interior points and corners lies inside."""
    net, box, t = _case(k)
    crown = compute_bounds("crown", net, box, t)
    for budget in (1, 7, 10**6):
        res = bab_bounds(net, box, t, opts=BabOptions(max_domains=budget, timeout_s=120))
        assert bool((res.bounds.lower >= crown.bounds.lower - 1e-12).all()
                    and (res.bounds.upper <= crown.bounds.upper + 1e-12).all())
        assert_contains_true_gradients(res.bounds, net, box, t, Output.LOGIT, n=300)


def test_oracle_check_would_catch_a_wrong_bab():
    """The exactness assertion can fail: bab's bounds with one leaf dropped (shrunk on the
    coordinate of largest width) miss the exact range."""
    net, box, t = _case(0)
    lo, hi, _ = exact_gradient_range(net, *_np(box), int(t))
    lower, upper = _np(bab_bounds(net, box, t, opts=BabOptions(timeout_s=60)).bounds)
    j = int(np.argmax(hi - lo))
    upper = upper.copy()
    upper[j] = (lower[j] + upper[j]) / 2
    assert containment_violations(lower, upper, lo, hi)


def _linf_property(v0: torch.Tensor, threshold: float) -> Property:
    return Property("linf", "untargeted", "linf", threshold)


def _objective(net, box, t, prop: Property, v0: torch.Tensor) -> Objective:
    def worst(maps: Bounds, boxes: Bounds) -> torch.Tensor:
        return props.worst_case(prop, v0.expand(maps.shape[0], -1), maps)

    def check(x: torch.Tensor):
        v = saliency(net, x.reshape(1, -1), t, Output.LOGIT)
        inside = bool(((x >= box.lower) & (x <= box.upper)).all())
        return x if inside and float(props.metric(prop, v0, v)[0]) > prop.threshold else None

    return Objective(worst, lambda w: w <= prop.threshold, 1.0, check)


@pytest.mark.parametrize("k", [0, 1], ids=[IDS[0], IDS[1]])
def test_bab_verdicts_equal_the_exact_ranges(k):
    """On max ‖v − v0‖_∞ ≤ δ: with δ above the exact worst case bab certifies; below it, bab
    finds a point of the box whose real gradient violates it. CROWN leaves the first unknown."""
    net, box, t = _case(k)
    lo, hi, _ = exact_gradient_range(net, *_np(box), int(t))
    v0 = saliency(net, box.center, t, Output.LOGIT)
    exact_worst = float(np.maximum(hi - v0[0].numpy(), v0[0].numpy() - lo).max())
    crown = compute_bounds("crown", net, box, t).bounds
    crown_worst = float(props.worst_case(_linf_property(v0, 1.0), v0, crown)[0])
    assert crown_worst > exact_worst * 1.01
    opts = BabOptions(timeout_s=60, max_domains=10**6)
    above = _linf_property(v0, exact_worst * (1 + 1e-6) + 1e-9)
    r = search(net, box, t, Output.LOGIT, crown, _objective(net, box, t, above, v0), opts)
    assert r.status == "certified" and r.worst <= above.threshold, r.notes
    assert crown_worst > above.threshold  # CROWN alone: unknown
    below = _linf_property(v0, exact_worst * (1 - 1e-3))
    r = search(net, box, t, Output.LOGIT, crown, _objective(net, box, t, below, v0), opts)
    assert r.status == "falsified", r.notes
    x = r.witness
    v = saliency(net, x.reshape(1, -1), t, Output.LOGIT)
    assert float(props.metric(below, v0, v)[0]) > below.threshold


def test_strong_branching_needs_fewer_domains_than_the_layer_rule():
    """Property-directed branching decides with no more splits than the layer-order rule."""
    net, box, t = _case(0)
    lo, hi, _ = exact_gradient_range(net, *_np(box), int(t))
    v0 = saliency(net, box.center, t, Output.LOGIT)
    worst = float(np.maximum(hi - v0[0].numpy(), v0[0].numpy() - lo).max())
    prop = _linf_property(v0, worst * 1.05)
    crown = compute_bounds("crown", net, box, t).bounds
    runs = {}
    for rule in Branching:
        opts = BabOptions(timeout_s=60, max_domains=10**6, branching=rule, lp=False, batch=1, candidates=4)
        runs[rule] = search(net, box, t, Output.LOGIT, crown, _objective(net, box, t, prop, v0), opts)
        assert runs[rule].status == "certified"
    splits = {rule: r.domains // (2 * (4 if rule == Branching.PROPERTY else 1))
              for rule, r in runs.items()}
    assert splits[Branching.PROPERTY] <= splits[Branching.LAYER], splits


def test_input_splits_on_a_smooth_net_tighten_and_stay_sound():
    """Sigmoid nets get input splits: the leaves' hull is never wider than CROWN, strictly
    narrower with enough domains, and contains autograd's gradients."""
    net = random_mlp(ActKind.SIGMOID, sizes=(3, 8, 8, 3), seed=3)
    assert neuron_split_reason(net) is not None
    box = input_box(torch.full((1, 3), 0.4, dtype=torch.float64), 0.4, None)
    t = torch.tensor([1])
    crown = compute_bounds("crown", net, box, t)
    res = bab_bounds(net, box, t, opts=BabOptions(max_domains=150, batch=8))
    assert "input splits" in res.notes[0]
    assert bool((res.bounds.width <= crown.bounds.width + 1e-15).all())
    assert float(res.bounds.width.sum()) < 0.9 * float(crown.bounds.width.sum())
    assert_contains_true_gradients(res.bounds, net, box, t, Output.LOGIT, n=300)
    forced = bab_bounds(net, box, t, opts=BabOptions(mode=Mode.NEURONS))  # refused, named, IBP instead
    assert forced.actual_method == "ibp" and any("neuron splits need" in n for n in forced.notes), forced.notes


def test_bab_refuses_parameter_boxes_and_compute_bounds_falls_back():
    from verigrad.perturbation import ParamBoxSpec

    net, box, t = _case(0)
    params = ParamBoxSpec(gamma=0.01, layers=("fc0",)).build(net)
    res = compute_bounds("bab", net, box, t, Output.LOGIT, params)
    assert res.actual_method == "ibp" and any("parameter boxes" in n for n in res.notes)


# ------------------------------------------------------------------------- the pipeline


def _spec(tmp_path: Path, **over) -> Path:
    d = {
        "model": {"path": FC, "input_range": [0.0, 1.0]},
        "data": {"dataset": "mnist_sample", "start": 2, "end": 3},
        "explanation": {"method": "saliency", "output": "logit", "target": "predicted"},
        "perturbation": {"input": {"norm": "inf", "epsilon": 0.001}},
        "properties": [{"name": "cos", "kind": "untargeted", "metric": "cosine", "threshold": 0.95},
                       {"name": "linf", "kind": "untargeted", "metric": "linf", "threshold": 0.05}],
        "bounds": {"methods": ["crown", "bab"], "bab": {"timeout_s": 5}},
        "attack": {"order": "after", "steps": 5, "restarts": 1},
        "general": {"results": str(tmp_path / "res")},
    }
    for k, v in over.items():
        d[k] = {**d[k], **v} if isinstance(v, dict) and isinstance(d.get(k), dict) else v
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


@pytest.mark.slow
def test_pipeline_bab_decides_what_crown_leaves_unknown(tmp_path):
    """MNIST FC, sample 2, ε = 0.002: CROWN leaves cosine ≥ 0.95 unknown (0.934, measured), bab
    certifies it; the ℓ∞ property is falsified (a witness, by the attacks or bab's own points)
    and replays."""
    problem = vmod.prepare(load_spec(_spec(tmp_path, perturbation={"input": {"norm": "inf", "epsilon": 0.002}})))
    r = vmod.verify_instance(problem, 0)
    crown, bab = (e for e in r.engines if e.method in ("crown", "bab"))
    by = {e.method: {p.name: p for p in e.properties} for e in (crown, bab)}
    assert by["crown"]["cos"].verdict == props.Verdict.UNKNOWN
    assert by["bab"]["cos"].verdict == props.Verdict.CERTIFIED and r.verdicts["cos"] == props.Verdict.CERTIFIED
    assert by["bab"]["cos"].worst_case >= by["crown"]["cos"].worst_case  # never worse (cosine: larger is better)
    assert r.verdicts["linf"] == props.Verdict.FALSIFIED and r.attacks["linf"].witness is not None
    assert any("cos: certified; bab" in n for n in bab.notes)
    assert float(bab.max_width) <= float(crown.max_width) + 1e-12


def test_spec_refuses_bab_where_it_does_not_apply(tmp_path):
    runner = CliRunner()
    for over, key in [({"second_order": {"hessian": ["bab"]}}, "second_order.hessian"),
                      ({"radius": {"search": True, "methods": ["bab"]}}, "radius.methods"),
                      ({"bounds": {"methods": ["bab"], "bab": {"root": "bab"}}}, "bounds.bab.root"),
                      ({"bounds": {"methods": ["bab"], "bab": {"timeout_s": 0}}}, "bounds.bab.timeout_s"),
                      ({"explanation": {"method": "integrated_gradients"}}, "bounds.methods")]:
        res = runner.invoke(main, ["verify", str(_spec(tmp_path, **over))])
        assert res.exit_code == 2, (over, res.output)
        assert key in res.output and "Traceback" not in res.output, res.output


def test_bab_options_reach_the_engine(tmp_path):
    spec = load_spec(_spec(tmp_path, bounds={"bab": {"timeout_s": 7, "max_domains": 99, "batch": 3,
                                                     "branching": "layer", "candidates": 2, "root": "ibp"}}))
    o = spec.bounds.engine_options().bab
    assert (o.timeout_s, o.max_domains, o.batch, o.branching, o.candidates, o.root) == (7, 99, 3, Branching.LAYER, 2,
                                                                                        "ibp")
    assert math.isclose(BabOptions().timeout_s, spec_default_timeout())


def spec_default_timeout() -> float:
    from verigrad.spec import BabSpec

    return BabSpec().timeout_s


def test_compare_does_not_run_bab(tmp_path, monkeypatch):
    """compare's default engines are every engine but bab (a search per property)."""
    import verigrad.cli as cli

    seen = {}
    monkeypatch.setattr(cli, "_run", lambda spec, flags, *a: seen.update(flags))
    res = CliRunner().invoke(main, ["compare", str(_spec(tmp_path))])
    assert res.exit_code == 0, res.output
    assert set(seen["methods"]) == {"ibp", "crown", "alpha-crown"}


def test_engine_options_default_is_shared():
    assert EngineOptions().bab == BabOptions()


# -- rounding: neuron-split leaves are rigorous -------------------------------------------------

def test_an_exact_leaf_encloses_a_gradient_float32_cancels():
    """1 → 3 → relu → 1 with weights 2^24, 1, 2^24 and signs +, +, −: every neuron active on the
    box, so the root domain is an exact leaf whose gradient 2^24 + 1 − 2^24 = 1 float32 computes
    as 0; the leaf's allowance γ_n·M (M = 2^25 + 1, the absolute evaluation) keeps it."""
    from verigrad.models.network import Activation, Linear, Network

    f32 = torch.float32
    w1 = torch.tensor([[2.0 ** 24], [1.0], [2.0 ** 24]], dtype=f32)
    w2 = torch.tensor([[1.0, 1.0, -1.0]], dtype=f32)
    net = Network((Linear("a", w1, torch.zeros(3, dtype=f32)), Activation("r", ActKind.RELU),
                   Linear("b", w2, torch.zeros(1, dtype=f32))), (1,), "cancelling_relu")
    box = Bounds(torch.tensor([[0.5]], dtype=f32), torch.tensor([[0.75]], dtype=f32))
    t = torch.tensor([0])
    assert float(saliency(net, box.lower, t)) == 0.0
    res = compute_bounds("bab", net, box, t, Output.LOGIT, None, EngineOptions(bab=BabOptions(root="ibp")))
    assert res.rigorous and "complete" in res.notes[0]
    assert float(res.bounds.lower) <= 1.0 <= float(res.bounds.upper)


@pytest.mark.parametrize("eps", [0.0, 0.05])
@pytest.mark.parametrize("act, param", [(ActKind.RELU, 0.0), (ActKind.LEAKY_RELU, 0.1)])
def test_float32_bab_encloses_the_float64_gradient(act, param, eps):
    f32 = torch.float32
    net = random_mlp(act, param, sizes=(6, 8, 8, 3), seed=5, dtype=f32)
    x = torch.rand(1, 6, generator=torch.Generator().manual_seed(6), dtype=f32)
    box, t = input_box(x, eps, (0.0, 1.0)), torch.tensor([1])
    res = compute_bounds("bab", net, box, t, Output.LOGIT, None, EngineOptions(bab=BabOptions(timeout_s=5.0)))
    assert res.rigorous
    lo, up = res.bounds.lower.double(), res.bounds.upper.double()
    assert_contains_true_gradients(Bounds(lo, up), net.to(dtype=torch.float64), box.to(torch.float64), t,
                                   Output.LOGIT, n=200, tol=0.0)


# -- leaves bounded by CROWN with the domain's pre-activation boxes ----------------------------

def test_crown_leaves_are_inside_interval_leaves_and_contain_the_domains_gradients(monkeypatch):
    import verigrad.bounds.bab as bab
    from verigrad.bounds import domain_engine
    from verigrad.bounds.bab import Leaf, Mode, _acts, _child, _Search
    from verigrad.bounds.lirpa import crown_bounds

    # the interval pass alone: on this two-layer MLP the symbolic pass equals CROWN's map
    # (tests/test_bab_symbolic.py), which would leave the CROWN leaf nothing to tighten
    monkeypatch.setattr(bab, "_symbolic", lambda *a, **k: (None, None))

    net = random_mlp(ActKind.RELU, sizes=(6, 16, 16, 3), seed=21)
    x = torch.rand(1, 6, generator=torch.Generator().manual_seed(22), dtype=torch.float64)
    box, t = input_box(x, 0.3, None), torch.tensor([1])
    root = crown_bounds(net, box, t).bounds
    obj = Objective(worst=lambda m, b: m.width.flatten(1).sum(1), holds=lambda w: w <= 0)
    searches = {leaf: _Search(net, box, t, Output.LOGIT, root, obj, BabOptions(leaf=leaf), Mode.NEURONS, None,
                              domain_engine(net, Output.LOGIT, EngineOptions()))
                for leaf in (Leaf.INTERVAL, Leaf.CROWN)}
    first = searches[Leaf.INTERVAL].bound_neurons([{}])[0]
    i = _acts(net)[1]  # a neuron of the second activation: its domains are correlated through the first
    zl, zu = first.info[0].pre[i]
    j = int(((zl < 0) & (zu > 0)).flatten().nonzero()[0])
    kids = [_child(net, {}, i, j, side, "cpu") for side in (1, -1)]
    got = {leaf: s.bound_neurons(kids) for leaf, s in searches.items()}
    pts = torch.cat([box.lower + torch.rand(4000, 6, generator=torch.Generator().manual_seed(23), dtype=torch.float64)
                     * (box.upper - box.lower), box.lower, box.upper])
    z = net.evaluate(pts)[net.wiring[i][0]].reshape(len(pts), -1)[:, j]
    g = saliency(net, pts, t.expand(len(pts)))
    narrower = 0
    for k, side in enumerate((1, -1)):
        a, c = got[Leaf.INTERVAL][k], got[Leaf.CROWN][k]
        assert a is not None and c is not None
        assert bool((c.lower >= a.lower).all() and (c.upper <= a.upper).all())
        narrower += int((c.upper - c.lower < a.upper - a.lower - 1e-9).sum())
        inside = (z > 0) if side > 0 else (z <= 0)
        assert int(inside.sum()) > 10
        gi = g[inside]
        assert bool(((gi >= c.lower) & (gi <= c.upper)).all()), float(torch.maximum(c.lower - gi, gi - c.upper).max())
    assert narrower > 0  # CROWN with the domain's boxes is tighter than the interval pass somewhere


def test_no_step_starts_that_would_end_past_the_budget(monkeypatch):
    """With each split domain costing 0.4 s and 1 s of budget, the search ends within the
    budget (the last step's time per domain predicts the next step's): it used to take a first
    step of four domains, 1.6 s."""
    import verigrad.bounds.bab as babmod

    net, box, t = _case(3)
    real = babmod._step_neurons
    sizes = []

    def slow(search, batch):
        sizes.append(len(batch))
        time.sleep(0.4 * len(batch))
        return real(search, batch)

    monkeypatch.setattr(babmod, "_step_neurons", slow)
    obj = Objective(worst=lambda m, b: m.width.flatten(1).sum(1), holds=lambda w: w < -1.0)
    res = search(net, box, t, Output.LOGIT, compute_bounds("crown", net, box, t).bounds, obj,
                 BabOptions(timeout_s=1.0, attack_share=0.0))
    assert res.status == "unknown" and sizes and sizes[0] == 1
    assert res.time_s <= 1.0 + 0.15, (res.time_s, sizes)


def test_time_a_search_leaves_goes_to_the_inputs_later_searches(tmp_path, monkeypatch):
    """Three properties CROWN leaves undecided (attacks skipped), timeout_s = 4: the first
    search gets 4 s and (here) takes 1, the second gets (12 − 1) / 2 = 5.5 and takes 5.5, the
    third gets max(4, 12 − 6.5) = 5.5; budgets are recorded in the search records."""
    import verigrad.bounds.bab as bmod

    given, took = [], iter([1.0, 5.5, 0.5])

    def fake(net, box, target, output, root, objective, opts, *a, **k):
        given.append(opts.timeout_s)
        return bmod.BabResult("unknown", math.inf, root, 1, 0, 1, next(took), False, Mode.NEURONS, notes=("fake",))

    monkeypatch.setattr(bmod, "search", fake)
    strict = [{"name": f"l{i}", "kind": "untargeted", "metric": "linf", "threshold": 1e-9 * (i + 1)} for i in range(3)]
    problem = vmod.prepare(load_spec(_spec(tmp_path, properties=strict, attack={"order": "skip"},
                                           bounds={"bab": {"timeout_s": 4}})))
    r = vmod.verify_instance(problem, 0)
    assert given == [4.0, 5.5, 5.5]
    bab = next(e for e in r.engines if e.method == "bab")
    assert [bab.search[f"l{i}"]["budget_s"] for i in range(3)] == given
