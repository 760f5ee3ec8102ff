"""Rank certificates from coordinate bounds: how much of the top-k of |v0| survives in the top-k
of |v| for every v in a box (used by the ``topk`` property and the smoothing certificates)."""
from __future__ import annotations

import torch

from verigrad.bounds.base import Bounds

__all__ = ["topk_overlap_lower_bound"]


def topk_overlap_lower_bound(v0: torch.Tensor, bounds: Bounds, k: int) -> torch.Tensor:
    """A sound lower bound (B,) of min over v in the box of |topk(|v0|) ∩ topk(|v|)|, as a
    COUNT (divide by k for the ``topk`` property's fraction), requiring v0 in the box.

    The paper's Corollary 2 argument, on a box: rank features by |v0| (any tie-break); let
    L_K = min a⁻ over the top K and U_m = max a⁺ over ranks ≥ m (a± = range of |v_i|). If
    L_K > U_{2k−K+1}, the overlap is ≥ K: otherwise topk(|v|) holds ≥ k − K + 1 features
    outside topk(|v0|), all of rank ≥ k + 1, so one j of rank ≥ 2k − K + 1; every i of the
    top K then has |v_i| ≥ L_K > U ≥ |v_j| with j in topk(|v|), so all K are in it (strict,
    whatever the tie-breaking), and in topk(|v0|): overlap ≥ K. Also overlap ≥ 2k − d.
    Ties in |v0| are resolved pessimistically (every feature tied with the K-th counts
    toward L_K, every one tied with the m-th toward U_m), so any tie-break is covered."""
    b = Bounds(bounds.lower.reshape(bounds.shape[0], -1).to(torch.float64), bounds.upper.reshape(bounds.shape[0], -1).to(torch.float64))
    a0 = v0.reshape(v0.shape[0], -1).to(torch.float64).abs().expand_as(b.lower)
    bsz, d = b.lower.shape
    if not 1 <= k <= d:
        raise ValueError(f"k = {k} must lie in [1, {d}]")
    lo, up = b.lower, b.upper
    amin = torch.where(lo > 0, lo, torch.where(up < 0, -up, torch.zeros_like(lo)))
    amax = torch.maximum(lo.abs(), up.abs())
    sorted0, order = torch.sort(a0, dim=1, descending=True, stable=True)
    amin_s, amax_s = amin.gather(1, order), amax.gather(1, order)
    # tie groups of |v0|: the first and last sorted position of the group of each position
    asc = torch.flip(sorted0, [1])  # ascending, for searchsorted
    first = d - torch.searchsorted(asc.contiguous(), sorted0.contiguous(), side="right")
    last = d - 1 - torch.searchsorted(asc.contiguous(), sorted0.contiguous(), side="left")
    # prefix min of a⁻ over positions 0..t, suffix max of a⁺ over t..d−1
    pre_min = torch.cummin(amin_s, 1).values
    suf_max = torch.flip(torch.cummax(torch.flip(amax_s, [1]), 1).values, [1])
    best = torch.full((bsz,), float(max(0, 2 * k - d)), dtype=torch.float64, device=lo.device)
    for kk in range(1, k + 1):
        pos_k = kk - 1
        lk = pre_min.gather(1, last[:, pos_k : pos_k + 1])[:, 0]  # all tied with the K-th
        m = 2 * k - kk + 1  # 1-based rank
        if m > d:
            ok = torch.ones_like(lk, dtype=torch.bool)
        else:
            um = suf_max.gather(1, first[:, m - 1 : m])[:, 0]  # all tied with the m-th
            ok = lk > um
        best = torch.where(ok & (kk > best), torch.full_like(best, float(kk)), best)
    return torch.maximum(best, _competitor_bound(amin_s, amax_s, last, k))


def _competitor_bound(amin: torch.Tensor, amax: torch.Tensor, last: torch.Tensor, k: int
                      ) -> torch.Tensor:
    """The overlap count ≥ K′ for the largest K′ with |C| ≤ k − K′, where A is the K′ features of
    topk(|v0|) with the largest a⁻, L = min a⁻ over A and C = {j ∉ topk(|v0|) : a⁺_j ≥ L}.

    If the overlap were < K′, some i of A would be outside topk(|v|); then all k features of
    topk(|v|) have |v_j| ≥ |v_i| ≥ L, and more than k − K′ of them lie outside topk(|v0|), all
    in C. A feature counts as in topk(|v0|) only when its whole tie group of |v0| is (every
    tie-break keeps it), and as outside otherwise. Inputs sorted by |v0| descending (B, d);
    last: the last position of its tie group. Unlike the rank argument above, one large a⁺
    far down the ranking costs one place here, not the certificate."""
    bsz, d = amin.shape
    sure = last < k  # (B, d): the whole tie group lies in the top k
    neg = torch.full_like(amin, -torch.inf)
    lows = torch.sort(torch.where(sure, amin, neg), dim=1, descending=True).values[:, :k]  # L for K′ = 1..k
    outside = torch.sort(torch.where(sure, neg, amax), dim=1).values  # ascending; −∞ for members
    # |C(L)| = #{outside: a⁺ ≥ L}; members (−∞) never count since L > −∞ where it is used
    count = d - torch.searchsorted(outside.contiguous(), lows.contiguous(), side="left")
    kk = torch.arange(1, k + 1, device=amin.device).expand(bsz, k)
    ok = (count <= k - kk) & (lows > 0)  # L = −∞ (fewer sure members than K′) fails here
    # ok holds on a prefix of K′ (L falls and |C| grows with K′): its length is the bound
    return ok.to(torch.float64).cumprod(1).sum(1)
