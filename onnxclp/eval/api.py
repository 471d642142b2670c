"""Python API of the evaluation side: :func:`evaluate` and :func:`compare`.

Both read a local data set, build the attack set with the torch triggers of :mod:`onnxclp.eval.attacks`
(trigger in [0, 1], then normalisation: docs/algorithms.md, "Attacks"), run the model(s) with onnxruntime and report
ACC, ASR and RA as defined in docs/algorithms.md, "Metrics", with sample counts and throughput. ``compare`` runs both
models on the very same batches, so their numbers differ only by the models.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from onnxclp.errors import OnnxclpError
from onnxclp.eval.attacks import (
    Attack,
    AttackConfig,
    attacked_mask,
    build_attack,
    load_attack_config,
)
from onnxclp.eval.data import ImageSet, load_dataset
from onnxclp.eval.metrics import MetricCounts
from onnxclp.eval.runner import InputSpec, OnnxClassifier, Preprocess, prepared_batches

__all__ = ["CompareResult", "EvalResult", "ModelMetrics", "compare", "evaluate", "save_example_grid"]

PathLike = str | os.PathLike[str]


@dataclass
class ModelMetrics:
    """ACC/ASR/RA of one model with the counts behind them (rates are None for an empty set)."""

    acc: float | None
    asr: float | None
    ra: float | None
    clean_correct: int
    attack_hits: int
    attack_robust: int

    @classmethod
    def from_counts(cls, c: MetricCounts) -> ModelMetrics:
        return cls(c.acc, c.asr, c.ra, c.clean_correct, c.attack_hits, c.attack_robust)


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
    metrics: ModelMetrics
    images: int
    seconds: float
    images_per_second: float
    total_seconds: float
    examples: str | None = None

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
        d = asdict(self)
        metrics = d.pop("metrics")
        head = {k: d.pop(k) for k in ("model", "data", "provider", "input", "num_classes", "attack")}
        return {**head, **metrics, **d}


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
    original_metrics: ModelMetrics
    sanitized_metrics: ModelMetrics
    agreement: float | None
    triggered_agreement: float | None
    images: int
    seconds: float
    images_per_second: float
    total_seconds: float
    deltas: dict[str, float | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.deltas:
            for name in ("acc", "asr", "ra"):
                a, b = getattr(self.original_metrics, name), getattr(self.sanitized_metrics, name)
                self.deltas[name] = None if a is None or b is None else b - a

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------------------------
# resolving options


def _resolve_attack(
    attack: str | Attack | AttackConfig | None,
    params: Mapping[str, Any] | None,
    attack_config: PathLike | None,
    target: int | None,
    mode: str | None,
    seed: int | None,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
) -> tuple[AttackConfig, Attack]:
    """One AttackConfig from the config file, then explicit arguments over it; the built Attack with it."""
    if isinstance(attack, AttackConfig):
        cfg = attack
    elif attack_config is not None:
        cfg = load_attack_config(attack_config)
    else:
        cfg = AttackConfig("none")
    if isinstance(attack, Attack):
        if attack_config is not None and attack.name not in (cfg.attack, "none"):
            raise OnnxclpError(f"the attack given ({attack.name}) differs from the attack config's ({cfg.attack})")
        built = attack
    else:
        name = attack if isinstance(attack, str) else cfg.attack
        if attack_config is not None and isinstance(attack, str) and attack not in (cfg.attack, "none"):
            raise OnnxclpError(f"--attack {attack} differs from the attack config's {cfg.attack!r}")
        # "none" with a config: the baseline without trigger, keeping the config's target, mode and normalisation
        merged = {**(cfg.params if name == cfg.attack else {}), **(params or {})}
        built = build_attack(name, merged, cfg.seed if seed is None else seed)
    if (mean is None) != (std is None):
        raise OnnxclpError("--mean and --std go together: give both or neither")
    normalize = cfg.normalize
    if mean is not None and std is not None:
        if any(s <= 0 for s in std):
            raise OnnxclpError("--std values must be > 0")
        normalize = {"mean": [float(m) for m in mean], "std": [float(s) for s in std]}
    final = AttackConfig.from_attack(
        built,
        cfg.target if target is None else target,
        cfg.mode if mode is None else mode,
        normalize,
    )
    if final.mode not in ("a2o", "a2a"):
        raise OnnxclpError(f"--mode must be a2o or a2a, got {final.mode!r}")
    if final.target < 0:
        raise OnnxclpError(f"--target must be >= 0, got {final.target}")
    return final, built


def _plan_size(spec: InputSpec, data_hw: tuple[int, int], input_size: Sequence[int] | None) -> tuple[int, int] | None:
    """The H×W images are fed at; resizing happens only when asked for with ``input_size``."""
    if input_size is not None:
        if len(input_size) != 2 or min(input_size) < 1:
            raise OnnxclpError(f"--input-size must be H,W with positive values, got {list(input_size)}")
        size = (int(input_size[0]), int(input_size[1]))
        for got, fixed, what in ((size[0], spec.height, "height"), (size[1], spec.width, "width")):
            if fixed is not None and got != fixed:
                raise OnnxclpError(f"--input-size {size[0]},{size[1]}: the model's input {what} is fixed at {fixed}")
        return size
    model_hw = (spec.height or data_hw[0], spec.width or data_hw[1])
    if model_hw != data_hw:
        raise OnnxclpError(
            f"images are {data_hw[0]}×{data_hw[1]} but the model takes {model_hw[0]}×{model_hw[1]}; "
            f"pass --input-size {model_hw[0]},{model_hw[1]} to resize them"
        )
    return None


def _check_channels(spec: InputSpec, channels: int, normalize: Mapping[str, Any] | None) -> None:
    if spec.channels is not None and spec.channels != channels:
        raise OnnxclpError(f"images have {channels} channel(s) but the model takes {spec.channels}")
    if normalize is not None:
        for key in ("mean", "std"):
            if len(normalize[key]) not in (1, channels):
                raise OnnxclpError(f"--{key} has {len(normalize[key])} values for {channels}-channel images")


def _check_labels(data: ImageSet, num_classes: int, target: int) -> None:
    if len(data) and int(data.labels.max()) >= num_classes:
        raise OnnxclpError(
            f"labels go up to {int(data.labels.max())} but the model has {num_classes} outputs (classes 0..{num_classes - 1})"
        )
    if target >= num_classes:
        raise OnnxclpError(f"--target {target} is not a class of a {num_classes}-class model")


def _select(n: int, limit: int | None, seed: int) -> np.ndarray:
    """All indices, or ``limit`` of them drawn with ``seed`` (sorted): test files are often sorted by class."""
    if limit is None or limit >= n:
        return np.arange(n)
    if limit < 1:
        raise OnnxclpError(f"--limit must be >= 1, got {limit}")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=limit, replace=False))


class _Progress:
    """A rich progress bar on stderr, shown only when stderr is a terminal and ``enabled``."""

    def __init__(self, enabled: bool, total: int, label: str) -> None:
        self.bar = None
        if enabled and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("[progress.description]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            self.bar.start()
            self.task = self.bar.add_task(label, total=total)

    def advance(self, n: int) -> None:
        if self.bar is not None:
            self.bar.advance(self.task, n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def save_example_grid(
    directory: PathLike, clean: torch.Tensor, triggered: torch.Tensor, name: str, count: int = 8
) -> Path:
    """Write ``<name>_examples.png``: clean images, their triggered versions, and |difference| scaled to full
    range (so that faint triggers such as WaNet's warp are visible), one row each, up to ``count`` columns."""
    from PIL import Image

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    n = min(count, clean.shape[0])
    if n == 0:
        raise OnnxclpError("--save-examples: no attacked sample to show")
    a, b = clean[:n].float().cpu(), triggered[:n].float().cpu()
    diff = (b - a).abs()
    diff = diff / diff.amax().clamp_min(1e-8)
    rows = torch.stack([a, b, diff])  # (3, n, C, H, W)
    if rows.shape[2] == 1:
        rows = rows.expand(-1, -1, 3, -1, -1)
    rows = rows[:, :, :3]
    _, _, C, H, W = rows.shape
    scale = max(1, 96 // max(H, W))
    gap = 2
    canvas = torch.ones(C, 3 * (H * scale + gap) + gap, n * (W * scale + gap) + gap)
    for r in range(3):
        for c in range(n):
            tile = rows[r, c].repeat_interleave(scale, 1).repeat_interleave(scale, 2)
            y0, x0 = gap + r * (H * scale + gap), gap + c * (W * scale + gap)
            canvas[:, y0 : y0 + H * scale, x0 : x0 + W * scale] = tile
    pixels = (canvas.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    path = directory / f"{name}_examples.png"
    Image.fromarray(pixels).save(path)
    return path


# --------------------------------------------------------------------------------------------------------------
# evaluate / compare


@dataclass
class _Setup:
    runners: list[OnnxClassifier]
    data: ImageSet
    indices: np.ndarray
    config: AttackConfig
    attack: Attack
    pre: Preprocess
    num_classes: int


def _setup(
    models: Sequence[PathLike],
    data: PathLike | ImageSet,
    attack: str | Attack | AttackConfig | None,
    params: Mapping[str, Any] | None,
    attack_config: PathLike | None,
    target: int | None,
    mode: str | None,
    seed: int | None,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    layout: str | None,
    input_size: Sequence[int] | None,
    limit: int | None,
    device: str,
    x_key: str | None,
    y_key: str | None,
    threads: int | None,
) -> _Setup:
    config, built = _resolve_attack(attack, params, attack_config, target, mode, seed, mean, std)
    runners = [OnnxClassifier(m, device=device, layout=layout, threads=threads) for m in models]
    spec = runners[0].input
    for other in runners[1:]:
        if not other.input.compatible(spec):
            raise OnnxclpError(
                f"the models take different inputs ({spec.describe()} vs {other.input.describe()}); "
                "compare needs one input format"
            )
    if isinstance(data, ImageSet):
        dataset = data
    else:
        folder_size = None
        if input_size is not None:
            folder_size = (int(input_size[0]), int(input_size[1]))
        elif spec.height is not None and spec.width is not None:
            folder_size = (spec.height, spec.width)
        dataset = load_dataset(data, x_key, y_key, channels=spec.channels, size=folder_size)
    _check_channels(spec, dataset.channels, config.normalize)
    size = _plan_size(spec, (dataset.height, dataset.width), input_size)
    h, w = size or (dataset.height, dataset.width)
    classes = {r.probe_classes(dataset.channels, h, w) for r in runners}
    if len(classes) != 1:
        raise OnnxclpError(f"the models have different numbers of classes: {sorted(classes)}")
    num_classes = classes.pop()
    _check_labels(dataset, num_classes, config.target)
    norm = config.normalize
    pre = Preprocess(
        size=size,
        mean=None if norm is None else norm["mean"],
        std=None if norm is None else norm["std"],
        layout=spec.layout,
        dtype=spec.dtype,
    )
    indices = _select(len(dataset), limit, config.seed)
    return _Setup(runners, dataset, indices, config, built, pre, num_classes)


def _data_name(data: PathLike | ImageSet) -> str:
    return data.description if isinstance(data, ImageSet) else str(data)


def evaluate(
    model: PathLike | bytes | Any,
    data: PathLike | ImageSet,
    attack: str | Attack | AttackConfig | None = None,
    *,
    params: Mapping[str, Any] | None = None,
    attack_config: PathLike | None = None,
    target: int | None = None,
    mode: str | None = None,
    seed: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    layout: str | None = None,
    input_size: Sequence[int] | None = None,
    batch_size: int = 256,
    limit: int | None = None,
    device: str = "auto",
    x_key: str | None = None,
    y_key: str | None = None,
    save_examples: PathLike | None = None,
    progress: bool = False,
    threads: int | None = None,
    prefetch: int = 2,
) -> EvalResult:
    """Clean accuracy, attack success rate and robust accuracy of an ONNX classifier (docs/algorithms.md,
    "Metrics" and "Attacks").

    ``attack``: a name (``none``, ``badnets``, ``blended``, ``sig``, ``wanet``, ``bpp``, ``patch``), an
    :class:`Attack` or an :class:`AttackConfig`; ``attack_config`` a JSON file (the trainer's), which
    ``params``/``target``/``mode``/``seed``/``mean``/``std`` override. With ``none``, ASR and RA are measured on
    the clean images of the attacked subset (the model's baseline rate of predicting the target); ``none`` with
    an ``attack_config`` keeps the config's target, mode and normalisation.
    ``model`` may also be held in memory: serialized bytes or a ModelProto with no external data.
    Raises :class:`OnnxclpError` for anything the user can fix.
    """
    if batch_size < 1:
        raise OnnxclpError(f"--batch-size must be >= 1, got {batch_size}")
    t_start = time.perf_counter()
    s = _setup(
        [model], data, attack, params, attack_config, target, mode, seed, mean, std, layout,
        input_size, limit, device, x_key, y_key, threads,
    )  # fmt: skip
    runner = s.runners[0]
    counts = MetricCounts(s.config.target, s.config.mode, s.num_classes)
    no_trigger = s.attack.name == "none"
    images = 0
    examples: Path | None = None
    bar = _Progress(progress, len(s.indices), f"evaluate {runner.path.name}")
    t0 = time.perf_counter()
    try:
        batches = prepared_batches(
            s.data, s.indices, batch_size, None if no_trigger else s.attack, s.config.target, s.config.mode,
            s.pre, prefetch=prefetch, keep_raw_first=save_examples is not None,
        )  # fmt: skip
        for b in batches:
            pred = runner.predict(b.clean)
            counts.add_clean(pred, b.y)
            images += len(b.y)
            if no_trigger:
                counts.add_triggered(pred[attacked_mask(b.y, s.config.target, s.config.mode)], b.y_attacked)
            else:
                assert b.triggered is not None
                counts.add_triggered(runner.predict(b.triggered), b.y_attacked)
                images += len(b.y_attacked)
            if b.raw_clean is not None:
                trig = b.raw_clean if b.raw_triggered is None else b.raw_triggered
                assert save_examples is not None
                examples = save_example_grid(save_examples, b.raw_clean, trig, s.attack.name)
            bar.advance(len(b.y))
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    return EvalResult(
        model=str(model) if isinstance(model, str | os.PathLike) else str(runner.path),
        data=_data_name(data),
        provider=runner.provider,
        input=runner.input.to_dict(),
        num_classes=s.num_classes,
        attack=s.config.to_dict(),
        n_samples=counts.clean_total,
        n_attacked=counts.attack_total,
        metrics=ModelMetrics.from_counts(counts),
        images=images,
        seconds=seconds,
        images_per_second=images / seconds if seconds > 0 else 0.0,
        total_seconds=time.perf_counter() - t_start,
        examples=None if examples is None else str(examples),
    )


def compare(
    original: PathLike,
    sanitized: PathLike,
    data: PathLike | ImageSet,
    attack: str | Attack | AttackConfig | None = None,
    *,
    params: Mapping[str, Any] | None = None,
    attack_config: PathLike | None = None,
    target: int | None = None,
    mode: str | None = None,
    seed: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    layout: str | None = None,
    input_size: Sequence[int] | None = None,
    batch_size: int = 256,
    limit: int | None = None,
    device: str = "auto",
    x_key: str | None = None,
    y_key: str | None = None,
    progress: bool = False,
    threads: int | None = None,
    prefetch: int = 2,
) -> CompareResult:
    """Both models on the same clean and triggered batches: ACC/ASR/RA of each, sanitized − original, and the
    fraction of samples on which their predictions agree (clean and triggered). Options as in :func:`evaluate`.
    """
    if batch_size < 1:
        raise OnnxclpError(f"--batch-size must be >= 1, got {batch_size}")
    t_start = time.perf_counter()
    s = _setup(
        [original, sanitized], data, attack, params, attack_config, target, mode, seed, mean, std, layout,
        input_size, limit, device, x_key, y_key, threads,
    )  # fmt: skip
    counts = [MetricCounts(s.config.target, s.config.mode, s.num_classes) for _ in s.runners]
    same_clean = same_trig = n_trig = 0
    no_trigger = s.attack.name == "none"
    images = 0
    bar = _Progress(progress, len(s.indices), "compare")
    t0 = time.perf_counter()
    try:
        batches = prepared_batches(
            s.data, s.indices, batch_size, None if no_trigger else s.attack, s.config.target, s.config.mode,
            s.pre, prefetch=prefetch,
        )  # fmt: skip
        for b in batches:
            mask = attacked_mask(b.y, s.config.target, s.config.mode)
            preds, preds_trig = [], []
            for runner, c in zip(s.runners, counts, strict=True):
                pred = runner.predict(b.clean)
                c.add_clean(pred, b.y)
                images += len(b.y)
                if no_trigger:
                    pt = pred[mask]
                else:
                    assert b.triggered is not None
                    pt = runner.predict(b.triggered)
                    images += len(b.y_attacked)
                c.add_triggered(pt, b.y_attacked)
                preds.append(pred)
                preds_trig.append(pt)
            same_clean += int((preds[0] == preds[1]).sum())
            same_trig += int((preds_trig[0] == preds_trig[1]).sum())
            n_trig += len(b.y_attacked)
            bar.advance(len(b.y))
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    n = counts[0].clean_total
    return CompareResult(
        original=str(original),
        sanitized=str(sanitized),
        data=_data_name(data),
        provider=s.runners[0].provider,
        input=s.runners[0].input.to_dict(),
        num_classes=s.num_classes,
        attack=s.config.to_dict(),
        n_samples=n,
        n_attacked=counts[0].attack_total,
        original_metrics=ModelMetrics.from_counts(counts[0]),
        sanitized_metrics=ModelMetrics.from_counts(counts[1]),
        agreement=same_clean / n if n else None,
        triggered_agreement=same_trig / n_trig if n_trig else None,
        images=images,
        seconds=seconds,
        images_per_second=images / seconds if seconds > 0 else 0.0,
        total_seconds=time.perf_counter() - t_start,
    )
