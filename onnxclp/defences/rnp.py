"""RNP's first stage, neuron-level unlearning (Li, Lyu, Ma, Koren, Lyu, Li & Jiang, "Reconstructive Neuron
Pruning for Backdoor Defense", ICML 2023, section 3.2): gradient *ascent* of the clean cross-entropy on every
weight of the model until it has forgotten the clean task (its accuracy over an epoch of the clean images at or
below a threshold). The second stage (filter-level recovering: masks learnt on the unlearned model to bring the
clean task back) is ANP's mask optimisation without its perturbation (:func:`onnxclp.defences.anp.anp_masks`
with ``eps = 0``); the method is :mod:`onnxclp.methods.rnp`.

Settings as the authors' reference code has them (SGD, learning rate 0.01, momentum 0.9, weight decay 5e-4,
batches of 128, the gradient norm clipped at 20, at most 20 epochs, stop at 20 % accuracy; BatchNorm layers in
train mode). Runs on a copy: the module given is not modified.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from onnxclp.defences.anp import logits

__all__ = ["UnlearnResult", "unlearn"]

LR = 0.01
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
BATCH = 128
CLIP = 20.0
EPOCHS = 20
CLEAN_THRESHOLD = 0.2


@dataclass
class UnlearnResult:
    """The unlearned copy, the epochs run, each epoch's clean accuracy and loss (measured during the epoch, as
    the reference code does) and why it stopped."""

    module: nn.Module
    epochs: int
    accuracy: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    stopped: str = "max epochs"
    seconds: float = 0.0


def unlearn(
    module: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    lr: float = LR,
    momentum: float = MOMENTUM,
    weight_decay: float = WEIGHT_DECAY,
    batch_size: int = BATCH,
    clip: float = CLIP,
    epochs: int = EPOCHS,
    threshold: float = CLEAN_THRESHOLD,
    train_modules: list[nn.Module] | None = None,
    seed: int = 0,
) -> UnlearnResult:
    """Gradient ascent of the cross-entropy on ``images``/``labels`` over every floating-point parameter of a
    copy of ``module``, an epoch at a time (a seeded permutation), until an epoch's accuracy is at or below
    ``threshold`` or after ``epochs``. ``train_modules``: submodules of ``module`` (the BatchNorms re-inserted
    after BN-folded convolutions) that run in train mode with batch statistics, their running statistics left as
    they are; the rest of the graph runs in eval mode. Deterministic for a ``seed`` on the CPU."""
    if images.shape[0] == 0 or images.shape[0] != labels.shape[0]:
        raise ValueError("images and labels must be non-empty and of one length")
    t0 = time.perf_counter()
    index = {id(m): name for name, m in module.named_modules()}
    work = copy.deepcopy(module)
    subs = dict(work.named_modules())
    bns = [subs[index[id(m)]] for m in (train_modules or []) if id(m) in index]
    work.eval()
    for bn in bns:
        bn.train()
        if hasattr(bn, "momentum"):
            bn.momentum = 0.0  # batch statistics; the running ones stay
    params = [p for p in work.parameters() if p.is_floating_point()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    n = int(images.shape[0])
    result = UnlearnResult(work, 0)
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen).to(images.device)
        right, total = 0, 0.0
        for i in range(0, n, batch_size):
            idx = order[i : i + batch_size]
            x, y = images[idx], labels[idx]
            out = logits(work(x))
            loss = nn.functional.cross_entropy(out, y)
            opt.zero_grad(set_to_none=True)
            (-loss).backward()
            nn.utils.clip_grad_norm_(params, clip)
            opt.step()
            right += int((out.detach().argmax(1) == y).sum())
            total += float(loss.detach()) * len(idx)
        result.epochs += 1
        result.accuracy.append(right / n)
        result.loss.append(total / n)
        if not torch.isfinite(torch.tensor(result.loss[-1])):
            result.stopped = "diverged"
            break
        if result.accuracy[-1] <= threshold:
            result.stopped = f"accuracy {100 * result.accuracy[-1]:.0f} % <= {100 * threshold:.0f} %"
            break
    for p in params:
        p.requires_grad_(False)
    result.seconds = time.perf_counter() - t0
    return result
