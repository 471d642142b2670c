"""Scores against hand-computed numbers, per-channel SVD, and the dense operator (docs/algorithms.md, "Scores")."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from onnxclp import scores


def test_spectral_and_l2_hand_computed():
    # Channel 0: diag(3, 4) -> sigma_max 4, Frobenius 5. Channel 1: rank one [[1,1],[1,1]] -> 2, 2.
    w = np.array([[[3.0, 0.0], [0.0, 4.0]], [[1.0, 1.0], [1.0, 1.0]]]).reshape(2, 2, 2, 1)
    np.testing.assert_allclose(scores.spectral(w), [4.0, 2.0])
    np.testing.assert_allclose(scores.l2(w), [5.0, 2.0])


@pytest.mark.parametrize("shape", [(16, 8, 3, 3), (8, 1, 3, 3), (4, 5, 1, 1), (6, 3, 5), (5, 2, 3, 3, 3), (7, 1, 20)])
def test_spectral_matches_per_channel_svd(shape):
    rng = np.random.default_rng(0)
    w = rng.normal(size=shape)
    ref = [np.linalg.svd(w[k].reshape(shape[1], -1), compute_uv=False).max() for k in range(shape[0])]
    np.testing.assert_allclose(scores.spectral(w), ref, rtol=1e-9)


def test_depthwise_spectral_is_kernel_norm():
    w = np.random.default_rng(1).normal(size=(4, 1, 3, 3))
    np.testing.assert_allclose(scores.spectral(w), np.linalg.norm(w.reshape(4, -1), axis=1))


def test_apply_scale_uses_absolute_value():
    np.testing.assert_allclose(scores.apply_scale(np.array([1.0, 2.0]), np.array([-3.0, 0.5])), [3.0, 1.0])


def _dense_channel_operator(wk: np.ndarray, size, strides, dilations) -> np.ndarray:
    """The explicit matrix of x -> (circular conv of x with W_k, then stride) for one output channel."""
    c = wk.shape[0]
    kernel = wk.shape[1:]
    nd = len(size)
    out_size = [n // s for n, s in zip(size, strides, strict=True)]
    rows = []
    for o in itertools.product(*[range(n) for n in out_size]):
        row = np.zeros((c, *size))
        for t in itertools.product(*[range(k) for k in kernel]):
            pos = tuple((o[i] * strides[i] + t[i] * dilations[i]) % size[i] for i in range(nd))
            row[(slice(None), *pos)] += wk[(slice(None), *t)]
        rows.append(row.reshape(-1))
    return np.array(rows)


@pytest.mark.parametrize(
    ("shape", "size", "strides", "dilations"),
    [
        ((3, 2, 3, 3), (5, 5), (1, 1), (1, 1)),
        ((2, 3, 3, 3), (6, 4), (2, 2), (1, 1)),
        ((2, 2, 3, 3), (6, 6), (1, 2), (2, 1)),
        ((2, 2, 5, 5), (3, 3), (1, 1), (1, 1)),  # kernel larger than the input: taps wrap
        ((3, 2, 3), (8,), (2,), (1,)),
        ((2, 1, 2, 2, 2), (3, 4, 2), (1, 2, 1), (1, 1, 1)),
    ],
)
def test_exact_equals_dense_operator_norm(shape, size, strides, dilations):
    w = np.random.default_rng(2).normal(size=shape)
    ref = [
        np.linalg.svd(_dense_channel_operator(w[k], size, strides, dilations), compute_uv=False).max()
        for k in range(shape[0])
    ]
    np.testing.assert_allclose(scores.exact(w, size, strides, dilations), ref, rtol=1e-9)


@pytest.mark.parametrize("seed", range(5))
def test_exact_bounds(seed):
    """||W_k||_F <= exact <= spectral * sqrt(prod(kernel)) (stride 1, input at least the kernel's size)."""
    rng = np.random.default_rng(seed)
    k, c, kh, kw = 6, int(rng.integers(1, 5)), int(rng.integers(1, 4)), int(rng.integers(1, 4))
    w = rng.normal(size=(k, c, kh, kw))
    ex = scores.exact(w, (8, 8))
    assert np.all(scores.l2(w) <= ex * (1 + 1e-9))
    assert np.all(ex <= scores.spectral(w) * np.sqrt(kh * kw) * (1 + 1e-9))


def test_exact_rejects_bad_sizes():
    w = np.ones((2, 2, 3, 3))
    with pytest.raises(ValueError):
        scores.exact(w, (5, 5), (2, 2))
    with pytest.raises(ValueError):
        scores.exact(w, (5,))


def _dense_transposed_operator(wk: np.ndarray, size, strides, dilations) -> np.ndarray:
    """Explicit matrix of x -> circular ConvTranspose(x) for one output channel (input C x size)."""
    c = wk.shape[0]
    kernel = wk.shape[1:]
    nd = len(size)
    out_size = [n * s for n, s in zip(size, strides, strict=True)]
    cols = []
    for ch in range(c):
        for n in itertools.product(*[range(v) for v in size]):
            col = np.zeros(out_size)
            for t in itertools.product(*[range(kk) for kk in kernel]):
                pos = tuple((n[i] * strides[i] + t[i] * dilations[i]) % out_size[i] for i in range(nd))
                col[pos] += wk[(ch, *t)]
            cols.append(col.reshape(-1))
    return np.array(cols).T


@pytest.mark.parametrize(
    ("shape", "size", "strides", "dilations"),
    [
        ((3, 2, 3, 3), (4, 4), (1, 1), (1, 1)),
        ((2, 3, 2, 2), (3, 4), (2, 2), (1, 1)),
        ((2, 1, 4, 4), (3, 3), (2, 1), (1, 2)),
        ((3, 4, 3), (5,), (3,), (1,)),
    ],
)
def test_exact_transposed_equals_dense_operator_norm(shape, size, strides, dilations):
    w = np.random.default_rng(4).normal(size=shape)
    ref = [
        np.linalg.svd(_dense_transposed_operator(w[k], size, strides, dilations), compute_uv=False).max()
        for k in range(shape[0])
    ]
    np.testing.assert_allclose(scores.exact_transposed(w, size, strides, dilations), ref, rtol=1e-9)
