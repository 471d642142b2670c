"""What the data-free methods and detectors share when they run the model from the pipeline: the torch module of
the state's model, the input shape (the graph's, or ``--input-shape``), the layout and the normalisation
(``--mean``/``--std``), from ``state.options.context``. Imports torch: only the ``eval`` extra's commands call it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from onnxclp.errors import OnnxclpError

if TYPE_CHECKING:
    from onnxclp.defences._inputs import SyntheticInput
    from onnxclp.pipeline import State


@dataclass
class ModelRun:
    module: Any  # onnxclp.bridge.OnnxModule
    input_shape: tuple[int, ...]  # one image, no batch dimension
    channel_axis: int  # 1 (NCHW) or -1 (NHWC), in the batched tensor
    mean: list[float] | None
    std: list[float] | None
    device: str

    def inputs(self, mean: list[float] | None = None, std: list[float] | None = None) -> SyntheticInput:
        """The :class:`~onnxclp.defences._inputs.SyntheticInput` of this model (images in [0, 1]); ``mean`` and
        ``std`` default to the run's (``--mean``/``--std``)."""
        from onnxclp.defences._inputs import SyntheticInput

        mean, std = (self.mean, self.std) if mean is None and std is None else (mean, std)
        return SyntheticInput(self.input_shape, mean=mean, std=std, channel_axis=self.channel_axis, device=self.device)

    def normalization(self, model: Any) -> tuple[list[float] | None, list[float] | None, str]:
        """(mean, std, where from) of ``model``'s input: ``--mean``/``--std``, else what the model records in its
        metadata, else pixels 0..255 for an 8-bit input (:func:`onnxclp.eval.normalize.input_normalization`), else
        none (images in [0, 1] fed as they are)."""
        if self.mean is not None or self.std is not None:
            return self.mean, self.std, "--mean/--std"
        from onnxclp.eval.normalize import EIGHT_BIT, input_normalization

        found = input_normalization(model)
        if found is None:
            return None, None, "none: images in [0, 1]"
        return found[0], found[1], EIGHT_BIT if found[2] == EIGHT_BIT else "metadata"


def model_run(state: State) -> ModelRun:
    """The state's model as a torch module, with its input geometry (exit 3 naming an op the bridge lacks)."""
    import torch

    from onnxclp.bridge import input_spec, to_torch

    ctx = state.options.context
    shape, _ = input_spec(state.model)
    given = ctx.get("input_shape")
    dims = tuple(int(d) for d in given) if given is not None else tuple(shape[1:])
    if len(dims) != 3 or any(d is None or d <= 0 for d in dims):
        raise OnnxclpError(
            f"the model's input shape {list(shape)} does not give one image's C,H,W: pass --input-shape C,H,W"
        )
    channel_axis = -1 if dims[-1] in (1, 3) and dims[0] not in (1, 3) else 1
    device = str(ctx.get("device") or "cpu").lower()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    # a QDQ graph's activations read as floats: the searches over inputs run on the network the quantised one
    # approximates, not on its clipped activations (docs/bridge.md, "Quantized weights")
    module = to_torch(state.model, store=state.store, logits=True, float_activations=True).to(device).eval()
    return ModelRun(module, dims, channel_axis, ctx.get("mean"), ctx.get("std"), device)  # type: ignore[arg-type]
