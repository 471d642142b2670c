"""BNP: BatchNorm-statistics-based pruning on a few clean images.

Zheng, Tang, Li & Liu, "Pre-activation Distributions Expose Backdoor Neurons", NeurIPS 2022.

The paper's finding (section 3): on a backdoor neuron, the pre-activations of poisoned and of benign
inputs have clearly different moments; on other neurons they do not. A BatchNormalization kept in the
graph stores the running mean and variance of its input, its neuron's pre-activation, over the *training*
set, poisoned samples included. BNP (section 4) models the neuron's pre-activation under that statistic as
``N(mu_bn, var_bn)`` and under benign inputs as ``N(mu_c, var_c)`` (moments measured on a few clean
images), and scores each neuron by the Kullback-Leibler divergence between the two Gaussians:

    KL(N(mu_c, var_c) || N(mu_bn, var_bn)) = log(s_bn / s_c) + (var_c + (mu_c - mu_bn)^2) / (2 var_bn) - 1/2

A neuron whose KL is an outlier of its layer (``> mean + u * std``, the threshold rule of CLP by the same
authors) is pruned.

:func:`preactivation_moments` measures the clean moments of named tensors of an ONNX graph through the
torch bridge (the graph is copied with those tensors added as outputs; nothing is modified);
:func:`gaussian_kl` is the score. Pure functions; the method module (:mod:`onnxclp.methods.bnp`) reads
the BatchNormalization statistics and turns outlying channels into prunes.

Where onnxclp's reading differs (docs/algorithms.md, "BNP / EP"):
- The direction of the divergence: benign || running statistics (the benign distribution is the one
  measured; the BN statistic is the hypothesis). The variance of the BN side is ``var + epsilon``, as the BN
  itself divides by it.
- Clean moments are over images and spatial positions together (a channel's pre-activation at every
  position is one population, as BatchNorm's own statistics are).
- EP, the paper's other detector (differential entropy of each neuron's pre-activation on the *infected
  training set*), is not implemented: it needs the poisoned training data, which a user of onnxclp who
  receives a model does not have.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import onnx
import torch

U = 3.0  # the threshold rule's u (mean + u * std of the layer's KL values)


def gaussian_kl(mu_c: np.ndarray, var_c: np.ndarray, mu_bn: np.ndarray, var_bn: np.ndarray) -> np.ndarray:
    """``KL(N(mu_c, var_c) || N(mu_bn, var_bn))`` element-wise (float64; variances floored at 1e-12)."""
    mu_c, mu_bn = np.asarray(mu_c, np.float64), np.asarray(mu_bn, np.float64)
    var_c = np.maximum(np.asarray(var_c, np.float64), 1e-12)
    var_bn = np.maximum(np.asarray(var_bn, np.float64), 1e-12)
    return 0.5 * np.log(var_bn / var_c) + (var_c + (mu_c - mu_bn) ** 2) / (2.0 * var_bn) - 0.5


def preactivation_moments(
    model: onnx.ModelProto,
    store: object,
    tensors: Sequence[str],
    batches: Iterable[torch.Tensor],
    channel_axis: int = 1,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-channel mean and (population) variance of each named tensor over ``batches`` of model inputs.

    ``model`` is not modified: a copy with ``tensors`` added as graph outputs is bridged
    (:func:`onnxclp.bridge.to_torch`, reading tensors through ``store``). Moments are accumulated in float64
    over the batch and every spatial position.
    """
    from onnxclp.bridge import to_torch

    g = onnx.GraphProto()
    g.CopyFrom(model.graph)
    known = {o.name for o in g.output}
    extra = [t for t in dict.fromkeys(tensors) if t not in known]
    for t in extra:
        g.output.append(onnx.helper.make_empty_tensor_value_info(t))
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.CopyFrom(g)
    module = to_torch(copy, store=store)  # type: ignore[arg-type]
    module.eval()
    names = module.output_names
    sums: dict[str, np.ndarray] = {}
    sqs: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    with torch.no_grad():
        for x in batches:
            out = module(x)
            outs = out if isinstance(out, tuple) else (out,)
            values = dict(zip(names, outs, strict=False))
            for t in tensors:
                v = values[t].to(torch.float64)
                v = v.movedim(channel_axis, 0).reshape(v.shape[channel_axis], -1)
                sums[t] = sums.get(t, 0) + v.sum(1).numpy()
                sqs[t] = sqs.get(t, 0) + (v * v).sum(1).numpy()
                counts[t] = counts.get(t, 0) + v.shape[1]
    out_moments = {}
    for t in tensors:
        mean = sums[t] / counts[t]
        var = np.maximum(sqs[t] / counts[t] - mean * mean, 0.0)
        out_moments[t] = (mean, var)
    return out_moments
