"""Numerical cores of the data-free defences (onnxclp.defences) on hand-built models with known answers.

MM-BD (Wang et al., IEEE S&P 2024): a tiny CNN with an injected trigger path to class 3 (a channel that
fires on bright 3x3 patches of one colour channel, wired to class 3 with a large weight) must be flagged with target 3
and a small p-value; the same network without the path must not be flagged. OTBR (Lin et al., AAAI 2025):
the channel whose outgoing weight is largest changes most under random-noise unlearning (its gradient is
proportional to that weight); the OT fusion recovers known permutations and reduces to the identity when
nothing was pruned.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from onnxclp.bridge import load
from onnxclp.defences import (
    ScoredLayer,
    SyntheticInput,
    fuse_layer,
    gamma_null_pvalue,
    mmbd,
    ot_fuse,
    otbr_channel_scores,
    select_top,
)

pytest.importorskip("scipy")
torch.set_num_threads(2)


class Tiny(nn.Module):
    """conv3x3 (8 channels, +1 trigger channel) -> ReLU -> global average pool -> linear (10 classes)."""

    def __init__(self, seed: int, trigger: bool) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(3, 9, 3, padding=1)
        self.fc = nn.Linear(9, 10)
        with torch.no_grad():
            self.conv.weight.copy_(0.3 * torch.randn(9, 3, 3, 3, generator=g))
            self.conv.bias.copy_(0.1 * torch.randn(9, generator=g))
            self.fc.weight.copy_(0.5 * torch.randn(10, 9, generator=g))
            self.fc.bias.zero_()
            # channel 8: fires where a 3x3 patch of the first colour channel is bright (sum of 9 values > 5;
            # about a third of the patches of a random image are, so the search has a gradient to follow)
            self.conv.weight[8] = 0.0
            self.conv.weight[8, 0] = 1.0
            self.conv.bias[8] = -5.0
            self.fc.weight[:, 8] = 0.0
            if trigger:
                self.fc.weight[3, 8] = 50.0

    def forward(self, x):
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 1), 1))


def _bridge(model: nn.Module, tmp_path, shape=(1, 3, 8, 8)):
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.rand(*shape),), str(path), dynamo=False, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "n"}})  # fmt: skip
    return load(path)


def test_mmbd_flags_the_injected_target(tmp_path):
    module = _bridge(Tiny(seed=0, trigger=True), tmp_path)
    res = mmbd(module, (3, 8, 8), steps=60, restarts=3, seed=0)
    assert res.target == 3
    assert res.backdoored and res.p_value < 1e-3
    assert res.margins[3] > 5 * np.delete(res.margins, 3).max()


def test_mmbd_clean_model_not_flagged(tmp_path):
    module = _bridge(Tiny(seed=0, trigger=False), tmp_path)
    res = mmbd(module, (3, 8, 8), steps=60, restarts=3, seed=0)
    assert not res.backdoored and res.p_value > 0.05


def test_mmbd_normalised_inputs_stay_in_range(tmp_path):
    """With mean/std the search is over [0, 1] images: the model sees (x - mean) / std, and the trigger
    (a white patch, 1.0 in image space) is still reachable; the module is left untouched."""

    class Normalised(nn.Module):
        def __init__(self, inner, mean, std):
            super().__init__()
            self.inner, self.mean, self.std = inner, mean.view(1, 3, 1, 1), std.view(1, 3, 1, 1)

        def forward(self, z):  # the exported model takes normalised z; undo it for the inner network
            return self.inner(z * self.std + self.mean)

    mean, std = torch.tensor([0.49, 0.48, 0.45]), torch.tensor([0.25, 0.24, 0.26])
    module = _bridge(Normalised(Tiny(seed=1, trigger=True), mean, std), tmp_path)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    res = mmbd(module, SyntheticInput((3, 8, 8), mean=mean.tolist(), std=std.tolist()), steps=60, restarts=3, seed=0)
    assert res.target == 3 and res.backdoored
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    assert all(p.requires_grad for p in module.parameters())


def test_mmbd_deterministic(tmp_path):
    module = _bridge(Tiny(seed=2, trigger=True), tmp_path)
    a = mmbd(module, (3, 8, 8), steps=10, restarts=2, seed=5)
    b = mmbd(module, (3, 8, 8), steps=10, restarts=2, seed=5)
    assert np.array_equal(a.margins, b.margins) and a.p_value == b.p_value


def test_gamma_null_pvalue():
    rng = np.random.default_rng(0)
    null = rng.gamma(4.0, 0.5, size=9) + 1.0
    p_out, target, _, _ = gamma_null_pvalue([*null, 40.0])
    assert target == 9 and p_out < 1e-3
    p_near, _, _, _ = gamma_null_pvalue([*null, float(null.max()) + 0.1])
    p_far, _, _, _ = gamma_null_pvalue([*null, float(null.max()) + 2.0])
    assert p_out < p_far < p_near <= 1.0
    assert gamma_null_pvalue([1.0] * 9 + [2.0])[0] == 0.0  # degenerate null: any excess is significant
    assert gamma_null_pvalue([1.0] * 10)[0] == 1.0


# ------------------------------------------------------------------------------------------------------------
# OTBR


class Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.fc = nn.Linear(8, 10)
        with torch.no_grad():
            self.conv1.weight.copy_(0.3 * torch.randn(8, 3, 3, 3, generator=g))
            self.conv2.weight.copy_(0.3 * torch.randn(8, 8, 3, 3, generator=g))
            self.conv2.weight[:, 5] = 0.3  # channel 5 of conv1 feeds conv2 positively
            self.fc.weight.copy_(0.2 * torch.randn(10, 8, generator=g))
            self.fc.weight[:, 6] = 0.0
            self.fc.weight[3, 6] = 20.0  # conv2's channel 6 drives class 3 alone, 100x the others

    def forward(self, x):
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1))


def _names(module):
    convs = [n for n in module.float_initializer_names if module.param_for(n).dim() == 4]
    assert len(convs) == 2
    return convs


def test_otbr_scores_find_the_high_gain_channel(tmp_path):
    module = _bridge(Chain(), tmp_path)
    conv1, conv2 = _names(module)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    res = otbr_channel_scores(module, [conv1, ScoredLayer(conv2)], (3, 8, 8), steps=5, batch_size=16, seed=0)
    assert set(res.scores) == {conv1, conv2}
    assert res.scores[conv1].shape == (8,) and res.scores[conv2].shape == (8,)
    assert int(np.argmax(res.scores[conv2])) == 6
    assert res.loss_last > res.loss_first  # gradient ascent on the random labels' loss
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())  # pure
    again = otbr_channel_scores(module, [conv1, conv2], (3, 8, 8), steps=5, batch_size=16, seed=0)
    assert all(np.array_equal(res.scores[k], again.scores[k]) for k in res.scores)
    top = select_top(res.scores, 1 / 16)
    assert top == {conv1: [], conv2: [6]}


def test_otbr_scores_fc_out_axis(tmp_path):
    """A Gemm weight [out, in] has output axis 0; (name, axis) pairs are accepted."""
    module = _bridge(Chain(), tmp_path)
    fc = next(n for n in module.float_initializer_names if module.param_for(n).shape == (10, 8))
    res = otbr_channel_scores(module, [(fc, 0)], (3, 8, 8), steps=2, batch_size=8)
    assert res.scores[fc].shape == (10,)


def test_fuse_identity_when_nothing_pruned():
    w = np.random.default_rng(0).normal(size=(6, 4, 3, 3)).astype(np.float32)
    f = fuse_layer(w, w, 0.7)
    assert np.array_equal(f.perm, np.arange(6))
    assert np.allclose(f.weight, w, atol=1e-6) and f.weight.dtype == np.float32


def test_fuse_recovers_permutation_and_aligns_the_next_layer():
    rng = np.random.default_rng(1)
    w1, w2 = rng.normal(size=(6, 3, 3, 3)), rng.normal(size=(5, 6, 3, 3))
    b1 = rng.normal(size=6)
    p = rng.permutation(6)
    # the "pruned" model is the original with conv1's channels reordered (and conv2's inputs to match)
    fused = ot_fuse([w1[p], w2[:, p]], [w1, w2], 0.5, biases=[(b1[p], b1), None])
    assert np.array_equal(p[fused[0].perm], np.arange(6))
    assert np.allclose(fused[0].weight, w1) and np.allclose(fused[0].bias, b1)
    assert np.allclose(fused[1].weight, w2)
    # without chaining, conv2's inputs stay misaligned
    unchained = ot_fuse([w1[p], w2[:, p]], [w1, w2], 0.5, chain=False)
    assert not np.allclose(unchained[1].weight, w2)


def test_fuse_pruned_channel_is_scaled_down():
    """A zeroed (pruned) channel matched to itself: the fused channel is (1 - lam) * original."""
    rng = np.random.default_rng(2)
    w = rng.normal(size=(8, 4)) + np.arange(8)[:, None] * 5  # well-separated channels: identity matching
    pruned = w.copy()
    pruned[0] = 0.0  # the smallest channel: the cheapest to match a zero row to
    f = fuse_layer(pruned, w, 0.8)
    assert np.array_equal(f.perm, np.arange(8))
    assert np.allclose(f.weight[0], 0.2 * w[0]) and np.allclose(f.weight[1:], w[1:])
    # output axis 1 (a MatMul weight [in, out]) gives the same result transposed
    g = fuse_layer(pruned.T.copy(), w.T.copy(), 0.8, out_axis=1)
    assert np.allclose(g.weight, f.weight.T)


def test_otbr_is_marked_experimental_and_reports_what_it_changed(tmp_path):
    """Issue 21.4: a data-free run that runs the model is never silent about what it changed: the share of 500
    seeded procedural images whose predicted class the result changed is a report note (the same on a rerun),
    and OTBR says it is experimental (methods table, JSON, report)."""
    import sys
    from pathlib import Path

    import onnx

    import onnxclp
    from onnxclp.methods import describe

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "examples"))
    try:
        from make_example_model import build
    finally:
        sys.path.pop(0)
    path = tmp_path / "m.onnx"
    onnx.save(build(seed=3, planted=4), path)
    notes = []
    for _ in range(2):
        _, rep = onnxclp.sanitize(str(path), "otbr", ratio=0.2, steps=2)
        notes.append([n for n in rep.notes if "procedural images" in n])
    assert len(notes[0]) == 1 and notes[0] == notes[1]
    assert "changed its predicted class on" in notes[0][0] and "of 500 procedural images" in notes[0][0]
    assert any(n.startswith("WARNING: otbr is experimental") for n in rep.notes)
    row = next(r for r in describe() if r["name"] == "otbr")
    assert row["experimental"] and row["description"].startswith("EXPERIMENTAL")
    _, rep = onnxclp.sanitize(str(path), "clp")  # weight-only: no probe, no runtime
    assert not any("procedural images" in n for n in rep.notes)


class ConvHead(nn.Module):
    """Tiny's features read by a 1x1-convolution classifier after the pool: logits N x 10 x 1 x 1 (SqueezeNet's
    form, as the ONNX Model Zoo's classics ship it)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 10, 1)

    def forward(self, x):
        return self.head(nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 1))


def test_otbr_reads_a_1x1_conv_classifiers_four_d_logits(tmp_path):
    """The unlearning's cross-entropy takes the N x K x 1 x 1 output as N x K (it counted 1 class and failed
    with torch's 'spatial targets' error before)."""
    module = _bridge(ConvHead(), tmp_path)
    conv = next(n for n in module.float_initializer_names if module.param_for(n).shape == (8, 3, 3, 3))
    res = otbr_channel_scores(module, [conv], (3, 8, 8), steps=3, batch_size=8)
    assert res.scores[conv].shape == (8,) and np.isfinite(res.scores[conv]).all()
