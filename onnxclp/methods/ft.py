"""FT: plain fine-tuning on the clean images, with distillation from the input model (the baseline of every
fine-tuning defence; e.g. Liu, Dolan-Gavitt & Garg, "Fine-Pruning", RAID 2018, section 4; BackdoorBench's "FT").

Cross-entropy on the augmented clean images plus ``--distill`` times the distillation term
(:mod:`onnxclp.defences.repair`), BatchNorm re-inserted where the exporter folded it, the checkpoint chosen by
the accuracy guard. Rewrites initializer values only (docs/algorithms.md, "Fine-tuning repairs").
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from onnxclp.methods import register
from onnxclp.methods._repair import RepairMethod

if TYPE_CHECKING:
    from onnxclp.defences.repair import Objective
    from onnxclp.pipeline import State


@register
class FT(RepairMethod):
    name = "ft"
    order = 30
    description = "Fine-tuning on the clean images with distillation from the input (baseline); rewrites weights."
    paper = "Liu, Dolan-Gavitt & Garg, Fine-Pruning (fine-tuning defence), RAID 2018"

    def objective(self, state: State) -> Objective:
        from onnxclp.defences.repair import Objective

        return Objective()
