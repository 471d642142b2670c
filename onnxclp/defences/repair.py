"""Fine-tuning repairs on a few clean images, trained through :mod:`onnxclp.bridge` and written back as
initializer values (docs/algorithms.md, "Fine-tuning repairs").

One loop serves every repair (:func:`train`): the method supplies a loss (:class:`Objective`) and may change the
module before training (FST re-initialises the classifier, NPD adds a layer). Around it:

- **BatchNorm re-inserted** (:func:`insert_batchnorm`, :func:`fold_batchnorm`): exporters fold BatchNorm into the
  convolutions, and a folded graph trained with SGD diverges at the learning rates fine-tuning defences use
  (issue 18's probe: lr 0.01 diverged within ten steps on a folded ResNet). Before training, a BatchNorm is put
  after every convolution that has a bias initializer and no BatchNormalization reading it: running statistics
  measured on the clean images, scale ``sqrt(var + eps)`` and shift ``mean`` (so it is the identity in eval mode).
  It trains in train mode (batch statistics) and is folded back before writing: ``W' = s W``, ``b' = s (b - mu)
  + beta`` with ``s = gamma / sqrt(var + eps)``; the written graph has exactly the input's operators.
- **Distillation from the input model** (``distill`` > 0): the input model, frozen, is the teacher on the same
  augmented clean batch; the student adds ``distill * T^2 * KL(teacher_T || student_T)`` (Hinton et al., 2015).
  The teacher carries the backdoor, but on clean images its outputs are clean: they hold the student near the
  input's clean behaviour while the method's own term removes the backdoor.
- **Function matching** (``distill_mix`` > 0; Beyer et al., "Knowledge distillation: A good teacher is patient
  and consistent", CVPR 2022, section 3): the same distillation term, weighted ``distill_mix``, on mixup blends
  of the batch (each image with another of the batch, weight drawn uniformly in [0, 1] per image). A few hundred
  images pin the student to the teacher only at those images; the blends ask it to agree between them too, where
  unseen clean images lie. Blends of clean images carry no trigger, so the teacher's answers there are clean.
- **Checkpoints chosen by the guard**: after every epoch the BatchNorm statistics are re-estimated on the fit
  images and the accuracy measured on the images that choose. By default (no selection part) those are the
  validation images, and only the run's end is a candidate: it is tested in fixed sequence with the guard's
  rule, and ``Outcome.failed`` tells the walk that ran it to stop (docs/algorithms.md, "Testing candidates in
  sequence"). With a selection part (``--select-fraction``) the latest epoch whose drop's one-sided 90 % upper
  bound on it is within ``--max-acc-drop`` of the input is kept (training further is the stronger repair; the
  bound leaves room for the independent check, :data:`onnxclp.guard.SELECT_Z`); without any epoch within budget,
  the best epoch so far, and the guard's final check decides.
- **Augmentation**: random crops (padding an eighth of the side) and horizontal flips of the clean images.

Nothing is written here: :func:`finish` returns the new value of every initializer that changed, for the
pipeline's ``rewrite`` pass.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from onnxclp.errors import OnnxclpError

if TYPE_CHECKING:
    from onnxclp.bridge import OnnxModule
    from onnxclp.passes.guard import CleanSplit
    from onnxclp.pipeline import State

BN_EPS = 1e-5


# ----------------------------------------------------------------------------------------------------------------
# progress


class Progress:
    """Progress on stderr: per-epoch lines overwrite each other on a terminal; off a terminal one line per stage
    (its end); nothing when ``quiet``."""

    def __init__(self, name: str, quiet: bool = False, stream: Any = None) -> None:
        self.name = name
        self.quiet = quiet
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._open = False

    def step(self, text: str) -> None:
        """An update within a stage (shown on a terminal only)."""
        if self.quiet or not self.tty:
            return
        self.stream.write(f"\r\x1b[K{self.name}: {text}")
        self.stream.flush()
        self._open = True

    def done(self, text: str) -> None:
        """The end of a stage: one line everywhere (but with ``quiet``)."""
        if self.quiet:
            return
        if self._open:
            self.stream.write("\r\x1b[K")
        self.stream.write(f"{self.name}: {text}\n")
        self.stream.flush()
        self._open = False


def progress_for(state: State) -> Progress:
    ctx = state.options.context
    return Progress(state.params.method, bool(ctx.get("quiet")), ctx.get("progress_stream"))


# ----------------------------------------------------------------------------------------------------------------
# BatchNorm re-insertion


class InsertedBatchNorm(nn.Module):
    """A BatchNorm put after a BN-folded convolution for training; the identity in eval mode when inserted."""

    def __init__(self, mean: torch.Tensor, var: torch.Tensor, eps: float = BN_EPS) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.sqrt(var + eps).clone())
        self.bias = nn.Parameter(mean.clone())
        self.register_buffer("running_mean", mean.clone())
        self.register_buffer("running_var", var.clone())
        self.momentum: float | None = 0.1

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(y, self.running_mean, self.running_var, self.weight, self.bias, self.training,
                            self.momentum if self.momentum is not None else 0.0, self.eps)  # fmt: skip

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(s, t) with ``eval(y) = s * y + t`` per channel."""
        s = self.weight / torch.sqrt(self.running_var + self.eps)
        return s, self.bias - self.running_mean * s


class _Moments(nn.Module):
    """A tap that accumulates per-channel sums of what passes through it, and returns it unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0
        self.s: torch.Tensor | None = None
        self.s2: torch.Tensor | None = None

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        dims = [d for d in range(y.ndim) if d != 1]
        v = y.detach().double()
        s, s2 = v.sum(dims), (v * v).sum(dims)
        self.s = s if self.s is None else self.s + s
        self.s2 = s2 if self.s2 is None else self.s2 + s2
        self.n += y.numel() // y.shape[1]
        return y

    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.s is not None and self.s2 is not None and self.n > 0
        mean = self.s / self.n
        var = (self.s2 / self.n - mean * mean).clamp_min(0.0)
        return mean.float(), var.float()


@dataclass
class Inserted:
    """One re-inserted BatchNorm: the convolution's output tensor, weight and bias initializers."""

    output: str
    weight: str
    bias: str
    bn: InsertedBatchNorm


def foldable_convs(module: OnnxModule) -> list[tuple[str, str, str]]:
    """(output, weight, bias) of every Conv with weight and bias initializers whose output no BatchNormalization
    reads (where BN was kept, the graph's own BatchNormalization trains its scale and shift instead)."""
    bn_inputs = {ins[0] for op, ins, _, _ in module._plan if op == "BatchNormalization" and ins}
    out = []
    for output, weight, bias in module.conv_outputs():
        if bias is None or output in bn_inputs:
            continue
        if weight in module._param_key and bias in module._param_key:
            out.append((output, weight, bias))
    return out


@torch.no_grad()
def run_with_taps(module: OnnxModule, taps: dict[str, nn.Module], x: torch.Tensor, batch: int = 128) -> None:
    """Run ``x`` through ``module`` in eval mode without gradients, ``batch`` images at a time, with each tap of
    ``taps`` on its tensor (an observer: it returns what it is given); the taps are removed and the module's mode
    restored afterwards."""
    for t, tap in taps.items():
        module.set_tap(t, tap)
    was = module.training
    module.eval()
    try:
        for i in range(0, len(x), batch):
            module(x[i : i + batch])
    finally:
        for t in taps:
            module.remove_tap(t)
        module.train(was)


@torch.no_grad()
def batchnorm_after(module: OnnxModule, tensors: list[str], x: torch.Tensor,
                    batch: int = 128) -> dict[str, InsertedBatchNorm]:  # fmt: skip
    """Put an :class:`InsertedBatchNorm` (the identity in eval mode) after each of ``tensors`` of the bridged
    ``module``, its statistics measured on ``x``; returns them by tensor name."""
    taps = {t: _Moments() for t in tensors}
    run_with_taps(module, taps, x, batch)  # type: ignore[arg-type]
    out = {}
    for t, tap in taps.items():
        mean, var = tap.moments()
        out[t] = InsertedBatchNorm(mean.to(x.device), var.to(x.device))
        module.set_tap(t, out[t])
    return out


def insert_batchnorm(module: OnnxModule, x: torch.Tensor, batch: int = 128) -> list[Inserted]:
    """Put an :class:`InsertedBatchNorm` after every foldable convolution, its statistics measured on ``x``."""
    convs = foldable_convs(module)
    bns = batchnorm_after(module, [out for out, _, _ in convs], x, batch)
    return [Inserted(out, weight, bias, bns[out]) for out, weight, bias in convs]


@torch.no_grad()
def fold_batchnorm(module: OnnxModule, inserted: list[Inserted]) -> None:
    """Fold every inserted BatchNorm (eval mode) into its convolution's weight and bias; remove the taps."""
    for item in inserted:
        s, t = item.bn.folded()
        w = module.param_for(item.weight)
        b = module.param_for(item.bias)
        w.mul_(s.to(w.dtype).reshape(-1, *([1] * (w.ndim - 1))))
        b.copy_((b * s + t).to(b.dtype))
        module.remove_tap(item.output)


@torch.no_grad()
def recompute_bn_stats(module: OnnxModule, inserted: list[Inserted], x: torch.Tensor, batch: int) -> None:
    """Re-estimate the inserted BatchNorms' running statistics on ``x`` (cumulative average of batch statistics,
    each layer seeing the ones before it in train mode)."""
    if not inserted:
        return
    for item in inserted:
        item.bn.running_mean.zero_()
        item.bn.running_var.fill_(1.0)
    was = module.training
    module.train()
    # cumulative moving average: momentum 1/k for the k-th batch
    for k, i in enumerate(range(0, len(x), batch), start=1):
        for item in inserted:
            item.bn.momentum = 1.0 / k
        module(x[i : i + batch])
    for item in inserted:
        item.bn.momentum = 0.1
    module.train(was)


# ----------------------------------------------------------------------------------------------------------------
# the loop


def logits_of(out: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The first output as (batch, classes) scores (a 1x1-conv classifier's N x K x 1 x 1 flattened)."""
    y = out[0] if isinstance(out, tuple) else out
    if y.ndim > 2:
        y = y.reshape(y.shape[0], -1)
    return y


def augment(x: torch.Tensor, gen: torch.Generator, nhwc: bool = False) -> torch.Tensor:
    """Random crops (zero padding of an eighth of the side, in the model's normalised space: the mean colour)
    and horizontal flips, per image."""
    if nhwc:
        x = x.permute(0, 3, 1, 2)
    n, _, h, w = x.shape
    ph, pw = max(1, h // 8), max(1, w // 8)
    padded = F.pad(x, (pw, pw, ph, ph))
    dy = torch.randint(0, 2 * ph + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pw + 1, (n,), generator=gen)
    flip = torch.rand(n, generator=gen) < 0.5
    out = torch.empty_like(x)
    for i in range(n):
        crop = padded[i, :, int(dy[i]) : int(dy[i]) + h, int(dx[i]) : int(dx[i]) + w]
        out[i] = crop.flip(-1) if bool(flip[i]) else crop
    return out.permute(0, 2, 3, 1) if nhwc else out


def blend(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mixup blends of a batch: each image with a random other image of it, the weight uniform in [0, 1] per image
    (the function-matching inputs of the module docstring)."""
    n = x.shape[0]
    other = torch.randperm(n, generator=gen).to(x.device)
    lam = torch.rand(n, generator=gen).to(x.device, x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return lam * x + (1 - lam) * x[other]


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
            weights: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, batch mean (each image's term times ``weights``
    where given)."""
    t = temperature
    if weights is None:
        return F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), reduction="batchmean",
                        log_target=True) * (t * t)  # fmt: skip
    per = F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), reduction="none", log_target=True)
    return (per.reshape(len(per), -1).sum(1) * weights).mean() * (t * t)


def focus_weights(settings: Settings, teacher_scores: torch.Tensor) -> torch.Tensor | None:
    """Per-image distillation weights of :attr:`Settings.distill_classes` (None: every image weighs 1)."""
    if not settings.distill_classes or settings.distill_other == 1.0:
        return None
    top = teacher_scores.reshape(len(teacher_scores), -1).argmax(1)
    inside = torch.isin(top, torch.tensor(settings.distill_classes, device=top.device))
    return torch.where(inside, 1.0, float(settings.distill_other)).to(teacher_scores.dtype)


@dataclass
class Settings:
    """Training settings of a repair (the method's parameters)."""

    epochs: int = 20
    lr: float = 0.01
    batch: int = 32
    momentum: float = 0.9
    weight_decay: float = 5e-4
    distill: float = 1.0
    distill_mix: float = 0.0
    # the distillation's weight on images (and blends) the teacher gives a class outside ``distill_classes`` is
    # multiplied by ``distill_other`` (1: every image alike; the target gate's focus: docs/algorithms.md)
    distill_classes: tuple[int, ...] = ()
    distill_other: float = 1.0
    temperature: float = 2.0
    augment: bool = True
    reinsert_bn: bool = True
    seed: int = 0


class Objective:
    """A repair's loss. ``loss`` gets the student's scores on the (augmented) batch, the batch itself, its labels
    and the teacher's scores (None without distillation); ``prepare`` may change the module before training
    (the trainable parameters are those it returns); ``after_step`` runs after each optimiser step.

    An objective may also define ``step(module, params, closure, opt) -> loss`` to replace the plain update
    ``loss = closure(); opt.step()``: ``closure()`` zeroes the gradients, computes the whole loss on the current
    batch (the objective's term and the distillation) at the current weights, back-propagates it and returns it
    detached; ``step`` may call it more than once (FT-SAM: at the weights and at the perturbed weights).

    And ``val_right(module, x, y) -> right`` to judge the candidate by what the written model will answer rather
    than by the module's own answers (fst-gate writes the module behind a gate: :mod:`onnxclp.methods._gate`)."""

    name = "ft"

    def prepare(self, module: OnnxModule, state: State) -> list[nn.Parameter]:
        return [p for p in module.parameters() if p.requires_grad]

    def loss(self, module: OnnxModule, x: torch.Tensor, y: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(scores, y)

    def after_step(self, module: OnnxModule) -> None:
        return None

    def describe(self) -> dict[str, Any]:
        return {}


@dataclass
class Outcome:
    """What :func:`train` did: the curve, the chosen epoch, the re-inserted BatchNorms."""

    curve: list[dict[str, Any]] = field(default_factory=list)
    chosen_epoch: int | None = None
    inserted: int = 0
    seconds: float = 0.0
    sequential: bool = False  # the run's end was tested in fixed sequence on the validation part (see train)
    failed: bool = False  # sequential: the run's end was over budget (the sequence ends here)

    @property
    def whole(self) -> bool:
        """Whether a walk may go on to a stronger run: with a selection part, some epoch was within budget (``failed``
        stays False); in sequence, the run's end passed its test."""
        return self.chosen_epoch is not None and not self.failed


@torch.no_grad()
def outputs(module: OnnxModule, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """``module``'s (eval mode) first output for each image of ``x`` as (N, classes), without gradients; the
    module's mode is restored."""
    was = module.training
    module.eval()
    out = [logits_of(module(x[i : i + batch])) for i in range(0, len(x), batch)]
    module.train(was)
    return torch.cat(out)


def predictions(module: OnnxModule, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """The class ``module`` (eval mode) gives each image of ``x``; the module's mode is restored."""
    return outputs(module, x, batch).argmax(1)


def val_right(module: OnnxModule, x: torch.Tensor, y: torch.Tensor, batch: int = 256) -> np.ndarray:
    """Per validation image, whether ``module`` (eval mode) classifies it right."""
    return (predictions(module, x, batch) == y).cpu().numpy()


def device_for(state: State) -> torch.device:
    want = str(state.options.context.get("device") or "auto")
    if want == "cuda" and not torch.cuda.is_available():
        raise OnnxclpError("--device cuda: torch sees no CUDA device")
    return torch.device("cuda" if want in ("auto", "cuda") and torch.cuda.is_available() else "cpu")


def train(state: State, objective: Objective, settings: Settings,
          module: OnnxModule | None = None) -> tuple[OnnxModule, Outcome]:  # fmt: skip
    """Train the bridged model of ``state`` on the guard's fit images with ``objective``; returns the module with
    the chosen checkpoint loaded and BatchNorm folded back, and the outcome (see the module docstring)."""
    from onnxclp.bridge import to_torch
    from onnxclp.guard import SELECT_Z, paired_drop

    clean: CleanSplit | None = state.clean
    if clean is None:
        raise OnnxclpError(f"--method {state.params.method} needs clean labelled images: give --clean-data")
    start = time.perf_counter()
    torch.manual_seed(settings.seed)
    gen = torch.Generator().manual_seed(settings.seed)
    dev = device_for(state)
    if module is None:
        module = to_torch(state.model, store=state.store, logits=True)
    module.to(dev)
    x_fit, y_fit = clean.x_fit.to(dev), clean.y_fit.to(dev)
    x_val, y_val = clean.x_sel.to(dev), clean.y_sel.to(dev)  # the epochs are chosen on the selection part
    nhwc = x_fit.ndim == 4 and x_fit.shape[1] not in (1, 3) and x_fit.shape[-1] in (1, 3)
    teacher = None
    if settings.distill > 0 or settings.distill_mix > 0:
        teacher = copy.deepcopy(module).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    inserted = insert_batchnorm(module, x_fit) if settings.reinsert_bn else []
    params = objective.prepare(module, state)
    opt = torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay)
    steps_per_epoch = max(1, math.ceil(len(x_fit) / settings.batch))
    steps = steps_per_epoch * settings.epochs
    travelled = 0.0  # the learning rate summed over the steps, in epochs: how far along the schedule
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    right_before = clean.right_before_selection
    if right_before is None:  # the pipeline measures the input with onnxruntime; the bridge when run alone
        right_before = val_right(teacher if teacher is not None else module, x_val, y_val)
    budget = state.guard.budget if state.guard is not None else 3.0
    # no selection part: the run's end is the candidate, tested on the validation part at the guard's confidence as
    # one of a fixed sequence (docs/algorithms.md, "Testing candidates in sequence"); earlier epochs decide nothing
    sequence_z = clean.sequence_z(state.guard)
    sequential = sequence_z is not None
    z = SELECT_Z if sequence_z is None else sequence_z
    outcome = Outcome(inserted=len(inserted), sequential=sequential)
    progress = progress_for(state)
    kept: dict[str, torch.Tensor] | None = None
    updates = [0]  # optimiser steps taken (a non-finite loss before the first is the input's, not the rate's)
    for epoch in range(1, settings.epochs + 1):
        module.train()
        perm = torch.randperm(len(x_fit), generator=gen)
        total, count = 0.0, 0
        for i in range(0, len(perm), settings.batch):
            idx = perm[i : i + settings.batch].to(dev)
            xb, yb = x_fit[idx], y_fit[idx]
            if settings.augment:
                xb = augment(xb, gen, nhwc)
            t_scores = xm = t_mix = None
            if teacher is not None:
                with torch.no_grad():
                    if settings.distill > 0:
                        t_scores = logits_of(teacher(xb))
                    if settings.distill_mix > 0:
                        xm = blend(xb, gen)
                        t_mix = logits_of(teacher(xm))

            def closure(xb: torch.Tensor = xb, yb: torch.Tensor = yb, t_scores: Any = t_scores, xm: Any = xm,
                        t_mix: Any = t_mix, epoch: int = epoch) -> torch.Tensor:  # fmt: skip
                opt.zero_grad(set_to_none=True)
                scores = logits_of(module(xb))
                loss = objective.loss(module, xb, yb, scores)
                if t_scores is not None:
                    w = focus_weights(settings, t_scores)
                    loss = loss + settings.distill * kd_loss(scores, t_scores, settings.temperature, w)
                if t_mix is not None:
                    w = focus_weights(settings, t_mix)
                    loss = loss + settings.distill_mix * kd_loss(logits_of(module(xm)), t_mix, settings.temperature, w)
                if not torch.isfinite(loss):
                    bad = int((~torch.isfinite(scores)).sum())
                    if updates[0] == 0 and bad:  # nothing trained yet: the input model's own scores are not finite
                        raise OnnxclpError(
                            f"--method {state.params.method}: the training loss is {loss.item()} before any update: "
                            f"{bad} of the input model's {scores.numel()} scores on a batch of the clean images are "
                            "inf or NaN; check the images and --mean/--std (a smaller --lr will not help)",
                            3,
                        )
                    raise OnnxclpError(
                        f"--method {state.params.method}: the training loss became {loss.item()} at epoch {epoch}; "
                        "try a smaller --lr",
                        3,
                    )
                loss.backward()
                return loss.detach()

            custom_step = getattr(objective, "step", None)
            if custom_step is None:
                loss = closure()
                opt.step()
            else:
                loss = custom_step(module, params, closure, opt)
            updates[0] += 1
            travelled += opt.param_groups[0]["lr"] / steps_per_epoch
            sched.step()
            objective.after_step(module)
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        recompute_bn_stats(module, inserted, x_fit, 128)
        # what the candidate answers on the validation images: the module's own answers, or what an objective
        # writes around it (fst-gate: the input's answers but where the gate consults the module)
        right = getattr(objective, "val_right", val_right)(module, x_val, y_val)
        d = paired_drop(right_before, right)
        within = d.bound(z) <= budget + 1e-9  # the one-sided 90 % bound (SELECT_Z, or the guard's in sequence)
        best = max((c["val_acc"] for c in outcome.curve), default=-1.0)
        # the latest epoch within budget; while none is, the best so far (the guard then refuses it); in sequence
        # the last epoch, within or not
        if sequential:
            if epoch == settings.epochs:
                kept = {k: v.detach().clone() for k, v in module.state_dict().items()}
                outcome.chosen_epoch, outcome.failed = (epoch, False) if within else (None, True)
        elif within or (outcome.chosen_epoch is None and d.acc_after > best):
            kept = {k: v.detach().clone() for k, v in module.state_dict().items()}
            if within:
                outcome.chosen_epoch = epoch
        elapsed = time.perf_counter() - start
        left = elapsed / epoch * (settings.epochs - epoch)
        outcome.curve.append({"epoch": epoch, "loss": total / max(count, 1), "val_acc": d.acc_after,
                              "drop": d.drop, "bound": d.bound(z), "within": within,
                              "lr_epochs": travelled, "seconds": elapsed})  # fmt: skip
        progress.step(f"epoch {epoch}/{settings.epochs} loss {total / max(count, 1):.3f} val "
                      f"{100 * d.acc_after:.1f}% (input {100 * d.acc_before:.1f}%) {elapsed:.0f} s, ~{left:.0f} s left")  # fmt: skip
    assert kept is not None
    module.load_state_dict(kept)
    fold_batchnorm(module, inserted)
    module.eval()
    outcome.seconds = time.perf_counter() - start
    last = outcome.curve[-1]
    chosen = outcome.chosen_epoch
    if chosen:
        kept_text = f"{chosen} (val {100 * outcome.curve[chosen - 1]['val_acc']:.1f}%)"
    else:
        kept_text = f"{len(outcome.curve)} (none within budget; last val {100 * last['val_acc']:.1f}%)"
    if sequential:
        kept_text = f"{len(outcome.curve)}, the run's end, " + ("within budget" if chosen else "over budget")
    progress.done(
        f"{len(outcome.curve)} epochs on {len(x_fit)} images in {outcome.seconds:.0f} s; kept epoch {kept_text}"
    )
    return module, outcome


def walk(strengths: Sequence[float], run: Callable[[float], tuple[Any, Outcome, Any]],
         passes: Callable[[Outcome], bool],
         entry: Callable[[float, Outcome, bool], dict[str, Any]]) -> tuple[Any, Outcome, Any, list[dict[str, Any]], bool]:  # fmt: skip
    """A strength walk (fst-head's alpha, AC's weight): ``run(s)`` trains at each strength, weakest first, while
    ``passes(outcome)``. Returns the module, outcome and objective of the strongest run that passed (the first
    run's when none did), the ladder (``entry(s, outcome, passed)`` per run) and whether one passed."""
    first = kept = None
    ladder: list[dict[str, Any]] = []
    for strength in strengths:
        trained = run(strength)
        ok = passes(trained[1])
        ladder.append(entry(strength, trained[1], ok))
        first = first or trained
        if not ok:
            break
        kept = trained
    if kept is None:
        assert first is not None
        return (*first, ladder, False)
    return (*kept, ladder, True)


def finish(state: State, module: OnnxModule, outcome: Outcome, settings: Settings, objective: Objective,
           original: dict[str, np.ndarray] | None = None) -> None:  # fmt: skip
    """Record the changed initializers in ``state.rewrites`` and the training in ``state.training``."""
    from onnxclp.passes.rewrite import relative_change

    module.to("cpu")
    new = module.state_to_onnx()
    if original is None:
        assert state.index is not None
        original = {name: state.store.read(state.index.initializers[name]) for name in new}
    rewritten = []
    for name, value in new.items():
        old = original[name]
        if old.shape == value.shape and np.array_equal(old, value):
            continue
        state.rewrites[name] = value
        rewritten.append({"name": name, "relative_change": relative_change(old, value)})
    rewritten.sort(key=lambda r: -1.0 if r["relative_change"] is None else -r["relative_change"])
    state.training = {
        "settings": {**settings.__dict__, **objective.describe()},
        "curve": outcome.curve,
        "chosen_epoch": outcome.chosen_epoch,
        "tested_in_sequence": outcome.sequential,
        "failed_in_sequence": outcome.failed,
        "reinserted_batchnorms": outcome.inserted,
        "seconds": outcome.seconds,
        "fit_images": len(state.clean.fit) if state.clean is not None else 0,
        "rewritten": rewritten,
        "largest_relative_change": max((r["relative_change"] or 0.0 for r in rewritten), default=0.0),
    }
    clipped = {n: c for n, c in getattr(module, "quantization_clipped", {}).items() if c and n in state.rewrites}
    if clipped:  # a QDQ weight trained past its integer range (docs/bridge.md, "Quantized weights")
        state.training["quantization_clipped"] = clipped
        state.notes.append(
            f"{state.params.method}: {sum(clipped.values())} quantised weight values in {len(clipped)} tensors were "
            "clipped to their integer range when written back (the guard measures the written integers)"
        )
    if state.clean is not None:
        state.clean.mark_selection(state.guard, sequence=outcome.sequential)  # the epoch's part, and how
    if state.graph_edit is None:
        state.notes.append(
            f"{state.params.method}: {len(rewritten)} initializers rewritten (largest relative change "
            f"{state.training['largest_relative_change']:.3g}); the graph's nodes are unchanged"
        )
    elif rewritten:
        state.notes.append(f"{state.params.method}: {len(rewritten)} initializers rewritten")
