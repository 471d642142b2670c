"""Measuring many variants of one model on one prepared data set (ACC / ASR / RA, docs/algorithms.md, "Metrics").

A sweep sanitizes the same model dozens of times; what must not be repeated is reading, resizing, triggering and
normalising the images. :func:`prepare` does that once, through the evaluator's own
:func:`~onnxclp.eval.run.prepare_run` (same :class:`~onnxclp.eval.options.RunOptions`, loaders, triggers and
preprocessing, so the numbers are those ``onnxclp evaluate`` prints), and keeps the model-ready batches in
memory; :func:`measure` runs one model, given as a ModelProto held in memory, over them with onnxruntime and
returns the evaluator's :class:`~onnxclp.eval.metrics.Metrics`.

:func:`load_inline` reads a model file, external data included (``model.onnx.data`` as the dynamo exporter
writes it), into one self-contained ModelProto, through onnxclp's safe loader.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from onnxclp.eval.metrics import Metrics
from onnxclp.eval.options import RunOptions
from onnxclp.io import iter_tensors, load_model, write_array

PathLike = str | os.PathLike[str]

__all__ = ["Metrics", "Prepared", "load_inline", "measure", "prepare"]


def load_inline(path: PathLike) -> onnx.ModelProto:
    """The model at ``path`` with every external tensor read into the proto (checked as ``sanitize`` does)."""
    model, store = load_model(path)
    for tensor in iter_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            write_array(tensor, store.read(tensor))
    return model


@dataclass
class Prepared:
    """Model-ready batches: clean images of every sample, triggered images of the attacked subset.

    ``triggered`` is empty when there is no attack (calibration needs clean accuracy only).
    """

    labels: list[np.ndarray]
    clean: list[np.ndarray]
    attacked: list[np.ndarray]  # boolean mask of the attacked samples of each batch
    triggered: list[np.ndarray]
    y_attacked: list[np.ndarray]
    target: int
    mode: str
    num_classes: int
    attack: dict[str, Any]
    data: str
    device: str = "cpu"
    threads: int | None = None
    input: dict[str, Any] = field(default_factory=dict)

    @property
    def n_samples(self) -> int:
        return int(sum(len(y) for y in self.labels))

    @property
    def n_attacked(self) -> int:
        return int(sum(len(y) for y in self.y_attacked))

    @property
    def has_attack(self) -> bool:
        return bool(self.triggered)


def prepare(
    model: onnx.ModelProto | bytes | PathLike,
    data: Any,
    attack: Any = None,
    *,
    options: RunOptions | None = None,
    **run_options: Any,
) -> Prepared:
    """Load ``data`` (a path the evaluator reads, or an ImageSet), build the attack, and prepare every batch once,
    as ``onnxclp evaluate`` would with the same :class:`~onnxclp.eval.options.RunOptions` (``options``, or its
    fields as keyword arguments: ``attack_config``, ``params``, ``mean``, ``std``, ``limit``, ``indices``,
    ``batch_size``, ``device``, ``threads``...).

    ``model`` is only read for its input format and number of classes. ``indices`` picks samples explicitly
    (e.g. a held-out split); otherwise ``limit`` draws that many with the attack's seed, as ``evaluate`` does.
    """
    from onnxclp.eval.run import prepare_run

    opts = RunOptions.build(options, **run_options, **({} if attack is None else {"attack": attack}))
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    run = prepare_run([model], data, opts)
    out = Prepared(
        [], [], [], [], [], run.config.target, run.config.mode, run.num_classes, run.config.to_dict(),
        run.data_name, opts.device, opts.threads, run.runners[0].input.to_dict(),
    )  # fmt: skip
    for b in run.batches(prefetch=0):
        assert b.attacked is not None
        out.labels.append(b.y)
        out.clean.append(b.clean)
        out.attacked.append(b.attacked)
        out.y_attacked.append(b.y_attacked)
        if b.triggered is not None:
            out.triggered.append(b.triggered)
    return out


def measure(model: onnx.ModelProto | bytes | PathLike, prepared: Prepared) -> Metrics:
    """ACC (and, when ``prepared`` has an attack, ASR and RA) of ``model`` on the prepared batches."""
    from onnxclp.eval.runner import OnnxClassifier

    runner = OnnxClassifier(model, device=prepared.device, threads=prepared.threads)
    counts = Metrics(prepared.target, prepared.mode, prepared.num_classes)
    for i, (y, x) in enumerate(zip(prepared.labels, prepared.clean, strict=True)):
        counts.add_clean(runner.predict(x), y)
        if prepared.has_attack:
            counts.add_triggered(runner.predict(prepared.triggered[i]), prepared.y_attacked[i])
    return counts
