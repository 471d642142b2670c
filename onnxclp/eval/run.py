"""One run of one or more models over one attack set: :func:`prepare_run` and the shared batch loop.

:func:`prepare_run` resolves a :class:`~onnxclp.eval.options.RunOptions` once: the attack configuration (the
config file, then explicit options over it), the onnxruntime sessions, the data set, the input size and
normalisation, the samples drawn. :func:`run_models` is the batch loop ``evaluate`` and ``compare`` share: every
model on the very same prepared batches (clean images, then the triggered images of the attacked subset),
one :class:`~onnxclp.eval.metrics.Metrics` per model and the agreement of each model with the first.
``onnxclp.study`` prepares its batches with the same :class:`Run`.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from onnxclp.errors import OnnxclpError
from onnxclp.eval.attacks import Attack, AttackConfig, build_attack, load_attack_config
from onnxclp.eval.data import ImageSet, load_dataset
from onnxclp.eval.metrics import Metrics
from onnxclp.eval.options import RunOptions
from onnxclp.eval.runner import InputSpec, OnnxClassifier, PreparedBatch, Preprocess, prepared_batches

__all__ = ["LoopResult", "Run", "prepare_run", "resolve_attack", "run_models"]

PathLike = str | os.PathLike[str]


def resolve_attack(options: RunOptions) -> tuple[AttackConfig, Attack]:
    """One AttackConfig from the config file, then the explicit options over it; the built Attack with it."""
    attack, attack_config = options.attack, options.attack_config
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
        merged = {**(cfg.params if name == cfg.attack else {}), **(options.params or {})}
        built = build_attack(name, merged, cfg.seed if options.seed is None else options.seed)
    mean, std = options.mean, options.std
    if (mean is None) != (std is None):
        raise OnnxclpError("--mean and --std go together: give both or neither")
    normalize = cfg.normalize
    if mean is not None and std is not None:
        if any(s <= 0 for s in std):
            raise OnnxclpError("--std values must be > 0")
        normalize = {"mean": [float(m) for m in mean], "std": [float(s) for s in std]}
    final = AttackConfig.from_attack(
        built,
        cfg.target if options.target is None else options.target,
        cfg.mode if options.mode is None else options.mode,
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


def _check_channels(spec: InputSpec, channels: int, normalize: dict[str, Any] | None) -> None:
    if spec.channels is not None and spec.channels != channels:
        raise OnnxclpError(f"images have {channels} channel(s) but the model takes {spec.channels}")
    if normalize is not None:
        for key in ("mean", "std"):
            if len(normalize[key]) not in (1, channels):
                raise OnnxclpError(f"--{key} has {len(normalize[key])} values for {channels}-channel images")


def _check_labels(data: ImageSet, num_classes: int, target: int) -> None:
    if len(data) and int(data.labels.max()) >= num_classes:
        raise OnnxclpError(
            f"labels go up to {int(data.labels.max())} but the model has {num_classes} outputs "
            f"(classes 0..{num_classes - 1})"
        )
    if target >= num_classes:
        raise OnnxclpError(f"--target {target} is not a class of a {num_classes}-class model")


def _select(n: int, options: RunOptions, seed: int) -> np.ndarray:
    """``options.indices``, or all indices, or ``limit`` of them drawn with ``seed`` (sorted: test files are
    often sorted by class)."""
    if options.indices is not None:
        idx = np.asarray(options.indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise OnnxclpError(f"sample indices out of range for {n} samples")
        return idx
    limit = options.limit
    if limit is None or limit >= n:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=limit, replace=False))


@dataclass
class Run:
    """Everything :func:`prepare_run` resolved: the sessions, the data, the samples, the attack, the
    preprocessing. :meth:`batches` yields the model-ready batches."""

    runners: list[OnnxClassifier]
    data: ImageSet
    data_name: str
    indices: np.ndarray
    config: AttackConfig
    attack: Attack
    pre: Preprocess
    num_classes: int
    options: RunOptions
    normalize_source: str | None = None  # where the normalisation came from (None: none, raw [0, 1] pixels)

    @property
    def has_trigger(self) -> bool:
        """False for the ``none`` attack: ASR/RA are then measured on the clean images of the attacked subset."""
        return self.attack.name != "none"

    def metrics(self) -> Metrics:
        """An empty :class:`Metrics` for this run's attack and model."""
        return Metrics(self.config.target, self.config.mode, self.num_classes)

    def batches(self, keep_raw_first: bool = False, prefetch: int | None = None) -> Iterator[PreparedBatch]:
        """The prepared batches (prepared ahead on a thread unless ``prefetch`` or the options say 0)."""
        return prepared_batches(
            self.data,
            self.indices,
            self.options.batch_size,
            self.attack if self.has_trigger else None,
            self.config.target,
            self.config.mode,
            self.pre,
            prefetch=self.options.prefetch if prefetch is None else prefetch,
            keep_raw_first=keep_raw_first,
        )


def prepare_run(models: Sequence[Any], data: PathLike | ImageSet, options: RunOptions | None = None) -> Run:
    """Resolve ``options`` for ``models`` (paths, serialized bytes or ModelProtos; they must take one input
    format and have one number of classes) and ``data`` (a path :func:`~onnxclp.eval.data.load_dataset` reads, or
    an ImageSet). Raises :class:`OnnxclpError` for anything the user can fix."""
    options = options or RunOptions()
    config, built = resolve_attack(options)
    runners = [OnnxClassifier(m, device=options.device, layout=options.layout, threads=options.threads) for m in models]
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
        if options.input_size is not None:
            folder_size = (int(options.input_size[0]), int(options.input_size[1]))
        elif spec.height is not None and spec.width is not None:
            folder_size = (spec.height, spec.width)
        dataset = load_dataset(data, options.x_key, options.y_key, channels=spec.channels, size=folder_size)
    config, source = _with_model_normalization(config, options, runners)
    _check_channels(spec, dataset.channels, config.normalize)
    size = _plan_size(spec, (dataset.height, dataset.width), options.input_size)
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
    indices = _select(len(dataset), options, config.seed)
    name = dataset.description if isinstance(data, ImageSet) else str(data)
    return Run(runners, dataset, name, indices, config, built, pre, num_classes, options, source)


def _with_model_normalization(
    config: AttackConfig, options: RunOptions, runners: Sequence[OnnxClassifier]
) -> tuple[AttackConfig, str | None]:
    """The normalisation and where it came from: ``mean``/``std`` given, else the attack config's, else the one
    the models record in their metadata (:mod:`onnxclp.eval.normalize`; models that record different ones are
    refused), else none."""
    if options.mean is not None:
        return config, "--mean/--std"
    if config.normalize is not None:
        return config, "attack config"
    from dataclasses import replace

    from onnxclp.eval.normalize import read_normalization

    found = {}
    for r in runners:
        got = read_normalization(r.session.get_modelmeta().custom_metadata_map)
        if got is not None:
            found[str(r.path)] = got
    if not found:
        if runners and all(np.issubdtype(r.input.dtype, np.integer) for r in runners):
            from onnxclp.eval.normalize import EIGHT_BIT, eight_bit_normalization

            mean, std = eight_bit_normalization()
            return replace(config, normalize={"mean": mean, "std": std}), EIGHT_BIT
        return config, None
    values = {(tuple(m), tuple(s)) for m, s, _ in found.values()}
    if len(values) > 1:
        detail = "; ".join(f"{p}: mean {list(m)} std {list(s)}" for p, (m, s, _) in found.items())
        raise OnnxclpError(f"the models record different normalisations ({detail}); give --mean/--std")
    mean, std, key = next(iter(found.values()))
    return replace(config, normalize={"mean": list(mean), "std": list(std)}), f"model metadata ({key})"


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


@dataclass
class LoopResult:
    """What :func:`run_models` measured: one Metrics per model, agreement counts with the first model,
    images run (clean + triggered, all models), the loop's seconds, and the example grid written, if any."""

    metrics: list[Metrics]
    same_clean: list[int]
    same_triggered: list[int]
    images: int
    seconds: float
    examples: Path | None = None
    n_triggered: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def run_models(run: Run, label: str = "evaluate", save_examples: PathLike | None = None) -> LoopResult:
    """The batch loop: every model of ``run`` on each prepared batch; with the ``none`` attack the clean
    predictions of the attacked subset stand for the triggered ones. ``save_examples``: a folder for the PNG
    grid of the first batch with attacked samples (:func:`onnxclp.eval.examples.save_example_grid`)."""
    counts = [run.metrics() for _ in run.runners]
    same_clean = [0] * len(run.runners)
    same_trig = [0] * len(run.runners)
    images = n_trig = 0
    examples: Path | None = None
    bar = _Progress(run.options.progress, len(run.indices), label)
    # The batches are prepared in torch on a background thread while onnxruntime runs: torch's own intra-op
    # pool would compete with onnxruntime's threads for the same cores (both spin while waiting), so the
    # preparation runs on one torch thread for the duration of the loop (docs/evaluate.md, "Speed").
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    try:
        for b in run.batches(keep_raw_first=save_examples is not None):
            mask = None if run.has_trigger else b.attacked
            first: tuple[np.ndarray, np.ndarray] | None = None
            for i, (runner, c) in enumerate(zip(run.runners, counts, strict=True)):
                pred = runner.predict(b.clean)
                c.add_clean(pred, b.y)
                images += len(b.y)
                if mask is not None:
                    pt = pred[mask]
                else:
                    assert b.triggered is not None
                    pt = runner.predict(b.triggered)
                    images += len(b.y_attacked)
                c.add_triggered(pt, b.y_attacked)
                if first is None:
                    first = (pred, pt)
                else:
                    same_clean[i] += int((pred == first[0]).sum())
                    same_trig[i] += int((pt == first[1]).sum())
            n_trig += len(b.y_attacked)
            if b.raw_clean is not None and save_examples is not None:
                from onnxclp.eval.examples import save_example_grid

                trig = b.raw_clean if b.raw_triggered is None else b.raw_triggered
                examples = save_example_grid(save_examples, b.raw_clean, trig, run.attack.name)
            bar.advance(len(b.y))
    finally:
        seconds = time.perf_counter() - t0
        torch.set_num_threads(torch_threads)
        bar.close()
    return LoopResult(counts, same_clean, same_trig, images, seconds, examples, n_trig)
