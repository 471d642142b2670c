"""Channel Lipschitz scores: pure numpy, a weight array in, one score per output channel out.

docs/algorithms.md, "Scores". Every function takes the canonical weight ``w`` of shape ``(K, C, *kernel)``
(output channel first; ``C`` the input channels of that channel's group; an FC layer is ``(K, 1, in)``)
and returns a float64 vector of length ``K``, before the per-channel affine scale is applied
(:func:`apply_scale`).

- :func:`spectral` (CLP paper, section 4.1: the UCLC; 4.4 for BatchNorm): largest singular value of ``W_k`` reshaped to
  ``(C, prod(kernel))``, computed for all channels at once from the smaller Gram matrix.
- :func:`l2` (LPP paper, section 3.2): Frobenius norm of ``W_k``.
- :func:`exact` (Sedghi, Gupta & Long 2019): the operator norm of the circular convolution from the
  layer's input to channel ``k`` at a given input size, strides and dilations included.
"""

from __future__ import annotations

import numpy as np

# Upper bound on elements of a temporary array built at once (float64: 8 bytes each).
_CHUNK_ELEMS = 8_000_000


def _matrices(w: np.ndarray) -> np.ndarray:
    w = np.asarray(w, dtype=np.float64)
    if w.ndim < 2:
        raise ValueError(f"a channel weight needs rank >= 2, got shape {w.shape}")
    k, c = w.shape[0], w.shape[1]
    return w.reshape(k, c, -1)


def spectral(w: np.ndarray) -> np.ndarray:
    """Largest singular value of each ``W_k`` as a ``(C, prod(kernel))`` matrix.

    Uses the eigenvalues of the Gram matrix ``M M^T`` or ``M^T M``, whichever is smaller (for a 3x3
    convolution a batch of 9x9 symmetric matrices), which is exact in float64 and avoids one SVD per
    channel. A depthwise or FC channel (one row or one column) reduces to an L2 norm.
    """
    m = _matrices(w)
    k, a, b = m.shape
    if a == 1 or b == 1:
        return np.sqrt(np.einsum("kab,kab->k", m, m))
    out = np.empty(k, dtype=np.float64)
    step = max(1, _CHUNK_ELEMS // max(1, a * b + min(a, b) ** 2))
    for lo in range(0, k, step):
        part = m[lo : lo + step]
        gram = part @ part.transpose(0, 2, 1) if a <= b else part.transpose(0, 2, 1) @ part
        top = np.linalg.eigvalsh(gram)[:, -1]
        out[lo : lo + step] = np.sqrt(np.clip(top, 0.0, None))
    return out


def l2(w: np.ndarray) -> np.ndarray:
    """Frobenius norm of each ``W_k`` (the LPP score)."""
    m = _matrices(w)
    return np.sqrt(np.einsum("kab,kab->k", m, m))


def _geometry(w, input_size, strides, dilations):
    """Checked float64 weight, spatial rank, input size, strides and dilations of an ``exact`` score."""
    w = np.asarray(w, dtype=np.float64)
    nd = w.ndim - 2
    size = tuple(int(n) for n in input_size)
    if len(size) != nd or any(n <= 0 for n in size):
        raise ValueError(f"input size {size} does not match a {nd}-D kernel")
    return w, nd, size, tuple(strides or (1,) * nd), tuple(dilations or (1,) * nd)


def _kernel_spectrum(part: np.ndarray, grid: tuple[int, ...], dilations: tuple[int, ...]) -> np.ndarray:
    """DFT over a circular ``grid`` of each kernel slice, taps placed ``dilation`` apart (wrapping around)."""
    idx = [(np.arange(kd) * d) % n for kd, d, n in zip(part.shape[2:], dilations, grid, strict=True)]
    placed = np.zeros(part.shape[:2] + grid, dtype=np.float64)
    # np.add.at accumulates taps that wrap onto the same grid point.
    np.add.at(placed, (slice(None), slice(None), *np.ix_(*idx)), part)
    return np.fft.fftn(placed, axes=tuple(range(2, 2 + len(grid))))


def exact(
    w: np.ndarray,
    input_size: tuple[int, ...],
    strides: tuple[int, ...] | None = None,
    dilations: tuple[int, ...] | None = None,
) -> np.ndarray:
    """Exact Lipschitz constant (L2 operator norm) of ``x -> conv(x)_k`` with circular padding.

    For stride 1 the map is diagonal in the Fourier basis: its norm is ``max_f ||DFT(W_k)[:, f]||_2``
    over input channels (Sedghi et al. 2019, Theorem 6). With stride ``s`` (per axis, product ``S``) the
    output at frequency ``f`` mixes the ``S`` aliases ``f + a N/s`` of the input, so the norm is
    ``max_f ||DFT(W_k)[:, aliases of f]||_2 / sqrt(S)``. Dilation places the taps ``d`` apart; taps that
    fall outside an input smaller than the kernel wrap around (circular convolution). ``input_size`` gives
    the spatial size of the input; each must be divisible by its stride.
    """
    w, nd, size, strides, dilations = _geometry(w, input_size, strides, dilations)
    if any(n % s for n, s in zip(size, strides, strict=True)):
        raise ValueError(f"input size {size} is not divisible by strides {strides}")
    k, c = w.shape[:2]
    out = np.empty(k, dtype=np.float64)
    per_channel = c * int(np.prod(size)) * 2
    step = max(1, _CHUNK_ELEMS // max(1, per_channel))
    s_total = float(np.prod(strides))
    for lo in range(0, k, step):
        spec = _kernel_spectrum(w[lo : lo + step], size, dilations)
        power = (spec.real**2 + spec.imag**2).sum(axis=1)  # (k, *size): sum over input channels
        # Fold the S aliases of each output frequency together: axis n -> (s, n/s), sum over s.
        shape = [power.shape[0]]
        for n, s in zip(size, strides, strict=True):
            shape += [s, n // s]
        folded = power.reshape(shape).sum(axis=tuple(1 + 2 * i for i in range(nd)))
        out[lo : lo + step] = np.sqrt(folded.reshape(folded.shape[0], -1).max(axis=1) / s_total)
    return out


def exact_transposed(
    w: np.ndarray,
    input_size: tuple[int, ...],
    strides: tuple[int, ...] | None = None,
    dilations: tuple[int, ...] | None = None,
) -> np.ndarray:
    """Exact Lipschitz constant of ``x -> conv_transpose(x)_k`` with circular padding (ConvTranspose).

    ``w`` is the canonical ``(K, C, *kernel)`` view (output channel first). A transposed convolution with
    stride ``s`` zero-upsamples its input of size ``N`` to ``M = s N`` and convolves; the upsampled signal's
    spectrum repeats every ``N`` frequencies, so output frequencies ``g = f + a N`` (``a < s``) all read input
    frequency ``f``. The map from ``X(f)`` (one value per input channel) to those ``S = prod(s)`` outputs is
    the ``S x C`` matrix ``A_f[a, c] = DFT(W_kc)(f + a N) / sqrt(S)``; the norm is ``max_f sigma_max(A_f)``.
    With stride 1 this is :func:`exact`.
    """
    w, nd, size, strides, dilations = _geometry(w, input_size, strides, dilations)
    out_size = tuple(n * s for n, s in zip(size, strides, strict=True))
    k, c = w.shape[:2]
    s_total = int(np.prod(strides))
    out = np.empty(k, dtype=np.float64)
    step = max(1, _CHUNK_ELEMS // max(1, c * int(np.prod(out_size)) * 4))
    for lo in range(0, k, step):
        spec = _kernel_spectrum(w[lo : lo + step], out_size, dilations)  # (k, C, *M)
        # Split each axis M = s * N into (alias a, frequency f), then gather A_f: (k, *f, C, S).
        shape = [spec.shape[0], c]
        for n, st in zip(size, strides, strict=True):
            shape += [st, n]
        v = spec.reshape(shape)
        alias_axes = [2 + 2 * i for i in range(nd)]
        freq_axes = [3 + 2 * i for i in range(nd)]
        v = np.transpose(v, [0, *freq_axes, 1, *alias_axes]).reshape(v.shape[0], -1, c, s_total)
        gram = v.conj().transpose(0, 1, 3, 2) @ v if s_total <= c else v @ v.conj().transpose(0, 1, 3, 2)
        top = np.linalg.eigvalsh(gram)[..., -1]
        out[lo : lo + step] = np.sqrt(np.clip(top.max(axis=1), 0.0, None) / s_total)
    return out


def apply_scale(scores: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
    """Multiply channel scores by ``|scale_k|``, the paired affine's per-channel scale (section 2)."""
    if scale is None:
        return scores
    return scores * np.abs(np.asarray(scale, dtype=np.float64).reshape(-1))


SCORERS = {"spectral": spectral, "l2": l2}
