"""The accuracy guard's two passes (:mod:`onnxclp.guard` has the rule): ``split`` before the method decides,
``check`` after the model was edited.

``split`` runs only when clean images were given (``context['clean_data']``): it reads them once, splits them
(seeded, :func:`onnxclp.guard.split_parts`) into the part the method may fit on and the validation part, which
tests its candidates in sequence and checks the result (with ``--select-fraction``, a selection part chooses
among the candidates and the validation part only checks; ``state.clean``), and, when
the model will be written, measures the input model on the validation and selection parts with onnxruntime. ``check``
measures the edited model on the same images and applies the guard's rule (:func:`onnxclp.guard.decide`).
Both import torch and onnxruntime inside (the ``eval`` extra): the weight-only path without clean images
never reaches them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from onnxclp.errors import OnnxclpError
from onnxclp.guard import (
    DEFAULT_CONFIDENCE,
    DEFAULT_MAX_ACC_DROP,
    DEFAULT_VAL_FRACTION,
    MIN_FIT,
    MIN_VAL,
    SYNTHETIC_VAL_FRACTION,
    GuardResult,
    blind,
    decide,
    paired_drop,
    split_indices,
    split_parts,
    z_of,
)
from onnxclp.pipeline import PassResult, State

if TYPE_CHECKING:
    import torch

    from onnxclp.io import TensorStore

INLINE_LIMIT = 2_000_000_000  # bytes: onnxruntime reads a model from memory only below protobuf's 2 GiB


@dataclass
class CleanSplit:
    """The clean images as the model takes them (normalised, in its layout), split once for the whole run."""

    x: torch.Tensor
    y: torch.Tensor
    fit: np.ndarray  # indices the method may use
    val: np.ndarray  # indices it never sees: the guard's final check only
    what: str
    metric: str = "clean accuracy"
    right_before: np.ndarray | None = None  # the input model right/wrong on each validation image
    pred_before: np.ndarray | None = None
    synthetic: dict[str, Any] | None = None  # --clean-data synthetic: what the synthesis did (onnxclp.defences.synth)
    sel: np.ndarray | None = None  # indices that choose among a method's candidates (None: the validation part)
    right_before_sel: np.ndarray | None = None  # the input model right/wrong on each selection image

    @property
    def x_fit(self) -> torch.Tensor:
        return self.x[self.fit]

    @property
    def y_fit(self) -> torch.Tensor:
        return self.y[self.fit]

    @property
    def x_val(self) -> torch.Tensor:
        return self.x[self.val]

    @property
    def y_val(self) -> torch.Tensor:
        return self.y[self.val]

    @property
    def selection(self) -> np.ndarray:
        """Indices that choose among a method's candidates (epochs, counts, strengths): the selection part, or
        the validation part when the images were too few for three parts (:func:`onnxclp.guard.split_parts`)."""
        return self.val if self.sel is None else self.sel

    @property
    def selection_name(self) -> str:
        """Which part chooses the candidates, for messages: ``"selection"`` or ``"validation"``."""
        return "validation" if self.sel is None else "selection"

    @property
    def x_sel(self) -> torch.Tensor:
        return self.x[self.selection]

    @property
    def y_sel(self) -> torch.Tensor:
        return self.y[self.selection]

    @property
    def right_before_selection(self) -> np.ndarray | None:
        """The input model right/wrong on each selection image (None until ``split`` measured it)."""
        return self.right_before if self.sel is None else self.right_before_sel

    def sequence_z(self, guard: GuardResult | None) -> float | None:
        """The z at which a method's candidates are tested in fixed sequence on the validation part (the guard's
        own, from ``--confidence``), or None when a selection part chooses them (or no guard runs): they are then
        chosen with :data:`onnxclp.guard.SELECT_Z` (docs/algorithms.md, "Testing candidates in sequence")."""
        return z_of(guard.confidence) if self.sel is None and guard is not None else None

    def mark_selection(self, guard: GuardResult | None, sequence: bool = False) -> None:
        """Record in the guard's result that candidates were chosen, and on which part; ``sequence``: on the
        validation part, tested in fixed sequence (:data:`GuardResult.tested_in_sequence`)."""
        if guard is not None and self.sel is None:
            guard.selected_on_validation = True
            guard.tested_in_sequence = guard.tested_in_sequence or sequence


def model_bytes(model: onnx.ModelProto, store: TensorStore) -> bytes:
    """The model serialized with every tensor held inline (external data read through the checked store), for
    an onnxruntime session in memory."""
    from onnx import TensorProto

    from onnxclp.io import iter_tensors

    if not store.has_external:
        return model.SerializeToString()
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for t in iter_tensors(copy):
        if t.data_location == TensorProto.EXTERNAL:
            store.write(t, store.read(t))  # same value, now inline (the copy only)
    if copy.ByteSize() > INLINE_LIMIT:
        raise OnnxclpError("the accuracy guard cannot run a model over 2 GiB from memory yet; use --force")
    return copy.SerializeToString()


def _classifier(model: onnx.ModelProto, store: TensorStore, x: torch.Tensor, device: str) -> Any:
    from onnxclp.eval.runner import OnnxClassifier

    layout = "nhwc" if x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3) else "nchw"
    return OnnxClassifier(model_bytes(model, store), device=device, layout=layout)


def predict(model: onnx.ModelProto, store: TensorStore, x: torch.Tensor, device: str = "auto") -> np.ndarray:
    """Class predictions of ``model`` on ``x`` (model layout and normalisation) with onnxruntime."""
    return _classifier(model, store, x, device).predict(x.detach().cpu().numpy())


def scores(model: onnx.ModelProto, store: TensorStore, x: torch.Tensor, device: str = "auto") -> np.ndarray:
    """The first output of ``model`` on ``x`` (its scores: logits or probabilities), with onnxruntime as
    :func:`predict` runs it."""
    clf = _classifier(model, store, x, device)
    arr = x.detach().cpu().numpy()
    from onnxclp.eval.runner import as_dtype

    return clf.logits(as_dtype(arr, clf.input.dtype))


def _context(state: State) -> dict[str, Any]:
    return dict(state.options.context)


def load_clean(state: State) -> CleanSplit:
    """Read and split the clean images of ``state.options.context`` (see the module docstring)."""
    from onnxclp.methods._fewshot import clean_images

    ctx = _context(state)
    if ctx.get("clean_arrays") is None and _is_synthetic(ctx.get("clean_data")):
        return load_synthetic(state)
    mask = saved_synthetic_mask(ctx.get("clean_data")) if ctx.get("clean_arrays") is None else None
    if mask is not None:
        return load_saved_synthetic(state, mask)
    x, y, what = clean_images(state)
    select = ctx.get("select_fraction")
    fit, sel, val = split_parts(
        len(y), float(ctx.get("val_fraction") or DEFAULT_VAL_FRACTION), None if select is None else float(select)
    )
    metric = str(ctx.get("guard_metric") or "clean accuracy")
    return CleanSplit(x, y, fit, val, what, metric, sel=sel)


# -- --clean-data synthetic[:N] (issue 21): stand-in images made from the model itself -------------------------

SYNTHETIC_METRIC = "agreement with the input model"


def _is_synthetic(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower().startswith("synthetic")


def as_model_input(state: State, pixels: torch.Tensor, layout: str) -> torch.Tensor:
    """Images (N, C, H, W) in [0, 1] as the model takes them: normalised with the context's ``mean``/``std`` and in
    the model's ``layout`` (:func:`onnxclp.methods._fewshot.input_layout`)."""
    from onnxclp.defences._inputs import normaliser, to_model

    ctx = _context(state)
    x = to_model(pixels, normaliser(tuple(pixels.shape[1:]), ctx.get("mean"), ctx.get("std"), 1, "cpu"))
    return x.permute(0, 2, 3, 1).contiguous() if layout == "nhwc" else x


def load_synthetic(state: State) -> CleanSplit:
    """``clean_data`` = ``synthetic[:N]``: N images made from the input model (:mod:`onnxclp.defences.synth`), split
    in the same proportions as clean images: the method's part optimised (model inversion), the validation part
    procedural and not optimised (agreement on held-out inverted images does not see a repair's damage); all
    labelled by the input model with onnxruntime (so the input agrees with every label). The guard's metric is
    agreement with the input model. ``save_synthetic`` (a folder) receives the set and a grid picture
    (:func:`onnxclp.defences.synth.save`)."""
    import torch

    from onnxclp.defences.synth import parse_spec, save, synthesize_for_state
    from onnxclp.methods._fewshot import input_layout

    ctx = _context(state)
    n, overrides = parse_spec(ctx["clean_data"])
    if n < MIN_VAL + MIN_FIT:
        raise OnnxclpError(f"--clean-data synthetic:{n}: the guard needs at least {MIN_VAL + MIN_FIT} images")
    fit, val = split_indices(n, float(ctx.get("val_fraction") or SYNTHETIC_VAL_FRACTION))
    # the method's images are optimised; the validation images are procedural, not optimised (synthesize_for_state)
    syn = synthesize_for_state(state, len(fit), len(val), overrides)
    x = as_model_input(state, torch.from_numpy(syn.x), input_layout(state)[0])
    y = predict(state.model, state.store, x, str(ctx.get("device") or "auto"))  # the labels the guard checks
    syn.y = y.astype(np.int64)
    if ctx.get("save_synthetic") is not None:
        save(syn, ctx["save_synthetic"])
    info = syn.info
    what = (
        f"{len(fit)} images synthesized from the input model ({info['mode']}, {info['settings']['steps']} steps, "
        f"{info['batchnorm_layers_matched']} BatchNorm layers matched) and {len(val)} unoptimised procedural "
        f"validation images, {info['seconds']:.0f} s, labelled by the input model"
    )
    clean = CleanSplit(x, torch.as_tensor(syn.y), np.arange(len(fit)), np.arange(len(fit), n), what, SYNTHETIC_METRIC)
    clean.synthetic = {k: v for k, v in info.items() if k != "label_counts"}
    clean.synthetic["label_counts"] = np.bincount(syn.y[: len(fit)], minlength=int(info["classes"])).tolist()
    return clean


def saved_synthetic_mask(path: Any) -> np.ndarray | None:
    """The ``validation`` column of a set ``--save-synthetic`` wrote (:func:`onnxclp.defences.synth.save`), or None
    when ``path`` is not such a file (any other .npz, a folder, a CIFAR batch: read as clean images)."""
    from pathlib import Path

    if path is None or isinstance(path, (list, tuple)) or Path(str(path)).suffix.lower() != ".npz":
        return None
    if not Path(str(path)).is_file():
        return None  # the clean-image reader says what is missing
    try:
        with np.load(str(path), allow_pickle=False) as data:
            if "validation" not in data.files or "x_test" not in data.files:
                return None
            mask = np.asarray(data["validation"])
    except (OSError, ValueError) as exc:
        raise OnnxclpError(f"{path}: not a readable .npz ({exc})") from exc
    if mask.dtype != np.bool_ or mask.ndim != 1:
        raise OnnxclpError(f"{path}: 'validation' must be a 1-D boolean array (a --save-synthetic set), got "
                           f"{mask.dtype} {mask.shape}")  # fmt: skip
    return mask


def load_saved_synthetic(state: State, mask: np.ndarray) -> CleanSplit:
    """``clean_data`` = a ``synthetic.npz`` that ``--save-synthetic`` wrote: read back as the synthesized set it
    is, not as clean images. The file's own split is kept (its ``validation`` images, procedural and unoptimised,
    are the guard's validation part; a random split would validate on inverted images, where a broken repair
    still agrees with the input: :func:`onnxclp.defences.synth.synthesize_for_state`), the whole set is used
    (``--clean-n`` does not subsample it), and the images are labelled again by the model being repaired, so
    the guard's metric is agreement with that model, whichever model made the set. ``mask``: the file's
    ``validation`` column (:func:`saved_synthetic_mask`)."""
    import torch

    from onnxclp.methods._fewshot import clean_images

    ctx = _context(state)
    path = ctx["clean_data"]
    with np.load(str(path), allow_pickle=False) as data:
        n = len(data["x_test"])
        targets = np.asarray(data["targets"]).astype(np.int64) if "targets" in data.files else None
    if len(mask) != n:
        raise OnnxclpError(f"{path}: 'validation' has {len(mask)} entries for {n} images")
    fit, val = np.flatnonzero(~mask), np.flatnonzero(mask)
    if len(val) < MIN_VAL or len(fit) < MIN_FIT:
        raise OnnxclpError(f"{path}: {len(fit)} method images and {len(val)} validation images; the guard needs at "
                           f"least {MIN_FIT} and {MIN_VAL}")  # fmt: skip
    x, _, _ = clean_images(state, n=n)  # the saved split is the file's: read it whole, in its order
    y = predict(state.model, state.store, x, str(ctx.get("device") or "auto")).astype(np.int64)
    what = (f"{len(fit)} synthesized images and {len(val)} procedural validation images read back from {path}, "
            "labelled by the input model")  # fmt: skip
    clean = CleanSplit(x, torch.as_tensor(y), fit, val, what, SYNTHETIC_METRIC)
    classes = int(y.max()) + 1 if len(y) else 1
    reached = float(np.mean(y[fit] == targets[fit])) if targets is not None and len(targets) == n else float("nan")
    clean.synthetic = {"saved": str(path), "classes": classes, "reached_target": reached,
                       "label_counts": np.bincount(y[fit], minlength=classes).tolist()}  # fmt: skip
    return clean


# -- data-free methods that run the model, without --clean-data (issue 21.4) ------------------------------------

PROBE_N = 500  # procedural images the input and the result classify (about 1 s on a CIFAR ResNet)


def _probes(state: State) -> bool:
    """A data-free method that runs the model (torch and onnxruntime already needed), editing, no clean images."""
    return state.options.edit and state.method.needs == "nothing" and state.method.extra == "eval"


def probe_input(state: State) -> None:
    """Classify :data:`PROBE_N` seeded procedural images (:func:`onnxclp.defences.synth.procedural`) with the input
    model; :func:`probe_result` says how many the result classifies differently. No accuracy and no refusal: the
    images have no labels; the share is in the report so that a data-free run is never silent about a model it
    changed on most inputs."""
    import torch

    from onnxclp.defences.synth import procedural
    from onnxclp.methods._fewshot import input_layout

    ctx = _context(state)
    try:
        layout, channels, hw = input_layout(state)
    except OnnxclpError:
        return  # not an image model: nothing to probe with
    x = as_model_input(state, procedural(PROBE_N, (channels, *hw), torch.Generator().manual_seed(0)), layout)
    state.probe = (x, predict(state.model, state.store, x, str(ctx.get("device") or "auto")))


def probe_result(state: State) -> None:
    """The share of the probe images whose predicted class the edit changed, as a note of the report."""
    x, before = state.probe
    after = predict(state.model, state.store, x, str(_context(state).get("device") or "auto"))
    changed = float(np.mean(after != before))
    state.notes.append(
        f"{state.params.method}: the result changed its predicted class on {100 * changed:.1f}% of {len(before)} "
        "procedural images (no clean data given: this is not accuracy; --clean-data gives the guard's check)"
        + ("; WARNING: most of them" if changed > 0.5 else "")
    )


def split(state: State) -> PassResult:
    """Pipeline pass: read and split the clean images, measure the input on the validation part."""
    ctx = _context(state)
    if ctx.get("clean_data") is None and ctx.get("clean_arrays") is None:
        if _probes(state):
            probe_input(state)
        return PassResult()
    state.method.precheck(state)  # a model the method refuses anyway is refused before any image is read
    if state.clean is None:
        state.clean = load_clean(state)
    clean: CleanSplit = state.clean
    budget = float(ctx["max_acc_drop"]) if ctx.get("max_acc_drop") is not None else DEFAULT_MAX_ACC_DROP
    if budget < 0:
        raise OnnxclpError(f"--max-acc-drop must be >= 0, got {budget:g}")
    confidence = float(ctx["guard_confidence"]) if ctx.get("guard_confidence") is not None else DEFAULT_CONFIDENCE
    z_of(confidence)  # a clear error before any work
    result = GuardResult(
        n_fit=len(clean.fit),
        n_val=len(clean.val),
        val_fraction=float(
            ctx.get("val_fraction") or (SYNTHETIC_VAL_FRACTION if clean.synthetic is not None else DEFAULT_VAL_FRACTION)
        ),
        budget=budget,
        acc_before=float("nan"),
        confidence=confidence,
        metric=clean.metric,
        data=clean.what,
    )
    if clean.synthetic is not None:
        info = clean.synthetic
        result.notes.append(
            f"synthetic data: {clean.what}; {100 * info['reached_target']:.0f}% of the method's images labelled with "
            f"the class they were made for; labels per class {info['label_counts']}"
        )
    if clean.sel is not None:
        result.n_select = len(clean.sel)
    if state.options.edit:
        # one onnxruntime session for both held-out parts: the validation part, then the selection part if any
        both = clean.val if clean.sel is None else np.concatenate([clean.val, clean.sel])
        pred_all = predict(state.model, state.store, clean.x[both], str(ctx.get("device") or "auto"))
        right_all = pred_all == clean.y[both].numpy()
        n_val = len(clean.val)
        clean.pred_before = pred_all[:n_val]
        clean.right_before = right_all[:n_val]
        result.acc_before = float(clean.right_before.mean())
        if clean.sel is not None:
            clean.right_before_sel = right_all[n_val:]
    state.guard = result
    return PassResult(len(clean.val))


def check(state: State) -> PassResult:
    """Pipeline pass: measure the edited model on the validation part and apply the guard's rule."""
    if state.probe is not None and state.options.edit:
        probe_result(state)
    if state.guard is None or not state.options.edit:
        return PassResult()
    clean: CleanSplit = state.clean
    assert clean.right_before is not None and clean.pred_before is not None
    pred = predict(state.model, state.store, clean.x_val, str(_context(state).get("device") or "auto"))
    right = pred == clean.y_val.numpy()
    changed = float(np.mean(pred != clean.pred_before))
    if clean.synthetic is not None:  # data-free: never silent about a model changed on many inputs (issue 21)
        state.guard.notes.append(
            f"synthetic data: the result changed its predicted class on {100 * changed:.1f}% of the {len(clean.val)} "
            "synthesized validation images (agreement with the input model, not clean accuracy)"
        )
    decide(state.guard, paired_drop(clean.right_before, right), changed, state.options.force)
    blind(state.guard, clean.right_before, clean.y_val.numpy(), state.options.force)  # after: the report's figures
    state.notes.extend(state.guard.notes)
    return PassResult(1)
