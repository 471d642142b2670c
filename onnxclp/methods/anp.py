"""ANP: Adversarial Neuron Pruning (Wu & Wang, "Adversarial Neuron Pruning Purifies Backdoored Deep Models",
NeurIPS 2021; docs/algorithms.md, "ANP"). Needs a few clean labelled images (``--clean-data``).

Learns one mask per neuron on the guard's fit images under adversarial neuron perturbation (paper section 4,
Algorithm 1; the optimisation is :func:`onnxclp.defences.anp.anp_masks`, run through the torch bridge, on CUDA
when present) until the objective converges (``--anp-window``, ``--anp-tol``; at most ``--anp-iterations``, the
paper's 2000), then prunes the lowest-mask neurons: as many as the accuracy guard allows on the validation
images the masks never saw (``--max-acc-drop``), in mask order (the count replaces the paper's threshold, which
on the zoo's resnet-badnets stopped at 39 of the 48 neurons the backdoor needed). Without a validation part it
prunes every neuron whose mask ends below ``--anp-threshold`` (the paper's rule). The pruned channels are written
into the ONNX weights like CLP's (exactly 0 before the activation); the report's scores are ``1 - mask`` so that,
as for every other method, a higher score is more suspicious.

A neuron is a BatchNorm channel, as in the paper's networks (mask on its scale, perturbation of its scale and
shift). ``--anp-bn batch`` (the default, chosen by measurement: docs/algorithms.md, "ANP"): a BatchNorm is
inserted for the optimisation after every BN-folded convolution and after every BatchNormalization the graph
kept, and normalises each batch with its own statistics, as the reference code's train-mode BatchNorm does.
``eval``: the same BatchNorm after a BN-folded convolution but on its measured statistics (the identity), and a
kept BatchNormalization's gamma and beta masked directly. ``none``: a BN-folded convolution's neurons are its
weight-slice-and-bias pairs. Other layers: the output channels of a Conv/Gemm/MatMul (mask on the kernel slice,
perturbation of it and of the bias). Pruning always zeroes the layer's own initializers (the inserted
BatchNorms exist only during the optimisation). A layer the bridge cannot mask (its weight is computed, a Constant node,
shared with another layer, a grouped ConvTranspose) is skipped with the reason; the model's output layer is
never masked or pruned.
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

# The paper's settings (section 4.1); the stopping rule's window and tolerance by measurement
# (docs/algorithms.md, "ANP"). Kept beside the numerical core's constants, which the tests check are the same.
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
    ParamSpec(
        "anp_threshold",
        float,
        0.2,
        "ANP: without validation images, the neurons whose mask ends below this are pruned (with them, the "
        "accuracy guard chooses how many, in mask order).",
        minimum=0.0,
        maximum=1.0,
    ),
    ParamSpec(
        "anp_iterations", int, 2000, "ANP: most mask optimisation steps (the paper: 2000).", minimum=1, maximum=100000
    ),
    ParamSpec("anp_window", int, 100, "ANP: iterations per window of the convergence rule.", minimum=1, maximum=100000),
    ParamSpec(
        "anp_tol",
        float,
        0.01,
        "ANP: stop when a window's mean loss improves on the one before by less than this (relative; <0: never).",
        minimum=-1.0,
        maximum=1.0,
    ),
    ParamSpec("anp_lr", float, 0.2, "ANP: SGD learning rate of the masks (momentum 0.9).", minimum=0.0),
    ParamSpec("anp_batch", int, 128, "ANP: clean images per step.", minimum=1),
    ParamSpec(
        "anp_bn",
        str,
        "batch",
        "ANP: BatchNorm neurons on batch statistics (batch: inserted after folded convolutions and kept BNs), on "
        "running statistics (eval), or folded convolutions as weight-and-bias pairs (none).",
        choices=("batch", "eval", "none"),
    ),
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
    prefix = "anp"  # of the --X-bn and --X-threshold parameters decide() reads

    def check(self, values: Mapping[str, Any]) -> None:
        super().check(values)
        if values["anp_eps"] > 0 and values["anp_alpha"] >= 1.0:
            raise OnnxclpError("--anp-alpha 1 ignores the perturbation: set --anp-eps 0 instead")

    def decide(self, state: State) -> None:
        import torch

        from onnxclp.bridge import to_torch
        from onnxclp.defences.anp import choose_count, prune_by_threshold, pruned_right, ranked, split_prune
        from onnxclp.defences.repair import device_for, progress_for, val_right
        from onnxclp.guard import DEFAULT_MAX_ACC_DROP
        from onnxclp.methods._fewshot import check_labels, clean_images
        from onnxclp.passes.decide import OUTPUT_NOTE, Decision
        from onnxclp.passes.score import ScoredLayer
        from onnxclp.select import Selection, Thresholds

        p = state.params
        clean = state.clean
        if clean is not None:  # the guard's split: the masks are learned on the fit part only
            images, labels = clean.x_fit, clean.y_fit
            what = f"{len(clean.fit)} clean images (fit part of {clean.what})"
        else:
            images, labels, what = clean_images(state)
        dev = device_for(state)
        module = to_torch(state.model, store=state.store, logits=True).to(dev)
        images, labels = images.to(dev), labels.to(dev)
        with torch.no_grad():
            out = module(images[:2])
        out = out[0] if isinstance(out, tuple) else out
        classes = int(out.reshape(out.shape[0], -1).shape[1])
        check_labels(labels.cpu(), classes, state.options.context["clean_data"])

        groups, by_key, outputs = self._groups(state, module)
        bn_mode = str(p[f"{self.prefix}_bn"])
        taps = 0
        if bn_mode != "none":
            groups, taps = _reinsert(module, groups, by_key, images, bn_mode == "batch")
        progress = progress_for(state)
        res, extra = self.learn_masks(module, groups, images, labels, p, bn_mode == "batch", progress)
        progress.done(
            f"{res.iterations} iterations on {what} in {res.seconds:.0f} s ({res.stopped}; loss "
            f"{res.loss_first:.3f} -> {res.loss_last:.3f})"
        )
        for g in groups:
            if g.tap is not None:
                module.remove_tap(g.tap)

        threshold = float(p[f"{self.prefix}_threshold"])
        below = sum(int(np.count_nonzero(res.masks[g.key] < threshold)) for g in groups)
        trials: list[dict[str, Any]] = []
        if clean is not None:
            order = ranked(res.masks, [g.key for g in groups])
            x_val, y_val = clean.x_sel.to(dev), clean.y_sel.to(dev)  # the count is chosen on the selection part
            right_before = clean.right_before_selection
            if right_before is None:  # the pipeline measures the input with onnxruntime when it will write
                right_before = val_right(module, x_val, y_val)
            budget = state.guard.budget if state.guard is not None else DEFAULT_MAX_ACC_DROP

            def measure(count: int) -> np.ndarray:
                return pruned_right(module, groups, split_prune(order, count), x_val, y_val)

            sequence_z = clean.sequence_z(state.guard)  # no selection part: the counts are tested in sequence
            count, trials = choose_count(order, len(order), measure, right_before, budget, sequence_z)
            prune = split_prune(order, count)
            clean.mark_selection(state.guard, sequence=sequence_z is not None)
            rule = (f"guard: the {count} lowest-mask neurons pruned ({below} have a mask below {threshold:g}), the "
                    f"most within {budget:g} pt on {len(clean.selection)} {clean.selection_name} images")  # fmt: skip
            progress.done(rule)
        else:
            prune = {g.key: prune_by_threshold(res.masks[g.key], threshold) for g in groups}
            count = sum(len(v) for v in prune.values())
            rule = f"threshold: the {count} neurons with mask below {threshold:g} pruned (no validation images)"

        cut = 1.0 - threshold
        decisions = []
        for g in groups:
            s = 1.0 - res.masks[g.key]
            std = float(s.std(ddof=1)) if s.size > 1 else 0.0
            sel = Selection(prune=prune.get(g.key, []), thresholds=Thresholds(float(s.mean()), std, upper=cut))
            decisions.append(Decision(ScoredLayer(by_key[g.key], s, f"{self.name} (1 - mask)"), sel))
        for layer in outputs:
            decisions.append(
                Decision(ScoredLayer(layer, np.zeros(layer.channels), f"{self.name} (1 - mask)"), note=OUTPUT_NOTE)
            )
        state.decisions = decisions
        state.training = extra | {
            "settings": {spec.name: p[spec.name] for spec in self.params} | {"device": str(dev)},
            "curve": res.curve,
            "iterations": res.iterations,
            "stopped": res.stopped,
            "seconds": res.seconds,
            "fit_images": len(images),
            "reinserted_batchnorms": taps,
            "neurons": sum(g.channels for g in groups),
            "below_threshold": below,
            "pruned": count,
            "pruning": rule,
            "trials": trials,
        }
        state.notes.append(
            f"{self.name.upper()}: {res.iterations} iterations on {what} in {res.seconds:.1f} s, {res.stopped} "
            f"(loss {res.loss_first:.3f} -> {res.loss_last:.3f}); {rule}"
        )

    def learn_masks(self, module: Any, groups: list[NeuronGroup], images: Any, labels: Any, p: Mapping[str, Any],
                    bn_train: bool, progress: Any) -> tuple[Any, dict[str, Any]]:  # fmt: skip
        """The neuron masks (an :class:`onnxclp.defences.anp.ANPResult`; lower = pruned first) and what the
        report's ``training`` adds: ANP's adversarial mask optimisation (paper section 4, Algorithm 1)."""
        from onnxclp.defences.anp import anp_masks

        budget_iter = int(p["anp_iterations"])

        def tick(it: int, loss: float, seconds: float) -> None:
            if it == 1 or it % 10 == 0:
                progress.step(f"iteration {it}/{budget_iter} loss {loss:.3f} {seconds:.0f} s "
                              f"(at most ~{seconds / it * (budget_iter - it):.0f} s left)")  # fmt: skip

        res = anp_masks(
            module, groups, images, labels, eps=p["anp_eps"], alpha=p["anp_alpha"], lr=p["anp_lr"],
            iterations=budget_iter, batch_size=p["anp_batch"], window=p["anp_window"], tol=p["anp_tol"],
            bn_train=bn_train, progress=tick,
        )  # fmt: skip
        return res, {}

    def _groups(self, state: State, module: Any) -> tuple[list[NeuronGroup], dict[str, Layer], list[Layer]]:
        """The neuron group of every hidden layer ANP can mask (the others skipped with the reason), the layers by
        key, and the output layers."""
        from onnxclp.report import SkippedLayer

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
        return groups, by_key, outputs


def _reinsert(module: Any, groups: list[NeuronGroup], by_key: dict[str, Layer], images: Any,
              batch_stats: bool) -> tuple[list[NeuronGroup], int]:  # fmt: skip
    """Re-insert a BatchNorm after every BN-folded convolution among ``groups`` (statistics on ``images``;
    :func:`onnxclp.defences.repair.insert_batchnorm`) and point those groups at it; the BatchNorms inserted
    after any other convolution are removed again. With ``batch_stats`` (``--anp-bn batch``) a layer
    whose BatchNormalization was kept gets one too, after that BatchNormalization (the graph's BatchNorm runs
    on its running statistics; the inserted one then normalises each batch as the reference code's train-mode
    BatchNorm does, with the kept BN's output moments as scale and shift). Returns the groups and how many
    BatchNorms were inserted."""
    from dataclasses import replace

    from onnxclp.defences.anp import batchnorm_after
    from onnxclp.defences.repair import insert_batchnorm

    mine = {
        (g.scale, g.shift): g.key
        for g in groups
        if g.shift and by_key[g.key].affine is None and by_key[g.key].op == "Conv" and g.axis == 0
    }
    tap_of: dict[str, str] = {}
    for item in insert_batchnorm(module, images):
        key = mine.get((item.weight, item.bias))
        if key is None:
            module.remove_tap(item.output)
        else:
            tap_of[key] = item.output
    if batch_stats:
        kept = {by_key[g.key].output: g.key for g in groups if _kept_bn(by_key[g.key])}
        kept = {t: k for t, k in kept.items() if t and t not in module.taps_by_name()}
        for tensor in batchnorm_after(module, list(kept), images):
            tap_of[kept[tensor]] = tensor
    return [replace(g, tap=tap_of[g.key]) if g.key in tap_of else g for g in groups], len(tap_of)


def _kept_bn(layer: Layer) -> bool:
    return layer.affine is not None and layer.affine.kind == "BatchNormalization"
