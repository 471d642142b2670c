"""BNP: BatchNorm-statistics-based neuron pruning (Zheng, Tang, Li & Liu, "Pre-activation Distributions Expose
Backdoor Neurons", NeurIPS 2022, section 4; docs/algorithms.md, "BNP / EP"). Needs a few clean labelled images
(``--clean-data``) and BatchNormalization nodes kept in the graph.

For every hidden layer followed by a BatchNormalization, the per-channel mean and variance of the BN's input
(the neuron's pre-activation) are measured on the clean images and compared with the BN's running
statistics, which the training set (poisoned samples included) produced: the score is
``KL(N(clean) || N(running))`` (:func:`onnxclp.defences.bnp.gaussian_kl`). Channels above
``mean + u * std`` of their layer are pruned (exactly 0 before the activation, as for CLP).

Defaults (rule written down before measuring ACC or ASR): ``u = 3`` and 500 clean images, the paper's
settings as onnxclp reads them (the same ``mean + u * std`` rule and ``u`` as CLP by the same authors; 500
images as ANP, the few-shot tier's common budget).

Refused (exit 2) when the graph holds no BatchNormalization after any hidden layer: exporters fold BN into
the convolutions in inference mode, and then its running statistics are gone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from onnxclp.errors import OnnxclpError
from onnxclp.methods import register
from onnxclp.methods.base import Method, Params
from onnxclp.methods.clp import U

if TYPE_CHECKING:
    import numpy as np

    from onnxclp.pipeline import State
    from onnxclp.select import Selection

FOLDED = (
    "--method {method}: BNP reads the running statistics of BatchNormalization layers, and this graph has none "
    "after any hidden layer: the exporter folded them into the convolutions (or the network has none). Export with "
    "BatchNorm kept (torch: "
    "torch.onnx.export(..., training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False)), or use a "
    "repair that needs no BatchNorm statistics: --method ac changed the fewest clean predictions of those measured "
    "on BN-folded exports (docs/results-repair.md)"
)
BATCH = 128  # clean images per forward pass (memory only: the moments do not depend on it)


@register
class BNP(Method):
    name = "bnp"
    order = 21
    description = "BatchNorm-statistics pruning (NeurIPS 2022): prune channels whose clean moments leave BN's."
    paper = "Zheng, Tang, Li & Liu, Pre-activation Distributions Expose Backdoor Neurons, NeurIPS 2022"
    needs = "clean-data"
    extra = "eval"
    score = None
    include_fc = False
    params = (U,)

    def select(self, scores: np.ndarray, params: Params) -> Selection:
        from onnxclp.select import select_clp

        return select_clp(scores, params["u"])

    def precheck(self, state: State) -> None:
        hidden = [layer for layer in state.layers if not layer.is_output]
        if not any(layer.affine is not None and layer.affine.kind == "BatchNormalization" for layer in hidden):
            raise OnnxclpError(FOLDED.format(method=state.params.method))

    def decide(self, state: State) -> None:
        import numpy as np

        from onnxclp import weights
        from onnxclp.defences.bnp import gaussian_kl, preactivation_moments
        from onnxclp.methods._fewshot import clean_images
        from onnxclp.passes.decide import Decision
        from onnxclp.passes.score import ScoredLayer
        from onnxclp.report import SkippedLayer

        assert state.index is not None
        hidden = [layer for layer in state.layers if not layer.is_output]
        with_bn = [l for l in hidden if l.affine is not None and l.affine.kind == "BatchNormalization"]  # noqa: E741
        if not with_bn:
            raise OnnxclpError(FOLDED.format(method=state.params.method))
        for layer in hidden:
            if layer not in with_bn:
                reason = "no BatchNormalization after it: BNP has no running statistics to compare with"
                state.skipped.append(SkippedLayer(layer.key, layer.op, reason, layer.weight.tensor.name))
        if state.clean is not None:  # the guard's split: BNP reads the fit part only
            images, what = state.clean.x_fit, f"{len(state.clean.fit)} clean images (fit part) of {state.clean.what}"
        else:
            images, _, what = clean_images(state)
        tensors = [layer.affine.nodes[0].input[0] for layer in with_bn]  # type: ignore[union-attr]
        batches = (images[i : i + BATCH] for i in range(0, len(images), BATCH))
        moments = preactivation_moments(state.model, state.store, tensors, batches, channel_axis=1)
        decisions = []
        for layer, t in zip(with_bn, tensors, strict=True):
            aff = layer.affine
            assert aff is not None and aff.mean is not None and aff.var is not None
            mu_bn = weights.read(state.index, state.store, aff.mean.src).astype(np.float64).reshape(-1)
            var_bn = weights.read(state.index, state.store, aff.var.src).astype(np.float64).reshape(-1)
            mu_c, var_c = moments[t]
            if mu_c.shape != mu_bn.shape:
                state.skipped.append(
                    SkippedLayer(layer.key, layer.op, f"its BN input has {mu_c.size} channels, BN {mu_bn.size}")
                )
                continue
            kl = gaussian_kl(mu_c, var_c + aff.epsilon, mu_bn, var_bn + aff.epsilon)
            decisions.append(Decision(ScoredLayer(layer, kl, "bnp-kl"), self.select(kl, state.params)))
        state.decisions = decisions
        state.notes.append(f"BNP: {len(decisions)} BatchNorm layers compared on {what}")
