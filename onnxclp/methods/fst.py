"""FST: feature shift tuning (Min, Qin, Shen & Cheng, "Towards Stable Backdoor Purification through Feature Shift
Tuning", NeurIPS 2023, section 4).

The classifier's weight ``w`` is re-initialised, then the whole network is fine-tuned on the clean images with
``CE + alpha * <w, w_ori>`` (``w_ori`` the input's classifier weight), ``w`` projected back to ``||w_ori||``
after every step: the penalty pushes the classifier away from the compromised one, so the features must shift
for the clean task to be learnt again, and the backdoor features, entangled with the old classifier, lose their
hold. onnxclp adds distillation from the input model (``--distill``, issue 18's probe: without it a re-initialised
head costs 30-50 points on a few hundred images) and BatchNorm re-insertion (:mod:`onnxclp.defences.repair`).

The classifier is the layer producing the model's output (a Gemm/MatMul, or a 1x1 Conv before global pooling);
its weight must be a float initializer. Rewrites initializer values only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from onnxclp.errors import OnnxclpError
from onnxclp.methods import register
from onnxclp.methods._repair import BATCH, DISTILL, DISTILL_MIX, EPOCHS, LR, RepairMethod
from onnxclp.methods.base import ParamSpec

if TYPE_CHECKING:
    from torch import nn

    from onnxclp.bridge import OnnxModule
    from onnxclp.defences.repair import Objective, Settings
    from onnxclp.pipeline import State

ALPHA = ParamSpec("fst_alpha", float, 0.2, "FST: weight of the <w, w_ori> penalty on the classifier.", minimum=0.0)
SCOPE = ParamSpec(
    "fst_scope",
    str,
    "all",
    "FST: what trains: all (the paper: every weight) or head (the classifier alone, the features frozen).",
    choices=("all", "head"),
)


def classifier_weight(state: State, module: OnnxModule) -> str:
    """The initializer name of the classifier's weight (the layer producing the model output)."""
    outs = [layer for layer in state.found if layer.is_output]
    # the stored tensor as the layer reads it, or through one DequantizeLinear (a QDQ weight, which the bridge
    # trains as floats and writes back as integers: docs/bridge.md, "Quantized weights"), or fake-quantised
    quantized = (["DequantizeLinear"], ["DequantizeLinear", "QuantizeLinear"])
    names = [layer.weight.tensor.name for layer in outs if layer.weight.initializer
             and (layer.weight.plain or [n.op_type for n in layer.weight.via] in quantized)]  # fmt: skip
    names = [n for n in names if n in module.float_initializer_names]
    if not names:
        raise OnnxclpError(
            f"--method {state.params.method} needs the classifier's weight (the Gemm/MatMul or 1x1 Conv producing "
            "the output) as a float initializer; none found"
        )
    return names[-1]


class FSTObjective:
    """CE + alpha * <w, w_ori>, w re-initialised and projected to ||w_ori|| after each step."""

    name = "fst"

    def __init__(self, alpha: float, seed: int = 0, scope: str = "all") -> None:
        self.alpha = alpha
        self.scope = scope
        self.seed = seed
        self.weight: nn.Parameter | None = None
        self.w_ori: Any = None
        self.norm = 0.0
        self.name_ = ""

    def prepare(self, module: OnnxModule, state: State) -> list[nn.Parameter]:
        import math

        import torch

        self.name_ = classifier_weight(state, module)
        w = module.param_for(self.name_)
        self.weight = w
        self.w_ori = w.detach().clone()
        self.norm = float(self.w_ori.norm())
        classes = next(layer.channels for layer in state.found if layer.weight.tensor.name == self.name_)
        fan_in = max(1, w.numel() // max(1, classes))
        bound = 1.0 / math.sqrt(fan_in)
        gen = torch.Generator().manual_seed(self.seed)
        with torch.no_grad():
            w.copy_((torch.rand(w.shape, generator=gen) * 2 - 1).to(w) * bound)
            self._project()
        if self.scope == "head":  # the features frozen: only the classifier's weight and bias train
            layer = next(layer for layer in state.found if layer.weight.tensor.name == self.name_)
            bias = layer.bias.src.tensor.name if layer.bias is not None else None
            head = {id(w)} | ({id(module.param_for(bias))} if bias in module.float_initializer_names else set())
            for p in module.parameters():
                p.requires_grad_(id(p) in head)
        return [p for p in module.parameters() if p.requires_grad]

    def _project(self) -> None:
        assert self.weight is not None
        n = float(self.weight.norm())
        if n > 0:
            self.weight.mul_(self.norm / n)

    def loss(self, module: OnnxModule, x: Any, y: Any, scores: Any) -> Any:
        import torch.nn.functional as F

        assert self.weight is not None
        return F.cross_entropy(scores, y) + self.alpha * (self.weight * self.w_ori.to(self.weight)).sum()

    def after_step(self, module: OnnxModule) -> None:
        import torch

        with torch.no_grad():
            self._project()

    def describe(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "classifier": self.name_, "scope": self.scope}


@register
class FST(RepairMethod):
    name = "fst"
    order = 31
    description = "Feature shift tuning (NeurIPS 2023): re-initialised classifier pushed from the old one; weights."
    paper = "Min, Qin, Shen & Cheng, Towards Stable Backdoor Purification through Feature Shift Tuning, NeurIPS 2023"
    params = (EPOCHS, LR, DISTILL, DISTILL_MIX, BATCH, ALPHA, SCOPE)

    def objective(self, state: State) -> Objective:
        p = state.params
        return FSTObjective(float(p["fst_alpha"]), scope=str(p["fst_scope"]))  # type: ignore[return-value]

    def settings(self, state: State) -> Settings:
        s = super().settings(state)
        if state.params["fst_scope"] == "head":
            s.reinsert_bn = False  # the features are frozen: nothing for a BatchNorm to stabilise
        return s
