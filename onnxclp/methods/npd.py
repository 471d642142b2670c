"""NPD: the neural polarizer (Zhu, Wei, Zha & Wu, "Neural Polarizer: A Lightweight and Effective Backdoor Defense
via Purifying Poisoned Features", NeurIPS 2023).

A 1x1 convolution (C -> C channels, with bias), initialised to the identity, is inserted on one feature map and
trained on the clean images with **everything else frozen**, so that it lets clean features through and filters
the trigger's. The trigger is unknown; adversarial examples stand in for it (the paper's bi-level objective,
section 4): per training step on a batch ``(x, y)``,

1. the **target** ``t`` of each image is the class the current model ranks highest after the true one;
2. a per-image **targeted PGD** perturbation ``delta`` (L2-normalised steps of ``2.5 eps / steps``, projected on
   the L2 ball, images kept in their [0, 1] range) pushes ``x + delta`` towards ``t``;
3. the polarizer minimises ``CE(f(x), y) + 0.4 CE(f(x + delta), y) + 0.4 BCE_away(x + delta) + 0.4
   BCE_t(x + delta)`` where ``BCE_c = -log(1 - p_c)`` pushes probability away from class ``c``: ``t`` and the
   class the perturbed image is predicted as besides ``y`` (the reference weights lmd1..lmd4 = 1, 0.4, 0.4, 0.4),
   plus the loop's distillation term on the clean images (``--distill``).

**Where.** ``--npd-layer`` names a tensor (or a node: the polarizer then goes on that node's first input). By
default: the last tensor, in execution order, that (1) every path from the model's input to its output passes
through (a cut: the polarizer then filters everything the later layers see, the skip connections too), (2) is a
4-D feature map with more than one spatial position (before global pooling), (3) is read directly by a Conv or
BatchNormalization (so its channel axis is axis 1) and (4) is produced at or before the input of the last
convolution whose output has more than one spatial position. On a ResNet this is the input of the last
residual block (the reference's PreAct-ResNet-18 setting puts it in the last block, before ``layer4.1.conv1``);
on a VGG the input of the last convolution. Without such a cut: the input of that last convolution.

**Units.** ``delta`` lives in the images' [0, 1] pixel range (divided by ``--std`` before it is added to the
normalised input). ``--npd-eps`` is its per-pixel RMS bound, ``||delta||_2 <= eps * sqrt(C H W)``; the default
0.054 is the reference's L2 bound 3.0 on 32x32x3 images (3 / sqrt(3072)). ``--npd-steps`` 2 is the reference's.

**Written.** The trained layer is added to the ONNX graph as one Conv node (kernel 1x1) reading the chosen
tensor and writing a new tensor, with two new initializers (weight C x C x 1 x 1, bias C, in the tensor's float
type); every former reader of the chosen tensor (a graph output too) reads the new one. Every other weight is
the input's. The report's ``added_nodes`` and the model's ``onnxclp.added_nodes`` metadata name the node.

Where it differs from the paper and its reference code: the reference polarizer is a 1x1 Conv without bias
followed by a BatchNorm in eval mode, i.e. an affine 1x1 convolution, which is what is written here; its 5
warm-up epochs at lr 1e-4 are skipped (a negligible move from the identity); its perturbation steps are signed
(FGSM-like) and stop when 60 % of a batch reach their target, onnxclp's are L2-normalised and always run
``--npd-steps``; its adversarial CE term uses the model's clean prediction as the label, onnxclp the true label
(the paper's formulation). As the reference, no augmentation. BatchNorm is not re-inserted (every weight but the
polarizer's is frozen, so there is nothing for it to stabilise).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from onnxclp.errors import OnnxclpError
from onnxclp.methods import register
from onnxclp.methods._repair import BATCH, DISTILL, DISTILL_MIX, EPOCHS, LR, RepairMethod
from onnxclp.methods.base import ParamSpec

if TYPE_CHECKING:
    import onnx
    import torch
    from torch import nn

    from onnxclp.bridge import OnnxModule
    from onnxclp.defences.repair import Objective, Settings
    from onnxclp.methods.ibau import PixelSpace
    from onnxclp.pipeline import State

LAYER = ParamSpec("npd_layer", str, "", "NPD: tensor (or node) to put the polarizer on (default: the rule in "
                  "docs/algorithms.md).")  # fmt: skip
EPS = ParamSpec("npd_eps", float, 0.054, "NPD: per-pixel RMS bound of the adversarial perturbations, in [0, 1] "
                "pixel units.", minimum=0.0, maximum=1.0)  # fmt: skip
STEPS = ParamSpec("npd_steps", int, 2, "NPD: targeted PGD steps per training step.", minimum=1, maximum=100)
WEIGHTS = (1.0, 0.4, 0.4, 0.4)  # clean CE, adversarial CE to the true label, away from predicted, away from target


# ----------------------------------------------------------------------------------------------------------------
# where


def _probe(module: OnnxModule, x: torch.Tensor, names: list[str]) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Shape and dtype of each tensor in ``names`` on one forward pass (eval mode, no gradients)."""
    from torch import nn

    from onnxclp.defences.repair import run_with_taps

    class Record(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.seen: tuple[tuple[int, ...], Any] | None = None

        def forward(self, y: torch.Tensor) -> torch.Tensor:
            self.seen = (tuple(y.shape), y.dtype)
            return y

    taps = {n: Record() for n in names if n not in module.taps_by_name()}
    run_with_taps(module, taps, x, max(1, len(x)))  # type: ignore[arg-type]
    return {n: tap.seen for n, tap in taps.items() if tap.seen is not None}


def _is_cut(module: OnnxModule, tensor: str) -> bool:
    """Whether every path from the graph inputs to the graph outputs passes through ``tensor``."""
    reach = set(module.input_names)
    for _, ins, outs, _ in module._plan:
        if any(i in reach for i in ins if i and i != tensor):
            reach.update(o for o in outs if o and o != tensor)
    return not any(o in reach for o in module.output_names if o != tensor)


def _spatial(shape: tuple[int, ...]) -> bool:
    return len(shape) == 4 and shape[2] * shape[3] > 1


def choose_tensor(module: OnnxModule, x: torch.Tensor, requested: str = "",
                  graph: onnx.GraphProto | None = None) -> tuple[str, int, Any, str]:  # fmt: skip
    """(tensor, channels, torch dtype, why) of the polarizer's place (the module docstring's rule)."""
    plan = module._plan
    produced = {o: i for i, (_, _, outs, _) in enumerate(plan) for o in outs if o}
    nchw_readers = {ins[0] for op, ins, _, _ in plan if op in ("Conv", "BatchNormalization") and ins and ins[0]}
    if requested:
        tensor, why = requested, "--npd-layer"
        if requested not in produced and graph is not None:
            node = next((n for n in graph.node if n.name == requested), None)
            if node is not None and node.input:
                tensor, why = node.input[0], f"--npd-layer: the input of node {requested!r}"
        if tensor not in produced:
            raise OnnxclpError(f"--npd-layer {requested}: no node computes a tensor (or is a node) of that name")
        seen = _probe(module, x, [tensor]).get(tensor)
        if seen is None or len(seen[0]) != 4:
            raise OnnxclpError(f"--npd-layer {requested}: {tensor!r} is not a 4-D feature map (N, C, H, W)")
        if tensor not in nchw_readers:
            raise OnnxclpError(
                f"--npd-layer {requested}: {tensor!r} is not read by a Conv or BatchNormalization, so its channel "
                "axis is not known to be axis 1; name a tensor a convolution reads"
            )
        return tensor, seen[0][1], seen[1], why
    convs = [(i, ins[0], outs[0]) for i, (op, ins, outs, _) in enumerate(plan) if op == "Conv" and ins and outs]
    candidates = sorted(nchw_readers & set(produced))
    seen = _probe(module, x, [o for _, _, o in convs] + candidates)
    last = next((c for c in reversed(convs) if c[2] in seen and _spatial(seen[c[2]][0])), None)
    if last is None:
        raise OnnxclpError("--method npd needs a convolution with a feature map of more than one position")
    index, conv_input, conv_output = last
    ordered = sorted((c for c in candidates if c in seen and produced[c] < index and _spatial(seen[c][0])),
                     key=lambda c: -produced[c])  # fmt: skip
    for c in ordered:
        if _is_cut(module, c):
            return c, seen[c][0][1], seen[c][1], f"the last cut feature map before {conv_output!r}'s convolution"
    if conv_input in seen and conv_input in produced:
        return conv_input, seen[conv_input][0][1], seen[conv_input][1], f"the input of {conv_output!r}'s convolution"
    raise OnnxclpError(
        "--method npd found no feature map to put the polarizer on (the last convolution reads the model's input); "
        "name one with --npd-layer"
    )


# ----------------------------------------------------------------------------------------------------------------
# the layer and its training


def polarizer(channels: int, device: Any) -> nn.Module:
    """A 1x1 convolution with bias, the identity at start (float32; it casts the feature map to and fro)."""
    import torch
    from torch import nn

    class Polarizer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(channels, channels, 1, bias=True)
            with torch.no_grad():
                self.conv.weight.copy_(torch.eye(channels).reshape(channels, channels, 1, 1))
                self.conv.bias.zero_()

        def forward(self, y: torch.Tensor) -> torch.Tensor:
            return self.conv(y.to(self.conv.weight.dtype)).to(y.dtype)

    return Polarizer().to(device)


class NPDObjective:
    """The loss of the module docstring; trains only the polarizer."""

    name = "npd"

    def __init__(self, layer: str, eps: float, steps: int) -> None:
        self.layer = layer
        self.eps = eps
        self.steps = steps
        self.tensor = ""
        self.why = ""
        self.channels = 0
        self.dtype: Any = None
        self.layer_module: nn.Module | None = None
        self.space: PixelSpace | None = None

    def prepare(self, module: OnnxModule, state: State) -> list[nn.Parameter]:
        from onnxclp.methods.ibau import PixelSpace

        device = next(iter(module.parameters())).device
        x = state.clean.x_fit[:2].to(device)
        self.tensor, self.channels, self.dtype, self.why = choose_tensor(module, x, self.layer, state.model.graph)
        for p in module.parameters():
            p.requires_grad_(False)
        self.layer_module = polarizer(self.channels, device)
        module.set_tap(self.tensor, self.layer_module)
        self.space = PixelSpace(state, x)
        return list(self.layer_module.parameters())

    def _attack(self, module: OnnxModule, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-image targeted L2 PGD towards ``target``."""
        import torch
        import torch.nn.functional as F

        from onnxclp.defences.repair import logits_of
        from onnxclp.methods.ibau import l2_direction, project_l2

        assert self.space is not None
        radius = self.space.radius(self.eps)
        step = 2.5 * radius / self.steps
        delta = torch.zeros_like(x)
        for _ in range(self.steps):
            delta.requires_grad_(True)
            loss = F.cross_entropy(logits_of(module(self.space.add(x, delta, clamp=True))), target)
            (g,) = torch.autograd.grad(loss, delta)
            delta = project_l2(delta.detach() - step * l2_direction(g), radius).detach()
        return delta

    def loss(self, module: OnnxModule, x: Any, y: Any, scores: Any) -> Any:
        import torch
        import torch.nn.functional as F

        from onnxclp.defences.repair import logits_of

        assert self.space is not None
        clean = F.cross_entropy(scores, y)
        if self.eps == 0.0:
            return WEIGHTS[0] * clean
        rows = torch.arange(len(y), device=y.device)
        with torch.no_grad():
            masked = scores.detach().clone()
            masked[rows, y] = -torch.inf
            target = masked.argmax(1)
        delta = self._attack(module, x, target)
        adv = logits_of(module(self.space.add(x, delta, clamp=True)))
        p = F.softmax(adv, 1)
        with torch.no_grad():
            masked = adv.detach().clone()
            masked[rows, y] = -torch.inf
            away = masked.argmax(1)

        def push_away(c: torch.Tensor) -> torch.Tensor:
            return -torch.log((1.0 - p[rows, c]).clamp_min(1e-6)).mean()

        w1, w2, w3, w4 = WEIGHTS
        return w1 * clean + w2 * F.cross_entropy(adv, y) + w3 * push_away(away) + w4 * push_away(target)

    def after_step(self, module: OnnxModule) -> None:
        return None

    def values(self) -> tuple[np.ndarray, np.ndarray]:
        """The trained weight (C, C, 1, 1) and bias (C,) in the chosen tensor's numpy dtype."""
        import torch

        assert self.layer_module is not None
        try:
            dtype = torch.empty(0, dtype=self.dtype).numpy().dtype
        except TypeError as exc:
            raise OnnxclpError(f"--method npd: cannot write a polarizer for a {self.dtype} feature map") from exc
        conv = self.layer_module.conv  # type: ignore[attr-defined]
        w = conv.weight.detach().cpu().double().numpy().astype(dtype)
        b = conv.bias.detach().cpu().double().numpy().astype(dtype)
        if not (np.isfinite(w).all() and np.isfinite(b).all()):
            raise OnnxclpError(f"--method npd: the polarizer's values do not fit {dtype}; try a smaller --lr", 3)
        return w, b

    def describe(self) -> dict[str, Any]:
        return {"npd_layer": self.tensor, "npd_rule": self.why, "npd_channels": self.channels,
                "npd_eps": self.eps, "npd_steps": self.steps, "npd_loss_weights": list(WEIGHTS),
                "perturbation_units": "per-pixel RMS in [0, 1] pixel range"}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# the graph edit


def insert_polarizer(model: onnx.ModelProto, tensor: str, weight: np.ndarray, bias: np.ndarray) -> str:
    """Add the trained polarizer to ``model`` as a Conv node on ``tensor`` (see the module docstring); returns
    the node's name."""
    from onnx import helper, numpy_helper

    from onnxclp.methods._insert import as_file_dtype, file_dtypes, insert_after, names_in, record_added, unique

    if not any(op.domain in ("", "ai.onnx") for op in model.opset_import):
        raise OnnxclpError("--method npd: the model imports no ai.onnx opset, so a Conv node cannot be added")
    dtype = file_dtypes(model, [tensor]).get(tensor)
    weight = as_file_dtype(weight, dtype, "--method npd: the polarizer's weight")
    bias = as_file_dtype(bias, dtype, "--method npd: the polarizer's bias")
    graph = model.graph
    taken = names_in(graph)
    node_name = unique("onnxclp_npd_polarizer", taken)
    out = unique(f"{tensor}_polarized", taken)
    w_name = unique(f"{node_name}.weight", taken)
    b_name = unique(f"{node_name}.bias", taken)
    node = helper.make_node("Conv", [tensor, w_name, b_name], [out], name=node_name, kernel_shape=[1, 1],
                            doc_string="onnxclp npd: the neural polarizer (a trained 1x1 convolution)")  # fmt: skip
    insert_after(graph, tensor, node)
    graph.initializer.extend([numpy_helper.from_array(weight, w_name), numpy_helper.from_array(bias, b_name)])
    record_added(model, [node_name])
    return node_name


# ----------------------------------------------------------------------------------------------------------------
# the method


@register
class NPD(RepairMethod):
    name = "npd"
    order = 34
    description = "Neural polarizer (NeurIPS 2023): a trained 1x1 Conv inserted, the rest frozen; adds one node."
    paper = (
        "Zhu, Wei, Zha & Wu, Neural Polarizer: A Lightweight and Effective Backdoor Defense via Purifying Poisoned "
        "Features, NeurIPS 2023"
    )
    rewrites = "nodes"
    # the polarizer trains at --lr (default 0.01, the reference's) and chooses only its epoch; it does not walk
    # the learning rate as the other repairs do (RepairMethod.decide): given the walk in session 12, the first
    # rate, 0.001, had no epoch within budget on the selection images on three of seven zoo models where 0.01 had
    # one (its adversarial training costs accuracy before it recovers), so the walk stopped before the rate that
    # works (docs/results-repair-notes.md, docs/results-repair-npd-walk.json)
    params = (EPOCHS, LR, DISTILL, DISTILL_MIX, BATCH, LAYER, EPS, STEPS)

    def objective(self, state: State) -> Objective:
        v = state.params.values
        return NPDObjective(str(v["npd_layer"]), float(v["npd_eps"]), int(v["npd_steps"]))  # type: ignore[return-value]

    def settings(self, state: State) -> Settings:
        s = super().settings(state)
        s.reinsert_bn = False  # every weight but the polarizer's is frozen
        s.augment = False  # as the reference
        return s

    def train_polarizer(self, state: State) -> tuple[OnnxModule, Any]:
        """Train the polarizer (the module keeps it as a tap), set the graph edit that writes it, record the
        training (:func:`onnxclp.defences.repair.finish`); returns the trained module and the outcome."""
        from onnxclp.defences.repair import finish, train

        objective = self.objective(state)
        settings = self.settings(state)
        module, outcome = train(state, objective, settings)
        npd: NPDObjective = objective  # type: ignore[assignment]
        weight, bias = npd.values()
        tensor = npd.tensor
        state.graph_edit = lambda st: [insert_polarizer(st.model, tensor, weight, bias)]
        finish(state, module, outcome, settings, objective)
        state.notes.append(
            f"npd: one Conv node (1x1, {npd.channels} -> {npd.channels} channels, with bias) added on tensor "
            f"{tensor!r} ({npd.why}); every other weight is the input's"
        )
        return module, outcome

    def decide(self, state: State) -> None:
        self.train_polarizer(state)
        state.decisions = []
