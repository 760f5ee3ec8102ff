"""Rank certificates (verigrad.ranking): the top-k overlap bound is sound on random boxes
(ties in |v0| included), never below the paper's rank argument, and the competitor count
certifies what neither the rank argument nor the per-member rule can."""
from __future__ import annotations

import torch

from verigrad.bounds.base import Bounds
from verigrad.properties import Property, _topk_members_that_stay, worst_case
from verigrad.ranking import _competitor_bound, topk_overlap_lower_bound

F64 = torch.float64


def _overlaps(v0: torch.Tensor, pts: torch.Tensor, k: int, ties: bool) -> torch.Tensor:
    """The true overlap at each point, with every tie-break of |v0| (ties: the minimum over
    the tie-breaks that a permutation of the tied features gives)."""
    a0 = v0[0].abs()
    tops = [set(a0.topk(k).indices.tolist())]
    if ties:  # the reverse tie-break too: sort by (|v0|, −index)
        order = sorted(range(a0.numel()), key=lambda i: (-float(a0[i]), -i))
        tops.append(set(order[:k]))
    return torch.tensor([min(len(t & set(p.abs().topk(k).indices.tolist())) for t in tops) for p in pts])


def test_topk_bound_is_sound_on_random_boxes_and_never_below_the_rank_argument():
    gen = torch.Generator().manual_seed(11)
    gains = 0
    for trial in range(80):
        d, k = 8 + trial % 9, 2 + trial % 5
        ties = trial % 4 == 0
        v0 = torch.randn(1, d, generator=gen, dtype=F64)
        if ties:  # equal magnitudes straddling the k-th place
            v0[0, :3] = torch.tensor([1.0, -1.0, 1.0], dtype=F64) * float(v0[0].abs().sort(descending=True).values[k - 1])
        w = torch.rand(1, d, generator=gen, dtype=F64) * (0.9 if trial % 2 else 0.3)
        box = Bounds(v0 - w * torch.rand(1, d, generator=gen, dtype=F64), v0 + w * torch.rand(1, d, generator=gen, dtype=F64))
        bound = int(topk_overlap_lower_bound(v0, box, k)[0])
        pts = box.lower + (box.upper - box.lower) * torch.rand(600, d, generator=gen, dtype=F64)
        corners = box.lower + (box.upper - box.lower) * torch.randint(0, 2, (600, d), generator=gen).to(F64)
        assert int(_overlaps(v0, torch.cat([pts, corners, v0]), k, ties).min()) >= bound, trial
        # the competitor count alone, against the whole bound: the maximum of it and the rank argument
        a0 = v0.abs()
        srt, order = torch.sort(a0, dim=1, descending=True, stable=True)
        asc = torch.flip(srt, [1]).contiguous()
        last = d - 1 - torch.searchsorted(asc, srt.contiguous(), side="left")
        lo, up = box.lower, box.upper
        amin = torch.where(lo > 0, lo, torch.where(up < 0, -up, torch.zeros_like(lo)))
        amax = torch.maximum(lo.abs(), up.abs())
        comp = int(_competitor_bound(amin.gather(1, order), amax.gather(1, order), last, k)[0])
        assert comp <= bound
        gains += comp == bound and bound > 0
    assert gains >= 20, gains


def test_competitor_count_beats_both_other_rules_by_hand():
    """d = 8, k = 3: features 0 and 1 stay above 6.5, and the only non-member that can reach
    6.5 is feature 7 (up to 7): one outsider can take one place of the top 3, so the overlap is
    ≥ 2, which the point below attains. The rank argument sees feature 7's 7 far down the
    ranking and gives 0; the per-member rule sees three features able to pass each leader
    (1 or 0, 2 and 7) and gives 0."""
    v0 = torch.tensor([[8.0, 7, 6, 5, 4, 3, 2, 1]], dtype=F64)
    lo = torch.tensor([[6.5, 6.5, 1.0, 4.0, 3.0, 2.0, 1.0, 0.5]], dtype=F64)
    up = torch.tensor([[8.5, 7.5, 8.0, 6.0, 5.0, 4.0, 3.0, 7.0]], dtype=F64)
    box = Bounds(lo, up)
    assert int(topk_overlap_lower_bound(v0, box, 3)[0]) == 2
    prop = Property("t", "topk", None, 0.5, k=3)
    assert float(_topk_members_that_stay(prop, v0, box)[0]) == 0.0
    assert float(worst_case(prop, v0, box)[0]) == 2 / 3
    v = torch.tensor([[6.5, 6.5, 8.0, 4.0, 3.0, 2.0, 1.0, 7.0]], dtype=F64)
    assert len({0, 1, 2} & set(v[0].topk(3).indices.tolist())) == 2
    # one more outsider able to reach 6.5 breaks it: overlap 1 is then attainable
    up2 = up.clone()
    up2[0, 6] = 6.6
    assert int(topk_overlap_lower_bound(v0, Bounds(lo, up2), 3)[0]) <= 1
    w = torch.tensor([[6.5, 6.5, 8.0, 4.0, 3.0, 2.0, 6.6, 7.0]], dtype=F64)
    assert len({0, 1, 2} & set(w[0].topk(3).indices.tolist())) == 1
