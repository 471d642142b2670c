"""Measuring many variants of one model on one prepared data set (ACC / ASR / RA, docs/algorithms.md, "Metrics").

A sweep sanitizes the same model dozens of times; what must not be repeated is reading, resizing, triggering and
normalising the images. :func:`prepare` does that once (with the evaluator's own loaders, triggers and
preprocessing, so the numbers are those ``onnxclp evaluate`` prints) and keeps the model-ready batches in
memory; :func:`measure` runs one model, given as a ModelProto held in memory, over them with onnxruntime.

:func:`load_inline` reads a model file, external data included (``model.onnx.data`` as the dynamo exporter
writes it), into one self-contained ModelProto, through onnxclp's safe loader.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from onnxclp.errors import OnnxclpError
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
class Metrics:
    """ACC, ASR and RA of one model on a :class:`Prepared` set, with the counts behind them."""

    acc: float | None
    asr: float | None
    ra: float | None
    clean_correct: int
    clean_total: int
    attack_hits: int
    attack_total: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


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
    attack_config: PathLike | None = None,
    params: Mapping[str, Any] | None = None,
    target: int | None = None,
    mode: str | None = None,
    seed: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    layout: str | None = None,
    input_size: Sequence[int] | None = None,
    limit: int | None = None,
    indices: Sequence[int] | None = None,
    batch_size: int = 256,
    device: str = "cpu",
    threads: int | None = None,
    x_key: str | None = None,
    y_key: str | None = None,
) -> Prepared:
    """Load ``data`` (a path the evaluator reads, or an ImageSet), build the attack from ``attack`` /
    ``attack_config`` (as ``onnxclp evaluate`` does), and prepare every batch once.

    ``model`` is only read for its input format and number of classes. ``indices`` picks samples explicitly
    (e.g. a held-out split); otherwise ``limit`` draws that many with the attack's seed, as ``evaluate`` does.
    """
    from onnxclp.eval.api import _setup
    from onnxclp.eval.attacks import attacked_mask
    from onnxclp.eval.runner import prepared_batches

    if batch_size < 1:
        raise OnnxclpError(f"--batch-size must be >= 1, got {batch_size}")
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    s = _setup(
        [model], data, attack, params, attack_config, target, mode, seed, mean, std, layout,
        input_size, limit, device, x_key, y_key, threads,
    )  # fmt: skip
    idx = s.indices
    if indices is not None:
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(s.data)):
            raise OnnxclpError(f"sample indices out of range for {len(s.data)} samples")
    no_trigger = s.attack.name == "none"
    out = Prepared(
        [], [], [], [], [], s.config.target, s.config.mode, s.num_classes, s.config.to_dict(),
        getattr(s.data, "description", str(data)), device, threads, s.runners[0].input.to_dict(),
    )  # fmt: skip
    batches = prepared_batches(
        s.data, idx, batch_size, None if no_trigger else s.attack, s.config.target, s.config.mode, s.pre, prefetch=0
    )
    for b in batches:
        out.labels.append(b.y)
        out.clean.append(b.clean)
        out.attacked.append(attacked_mask(b.y, s.config.target, s.config.mode))
        out.y_attacked.append(b.y_attacked)
        if b.triggered is not None:
            out.triggered.append(b.triggered)
    return out


def measure(model: onnx.ModelProto | bytes | PathLike, prepared: Prepared) -> Metrics:
    """ACC (and, when ``prepared`` has an attack, ASR and RA) of ``model`` on the prepared batches."""
    from onnxclp.eval.metrics import MetricCounts
    from onnxclp.eval.runner import OnnxClassifier

    runner = OnnxClassifier(model, device=prepared.device, threads=prepared.threads)
    counts = MetricCounts(prepared.target, prepared.mode, prepared.num_classes)
    for i, (y, x) in enumerate(zip(prepared.labels, prepared.clean, strict=True)):
        counts.add_clean(runner.predict(x), y)
        if prepared.has_attack:
            counts.add_triggered(runner.predict(prepared.triggered[i]), prepared.y_attacked[i])
    return Metrics(
        counts.acc, counts.asr, counts.ra, counts.clean_correct, counts.clean_total, counts.attack_hits,
        counts.attack_total,
    )  # fmt: skip
