"""Python API of the evaluation side: :func:`evaluate` and :func:`compare`.

Both read a local data set, build the attack set with the torch triggers of :mod:`onnxclp.eval.attacks`
(trigger in [0, 1], then normalisation: docs/algorithms.md, "Attacks"), run the model(s) with onnxruntime and report ACC,
ASR and RA with sample counts and throughput. Both take one :class:`~onnxclp.eval.options.RunOptions` (or its
fields as keyword arguments), resolve it with :func:`~onnxclp.eval.run.prepare_run` and run the one batch loop
:func:`~onnxclp.eval.run.run_models`: ``compare`` runs both models on the very same batches, so their numbers
differ only by the models.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from time import perf_counter as time_now
from typing import Any

from onnxclp.eval.data import ImageSet
from onnxclp.eval.examples import save_example_grid
from onnxclp.eval.metrics import Metrics
from onnxclp.eval.options import RunOptions
from onnxclp.eval.run import prepare_run, run_models

__all__ = ["CompareResult", "EvalResult", "ModelMetrics", "RunOptions", "compare", "evaluate", "save_example_grid"]

PathLike = str | os.PathLike[str]

ModelMetrics = Metrics  # the former name of the per-model metrics


@dataclass
class EvalResult:
    """What ``onnxclp evaluate`` measures; ``to_dict()`` is its JSON form."""

    model: str
    data: str
    provider: str
    input: dict[str, Any]
    num_classes: int
    attack: dict[str, Any]
    n_samples: int
    n_attacked: int
    metrics: Metrics
    images: int
    seconds: float
    images_per_second: float
    total_seconds: float
    examples: str | None = None
    normalize_source: str | None = None  # --mean/--std, attack config, model metadata (KEY), or None: raw pixels

    @property
    def acc(self) -> float | None:
        return self.metrics.acc

    @property
    def asr(self) -> float | None:
        return self.metrics.asr

    @property
    def ra(self) -> float | None:
        return self.metrics.ra

    def to_dict(self) -> dict[str, Any]:
        """Flat JSON form: the metrics and their counts sit beside the run's description."""
        head = {k: getattr(self, k) for k in ("model", "data", "provider", "input", "num_classes", "attack")}
        tail = {
            k: getattr(self, k)
            for k in (
                "n_samples", "n_attacked", "images", "seconds", "images_per_second", "total_seconds", "examples",
                "normalize_source",
            )
        }  # fmt: skip
        return {**head, **self.metrics.to_dict(), **tail}


@dataclass
class CompareResult:
    """What ``onnxclp compare`` measures: both models on one attack set, differences, agreement."""

    original: str
    sanitized: str
    data: str
    provider: str
    input: dict[str, Any]
    num_classes: int
    attack: dict[str, Any]
    n_samples: int
    n_attacked: int
    original_metrics: Metrics
    sanitized_metrics: Metrics
    agreement: float | None
    triggered_agreement: float | None
    images: int
    seconds: float
    images_per_second: float
    total_seconds: float
    deltas: dict[str, float | None] = field(default_factory=dict)
    normalize_source: str | None = None  # as in EvalResult

    def __post_init__(self) -> None:
        if not self.deltas:
            for name in ("acc", "asr", "ra"):
                a, b = getattr(self.original_metrics, name), getattr(self.sanitized_metrics, name)
                self.deltas[name] = None if a is None or b is None else b - a

    def to_dict(self) -> dict[str, Any]:
        """JSON form: each model's metrics as an object, the deltas, the agreement and the run fields."""
        out: dict[str, Any] = {}
        for k in self.__dataclass_fields__:
            v = getattr(self, k)
            out[k] = v.to_dict() if isinstance(v, Metrics) else (dict(v) if isinstance(v, dict) else v)
        return out


def _model_name(model: Any, runner_path: Path) -> str:
    return str(model) if isinstance(model, str | os.PathLike) else str(runner_path)


def evaluate(
    model: PathLike | bytes | Any,
    data: PathLike | ImageSet,
    attack: Any = None,
    *,
    options: RunOptions | None = None,
    save_examples: PathLike | None = None,
    **run_options: Any,
) -> EvalResult:
    """Clean accuracy, attack success rate and robust accuracy of an ONNX classifier (docs/algorithms.md,
    "Metrics" and "Attacks").

    ``attack``: a name (``none``, ``badnets``, ``blended``, ``sig``, ``wanet``, ``bpp``, ``patch``), an
    :class:`~onnxclp.eval.attacks.Attack` or an :class:`~onnxclp.eval.attacks.AttackConfig` (the ``attack``
    field of :class:`RunOptions`). ``options`` and ``run_options`` (any other field of :class:`RunOptions`:
    ``params``, ``attack_config``, ``target``, ``mode``, ``seed``, ``mean``, ``std``, ``layout``,
    ``input_size``, ``limit``, ``batch_size``, ``device``, ``threads``, ``x_key``, ``y_key``, ``prefetch``,
    ``progress``) say how to run. With ``none``, ASR and RA are measured on the clean images of the attacked
    subset (the model's baseline rate of predicting the target); ``none`` with an ``attack_config`` keeps the
    config's target, mode and normalisation. ``model`` may also be held in memory: serialized bytes or a
    ModelProto with no external data. ``save_examples``: a folder for a PNG of clean/triggered images.
    Raises :class:`OnnxclpError` for anything the user can fix.
    """
    t_start = time_now()
    opts = RunOptions.build(options, **run_options, **({} if attack is None else {"attack": attack}))
    run = prepare_run([model], data, opts)
    runner = run.runners[0]
    loop = run_models(run, f"evaluate {runner.path.name}", save_examples)
    m = loop.metrics[0]
    return EvalResult(
        model=_model_name(model, runner.path),
        data=run.data_name,
        provider=runner.provider,
        input=runner.input.to_dict(),
        num_classes=run.num_classes,
        attack=run.config.to_dict(),
        n_samples=m.clean_total,
        n_attacked=m.attack_total,
        metrics=m,
        images=loop.images,
        seconds=loop.seconds,
        images_per_second=loop.images / loop.seconds if loop.seconds > 0 else 0.0,
        total_seconds=time_now() - t_start,
        examples=None if loop.examples is None else str(loop.examples),
        normalize_source=run.normalize_source,
    )


def compare(
    original: PathLike | bytes | Any,
    sanitized: PathLike | bytes | Any,
    data: PathLike | ImageSet,
    attack: Any = None,
    *,
    options: RunOptions | None = None,
    **run_options: Any,
) -> CompareResult:
    """Both models on the same clean and triggered batches: ACC/ASR/RA of each, sanitized − original, and the
    fraction of samples on which their predictions agree (clean and triggered). Options as in :func:`evaluate`.
    """
    t_start = time_now()
    opts = RunOptions.build(options, **run_options, **({} if attack is None else {"attack": attack}))
    run = prepare_run([original, sanitized], data, opts)
    loop = run_models(run, "compare")
    o, s = loop.metrics
    n = o.clean_total
    return CompareResult(
        original=_model_name(original, run.runners[0].path),
        sanitized=_model_name(sanitized, run.runners[1].path),
        data=run.data_name,
        provider=run.runners[0].provider,
        input=run.runners[0].input.to_dict(),
        num_classes=run.num_classes,
        attack=run.config.to_dict(),
        n_samples=n,
        n_attacked=o.attack_total,
        original_metrics=o,
        sanitized_metrics=s,
        agreement=loop.same_clean[1] / n if n else None,
        triggered_agreement=loop.same_triggered[1] / loop.n_triggered if loop.n_triggered else None,
        images=loop.images,
        seconds=loop.seconds,
        images_per_second=loop.images / loop.seconds if loop.seconds > 0 else 0.0,
        total_seconds=time_now() - t_start,
        normalize_source=run.normalize_source,
    )
