"""RNP: Reconstructive Neuron Pruning (Li, Lyu, Ma, Koren, Lyu, Li & Jiang, "Reconstructive Neuron Pruning for
Backdoor Defense", ICML 2023; docs/algorithms.md, "RNP"). Needs a few clean labelled images (``--clean-data``).

Two stages on the guard's fit images, then pruning of the input model (paper section 3):

1. **Unlearning** (section 3.2, :func:`onnxclp.defences.rnp.unlearn`): a copy of the model is trained by gradient
   ascent of the clean cross-entropy, every weight, until it has forgotten the clean task (an epoch's accuracy
   at or below ``--rnp-clean-threshold``, at most ``--rnp-unlearn-epochs``). The clean features are the ones
   the ascent destroys; neurons the clean images do not use, the backdoor's, are left much as they were.
2. **Recovering** (section 3.3): per-neuron masks in [0, 1] are learnt on the *unlearned* copy (its weights
   frozen) to bring the clean task back (``--rnp-recover-epochs`` epochs, SGD at ``--rnp-recover-lr``, the loss
   scaled by ``--rnp-alpha``, as the reference code). Restoring the clean task with the fewest neurons turns
   the backdoor's neurons down: they low-mask first.
3. **Pruning** of the input model, lowest mask first: as many neurons as the accuracy guard allows (by default the
   counts tested in sequence on the validation images; with ``--select-fraction``, on the selection images: ANP's
   count walk, :func:`onnxclp.defences.anp.choose_count`), which replaces the paper's
   mask threshold; without a held-out part every neuron with mask below ``--rnp-threshold`` (the paper's 0.2).

A neuron is what ANP's is (:mod:`onnxclp.methods.anp`): a BatchNorm channel, re-inserted after every BN-folded
convolution (statistics of the fit images) and normalising each batch with its own statistics, as the reference
code's train-mode BatchNorms do, in both stages. Pruning zeroes the layer's own initializers (the channel is exactly
0 before its activation; the reference zeroes the BatchNorm's scale and keeps its shift). The report gives the
unlearning curve, the recovery's loss and the count walk.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from onnxclp.methods import register
from onnxclp.methods.anp import ANP
from onnxclp.methods.base import ParamSpec

if TYPE_CHECKING:
    from onnxclp.defences.anp import NeuronGroup

PARAMS = (
    ParamSpec(
        "rnp_unlearn_lr", float, 0.01, "RNP: SGD learning rate of the unlearning (gradient ascent).", minimum=0.0
    ),
    ParamSpec("rnp_unlearn_epochs", int, 20, "RNP: most unlearning epochs.", minimum=1, maximum=1000),
    ParamSpec(
        "rnp_clean_threshold",
        float,
        0.2,
        "RNP: the unlearning stops when an epoch's clean accuracy is at or below this.",
        minimum=0.0,
        maximum=1.0,
    ),
    ParamSpec("rnp_recover_lr", float, 0.2, "RNP: SGD learning rate of the masks (momentum 0.9).", minimum=0.0),
    ParamSpec("rnp_recover_epochs", int, 20, "RNP: mask recovery epochs.", minimum=1, maximum=1000),
    ParamSpec("rnp_alpha", float, 0.2, "RNP: scale of the recovery loss (the reference code's alpha).", minimum=0.0),
    ParamSpec(
        "rnp_threshold",
        float,
        0.2,
        "RNP: without a held-out part, the neurons whose mask ends below this are pruned (with one, the guard "
        "chooses how many, in mask order).",
        minimum=0.0,
        maximum=1.0,
    ),
    ParamSpec("rnp_batch", int, 128, "RNP: clean images per step (both stages).", minimum=1),
    ParamSpec(
        "rnp_bn",
        str,
        "batch",
        "RNP: neurons as ANP's --anp-bn (batch: BatchNorms on batch statistics after folded convolutions and kept "
        "BNs; eval: on running statistics; none: folded convolutions as weight-and-bias pairs).",
        choices=("batch", "eval", "none"),
    ),
)


@register
class RNP(ANP):
    name = "rnp"
    order = 22
    description = (
        "Reconstructive neuron pruning (ICML 2023): unlearn the clean task, learn masks that recover it, prune the "
        "lowest-mask neurons."
    )
    paper = "Li, Lyu, Ma, Koren, Lyu, Li & Jiang, Reconstructive Neuron Pruning for Backdoor Defense, ICML 2023"
    params = PARAMS
    prefix = "rnp"

    def check(self, values: Mapping[str, Any]) -> None:
        super(ANP, self).check(values)

    def learn_masks(self, module: Any, groups: list[NeuronGroup], images: Any, labels: Any, p: Mapping[str, Any],
                    bn_train: bool, progress: Any) -> tuple[Any, dict[str, Any]]:  # fmt: skip
        """Unlearn a copy (stage 1), then ANP's mask optimisation on it without perturbation (stage 2)."""
        from onnxclp.defences.anp import anp_masks
        from onnxclp.defences.rnp import unlearn

        taps = module.taps_by_name()
        bns = [taps[g.tap] for g in groups if g.tap is not None] if bn_train else []
        batch = int(p["rnp_batch"])
        gone = unlearn(module, images, labels, lr=p["rnp_unlearn_lr"], epochs=p["rnp_unlearn_epochs"],
                       threshold=p["rnp_clean_threshold"], batch_size=batch, train_modules=bns)  # fmt: skip
        curve = ", ".join(f"{100 * a:.0f} %" for a in gone.accuracy)
        progress.done(f"unlearning: {gone.epochs} epochs in {gone.seconds:.0f} s ({gone.stopped}; per epoch {curve})")
        per_epoch = -(-int(images.shape[0]) // batch)
        iterations = int(p["rnp_recover_epochs"]) * per_epoch
        res = anp_masks(gone.module, groups, images, labels, eps=0.0, alpha=p["rnp_alpha"], lr=p["rnp_recover_lr"],
                        iterations=iterations, batch_size=batch, tol=-1.0, bn_train=bn_train)  # fmt: skip
        res.seconds += gone.seconds
        extra = {"unlearning": {"epochs": gone.epochs, "accuracy": gone.accuracy, "loss": gone.loss,
                                "stopped": gone.stopped, "seconds": gone.seconds},
                 "recovering_iterations": iterations}  # fmt: skip
        return res, extra
