"""ANP: Adversarial Neuron Pruning (Wu & Wang, "Adversarial Neuron Pruning Purifies Backdoored Deep Models",
NeurIPS 2021; docs/algorithms.md, "ANP"). Needs a few clean labelled images (``--clean-data``).

Learns one mask per neuron on the clean images under adversarial neuron perturbation (paper section 4,
Algorithm 1; the optimisation is :func:`onnxclp.defences.anp.anp_masks`, run through the torch bridge) and
prunes the neurons whose mask ends below ``--anp-threshold`` (section 4.1, pruning by threshold). The pruned
channels are written into the ONNX weights like CLP's (exactly 0 before the activation); the report's scores
are ``1 - mask`` so that, as for every other method, a higher score is more suspicious and the threshold is an
upper one (``1 - anp_threshold``).

Defaults (rule written down before measuring ACC or ASR, :mod:`onnxclp.defences.anp`): the paper's section
4.1 settings (eps 0.4, alpha 0.2, lr 0.2, momentum 0.9, batch 128, threshold 0.2, 500 clean images), and the
number of iterations set by the speed target only (the largest of 2000, 1000, 500, 250, 125, 60, 30 that runs
under 120 s on a half-width CIFAR ResNet-18 on the 2-core machine; bench/few_shot_speed.py).

A neuron is an output channel of a hidden Conv/Gemm/MatMul (mask on its kernel slice, perturbation of its
bias), or the channel of a BatchNormalization kept after it (mask on gamma, perturbation of beta). A layer
the bridge cannot mask (its weight is computed, a Constant node, shared with another layer, a grouped
ConvTranspose) is skipped with the reason; the model's output layer is never masked or pruned.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from onnxclp.errors import OnnxclpError
from onnxclp.methods import register
from onnxclp.methods.base import Method, ParamSpec

if TYPE_CHECKING:
    from onnxclp.defences.anp import NeuronGroup
    from onnxclp.layers import Layer
    from onnxclp.pipeline import State

# The paper's settings (section 4.1); iterations by the speed rule (module docstring). Kept beside the
# numerical core's constants, which the tests check are the same.
PARAMS = (
    ParamSpec("anp_eps", float, 0.4, "ANP: relative size of the neuron perturbation.", minimum=0.0, maximum=1.0),
    ParamSpec(
        "anp_alpha",
        float,
        0.2,
        "ANP: weight of the natural loss (1 - alpha: the perturbed one).",
        minimum=0.0,
        maximum=1.0,
    ),
    ParamSpec("anp_threshold", float, 0.2, "ANP: prune neurons whose mask ends below this.", minimum=0.0, maximum=1.0),
    ParamSpec("anp_iterations", int, 30, "ANP: mask optimisation steps (the paper: 2000).", minimum=1),
    ParamSpec("anp_lr", float, 0.2, "ANP: SGD learning rate of the masks (momentum 0.9).", minimum=0.0),
    ParamSpec("anp_batch", int, 128, "ANP: clean images per step.", minimum=1),
)


def _initializer(src: Any) -> str | None:
    """The initializer name of a constant the reader sees as stored, or None."""
    if src is None or not src.initializer or not src.plain:
        return None
    return str(src.tensor.name)


def readers(model: Any) -> Counter[str]:
    """How many nodes read each tensor, looking through Identity nodes (an initializer an exporter merged
    with an equal one is read by several layers)."""
    alias = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Identity" and n.input and n.output}

    def root(name: str) -> str:
        seen = set()
        while name in alias and name not in seen:
            seen.add(name)
            name = alias[name]
        return name

    return Counter(root(x) for n in model.graph.node if n.op_type != "Identity" for x in n.input if x)


def neuron_group(layer: Layer, module: Any, read: Counter[str] | None = None) -> NeuronGroup | str:
    """The neurons of ``layer`` as initializers of the bridged module, or why it cannot be masked.

    ``read`` (:func:`readers`): an initializer read by more than one node is refused (masking it would mask
    every reader)."""
    from onnxclp.defences.anp import NeuronGroup

    aff = layer.affine
    if aff is not None and aff.kind == "BatchNormalization":
        scale, shift = _initializer(aff.scale.src), _initializer(aff.shift.src)
        if scale is None or shift is None:
            return "its BatchNormalization's scale or shift is computed, not a stored initializer"
        axis = 0
    else:
        scale = _initializer(layer.weight)
        if scale is None:
            return "its weight is computed or a Constant node: the bridge cannot mask it"
        kind = layer.layout.kind
        if kind == "convtranspose" and layer.layout.group != 1:
            return "grouped ConvTranspose: its output channels are not one axis of the weight"
        axis = {"conv": 0, "rows": 0, "cols": 1, "convtranspose": 1}[kind]
        shift = _initializer(layer.bias.src) if layer.bias is not None else None
        if shift is None and aff is not None and aff.shift is not None:
            shift = _initializer(aff.shift.src)
    for name in (scale, shift):
        if name is None:
            continue
        if read is not None and read[name] > 1:
            return f"initializer {name!r} is read by {read[name]} nodes: one mask cannot stand for all of them"
        try:
            p = module.param_for(name)
        except KeyError:
            return f"initializer {name!r} is not floating point"
        if name == scale and (p.dim() <= axis or int(p.shape[axis]) != layer.channels):
            return f"initializer {name!r} does not hold {layer.channels} channels on axis {axis}"
        if name == shift and int(p.numel()) != layer.channels:
            shift = None  # a scalar bias: no per-neuron perturbation
    return NeuronGroup(layer.key, scale, axis, layer.channels, shift)


@register
class ANP(Method):
    name = "anp"
    per_layer = False
    order = 20
    description = "Adversarial neuron pruning (NeurIPS 2021): masks learned on clean images under neuron perturbation."
    paper = "Wu & Wang, Adversarial Neuron Pruning Purifies Backdoored Deep Models, NeurIPS 2021"
    needs = "clean-data"
    extra = "eval"
    score = None
    include_fc = False
    params = PARAMS

    def check(self, values: Mapping[str, Any]) -> None:
        super().check(values)
        if values["anp_eps"] > 0 and values["anp_alpha"] >= 1.0:
            raise OnnxclpError("--anp-alpha 1 ignores the perturbation: set --anp-eps 0 instead")

    def decide(self, state: State) -> None:
        import torch

        from onnxclp.bridge import to_torch
        from onnxclp.defences.anp import anp_masks, prune_by_threshold
        from onnxclp.methods._fewshot import check_labels, clean_images
        from onnxclp.passes.decide import OUTPUT_NOTE, Decision
        from onnxclp.passes.score import ScoredLayer
        from onnxclp.report import SkippedLayer
        from onnxclp.select import Selection, Thresholds

        p = state.params
        images, labels, what = clean_images(state)
        module = to_torch(state.model, store=state.store)
        with torch.no_grad():
            logits = module(images[:2])
        logits = logits[0] if isinstance(logits, tuple) else logits
        check_labels(labels, int(logits.reshape(logits.shape[0], -1).shape[1]), state.options.context["clean_data"])

        groups: list[NeuronGroup] = []
        by_key: dict[str, Layer] = {}
        used: dict[str, str] = {}
        read = readers(state.model)
        outputs = []
        for layer in state.layers:
            if layer.is_output:
                outputs.append(layer)
                continue
            g = neuron_group(layer, module, read)
            if not isinstance(g, str):
                clash = next((used[n] for n in (g.scale, g.shift) if n and n in used), None)
                if clash is not None:
                    g = f"its initializer is shared with layer {clash!r}: one mask cannot stand for both"
            if isinstance(g, str):
                state.skipped.append(SkippedLayer(layer.key, layer.op, g, layer.weight.tensor.name))
                continue
            for n in (g.scale, g.shift):
                if n:
                    used[n] = layer.key
            groups.append(g)
            by_key[g.key] = layer
        if not groups:
            raise OnnxclpError("ANP found no hidden layer it can mask (see the skipped layers)", 3)
        res = anp_masks(
            module, groups, images, labels, eps=p["anp_eps"], alpha=p["anp_alpha"], lr=p["anp_lr"],
            iterations=p["anp_iterations"], batch_size=p["anp_batch"],
        )  # fmt: skip
        cut = 1.0 - p["anp_threshold"]
        decisions = []
        for g in groups:
            mask = res.masks[g.key]
            s = 1.0 - mask
            std = float(s.std(ddof=1)) if s.size > 1 else 0.0
            sel = Selection(prune=prune_by_threshold(mask, p["anp_threshold"]),
                            thresholds=Thresholds(float(s.mean()), std, upper=cut))  # fmt: skip
            decisions.append(Decision(ScoredLayer(by_key[g.key], s, "anp (1 - mask)"), sel))
        for layer in outputs:
            decisions.append(Decision(ScoredLayer(layer, np.zeros(layer.channels), "anp (1 - mask)"), note=OUTPUT_NOTE))
        state.decisions = decisions
        state.notes.append(
            f"ANP: {res.iterations} iterations on {what} in {res.seconds:.1f} s "
            f"(loss {res.loss_first:.3f} -> {res.loss_last:.3f})"
        )
