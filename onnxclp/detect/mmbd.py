"""``mmbd``: the maximum achievable logit margin per class (Wang, Xiang, Miller & Kesidis, "MM-BD: Post-Training
Detection of Backdoor Attacks with Arbitrary Backdoor Pattern Types Using a Maximum Margin Statistic", IEEE S&P
2024, section III; :mod:`onnxclp.defences.mmbd`). Runs the model on optimised synthetic images through the torch
bridge (the ``eval`` extra); opt-in (``scan --detector mmbd``) because it takes seconds to minutes per model.
Input geometry and normalisation: the graph's input, ``--input-shape``, ``--mean``/``--std``.
"""

from __future__ import annotations

from onnxclp.detect import Detector, DetectorResult, register
from onnxclp.pipeline import State


@register
class MMBD(Detector):
    name = "mmbd"
    description = "MM-BD: per-class maximum logit margin on optimised images, Gamma null (needs torch: 'eval')"
    default = False
    extra = "eval"

    def run(self, state: State) -> DetectorResult | str:
        from onnxclp.defences.mmbd import mmbd
        from onnxclp.defences.run import model_run

        r = model_run(state)
        result = mmbd(r.module, r.inputs())
        margins = ", ".join(f"{m:.1f}" for m in result.margins)
        return DetectorResult(
            float(result.statistic),
            float(result.p_value),
            int(result.target),
            f"class {result.target}: margin {result.statistic:.1f} (margins {margins}; null {result.null_fit})",
        )


def target_class(state: State) -> int:
    """MM-BD's detected target class of the state's model (LPP's ``--target-from mmbd``)."""
    out = MMBD().run(state)
    assert not isinstance(out, str)
    assert out.target is not None
    return out.target
