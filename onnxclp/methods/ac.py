"""``ac``: activation clipping. Per-channel upper bounds on the model's ReLU activations, learnt on a few clean
images so that no input can reach an abnormally large classification margin (after Wang, Xiang, Miller &
Kesidis, "Improved Activation Clipping for Universal Backdoor Mitigation and Test-Time Detection", arXiv
2308.04617, 2023; the margin statistic is MM-BD's, IEEE S&P 2024, section III).

Why: a backdoor is a shortcut that drives some internal activations far above anything clean inputs produce, and
through them one class's logit far above the others (MM-BD's observation: the target class admits an abnormally
large maximum margin). Bounding each channel at what clean inputs need leaves clean predictions almost untouched
and cuts the shortcut. What this repair changes is small by construction: a clean image is affected only where
one of its activations exceeds a bound, which is why it was added after the fine-tuning repairs changed the
correctness of 3-26 % of the guard's checking images (docs/results-repair-notes.md, session 9).

**Where.** The output of every ``Relu`` node (and, since session 19, of every other activation in
:data:`ACTIVATIONS`: ReLU6's ``Clip``, LeakyReLU, PReLU, ELU, SELU, CELU, GELU, HardSwish, Softplus, Mish) whose
feature map has its channels on axis 1: a 4-D map read from a Conv, BatchNormalization, Add or Sum (ONNX
convolutions are channels-first; since session 19 also InstanceNormalization, GroupNormalization, MaxPool and
AveragePool), or a 2-D (batch, features) vector; and the output of every ``GlobalAveragePool``
(N x C x 1 x 1), or ``ReduceMean`` over a channels-first map's spatial axes, the pooled features a classifier
reads. A ReLU
bound caps a channel's largest value at any position; a trigger spread over the whole image (a blend, a warp, a
signal) can raise a channel's *average* without any position leaving the clean range, and the pooled bound caps
that average. The paper clips ReLUs; a cap is as well defined on any activation that is unbounded above, which
is why the others were added (measured on the zoo's ReLU networks only). Other activations (Sigmoid, Tanh, SiLU
written as ``x * Sigmoid(x)``) are left alone.

**The bounds.** Each clipped channel ``c`` of tensor ``t`` gets ``t_c <- min(t_c, z_c)`` with ``z_c = z0_c *
exp(s_c)``: ``z0_c`` is the channel's largest value over the fit images (so the fit images pass unchanged at the
start) and ``s_c`` (starting at 0) is trained. Per training step, on a batch of clean images ``(x, y)``:

1. **Margin inputs**: one image per class, kept across steps (a warm start), is pushed by :data:`INNER` signed
   gradient steps of :data:`INNER_STEP` of the pixel range, inside the [0, 1] image range, to maximise its
   class's margin ``logit_k - max_{j != k} logit_j`` under the current bounds (MM-BD's search, one start per
   class). A task with many large images (1,000 classes at 224 x 224) searches a seeded random subset of the
   classes per step, as many as :data:`SEARCH_VALUES` input values allow (memory); the others keep their inputs.
2. **Loss**: ``CE(f(x), y) + --ac-weight * mean_k max(0, margin_k) / m0`` plus the loop's distillation from the
   input model on ``x`` (``--distill``), where ``m0`` is the mean margin of the first step (so the weight means
   the same on every model); only the ``s_c`` train (Adam, ``--lr`` per step on the log-bound, the loop's cosine
   schedule).

**Strength.** By default each run's end is tested in sequence on the guard's validation images, and the walk
below stops at the first run whose end fails (docs/algorithms.md, "Testing candidates in sequence"). With
``--select-fraction`` the loop (:func:`onnxclp.defences.repair.train`) keeps the latest epoch whose clean accuracy
on the guard's selection images is within budget. Unless ``--ac-weight`` is given, the margin weight is walked through
:data:`WEIGHTS`, weakest first, while a run's last epoch stays within budget, and the strongest run whose last
epoch did is kept (when the first run's does not, its latest epoch within budget): a stronger weight that ran its
20 epochs within budget lowered the bounds at least as far as a weaker one, where fst-head's rule (any epoch
within budget) could keep an early, weaker epoch of a stronger weight. The guard's final check decides as for
every repair. The walk and its rule were written after two rows of the seven zoo models (weight 1 alone; the
walk with fst-head's rule), both in docs/results-repair-notes.md.

**Written.** One ``Min`` node per clipped tensor, reading the tensor and a new initializer of shape ``[1, C, 1,
1]`` (or ``[1, C]``) in the tensor's float type; every former reader of the tensor (a graph output too) reads
the clipped one. The report's ``added_nodes`` and the model's ``onnxclp.added_nodes`` metadata name them.
Needs opset 8 or later (``Min`` broadcasts from 8).

onnxclp's reading, from the paper's abstract (the full method was not available offline): bounds on internal
activations learnt with a few clean images and chosen to limit classification margins are the paper's; where the
bounds sit (every ReLU), their parametrisation (multiplicative, from the clean maximum), the margin search (one
warm-started image per class, signed steps), the margin normalisation, the distillation term and the checkpoint
rule are onnxclp's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from onnxclp.errors import EXIT_NOTHING, OnnxclpError
from onnxclp.methods import register
from onnxclp.methods._repair import BATCH, DISTILL, EPOCHS, LR, RepairMethod
from onnxclp.methods.base import ParamSpec

if TYPE_CHECKING:
    import onnx
    import torch
    from torch import nn

    from onnxclp.bridge import OnnxModule
    from onnxclp.defences.repair import Objective, Settings
    from onnxclp.methods.ibau import PixelSpace
    from onnxclp.pipeline import State

WEIGHT = ParamSpec("ac_weight", float, 1.0, "AC: weight of the margin term against the clean cross-entropy "
                   "(the margins divided by their first value); unset: walked 1, 4, 16, 64 within the budget.",
                   minimum=0.0)  # fmt: skip
WEIGHTS = (1.0, 4.0, 16.0, 64.0)  # the walk, weakest first (module docstring, "Strength")
INNER = 3  # signed gradient steps of the margin inputs per training step
INNER_STEP = 0.02  # of the pixel range per signed step
SEARCH_VALUES = 1 << 20  # input values searched per step at most: all classes of a CIFAR-sized task (341 at 3x32x32)
# Ops whose 4-D output has its channels on axis 1 by definition (ONNX's convolution layout); since session 19 the
# normalisations and pools that keep it too (an activation after an InstanceNorm or a MaxPool).
CHANNEL_FIRST_PRODUCERS = ("Conv", "BatchNormalization", "Add", "Sum", "ConvTranspose", "InstanceNormalization",
                           "GroupNormalization", "MaxPool", "AveragePool")  # fmt: skip
POOLS = ("GlobalAveragePool",)  # the pooled features the classifier reads (module docstring, "Where")
# Activations whose outputs are capped (module docstring, "Where"): the paper's ReLU, and since session 19 the
# element-wise ones that are unbounded above or nearly so (ReLU6 is Clip), so that MobileNets, GELU and LeakyReLU
# networks get bounds too. Sigmoid and Tanh saturate by themselves and are left alone.
ACTIVATIONS = ("Relu", "Clip", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Gelu", "HardSwish", "Softplus", "Mish",
               "ThresholdedRelu")  # fmt: skip


def _bounded(module: OnnxModule, x: torch.Tensor) -> tuple[list[tuple[str, int, Any, int]], int]:
    """(tensor, channels, torch dtype, rank) of every activation and pooled output :func:`AC` clips (module
    docstring, "Where"), and the number of activation outputs left alone."""
    from onnxclp.methods.npd import _probe

    plan = module._plan
    produced = {o: i for i, (_, _, outs, _) in enumerate(plan) for o in outs if o}
    relus = [(ins[0], outs[0]) for op, ins, outs, _ in plan if op in ACTIVATIONS and ins and outs and outs[0]]
    pools = [outs[0] for op, _, outs, _ in plan if op in POOLS and outs and outs[0]]
    means = [(ins[0], outs[0]) for op, ins, outs, _ in plan if op == "ReduceMean" and ins and outs and outs[0]]
    seen = _probe(module, x, [out for _, out in relus] + pools + [t for pair in means for t in pair])
    chosen, skipped = [], 0
    for out in pools:  # N x C x 1 x 1 by the operator's definition: channels on axis 1
        if out in seen and len(seen[out][0]) == 4 and seen[out][0][1] > 1:
            chosen.append((out, int(seen[out][0][1]), seen[out][1], 4))
    for src, out in means:  # a ReduceMean over the spatial axes of a channels-first map is a global average pool
        if src in seen and out in seen and len(seen[src][0]) == 4 and seen[src][0][1] > 1:
            c, shape = seen[src][0][1], seen[out][0]
            if tuple(shape[1:]) in ((c, 1, 1), (c,)):
                chosen.append((out, int(c), seen[out][1], len(shape)))
    for src, out in relus:
        shape_dtype = seen.get(out)
        if shape_dtype is None:
            skipped += 1
            continue
        shape, dtype = shape_dtype
        src_op = plan[produced[src]][0] if src in produced else ""
        if (len(shape) == 4 and src_op in CHANNEL_FIRST_PRODUCERS and shape[1] > 1) or (
            len(shape) == 2 and shape[1] > 1
        ):
            chosen.append((out, int(shape[1]), dtype, len(shape)))
        else:
            skipped += 1
    return chosen, skipped


def _cap(z0: torch.Tensor) -> nn.Module:
    """``min(t, z0 * exp(s))`` per channel on axis 1, ``s`` trained (starts at 0)."""
    import torch
    from torch import nn

    class Cap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("z0", z0.clone())
            self.s = nn.Parameter(torch.zeros_like(z0))

        def bound(self) -> torch.Tensor:
            return self.z0 * torch.exp(self.s)

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            z = self.bound().to(t.dtype).reshape(1, -1, *([1] * (t.ndim - 2)))
            return torch.minimum(t, z)

    return Cap()


def _channel_max(module: OnnxModule, tensors: list[str], x: torch.Tensor, batch: int = 128) -> dict[str, Any]:
    """Per tensor, the largest value of each channel (axis 1) over the images ``x`` (eval mode, no gradients)."""
    import torch
    from torch import nn

    from onnxclp.defences.repair import run_with_taps

    class Max(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m: torch.Tensor | None = None

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            dims = [d for d in range(t.ndim) if d != 1]
            m = t.detach().float().amax(dim=dims)
            self.m = m if self.m is None else torch.maximum(self.m, m)
            return t

    taps = {t: Max() for t in tensors}
    run_with_taps(module, taps, x, batch)  # type: ignore[arg-type]
    return {t: tap.m for t, tap in taps.items()}


def margins(scores: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
    """Row ``i``'s margin of its class ``c_i``: ``scores[i, c_i] - max_{j != c_i} scores[i, j]``; the classes are
    ``classes`` (one per row) or, by default, the row numbers (one image per class)."""
    import torch

    rows = torch.arange(scores.shape[0], device=scores.device)
    cols = rows if classes is None else classes.to(scores.device)
    own = scores[rows, cols]
    others = scores.clone()
    others[rows, cols] = -torch.inf
    return own - others.max(1).values


class ACObjective:
    """The loss of the module docstring; trains only the log-bounds."""

    name = "ac"

    def __init__(self, weight: float, seed: int = 0) -> None:
        self.weight = weight
        self.seed = seed
        self.clipped: list[tuple[str, int, Any, int]] = []
        self.left_alone = 0
        self.caps: dict[str, nn.Module] = {}
        self.space: PixelSpace | None = None
        self.inputs: torch.Tensor | None = None
        self.m0: float | None = None
        self.adam: Any = None
        self.last_margins: list[float] = []
        self.per_step = 0  # classes whose margin inputs one step searches (all, unless SEARCH_VALUES caps it)
        self.gen: torch.Generator | None = None

    def prepare(self, module: OnnxModule, state: State) -> list[nn.Parameter]:
        import torch

        from onnxclp.defences.repair import logits_of
        from onnxclp.methods.ibau import PixelSpace

        assert state.clean is not None
        device = next(iter(module.parameters())).device
        x_fit = state.clean.x_fit.to(device)
        self.clipped, self.left_alone = _bounded(module, x_fit[:2])
        if not self.clipped:
            raise OnnxclpError(
                "--method ac: no activation output (ReLU, ReLU6, LeakyReLU, GELU, ...) with its channels on axis 1 "
                "(after a Conv, BatchNormalization or Add, or a 2-D feature vector) and no global average pool: "
                "nothing to clip (Sigmoid, Tanh and SiLU written as x * Sigmoid(x) are not clipped; try --method "
                "fst-sau-gate)",
                EXIT_NOTHING,
            )
        for p in module.parameters():
            p.requires_grad_(False)
        tops = _channel_max(module, [t for t, _, _, _ in self.clipped], x_fit)
        for t, _, _, _ in self.clipped:
            z0 = tops[t].clamp_min(1e-6).to(device)
            self.caps[t] = _cap(z0).to(device)
            module.set_tap(t, self.caps[t])
        self.space = PixelSpace(state, x_fit[:1])
        with torch.no_grad():
            classes = int(logits_of(module(x_fit[:1])).shape[1])
        gen = torch.Generator().manual_seed(self.seed)
        u = torch.rand((classes, *x_fit.shape[1:]), generator=gen).to(device, x_fit.dtype)
        self.inputs = self.space.lo + u * (self.space.hi - self.space.lo)
        # a 1000-class task at 224x224 cannot search every class's input in one batch: each step then takes a
        # seeded random subset of the classes (an unbiased estimate of the mean margin); the others keep theirs
        self.per_step = max(1, min(classes, SEARCH_VALUES // max(1, int(np.prod(x_fit.shape[1:])))))
        self.gen = gen
        params = [cap.s for cap in self.caps.values()]  # type: ignore[attr-defined]
        self.adam = torch.optim.Adam(params, lr=1.0)  # the loop's schedule sets the rate each step
        return params

    def _search(self, module: OnnxModule) -> tuple[torch.Tensor, torch.Tensor]:
        """INNER signed steps of this step's margin inputs (module docstring, step 1): every class's, or a seeded
        random subset of :attr:`per_step` classes when the task has too many (the margin of input ``k`` is class
        ``k``'s); returns the classes and their inputs, detached."""
        import torch

        from onnxclp.defences.repair import logits_of

        assert self.inputs is not None and self.space is not None
        classes = len(self.inputs)
        if self.per_step >= classes:
            idx = torch.arange(classes)
        else:
            idx = torch.randperm(classes, generator=self.gen)[: self.per_step].sort().values
        x = self.inputs[idx.to(self.inputs.device)]
        step = INNER_STEP * (self.space.hi - self.space.lo)
        for _ in range(INNER):
            x = x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(margins(logits_of(module(x)), idx).sum(), x)
            x = torch.maximum(torch.minimum(x.detach() + step * g.sign(), self.space.hi), self.space.lo)
        self.inputs[idx.to(self.inputs.device)] = x.detach()
        return idx, x.detach()

    def loss(self, module: OnnxModule, x: Any, y: Any, scores: Any) -> Any:
        import torch.nn.functional as F

        from onnxclp.defences.repair import logits_of

        clean = F.cross_entropy(scores, y)
        if self.weight == 0.0:
            return clean
        idx, x_m = self._search(module)
        m = margins(logits_of(module(x_m)), idx)
        if self.m0 is None:
            self.m0 = max(float(m.detach().clamp_min(0).mean()), 1e-6)
        self.last_margins = [float(v) for v in m.detach().cpu()]
        return clean + self.weight * F.relu(m).mean() / self.m0

    def step(self, module: OnnxModule, params: list[Any], closure: Any, opt: Any) -> Any:
        """The closure's gradients applied by Adam at the loop's current (cosine-scheduled) rate."""
        loss = closure()
        for group in self.adam.param_groups:
            group["lr"] = opt.param_groups[0]["lr"]
        self.adam.step()
        opt.zero_grad(set_to_none=True)
        opt.step()  # no gradients: a no-op that keeps the loop's scheduler in order
        return loss

    def after_step(self, module: OnnxModule) -> None:
        return None

    def bounds(self) -> dict[str, np.ndarray]:
        """Per clipped tensor, its bounds shaped to broadcast over it (``[1, C, 1, 1]`` or ``[1, C]``) in the
        tensor's numpy dtype."""
        import torch

        out = {}
        for t, channels, dtype, rank in self.clipped:
            try:
                np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
            except TypeError as exc:
                raise OnnxclpError(f"--method ac: cannot write bounds for a {dtype} feature map") from exc
            z = self.caps[t].bound().detach().cpu().double().numpy()  # type: ignore[operator]
            if not np.isfinite(z).all():
                raise OnnxclpError("--method ac: a bound became infinite; try a smaller --lr", 3)
            out[t] = z.astype(np_dtype).reshape((1, channels, 1, 1) if rank == 4 else (1, channels))
        return out

    def bound_ratios(self) -> dict[str, float]:
        """Per clipped tensor, the median over its channels of bound / clean maximum (1: unchanged)."""
        return {t: float(self.caps[t].s.detach().exp().median()) for t, *_ in self.clipped}  # type: ignore[union-attr]

    def describe(self) -> dict[str, Any]:
        ratios = self.bound_ratios() if self.caps else {}
        return {"ac_weight": self.weight, "ac_bound_ratio_median": ratios, "ac_tensors": len(self.clipped), "ac_relus_left_alone": self.left_alone,
                "ac_inner_steps": INNER, "ac_search_classes_per_step": self.per_step, "ac_inner_step": INNER_STEP, "ac_first_mean_margin": self.m0,
                "ac_last_margins": self.last_margins}  # fmt: skip


def insert_caps(model: onnx.ModelProto, bounds: dict[str, np.ndarray]) -> list[str]:
    """Add one ``Min`` node per tensor of ``bounds`` (module docstring, "Written"); returns the nodes' names."""
    from onnx import helper, numpy_helper

    from onnxclp.methods._insert import as_file_dtype, file_dtypes, insert_after, names_in, record_added, unique

    opset = next((op.version for op in model.opset_import if op.domain in ("", "ai.onnx")), None)
    if opset is None or opset < 8:
        raise OnnxclpError(f"--method ac: Min broadcasts from opset 8; the model imports ai.onnx {opset}")
    graph = model.graph
    taken = names_in(graph)
    dtypes = file_dtypes(model, bounds)  # before any node is added: the types the graph gives the tensors
    added = []
    for tensor, z in bounds.items():
        node_name = unique("onnxclp_ac_clip", taken)
        z_name = unique(f"{node_name}.bound", taken)
        node = helper.make_node("Min", [tensor, z_name], [unique(f"{tensor}_clipped", taken)], name=node_name,
                                doc_string="onnxclp ac: per-channel upper bounds of the activation")  # fmt: skip
        z = as_file_dtype(z, dtypes.get(tensor), f"--method ac: the bound on {tensor!r}")
        insert_after(graph, tensor, node)
        graph.initializer.append(numpy_helper.from_array(z, z_name))
        added.append(node_name)
    record_added(model, added)
    return added


@register
class AC(RepairMethod):
    name = "ac"
    order = 37
    description = "Activation clipping (2023): per-channel bounds on ReLU outputs that cap margins; adds Min nodes."
    paper = (
        "Wang, Xiang, Miller & Kesidis, Improved Activation Clipping for Universal Backdoor Mitigation and Test-Time "
        "Detection, arXiv 2308.04617, 2023"
    )
    rewrites = "nodes"
    params = (EPOCHS, LR, DISTILL, BATCH, WEIGHT)

    def objective(self, state: State) -> Objective:
        return ACObjective(float(state.params.values["ac_weight"]))  # type: ignore[return-value]

    def settings(self, state: State) -> Settings:
        s = super().settings(state)
        s.reinsert_bn = False  # only the bounds train
        return s

    def walk(self, state: State) -> tuple[Any, Any, ACObjective, list[dict[str, Any]], bool]:
        """Train at each weight, weakest first, while a run's last epoch is within budget (module docstring,
        "Strength"). Returns the module, outcome and objective of the strongest weight whose whole run stayed within
        budget (else the first run's, its latest epoch within budget kept by the loop), the ladder, and whether one
        did."""
        from onnxclp.defences.repair import train, walk

        given = "ac_weight" in state.params.given
        weights = (float(state.params.values["ac_weight"]),) if given else WEIGHTS
        settings = self.settings(state)

        def run(weight: float) -> tuple[Any, Any, ACObjective]:
            objective = ACObjective(weight)
            module, outcome = train(state, objective, settings)  # type: ignore[arg-type]
            return module, outcome, objective

        def whole(outcome: Any) -> bool:  # the run's last epoch within budget: the whole run was kept
            return bool(outcome.curve[-1]["within"])

        def entry(weight: float, outcome: Any, ok: bool) -> dict[str, Any]:
            last = outcome.curve[-1]
            return {"weight": weight, "whole_run_within": ok, "chosen_epoch": outcome.chosen_epoch,
                    "val_acc": last["val_acc"], "drop": last["drop"]}  # fmt: skip

        return walk(weights, run, whole, entry)

    def decide(self, state: State) -> None:
        from onnxclp.defences.repair import finish

        settings = self.settings(state)
        module, outcome, ac, ladder, _ = self.walk(state)
        bounds = ac.bounds()
        state.graph_edit = lambda st: insert_caps(st.model, bounds)
        for t in bounds:  # the bounds are written as nodes, not as initializer values: take the taps out
            module.remove_tap(t)
        finish(state, module, outcome, settings, ac)  # type: ignore[arg-type]
        assert state.training is not None
        state.training["weight_ladder"] = ladder
        state.decisions = []
        state.notes.append(
            f"ac: {len(bounds)} Min nodes added (per-channel bounds on activation and pooled outputs, margin weight "
            f"{ac.weight:g}); {ac.left_alone} activation outputs left alone; every weight is the input's"
        )
