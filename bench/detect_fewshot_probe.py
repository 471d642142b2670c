"""Probes for a few-shot backdoor detector (issue 20): do clean images plus a small perturbation reveal the target?

Probes on a few clean images of each model's task, through the torch bridge (docs/detect.md, "Few-shot
detectors tried"):

- ``uap``: one untargeted universal additive perturbation (L-inf ``eps`` in pixel space, signed-gradient ascent on
  the cross-entropy); which class the perturbed images collapse to, and how many;
- ``anp``: ANP's observation (Wu & Wang, NeurIPS 2021, section 3): every convolution's output channels and every
  bias multiplied by ``1 + delta``, ``|delta| <= eps``, delta maximising the loss; which class the model collapses to;
- ``targeted``: per class, the share of images a small neuron perturbation sends to it, and the MAD z-score of the
  largest share;
- ``stimulation``: Artificial Brain Stimulation's first step (Liu et al., "ABS: Scanning Neural Networks for
  Back-doors by Artificial Brain Stimulation", CCS 2019, section 4): each channel of every ReLU output set to
  ``eps`` times its largest value on the clean images, everywhere in the map; per class, how many channels send at
  least 90 % of the other classes' images to it;
- ``nc``: Neural Cleanse's trigger reverse-engineering (Wang et al., IEEE S&P 2019, section IV;
  :mod:`onnxclp.defences.cleanse`, the ``nc`` detector's code): per class the smallest mask (L1) that, with its
  pattern, sends the clean images of the other classes to that class; the anomaly index of the smallest.

Models: ``zoo/<name>`` (CIFAR-10 test images, normalisation and target from attack.json) and ``zoo-null/<name>``
(the task of ``bench/null_models.py``). Prints one JSON line per model.

Usage: ``python bench/detect_fewshot_probe.py --zoo resnet-badnets resnet-sig --null cnn-w24-d4-c10 --probe anp``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def images(folder: Path, data: dict, n: int):  # -> (pixels in [0, 1], labels, mean, std, target or None)
    import torch

    if folder.parent.name == "zoo-null":
        sys.path.insert(0, str(REPO / "bench"))
        import null_models as nm

        spec = next(s for s in nm.SPECS if s.name == folder.name)
        x, y = nm.task_data(spec, data, "test", n, 0)
        mean, std = (nm.GRAY_MEAN, nm.GRAY_STD) if spec.gray else (nm.CIFAR_MEAN, nm.CIFAR_STD)
        mean, std = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
        return x * std + mean, y, mean, std, None
    attack = json.loads((folder / "attack.json").read_text())
    pick = np.random.default_rng(0).permutation(len(data["y_test"]))[:n]
    x = torch.from_numpy(data["x_test"][pick]).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(data["y_test"][pick].astype(np.int64))
    norm = attack["normalize"]
    mean, std = torch.tensor(norm["mean"]).view(1, -1, 1, 1), torch.tensor(norm["std"]).view(1, -1, 1, 1)
    return x, y, mean, std, attack["target"]


def logits(out):  # -> torch.Tensor (N, classes)
    out = out[0] if isinstance(out, tuple | list) else out
    return out.reshape(out.shape[0], -1)


def uap(module, x, y, mean, std, eps: float, steps: int = 40):  # -> predictions
    import torch

    d = torch.zeros_like(x[:1], requires_grad=True)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(logits(module(((x + d).clamp(0, 1) - mean) / std)), y)
        (g,) = torch.autograd.grad(loss, d)
        with torch.no_grad():
            d += eps / 10 * g.sign()
            d.clamp_(-eps, eps)
    with torch.no_grad():
        return logits(module(((x + d).clamp(0, 1) - mean) / std)).argmax(1)


def stimulation(module, x, y, scales: list[float]) -> dict:
    """Per scale, per class: the number of ReLU channels that, set to ``scale`` x their largest value on ``x``,
    send at least 90 % of the images not labelled with the class to it (``stimulation`` probe)."""
    import torch

    relus = [outs[0] for op, _, outs, _ in module._plan if op == "Relu"]
    peak: dict[str, torch.Tensor] = {}

    class Peak(torch.nn.Module):
        def __init__(self, name: str) -> None:
            super().__init__()
            self.name = name

        def forward(self, v):  # the largest value per channel
            if v.dim() == 4:
                peak[self.name] = v.detach().amax(dim=(0, 2, 3))
            return v

    class Set(torch.nn.Module):
        channel, value = 0, 0.0

        def forward(self, v):
            v = v.clone()
            v[:, self.channel] = self.value
            return v

    for r in relus:
        module.set_tap(r, Peak(r))
    with torch.no_grad():
        k = int(logits(module(x)).shape[1])
    for r in relus:
        module.remove_tap(r)
    counts = {s: np.zeros(k, dtype=int) for s in scales}
    for r, top in peak.items():
        tap = Set()
        module.set_tap(r, tap)
        for ch in range(len(top)):
            for s in scales:
                tap.channel, tap.value = ch, float(top[ch]) * s
                with torch.no_grad():
                    pred = logits(module(x)).argmax(1)
                for c in range(k):
                    counts[s][c] += float((pred[y != c] == c).float().mean()) >= 0.9
        module.remove_tap(r)
    return {f"scale {s:g}": {"channels": counts[s].tolist(), "top": int(counts[s].argmax())} for s in scales}


def neuron_attack(module, x, y, eps: float, steps: int, target: int | None = None):  # -> predictions
    """Multiplicative per-channel perturbation of every 4-D weight and every 1-D parameter; ascent on the loss
    (``target`` None) or descent towards ``target``."""
    import torch
    from torch.func import functional_call

    params = dict(module.named_parameters())
    keys = [k for k, v in params.items() if v.ndim in (1, 4)]
    deltas = {k: torch.zeros(params[k].shape[0], requires_grad=True) for k in keys}

    def over() -> dict:
        return {k: params[k] * (1 + deltas[k]).view(-1, *([1] * (params[k].ndim - 1))) for k in keys}

    goal = y if target is None else torch.full((len(x),), target)
    sign = 1.0 if target is None else -1.0
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(logits(functional_call(module, over(), (x,))), goal)
        grads = torch.autograd.grad(loss, list(deltas.values()))
        with torch.no_grad():
            for d, g in zip(deltas.values(), grads, strict=True):
                d += sign * eps / 4 * g.sign()
                d.clamp_(-eps, eps)
    with torch.no_grad():
        return logits(functional_call(module, over(), (x,))).argmax(1)


def main(argv: list[str] | None = None) -> None:
    import onnx
    import torch

    from onnxclp.bridge import to_torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", nargs="*", default=[])
    ap.add_argument("--null", nargs="*", default=[])
    ap.add_argument("--probe", choices=("uap", "anp", "targeted", "nc", "stimulation"), required=True)
    ap.add_argument("--eps", type=float, nargs="+")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--cifar", default=str(REPO.parent / "shared" / "data" / "cifar10.npz"))
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    data = dict(np.load(a.cifar))
    eps_list = (
        a.eps
        or {
            "uap": [2 / 255, 4 / 255, 8 / 255],
            "anp": [0.05, 0.1, 0.2, 0.4],
            "targeted": [0.01, 0.02],
            "nc": [200],
            "stimulation": [1.0, 1.5, 2.0],
        }[a.probe]
    )
    folders = [REPO / "zoo" / m for m in a.zoo] + [REPO / "zoo-null" / m for m in a.null]
    for folder in folders:
        start = time.time()
        module = to_torch(onnx.load(str(folder / "model.onnx")), folder).eval()
        for p in module.parameters():
            p.requires_grad_(False)
        x, y, mean, std, target = images(folder, data, a.n)
        xn = (x - mean) / std
        with torch.no_grad():
            before = logits(module(xn)).argmax(1)
        k = int(logits(module(xn[:1])).shape[1])
        row: dict = {"model": f"{folder.parent.name}/{folder.name}", "target": target, "probe": a.probe}
        if a.probe == "stimulation":  # eps: the stimulation scales
            row.update(stimulation(module, xn, y, eps_list))
            eps_list_run: list[float] = []
        else:
            eps_list_run = eps_list
        for eps in eps_list_run:
            if a.probe == "nc":  # eps: the optimisation steps per class
                from onnxclp.defences.cleanse import cleanse

                with torch.enable_grad():

                    def fwd(p, module=module, mean=mean, std=std):
                        return logits(module((p - mean) / std))

                    res = cleanse(fwd, x, y, k, steps=int(eps))
                row[f"steps {int(eps)}"] = {"l1": np.round(res.l1, 1).tolist(), "success": np.round(res.success, 2).tolist(),
                                            "top": res.target, "index": round(res.index, 2), "p": res.p_value}  # fmt: skip
                continue
            if a.probe == "targeted":
                rates = np.array([float((neuron_attack(module, xn[:100], y[:100], eps, 8, t) == t).float().mean())
                                  for t in range(k)])  # fmt: skip
                med = float(np.median(rates))
                mad = float(np.median(np.abs(rates - med))) * 1.4826 + 1e-6
                row[f"eps {eps:g}"] = {"rates": rates.round(2).tolist(), "top": int(rates.argmax()),
                                       "z": round((float(rates.max()) - med) / mad, 2)}  # fmt: skip
                continue
            pred = uap(module, x, y, mean, std, eps) if a.probe == "uap" else neuron_attack(module, xn, y, eps, 10)
            counts = np.bincount(pred.numpy(), minlength=k)
            row[f"eps {eps:g}"] = {"top": int(counts.argmax()), "share": round(float(counts.max()) / len(pred), 3),
                                   "changed": round(float((pred != before).float().mean()), 3)}  # fmt: skip
        row["seconds"] = round(time.time() - start, 1)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
