"""``mmbd``: the maximum achievable logit margin per class (Wang, Xiang, Miller & Kesidis, "MM-BD: Post-Training
Detection of Backdoor Attacks with Arbitrary Backdoor Pattern Types Using a Maximum Margin Statistic", IEEE S&P
2024, section III; :mod:`onnxclp.defences.mmbd`). Runs the model on optimised synthetic images through the torch
bridge. Part of the default ``scan`` when torch and scipy are installed (the ``eval`` extra); without them it is
skipped, and the report says so and why (the verdict then rests on the weight-only detectors).

The search budget here is smaller than the paper's (30 starts x 300 SGD steps) and than
:func:`onnxclp.defences.mmbd.mmbd`'s defaults: one start per class, :data:`STEPS` projected Adam steps of
:data:`LR` of the pixel range, all classes in one batch. Chosen by measurement (docs/detect.md, "MM-BD's budget"):
it keeps the zoo's backdoored ResNets' target far ahead (p < 1e-9) and takes a few seconds on a CIFAR-10 ResNet on
two CPU cores; its p-value's null is recalibrated on clean models like every detector's (:mod:`onnxclp.detect._null`).

Models with fewer than :data:`MIN_CLASSES` classes are not examined (the result says why): the Gamma null is fitted
to the other classes' margins, and with three to five of them a clean model with one easy class reaches p = 1e-6
to 1e-8 (the calibration models cnn-w24-d2-sub5, dwsep-w16-d2-sub4, vgg-w8-d2-sub6). Fitted over every model, those
few-class models set the recalibration's scale (:mod:`onnxclp.detect._null`) so wide that MM-BD's p-value could not
go below 0.0033 on any model, and with three detectors it could never flag one alone (docs/detect.md).

Input geometry: the graph's input or ``--input-shape``. Normalisation: ``--mean``/``--std``, else the one the model
records in its metadata (:mod:`onnxclp.eval.normalize`), else none (images in [0, 1] fed as they are: the detail
says so).
"""

from __future__ import annotations

import importlib.util
from typing import Any

from onnxclp.detect import Detector, DetectorResult, register
from onnxclp.pipeline import State

# The paper's tasks have 10 or more classes; below that the Gamma fit rests on too few margins (module docstring).
MIN_CLASSES = 10
STEPS = 20
RESTARTS = 1
LR = 0.1


def missing_modules() -> list[str]:
    """The modules MM-BD needs that are not installed (found without importing them)."""
    return [m for m in ("torch", "scipy") if importlib.util.find_spec(m) is None]


@register
class MMBD(Detector):
    name = "mmbd"
    description = "MM-BD: per-class maximum logit margin on optimised images, Gamma null (needs torch: 'eval')"
    default = True  # skipped, with the reason in the report, when torch or scipy is missing
    extra = "eval"
    order = 110  # after the weight-only detectors

    def run(self, state: State) -> DetectorResult | str:
        out = measure(state, MIN_CLASSES)
        if isinstance(out, str):
            return out
        result, norm = out
        margins = ", ".join(f"{m:.1f}" for m in result.margins)
        return DetectorResult(
            float(result.statistic),
            float(result.p_value),
            int(result.target),
            f"class {result.target}: margin {result.statistic:.1f} (margins {margins}; null {result.null_fit}; "
            f"{result.restarts} start(s) x {result.steps_run} steps, {result.time_s:.1f} s; normalisation {norm})",
        )


def measure(state: State, min_classes: int = 0) -> tuple[Any, str] | str:
    """MM-BD's search on the state's model at this detector's budget: ``(result, normalisation)``, or why it
    cannot run (torch missing; fewer than ``min_classes`` classes, told before any search)."""
    missing = missing_modules()
    if missing:
        return (
            f"skipped: {' and '.join(missing)} not installed (MM-BD runs the model through torch; "
            "pip install 'onnxclp[eval]' after torch, README 'Quick start')"
        )
    from onnxclp.defences.mmbd import classes_of, mmbd
    from onnxclp.defences.run import model_run

    r = model_run(state)
    mean, std, norm = r.normalization(state.model)
    inputs = r.inputs(mean, std)
    classes = classes_of(r.module, inputs)
    if classes < min_classes:
        return (
            f"skipped: {classes} classes; MM-BD's Gamma null needs at least {min_classes} (fitted to fewer "
            "margins it gives clean models p-values of 1e-6 to 1e-8: docs/detect.md, 'MM-BD and few classes')"
        )
    return mmbd(r.module, inputs, num_classes=classes, steps=STEPS, restarts=RESTARTS, lr=LR), norm


def target_class(state: State) -> int:
    """MM-BD's detected target class of the state's model (LPP's ``--target-from mmbd``; any number of classes:
    the class with the largest margin does not need the null)."""
    out = measure(state)
    if isinstance(out, str):
        from onnxclp.errors import OnnxclpError

        raise OnnxclpError(f"--target-from mmbd: {out}")
    return int(out[0].target)
