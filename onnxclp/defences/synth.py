"""Synthesized stand-in images: made from the model alone and labelled by it (``--clean-data synthetic[:N]``).

The data-free repairs need images that exercise the model's clean features; without a data set they are
synthesized (docs/algorithms.md, "Synthesized stand-in data"). The starting point is class-conditional model
inversion (Yin et al., "Dreaming to Distill: Data-free Knowledge Transfer via DeepInversion", CVPR 2020): a batch
of images, each given a target class, is optimised so that the model puts it in its class, under image priors
(total variation, an l2 penalty, random jitter and flips at every step) and, where the graph kept its
BatchNormalization nodes, so that the per-channel mean and variance of every BatchNormalization's input over the
batch match the running statistics the layer stored from the training data (the BN-statistics term; measured
here, it is worth about ten points of clean accuracy to a repair trained on the images).

Exporters usually fold BatchNorm into the convolutions: the statistics are then gone and only the priors remain.
The optimisation starts from procedural images (smooth random colour fields with a few random shapes; ``mode=
inversion`` starts from grey noise instead: the two starts were not compared on repairs). The guard's validation
images are procedural and not optimised (:func:`synthesize_for_state`).

What comes out is in pixel space, [0, 1] (the optimisation normalises with the model's mean/std inside), rounded
to 8 bits so that the set saved with ``--save-synthetic`` is exactly what the repair trained on; the targets are
class-balanced; the labels are the model's own predictions on the final images (the target is what the
optimisation aimed at, the label is what the model says). Everything is seeded: on the CPU the same settings give
the same images (torch's CPU kernels used here are deterministic at a fixed thread count).

Cost: every optimisation step is a forward and a backward pass of the model over the batch (weights frozen, no
weight gradients): 16 ms of CPU per image and step on a half-width CIFAR ResNet-18 with BatchNorm folded, 23 ms
with it kept, so the defaults (:class:`SynthSettings`, 20 steps) take two to three minutes of an idle 2-core CPU
for 800 images; ``steps`` trades it (docs/algorithms.md, "Synthesized stand-in data", has the measurements).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from onnxclp.errors import OnnxclpError

if TYPE_CHECKING:
    from onnxclp.bridge import OnnxModule
    from onnxclp.defences.repair import Progress
    from onnxclp.pipeline import State

__all__ = [
    "DEFAULT_N",
    "MODES",
    "SynthSettings",
    "Synthesized",
    "grid",
    "parse_spec",
    "save",
    "synthesize",
    "synthesize_for_state",
    "synthesize_split",
]

DEFAULT_N = 1000
TV_WITH_BN = 3.0  # total-variation weight beside the BatchNorm-statistics term
TV_PRIORS_ONLY = 30.0  # ... and where BatchNorm was folded (the priors carry the images alone)
MODES = ("auto", "inversion", "procedural", "noise")


@dataclass
class SynthSettings:
    """How the images are made.

    ``mode``: ``inversion`` (optimised from white noise), ``procedural`` (optimised from procedural images: the
    default, ``auto``), ``noise`` (procedural images labelled by the model, no optimisation). ``steps`` of Adam
    at ``lr`` (pixel units, cosine decay) in batches of ``batch`` images; ``bn`` weighs the BatchNorm-statistics
    term (where BatchNormalization was kept), ``tv`` the total variation (None: :data:`TV_WITH_BN` where the
    BatchNorm term is used, :data:`TV_PRIORS_ONLY` where not), ``l2`` the squared distance from mid-grey,
    ``first_bn`` multiplies the first BatchNorm's term (DeepInversion's first-layer multiplier), ``jitter`` the
    random shift in pixels, ``flip`` random horizontal flips; ``param`` the optimised variables (``pixel``, or
    ``fourier``: :class:`_Image`); ``seed`` everything random.
    """

    n: int = DEFAULT_N
    mode: str = "auto"
    steps: int = 20
    lr: float = 0.2
    batch: int = 250
    bn: float = 1.0
    first_bn: float = 2.0
    tv: float | None = None  # 3 where BatchNorm statistics are matched, 30 where they are not (both measured)
    l2: float = 0.0
    jitter: int = 2
    flip: bool = True
    param: str = "pixel"
    seed: int = 0


@dataclass
class Synthesized:
    """The synthesized set: ``x`` float32 (N, C, H, W) in [0, 1] (8-bit values), ``y`` the model's labels,
    ``targets`` the class each image was optimised for, ``info`` what was done (for the report)."""

    x: np.ndarray
    y: np.ndarray
    targets: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)
    holdout: int = 0  # the last ``holdout`` images are the guard's validation images (procedural, not optimised)

    def uint8_nhwc(self) -> np.ndarray:
        return np.round(self.x * 255.0).astype(np.uint8).transpose(0, 2, 3, 1)

    @property
    def n_fit(self) -> int:
        return len(self.y) - self.holdout


def parse_spec(spec: str) -> tuple[int, dict[str, Any]]:
    """``synthetic[:N][,key=value...]`` -> (N, settings): N defaults to :data:`DEFAULT_N`; the keys are fields of
    :class:`SynthSettings` (``synthetic:500,steps=20,mode=noise``)."""
    text = str(spec).strip()
    if not text.lower().startswith("synthetic"):
        raise OnnxclpError(f"--clean-data {spec!r}: expected a path, 'synthetic' or 'synthetic:N'")
    rest = text[len("synthetic") :]
    if rest and rest[0] not in ":,":
        raise OnnxclpError(f"--clean-data {spec!r}: expected 'synthetic[:N][,key=value...]'")
    n, overrides = DEFAULT_N, {}
    fields = SynthSettings.__dataclass_fields__
    for k, token in enumerate(t.strip() for t in rest[1:].split(",") if rest):
        if not token:
            continue
        key, eq, value = token.partition("=")
        key = key.strip()
        if not eq and k == 0:
            try:
                n = int(token)
            except ValueError:
                raise OnnxclpError(f"--clean-data {spec!r}: N in 'synthetic:N' must be a whole number") from None
            continue
        if not eq or key not in fields or key == "n":
            known = ", ".join(f for f in fields if f != "n")
            raise OnnxclpError(f"--clean-data {spec!r}: {token!r} is not one of key=value with key in {known}")
        overrides[key] = _setting(key, value.strip(), spec)
    if n < 1:
        raise OnnxclpError(f"--clean-data {spec!r}: N must be >= 1")
    return n, overrides


def _setting(key: str, value: Any, spec: Any) -> Any:
    kind = float if key == "tv" else type(getattr(SynthSettings(), key))
    try:
        if kind is bool:
            if str(value).lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(value)
            return str(value).lower() in ("1", "true", "yes")
        return kind(value)
    except ValueError:
        raise OnnxclpError(f"--clean-data {spec!r}: {key}={value!r} is not a {kind.__name__}") from None


# ----------------------------------------------------------------------------------------------------------------
# the BatchNorm-statistics term


class _BNStats(nn.Module):
    """A tap on a BatchNormalization's input: the distance of the batch's per-channel mean and variance from the
    layer's running statistics (DeepInversion's R_feature: ``||mu - mu_bn||_2 + ||var - var_bn||_2``)."""

    def __init__(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.detach().float().clone())
        self.register_buffer("var", var.detach().float().clone())
        self.loss: torch.Tensor | None = None

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        dims = [d for d in range(y.ndim) if d != 1]
        mu = y.mean(dims)
        var = y.var(dims, unbiased=False)
        self.loss = torch.linalg.vector_norm(mu - self.mean) + torch.linalg.vector_norm(var - self.var)
        return y


def _constant(module: OnnxModule, name: str) -> torch.Tensor | None:
    """The value of a tensor that is an initializer, a Constant, or an Identity chain to one (None otherwise)."""
    for _ in range(16):
        for keys, get in ((module._buffer_key, module.buffer_for), (module._param_key, module.param_for)):
            if name in keys:
                return get(name).detach()
        if name in module._const_key:
            return getattr(module.consts, module._const_key[name])
        i = module._producer.get(name)
        if i is None or module._plan[i][0] != "Identity":
            return None
        name = module._plan[i][1][0]
    return None


def bn_taps(module: OnnxModule) -> list[tuple[str, _BNStats]]:
    """A :class:`_BNStats` tap on the input of every BatchNormalization whose running statistics are initializers
    (in execution order; a tensor read by several BatchNormalizations is tapped once, for the first)."""
    taps: list[tuple[str, _BNStats]] = []
    seen: set[str] = set()
    for op, ins, _, _ in module._plan:
        if op != "BatchNormalization" or len(ins) < 5 or not ins[0] or ins[0] in seen:
            continue
        mean, var = _constant(module, ins[3]), _constant(module, ins[4])
        if mean is None or var is None:
            continue
        seen.add(ins[0])
        taps.append((ins[0], _BNStats(mean, var)))
    return taps


# ----------------------------------------------------------------------------------------------------------------
# priors and starting images


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of neighbouring pixels (horizontal, vertical and both diagonals), per image mean."""
    d1 = x[..., :, 1:] - x[..., :, :-1]
    d2 = x[..., 1:, :] - x[..., :-1, :]
    d3 = x[..., 1:, 1:] - x[..., :-1, :-1]
    d4 = x[..., 1:, :-1] - x[..., :-1, 1:]
    return sum(d.pow(2).mean() for d in (d1, d2, d3, d4)) / 4.0  # type: ignore[return-value]


def procedural(n: int, shape: Sequence[int], gen: torch.Generator) -> torch.Tensor:
    """``n`` procedural images (C, H, W) in [0, 1]: a smooth random colour field (random noise at 2x2 to 8x8,
    upsampled bicubically, summed over scales), a few random rectangles and discs of random colours, and a little
    pixel noise."""
    c, h, w = (int(s) for s in shape)
    x = torch.zeros(n, c, h, w)
    for s, amp in ((2, 0.5), (4, 0.35), (8, 0.25)):
        lo = torch.randn(n, c, min(s, h), min(s, w), generator=gen) * amp
        x += F.interpolate(lo, size=(h, w), mode="bicubic", align_corners=False)
    x = torch.sigmoid(x + torch.randn(n, c, 1, 1, generator=gen) * 0.5)
    yy = torch.arange(h).view(1, h, 1).float()
    xx = torch.arange(w).view(1, 1, w).float()
    shapes = torch.randint(1, 4, (n,), generator=gen)
    for i in range(n):
        for _ in range(int(shapes[i])):
            cy, cx = float(torch.rand(1, generator=gen)) * h, float(torch.rand(1, generator=gen)) * w
            ry = (0.1 + 0.3 * float(torch.rand(1, generator=gen))) * h
            rx = (0.1 + 0.3 * float(torch.rand(1, generator=gen))) * w
            if float(torch.rand(1, generator=gen)) < 0.5:
                mask = ((yy - cy).abs() < ry) & ((xx - cx).abs() < rx)
            else:
                mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1.0
            colour = torch.rand(c, 1, 1, generator=gen)
            x[i] = torch.where(mask, colour.expand(c, h, w), x[i])
    x = x + torch.randn(x.shape, generator=gen) * 0.03
    return x.clamp(0.0, 1.0)


class _Image(nn.Module):
    """The optimised images. ``pixel``: the pixels themselves, clamped to [0, 1] after every step. ``fourier``:
    ``sigmoid(logit(x0) + irfft2(scale * S))`` with the spectrum ``S`` (zero at the start: the images start at
    ``x0``) scaled by ``1 / frequency`` (the decorrelated parametrisation of feature visualisation, Olah et al.,
    Distill 2017): Adam's steps then change low frequencies as readily as high ones, instead of the pixel basis's
    bias towards pixel-level noise."""

    def __init__(self, x0: torch.Tensor, param: str) -> None:
        super().__init__()
        self.param = param
        if param == "pixel":
            self.x = nn.Parameter(x0.clone())
            return
        if param != "fourier":
            raise OnnxclpError(f"synthesis param must be 'pixel' or 'fourier', got {param!r}")
        n, c, h, w = x0.shape
        fy = torch.fft.fftfreq(h).abs().view(h, 1)
        fx = torch.fft.rfftfreq(w).view(1, -1)
        freq = torch.sqrt(fy * fy + fx * fx)
        self.register_buffer("scale", (1.0 / torch.clamp(freq, min=1.0 / max(h, w))).to(x0))
        self.register_buffer("base", torch.logit(x0.clamp(0.02, 0.98)))
        self.spectrum = nn.Parameter(torch.zeros(n, c, h, w // 2 + 1, 2, device=x0.device, dtype=x0.dtype))
        self.hw = (h, w)

    def forward(self) -> torch.Tensor:
        if self.param == "pixel":
            return self.x
        spec = torch.view_as_complex(self.spectrum) * self.scale
        return torch.sigmoid(self.base + torch.fft.irfft2(spec, s=self.hw, norm="ortho"))

    @torch.no_grad()
    def project(self) -> None:
        if self.param == "pixel":
            self.x.clamp_(0.0, 1.0)


# ----------------------------------------------------------------------------------------------------------------
# synthesis


def _scores(out: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    y = out[0] if isinstance(out, tuple) else out
    return y.reshape(y.shape[0], -1) if y.ndim > 2 else y


def synthesize(
    module: OnnxModule,
    shape: Sequence[int],
    settings: SynthSettings | None = None,
    *,
    layout: str = "nchw",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    progress: Progress | None = None,
) -> Synthesized:
    """Synthesize ``settings.n`` images of ``shape`` (C, H, W) from ``module`` (an :class:`OnnxModule`; its
    parameters are frozen, taps added and removed), labelled by it. ``layout`` is the model's image layout
    (``nchw`` or ``nhwc``), ``mean``/``std`` its normalisation of [0, 1] images (None: none). Runs on the module's
    device."""
    from onnxclp.defences._inputs import normaliser

    s = settings or SynthSettings()
    if s.mode not in MODES:
        raise OnnxclpError(f"synthesis mode must be one of {', '.join(MODES)}, got {s.mode!r}")
    if s.n < 1 or s.batch < 1 or s.steps < 0:
        raise OnnxclpError("synthesis needs n >= 1, batch >= 1 and steps >= 0")
    start = time.perf_counter()
    dev = next((p.device for p in module.parameters()), torch.device("cpu"))
    c, h, w = (int(v) for v in shape)
    try:
        norm = normaliser((c, h, w), mean, std, 1, dev)
    except ValueError as exc:
        raise OnnxclpError(f"--mean/--std: {exc}") from exc
    for p in module.parameters():
        p.requires_grad_(False)
    module.eval()

    def run(x: torch.Tensor) -> torch.Tensor:
        z = x if norm is None else (x - norm[0]) / norm[1]
        if layout == "nhwc":
            z = z.permute(0, 2, 3, 1)
        return _scores(module(z))

    gen = torch.Generator().manual_seed(s.seed)
    with torch.no_grad():
        classes = int(run(torch.full((1, c, h, w), 0.5, device=dev)).shape[1])
    # class-balanced targets, every batch holding every class (the batch statistics are those of a mixed batch)
    targets = torch.arange(s.n) % classes
    mode = "procedural" if s.mode == "auto" else s.mode
    taps = bn_taps(module) if mode != "noise" and s.bn > 0 and s.steps > 0 else []
    for name, tap in taps:
        module.set_tap(name, tap.to(dev))
    tv = s.tv if s.tv is not None else (TV_WITH_BN if taps else TV_PRIORS_ONLY)
    out = torch.empty(s.n, c, h, w)
    final_loss: list[float] = []
    try:
        for b0 in range(0, s.n, s.batch):
            tb = targets[b0 : b0 + s.batch].to(dev)
            nb = len(tb)
            if mode == "inversion":
                x0 = (0.5 + 0.2 * torch.randn(nb, c, h, w, generator=gen)).clamp(0, 1)
            else:
                x0 = procedural(nb, (c, h, w), gen)
            image = _Image(x0.to(dev), s.param)
            if mode != "noise" and s.steps > 0:
                opt = torch.optim.Adam(image.parameters(), lr=s.lr, betas=(0.5, 0.9))
                for step in range(s.steps):
                    lr = 0.5 * s.lr * (1.0 + math.cos(math.pi * step / s.steps))
                    for group in opt.param_groups:
                        group["lr"] = lr
                    x = image()
                    xi = x
                    if s.jitter > 0:
                        dy, dx = (int(v) for v in torch.randint(-s.jitter, s.jitter + 1, (2,), generator=gen))
                        xi = torch.roll(xi, shifts=(dy, dx), dims=(2, 3))
                    if s.flip and bool(torch.rand(1, generator=gen) < 0.5):
                        xi = xi.flip(3)
                    loss = F.cross_entropy(run(xi), tb)
                    if taps:
                        bn = sum((s.first_bn if k == 0 else 1.0) * t.loss for k, (_, t) in enumerate(taps))
                        loss = loss + s.bn * bn / len(taps)
                    if tv > 0:
                        loss = loss + tv * total_variation(x)
                    if s.l2 > 0:
                        loss = loss + s.l2 * (x - 0.5).pow(2).mean()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    image.project()
                    if progress is not None:
                        progress.step(f"synthesizing: batch {b0 // s.batch + 1}/{math.ceil(s.n / s.batch)} step "
                                      f"{step + 1}/{s.steps} loss {float(loss.detach()):.3f}")  # fmt: skip
                final_loss.append(float(loss.detach()))
            with torch.no_grad():
                out[b0 : b0 + nb] = image().to("cpu")
    finally:
        for name, _ in taps:
            module.remove_tap(name)
    out = torch.round(out.clamp(0.0, 1.0) * 255.0) / 255.0  # 8-bit: what --save-synthetic writes
    with torch.no_grad():
        labels = torch.cat([run(out[i : i + 500].to(dev)).argmax(1).cpu() for i in range(0, s.n, 500)])
    y = labels.numpy().astype(np.int64)
    counts = np.bincount(y, minlength=classes)
    info = {
        "settings": asdict(s),
        "mode": mode,
        "tv": tv,
        "batchnorm_layers_matched": len(taps),
        "classes": classes,
        "reached_target": float(np.mean(y == targets.numpy())),
        "label_counts": counts.tolist(),
        "final_loss": float(np.mean(final_loss)) if final_loss else None,
        "seconds": time.perf_counter() - start,
    }
    if progress is not None:
        progress.done(
            f"synthesized {s.n} images ({mode}, {len(taps)} BatchNorm layers matched, {s.steps} steps) in "
            f"{info['seconds']:.0f} s; {100 * info['reached_target']:.0f}% labelled with their target class"
        )
    return Synthesized(out.numpy().astype(np.float32), y, targets.numpy().astype(np.int64), info)


def synthesize_for_state(state: State, n_fit: int, n_val: int = 0,
                         overrides: dict[str, Any] | None = None) -> Synthesized:  # fmt: skip
    """:func:`synthesize` for a pipeline run: ``n_fit`` images for the method, then ``n_val`` procedural images
    that are not optimised (``mode=noise``, another seed) for the guard's validation part (``holdout``). The
    model of ``state`` is bridged; its layout and the context's ``mean``/``std`` are used; ``synth_*`` context
    keys, then ``overrides`` (from :func:`parse_spec`), set :class:`SynthSettings` fields; progress on stderr.

    Why the validation images are made differently: measured on the zoo, a repair trained on inverted images
    agrees with the input model on 99-100 % of held-out inverted images while its clean accuracy has fallen to
    20-35 %; on unoptimised procedural images its agreement falls with the clean accuracy (docs/algorithms.md,
    "Synthesized stand-in data")."""
    from onnxclp.bridge import to_torch
    from onnxclp.defences.repair import Progress, device_for
    from onnxclp.methods._fewshot import input_layout

    ctx = state.options.context
    layout, channels, hw = input_layout(state)
    settings = SynthSettings(n=n_fit)
    for key in SynthSettings.__dataclass_fields__:
        if key != "n" and ctx.get(f"synth_{key}") is not None:
            setattr(settings, key, _setting(key, ctx[f"synth_{key}"], f"synth_{key}"))
    for key, value in (overrides or {}).items():
        setattr(settings, key, value)
    module = to_torch(state.model, store=state.store, logits=True).to(device_for(state))
    progress = Progress("synthetic", bool(ctx.get("quiet")), ctx.get("progress_stream"))
    return synthesize_split(module, (channels, *hw), settings, n_val, layout=layout, mean=ctx.get("mean"),
                            std=ctx.get("std"), progress=progress)  # fmt: skip


def synthesize_split(
    module: OnnxModule,
    shape: Sequence[int],
    settings: SynthSettings,
    n_val: int,
    *,
    layout: str = "nchw",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    progress: Progress | None = None,
) -> Synthesized:
    """``settings.n`` images optimised from ``module`` (:func:`synthesize`), then ``n_val`` procedural ones that
    are not (``mode=noise``, the next seed) for the guard's validation part (``holdout``): the set
    ``--clean-data synthetic`` makes (:func:`synthesize_for_state`), also for a caller without a pipeline state
    (bench/repair_zoo.py makes each model's set once and :func:`save` it for every repair)."""
    kw: dict[str, Any] = {"layout": layout, "mean": mean, "std": std}
    fit = synthesize(module, shape, settings, progress=progress, **kw)
    if n_val < 1:
        return fit
    val = synthesize(module, shape, SynthSettings(n=n_val, mode="noise", seed=settings.seed + 1), **kw)
    info = dict(fit.info, n_fit=settings.n, n_val=n_val, seconds=fit.info["seconds"] + val.info["seconds"])
    return Synthesized(np.concatenate([fit.x, val.x]), np.concatenate([fit.y, val.y]),
                       np.concatenate([fit.targets, val.targets]), info, holdout=n_val)  # fmt: skip


def grid(syn: Synthesized, per_class: int = 8, max_classes: int = 10, scale: int = 2) -> Any:
    """A PIL image of the images the method trains on (not the validation ones): one row per class (the model's
    label; the first ``max_classes`` classes), ``per_class`` images each (fewer where the model gave the class
    fewer), the class index at the left."""
    from PIL import Image, ImageDraw

    x = syn.uint8_nhwc()
    _, h, w, c = x.shape
    classes = int(syn.info.get("classes") or (int(syn.y.max()) + 1 if len(syn.y) else 1))
    rows = min(classes, max_classes)
    gap, label = 2, 24
    cell_h, cell_w = h * scale, w * scale
    canvas = Image.new("RGB", (label + per_class * (cell_w + gap), rows * (cell_h + gap)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r in range(rows):
        top = r * (cell_h + gap)
        draw.text((2, top + cell_h // 2 - 5), str(r), fill=(0, 0, 0))
        for j, i in enumerate(np.flatnonzero(syn.y[: syn.n_fit] == r)[:per_class]):
            img = Image.fromarray(x[i, :, :, 0] if c == 1 else x[i, :, :, :3], "L" if c == 1 else "RGB")
            canvas.paste(img.convert("RGB").resize((cell_w, cell_h), Image.Resampling.NEAREST),
                         (label + j * (cell_w + gap), top))  # fmt: skip
    return canvas


def save(syn: Synthesized, folder: Any) -> list[str]:
    """Write ``synthetic.npz`` (``x_test`` uint8 N,H,W,C; ``y_test`` the model's labels; ``targets``; ``validation``
    True for the guard's validation images) and
    ``synthetic.png`` (:func:`grid`) into ``folder`` (created); returns the paths written. The .npz reads back
    with ``--clean-data``."""
    from pathlib import Path

    out = Path(folder)
    try:
        out.mkdir(parents=True, exist_ok=True)
        npz, png = out / "synthetic.npz", out / "synthetic.png"
        validation = np.arange(len(syn.y)) >= syn.n_fit
        np.savez_compressed(npz, x_test=syn.uint8_nhwc(), y_test=syn.y.astype(np.int64), targets=syn.targets,
                            validation=validation)  # fmt: skip
        grid(syn).save(png)
    except OSError as exc:
        raise OnnxclpError(f"--save-synthetic {folder}: {exc}") from exc
    return [str(npz), str(png)]
