"""Selection rules against hand-computed cases (CLP section 3.4; docs/algorithms.md, "LPP")."""

from __future__ import annotations

import numpy as np

from onnxclp.select import classifier_topk, select_clp, select_lpp


def test_clp_uses_unbiased_std_and_strict_threshold():
    s = np.array([1.0, 1.0, 1.0, 1.0, 5.0])
    mean, std = 1.8, np.sqrt(((0.8**2) * 4 + 3.2**2) / 4)  # ddof = 1
    sel = select_clp(s, 1.0)
    assert sel.thresholds.mean == mean
    np.testing.assert_allclose(sel.thresholds.std, std)
    assert sel.prune == [4]
    # A channel exactly on the threshold is not pruned (strictly greater).
    u_edge = (5.0 - mean) / std
    assert select_clp(s, u_edge).prune == []
    assert select_clp(s, u_edge - 1e-9).prune == [4]


def test_clp_single_channel_selects_nothing():
    assert select_clp(np.array([3.0]), 0.0).prune == []


def test_all_equal_channels_prune_nothing():
    s = np.full(8, 2.5)
    assert select_clp(s, 0.0).prune == []
    sel = select_lpp(s, 0.0, -0.5, 1.0)
    assert sel.prune == [] and sel.rescale == {}


def test_lpp_upper_lower_and_band_edges():
    # mean 10, std 2 (ddof 1) by construction: values symmetric around 10.
    s = np.array([4.0, 8.0, 10.0, 10.0, 12.0, 16.0])
    mean, std = s.mean(), s.std(ddof=1)
    u, u_low, b = (15.0 - mean) / std, (5.0 - mean) / std, (15.0 - 11.0) / std
    sel = select_lpp(s, u, u_low, b)  # upper 15, lower 5, band (11, 15]
    np.testing.assert_allclose([sel.thresholds.upper, sel.thresholds.lower, sel.thresholds.rescale_from], [15, 5, 11])
    assert sel.prune == [0, 5]  # 4 < 5 and 16 > 15
    assert list(sel.rescale) == [4]  # 12 in (11, 15]
    np.testing.assert_allclose(sel.rescale[4], mean / 12.0)
    # Band edges: a score equal to the upper threshold is rescaled, one equal to the band start is not.
    s2 = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    m2, sd2 = s2.mean(), s2.std(ddof=1)
    sel2 = select_lpp(s2, (6.0 - m2) / sd2, -10.0, (6.0 - 5.0) / sd2)  # band (5, 6]
    assert sel2.prune == [6]
    assert list(sel2.rescale) == [5]


def test_topk_hand_computed_and_ties():
    w = np.array(
        [
            [0.0, 0.0, 0.0, 0.0],
            [1.0, 3.0, 3.0, 0.5],  # largest row mean -> suspected target class 1
            [0.0, 1.0, 1.0, 0.5],
        ]
    )
    # d = W[1] - mean(W[0], W[2]) = [1, 2.5, 2.5, 0.25]: the two largest are a tie at columns 1 and 2.
    t = classifier_topk(w, 2)
    assert t.target == 1 and t.columns == [1, 2]
    t1 = classifier_topk(w, 1)
    assert t1.columns == [1]  # ties broken by the lower index
    assert classifier_topk(w, 0) is None
    assert classifier_topk(w, 10).columns == [0, 1, 2, 3]
