"""NC unlearning: Neural Cleanse's trigger, reverse-engineered from the clean images, unlearned by fine-tuning
(Wang, Yao, Shan, Li, Viswanath, Zheng & Zhao, "Neural Cleanse: Identifying and Mitigating Backdoor Attacks in
Neural Networks", IEEE S&P 2019, section IV for the reverse engineering, section VI for the mitigation by
unlearning; docs/algorithms.md, "NC unlearning").

Two stages on the guard's fit images:

1. **Reverse engineering** (section IV; :func:`onnxclp.defences.cleanse.reverse_trigger_pattern`, the `nc` detector's
   optimisation): for every class ``t``, the smallest mask ``m`` and pattern ``p`` that send the fit images of the
   other classes to ``t``. The class with the smallest mask L1 is the presumed target (the paper's rule); its
   trigger is kept, and the report gives every class's L1, the anomaly index and the trigger's success.
2. **Unlearning** (section VI): fine-tuning on the clean images where a share of each batch (``--nc-share``, the
   paper's 20 %) is also shown stamped with the reversed trigger, ``(1 - m) x + m p``, under its true label. The
   stamped copies are an extra term, ``CE(f(stamp(x_s)), y_s)``, beside the clean cross-entropy; the loop's
   distillation from the input model reads the clean images only (on stamped ones the input model answers the
   target: distilling there would teach the backdoor back).

Where onnxclp's reading differs: the paper fine-tunes one epoch on 10 % of the training set; here the shared repair
loop (:mod:`onnxclp.defences.repair`: augmentation, BatchNorm re-inserted after folded convolutions, distillation,
the learning-rate walk and the checkpoint chosen on the selection images, docs/algorithms.md "Fine-tuning
repairs"). The reverse engineering runs a fixed ``--nc-steps`` Adam steps per class (default 100, a third of the
detector's 300, for time) and stamps in the images' [0, 1] pixel range, before ``--mean``/``--std``. A task of
more than :data:`MAX_CLASSES` classes is refused (exit 3): one search per class would take hours on a CPU.
Rewrites initializer values only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from onnxclp.errors import OnnxclpError
from onnxclp.methods import register
from onnxclp.methods._repair import BATCH, DISTILL, DISTILL_MIX, EPOCHS, LR, RepairMethod
from onnxclp.methods.base import ParamSpec

if TYPE_CHECKING:
    import torch
    from torch import nn

    from onnxclp.bridge import OnnxModule
    from onnxclp.defences.repair import Objective
    from onnxclp.pipeline import State

SHARE = ParamSpec("nc_share", float, 0.2, "NC unlearning: share of each batch also shown with the reversed trigger "
                  "under its true label (the paper's 20 %).", minimum=0.0, maximum=1.0)  # fmt: skip
STEPS = ParamSpec("nc_steps", int, 100, "NC unlearning: Adam steps of the trigger reverse engineering per class.",
                  minimum=1, maximum=10000)  # fmt: skip


MAX_CLASSES = 100  # ten classes at 100 steps take 60-90 s on a zoo ResNet (2-core CPU)


@dataclass
class Trigger:
    """The reversed trigger the unlearning stamps: mask (H x W) and pattern (C x H x W, pixels in [0, 1]) of the
    presumed target, and what the reverse engineering found (the report's ``training.settings``)."""

    mask: np.ndarray
    pattern: np.ndarray
    found: dict[str, Any]


def reverse_engineer(state: State, steps: int) -> Trigger:
    """Stage 1 of the module docstring, on the input model (eval mode) and the guard's fit images."""
    import time

    import torch

    from onnxclp.bridge import to_torch
    from onnxclp.defences.cleanse import BATCH as NC_BATCH
    from onnxclp.defences.cleanse import anomaly_index, reverse_trigger_pattern
    from onnxclp.defences.repair import device_for, logits_of, progress_for

    assert state.clean is not None
    dev = device_for(state)
    module = to_torch(state.model, store=state.store, logits=True).to(dev).eval()
    for p in module.parameters():
        p.requires_grad_(False)
    x, y = state.clean.x_fit.to(dev), state.clean.y_fit.to(dev)
    space = Stamp(state, x[:1])
    pixels = space.pixels(x).clamp(0, 1)

    def forward(images: torch.Tensor) -> torch.Tensor:
        return logits_of(module(space.model(images)))

    with torch.no_grad():
        classes = int(forward(pixels[:1]).shape[1])
    if classes > MAX_CLASSES:
        raise OnnxclpError(
            f"--method nc-unlearn reverse-engineers a trigger for every class, and this model has {classes} "
            f"(at most {MAX_CLASSES}): try --method clp-ac or ac",
            3,
        )
    start = time.perf_counter()
    progress = progress_for(state)
    l1: list[float] = []
    success: list[float] = []
    triggers = []
    for t in range(classes):
        others = pixels[y != t] if bool((y != t).any()) else pixels
        with torch.enable_grad():
            mask, pattern, hit = reverse_trigger_pattern(forward, others, t, steps, NC_BATCH, t)
        l1.append(float(mask.sum()))
        success.append(hit)
        triggers.append((mask, pattern))
        elapsed = time.perf_counter() - start
        progress.step(f"reverse engineering: class {t + 1}/{classes}, mask L1 {l1[-1]:.1f}, {elapsed:.0f} s, "
                      f"~{elapsed / (t + 1) * (classes - t - 1):.0f} s left")  # fmt: skip
    target = int(np.argmin(l1))
    index = anomaly_index(np.asarray(l1)) if classes >= 3 else None
    progress.done(f"reverse engineering: class {target} has the smallest mask (L1 {l1[target]:.1f}"
                  + (f", anomaly index {index:.2f}" if index is not None else "") + "); unlearning its trigger")  # fmt: skip
    state.notes.append(
        f"nc-unlearn: presumed target class {target} (smallest reversed mask, L1 {l1[target]:.1f}; median "
        f"{float(np.median(l1)):.1f}); its trigger sent {100 * success[target]:.0f}% of the other fit images there"
    )
    found = {"nc_steps": steps, "target": target, "mask_l1": l1, "trigger_success": success, "anomaly_index": index,
             "reverse_seconds": time.perf_counter() - start}  # fmt: skip
    return Trigger(triggers[target][0], triggers[target][1], found)


class Stamp:
    """Between the model's normalised input (its layout) and NCHW pixels in [0, 1], and the stamping."""

    def __init__(self, state: State, like: torch.Tensor) -> None:
        from onnxclp.methods._fewshot import input_layout
        from onnxclp.methods.ibau import PixelSpace

        self.space = PixelSpace(state, like)
        self.nhwc = input_layout(state)[0] == "nhwc"

    def pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised model input -> NCHW pixels."""
        p = (x - self.space.lo) * self.space.std
        return p.permute(0, 3, 1, 2) if self.nhwc else p

    def model(self, p: torch.Tensor) -> torch.Tensor:
        """NCHW pixels -> the model's normalised input."""
        if self.nhwc:
            p = p.permute(0, 2, 3, 1)
        return p / self.space.std + self.space.lo


class NCObjective:
    """Stage 2 of the module docstring: the clean loss plus the stamped copies' under their true labels."""

    name = "nc-unlearn"

    def __init__(self, share: float, trigger: Trigger) -> None:
        self.share = share
        self.trigger = trigger
        self.stamp_io: Stamp | None = None
        self.mask: torch.Tensor | None = None
        self.pattern: torch.Tensor | None = None

    def prepare(self, module: OnnxModule, state: State) -> list[nn.Parameter]:
        import torch

        assert state.clean is not None
        like = state.clean.x_fit[:1].to(next(iter(module.parameters())).device)
        self.stamp_io = Stamp(state, like)
        self.mask = torch.as_tensor(self.trigger.mask, device=like.device, dtype=like.dtype)[None, None]
        self.pattern = torch.as_tensor(self.trigger.pattern, device=like.device, dtype=like.dtype)[None]
        return [p for p in module.parameters() if p.requires_grad]

    def stamp(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (normalised model input) with the reversed trigger stamped on, in pixel space."""
        assert self.stamp_io is not None and self.mask is not None and self.pattern is not None
        io = self.stamp_io
        return io.model((1 - self.mask) * io.pixels(x) + self.mask * self.pattern)

    def loss(self, module: OnnxModule, x: Any, y: Any, scores: Any) -> Any:
        import math

        import torch.nn.functional as F

        from onnxclp.defences.repair import logits_of

        clean = F.cross_entropy(scores, y)
        k = math.ceil(self.share * len(x))
        if k == 0:
            return clean
        # the first k of the batch (the loop shuffles every epoch), stamped, under their true labels
        return clean + F.cross_entropy(logits_of(module(self.stamp(x[:k]))), y[:k]) * (k / len(x))

    def after_step(self, module: OnnxModule) -> None:
        return None

    def describe(self) -> dict[str, Any]:
        return {"nc_share": self.share, **self.trigger.found}


@register
class NCUnlearn(RepairMethod):
    name = "nc-unlearn"
    order = 33
    description = ("Neural Cleanse (S&P 2019): reverse-engineer the smallest trigger per class, unlearn the "
                   "smallest class's by fine-tuning; weights.")  # fmt: skip
    paper = (
        "Wang, Yao, Shan, Li, Viswanath, Zheng & Zhao, Neural Cleanse: Identifying and Mitigating Backdoor Attacks "
        "in Neural Networks, IEEE S&P 2019"
    )
    params = (EPOCHS, LR, DISTILL, DISTILL_MIX, BATCH, SHARE, STEPS)

    def objective(self, state: State) -> Objective:
        return NCObjective(float(state.params["nc_share"]), reverse_engineer(state, int(state.params["nc_steps"])))  # type: ignore[return-value]

    def decide(self, state: State, make: Any = None) -> None:
        """Reverse-engineer once; every run of the learning-rate walk unlearns the same trigger."""
        trigger = reverse_engineer(state, int(state.params["nc_steps"]))
        share = float(state.params["nc_share"])
        super().decide(state, make=lambda: NCObjective(share, trigger))  # type: ignore[arg-type,return-value]
