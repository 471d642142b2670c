"""``freeeagle``: the classes' scores on representations optimised through the network's tail (Fu et al.,
"FreeEagle: Detecting Complex Neural Trojans in Data-Free Cases", USENIX Security 2023, section 4;
:mod:`onnxclp.defences.freeeagle`). Data-free: nothing but the ONNX file, run through the torch bridge (the
``eval`` extra); without torch it is skipped, and the report says why.

Statistic: the anomaly metric ``(max v - Q3) / IQR`` of the classes' mean scores; p-value: the largest class's
z-score (:mod:`onnxclp.defences.freeeagle`) as the largest of ``K`` normals; target: that class. Models with fewer
than :data:`MIN_CLASSES` classes are skipped (the quartiles of a handful of scores say nothing), and so are
graphs that no single tensor separates between two weighted layers, with the reason.
"""

from __future__ import annotations

import importlib.util

from onnxclp.detect import Detector, DetectorResult, register
from onnxclp.pipeline import State

MIN_CLASSES = 10  # as MM-BD's and Neural Cleanse's: the paper's smallest task has 10 classes


@register
class FreeEagle(Detector):
    name = "freeeagle"
    description = "FreeEagle: other classes' scores on representations optimised through the tail (needs torch)"
    default = False  # opt-in until measured on the zoo and the clean null models (docs/detect.md, "FreeEagle")
    extra = "eval"
    order = 115

    def run(self, state: State) -> DetectorResult | str:
        if importlib.util.find_spec("torch") is None:
            return "skipped: torch not installed (pip install 'onnxclp[eval]' after torch, README 'Quick start')"
        import torch

        from onnxclp.defences.freeeagle import choose_split, freeeagle, shape_at
        from onnxclp.defences.mmbd import classes_of
        from onnxclp.defences.run import model_run

        r = model_run(state)
        inputs = r.inputs()
        module = r.module
        for p in module.parameters():
            p.requires_grad_(False)
        classes = classes_of(module, inputs)
        if classes < MIN_CLASSES:
            return f"skipped: {classes} classes; FreeEagle's quartiles need at least {MIN_CLASSES}"
        split = choose_split(module)
        if isinstance(split, str):
            return f"skipped: {split}"
        image = torch.zeros((1, *inputs.shape), device=r.device)
        split = shape_at(module, split, image)
        with torch.enable_grad():
            res = freeeagle(module, split, classes)
        tendency = ", ".join(f"{v:.3f}" for v in res.tendency)
        return DetectorResult(
            res.metric,
            res.p_value,
            res.target,
            f"class {res.target}: anomaly metric {res.metric:.2f} (mean score per class {tendency}; cut at "
            f"{split.tensor!r}, {split.position:.0%} of the weighted layers, shape {list(split.shape)}; "
            f"{res.reached} of {classes} classes reached; {res.steps} steps, {res.seconds:.1f} s)",
        )
