"""``fst-gate``: FST's repaired copy of the network, consulted only where the input network answers a suspected
target class (the target gate, :mod:`onnxclp.methods._gate`; docs/algorithms.md, "The target gate").

Not a published method. FST (Min, Qin, Shen & Cheng, NeurIPS 2023, section 4: the classifier re-initialised and
pushed away from the old one while the whole network is fine-tuned) removes most of the zoo's backdoors from 500
clean images, but at 10-30 points of clean accuracy, which the guard refuses. An all-to-one backdoor only adds
answers of its target class, so the written model answers as the input does except where the input says a
suspected target and FST's copy disagrees. Clean images of other classes keep the input's answer, which is what
lets the guard's validation images certify it.

**The suspects** come from the model alone, before any clean image is read (``--suspects-from``): the classes
ranked by the size of the ``classifier`` detector's anomaly index, either sign (the excess of a class's row of the
classifier layer over the others', :mod:`onnxclp.detect.classifier`), most anomalous first; where that detector
cannot read the classifier layer (class maps from a 3x3 convolution, globally pooled, as in all-convolutional
nets; several output layers), by MM-BD's per-class maximum logit margin on optimised images (Wang et al., IEEE
S&P 2024, section III; :mod:`onnxclp.detect.mmbd`'s search budget), largest first. The report says which ranking
was used and why.

**The candidates**, tested in one fixed sequence on the validation images (docs/algorithms.md, "Testing
candidates in sequence"): the gate with the first suspect alone where the input's top softmax probability is
above 0.99 (FST's run end behind it), then above 0.9, 0.5 and 0 (:data:`CONFIDENCES`); then the first two,
three... suspects up to every class (the gate then passes every disagreement: FST's copy alone). The walk stops at the
first over the budget and keeps the last within. With ``--select-fraction`` the largest suspect set within the
budget on the selection images is kept.

**The copy's training**, written down before any zoo model was measured with the gate: FST at one learning rate
(``--lr``, default 0.001, the first of the other repairs' walk), 40 epochs, distillation from the input weighted 4
and on mixup blends weighted 2 (``--distill``, ``--distill-mix``): these keep the copy closer to the input, so that
its answers on the suspects' clean images change less. Where this came from is in docs/results-repair-notes.md
(session 15): FST with these settings on three zoo models, then the gate tried on one of them.

Written: the input's nodes unchanged, a copy of them reading FST's rewritten initializers (the others shared), and
the gate's nodes (:mod:`onnxclp.methods._gate`); the report's ``added_nodes``, ``training.gate`` and the model's
``onnxclp.gate`` metadata say so. About twice the compute of the input at inference.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from onnxclp.errors import OnnxclpError
from onnxclp.methods import register
from onnxclp.methods._repair import BATCH
from onnxclp.methods.base import ParamSpec
from onnxclp.methods.fst import ALPHA, FST, SCOPE, FSTObjective

if TYPE_CHECKING:
    from onnxclp.bridge import OnnxModule
    from onnxclp.defences.repair import Objective
    from onnxclp.pipeline import State

EPOCHS = ParamSpec("epochs", int, 40, "Training epochs over the clean images (repairs).", minimum=1, maximum=1000)
LR = ParamSpec("lr", float, 0.001, "SGD learning rate of fst-gate's copy (cosine schedule; no walk).",
               minimum=1e-6, maximum=1.0)  # fmt: skip
DISTILL = ParamSpec("distill", float, 4.0, "Weight of distillation from the input model's outputs (repairs; 0 = off).",
                    minimum=0.0)  # fmt: skip
DISTILL_MIX = ParamSpec("distill_mix", float, 2.0, "Weight of distillation on mixup blends of the clean images "
                        "(function matching; repairs; 0 = off).", minimum=0.0)  # fmt: skip

DISTILL_FOCUS = ParamSpec("distill_focus", float, 1.0, "Target gate: the FST copy's distillation weight on images "
                          "the input gives a class other than the first suspect, as a fraction of its weight on "
                          "that class's (1 = every image alike; the gate consults the copy only on the latter).",
                          minimum=0.0, maximum=1.0)  # fmt: skip


SUSPECTS_FROM = ParamSpec(
    "suspects_from",
    str,
    "auto",
    "How the gate ranks the suspected target classes: classifier (the classifier layer's anomaly index, either "
    "sign; weights only), mmbd (MM-BD's per-class maximum margin on optimised images, largest first), auto "
    "(classifier where that layer can be read, else mmbd).",
    choices=("auto", "classifier", "mmbd"),
)


class Suspects(NamedTuple):
    """The gate's ranking: ``order`` (most suspect first), each class's ``scores`` in that order, the ranking
    used (``by``: ``classifier`` or ``mmbd``) and, where ``auto`` fell back to MM-BD, ``why``."""

    order: list[int]
    scores: list[float]
    by: str
    why: str | None = None


def suspects_of(state: State) -> Suspects:
    """The classes, most suspect first (module docstring, ``--suspects-from``).

    ``classifier``: the anomaly indices of :func:`onnxclp.detect.classifier.class_anomaly`, ranked by size, either
    sign (a poisoned-label backdoor raises its target's row above the others'; the zoo's clean-label SIG model has
    its target's the lowest, -3.2, docs/algorithms.md "The target gate"). ``mmbd``: MM-BD's maximum margins
    (:func:`onnxclp.detect.mmbd.measure`), largest first: a backdoor's target is the class an image can be pushed
    furthest into (Wang et al., IEEE S&P 2024, section III). Exit 3 when the chosen ranking cannot run."""
    from onnxclp.detect.classifier import class_anomaly

    method, how = state.params.method, str(state.params["suspects_from"])
    why = None
    if how in ("auto", "classifier"):
        a = class_anomaly(state)
        if not isinstance(a, str):
            order = [int(c) for c in np.argsort(-np.abs(a), kind="stable")]
            return Suspects(order, [float(a[c]) for c in order], "classifier")
        if how == "classifier":
            raise OnnxclpError(f"--method {method} --suspects-from classifier ranks the suspected target classes "
                               f"from the classifier layer, and cannot use this model's: {a} (try --suspects-from "
                               "mmbd)", 3)  # fmt: skip
        why = f"the classifier layer cannot be read ({a})"
    from onnxclp.detect.mmbd import measure

    out = measure(state)
    if isinstance(out, str):
        raise OnnxclpError(f"--method {method} ranks the suspected target classes with MM-BD"
                           + (f" because {why}" if why else "") + f", which cannot run: {out}", 3)  # fmt: skip
    margins = np.asarray(out[0].margins, dtype=np.float64)
    order = [int(c) for c in np.argsort(-margins, kind="stable")]
    return Suspects(order, [float(margins[c]) for c in order], "mmbd", why)


# The gate's candidates, in the order they are tested: (suspects, confidence). The first suspect alone, where the
# input is at least this sure of its answer (a backdoor's answers are sure ones; clean images the copy would move
# are often not), the bar lowered step by step, then the suspects widened without a bar (module docstring).
CONFIDENCES = (0.99, 0.9, 0.5, 0.0)
# fst-sau-gate's bars since session 18: the same walk in smaller steps, so that it stops nearer the budget (the
# sequence still ends at the first candidate over it; docs/results-repair-notes.md, session 18)
FINE_CONFIDENCES = (0.99, 0.98, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.0)
# a suspect class is measurable when at least this share of a class's average count of validation images is labelled
# with it (200 images, 10 classes: 10); on the zoo's real draws every class has 12 or more
MIN_CLASS_SHARE = 0.5


class Candidate(NamedTuple):
    """One step of the gate's walk: ``copies`` consulted; where the input says one of the first ``suspects``
    classes above ``confidence``, the first copy that disagrees answers; where it says one of the first ``sure``
    (at any confidence), a copy that disagrees and gives the input's answer less than :func:`sure_level`; where it
    says one of the first ``joint`` above ``joint_confidence``, the first copy if every copy disagrees."""

    copies: int
    suspects: int
    confidence: float
    sure: int = 0
    joint: int = 0
    joint_confidence: float = 0.0


def candidates(classes: int, copies: int = 1, sure: bool = False,
               bars: tuple[float, ...] = CONFIDENCES) -> list[Candidate]:  # fmt: skip
    """The walk, weakest first, each candidate moving at least the answers the one before moved: the first copy
    behind the first suspect at the highest bar; then every copy (one for fst-gate) behind it at each bar from the
    highest; then every copy behind wider suspect sets.

    With ``sure`` (fst-sau-gate), the moves with more evidence come before those with less (session 17): after
    every copy at the highest bar, the copies' sure moves on the first suspect; then their joint moves (every copy
    disagrees) on it above each lower bar; then the moves of either copy above each lower bar; and before each wider
    suspect set, the set before it plus the sure and joint moves on the wider one. ``bars``: the confidence bars,
    highest first, ending at 0 (:data:`CONFIDENCES`; fst-sau-gate's :data:`FINE_CONFIDENCES`)."""
    top = bars[0]
    if not sure:
        walk = [Candidate(1, 1, top)] + [Candidate(copies, 1, c) for c in bars[1 if copies == 1 else 0 :]]
        return walk + [Candidate(copies, k, 0.0) for k in range(2, classes + 1)]
    walk = [Candidate(1, 1, top), Candidate(copies, 1, top), Candidate(copies, 1, top, 1)]
    walk += [Candidate(copies, 1, top, 1, 1, b) for b in bars[1:]]
    walk += [Candidate(copies, 1, c, 1, 1, 0.0) for c in bars[1:-1]] + [Candidate(copies, 1, 0.0)]
    for k in range(2, classes + 1):
        walk += [Candidate(copies, k - 1, 0.0, k, k, 0.0), Candidate(copies, k, 0.0)]
    return walk


# a copy's disagreement is sure where it gives the input's answer less than a uniform guess would (1/C of its
# softmax probability): on the zoo's clean validation images FST's copy gives the target less than 0.1 on 90-97 % of
# the other classes' images, and 0.07-0.44 on the target images its moves would cost (results-repair-notes, s. 17)
def sure_level(classes: int) -> float:
    """The probability below which a copy's disagreement counts as sure: chance, 1/``classes``."""
    return 1.0 / classes


class Judged:
    """Mixin (listed before the objective's class): the run's end judged on the validation images through the gate
    (``self.judge``, a :class:`GateJudge`) rather than by the module's own answers; ``describe`` says how."""

    judge: GateJudge

    def val_right(self, module: OnnxModule, x: Any, y: Any) -> np.ndarray:
        return self.judge.right(module, x, y)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "gate_first": self.judge.describe()}


class GateObjective(Judged, FSTObjective):
    """FST's objective, judged on the validation images through the gate's first candidate."""

    def __init__(self, alpha: float, scope: str, judge: GateJudge) -> None:
        super().__init__(alpha, scope=scope)
        self.judge = judge


class GateJudge:
    """What a copy in training answers through the gate at ``candidate`` (suspects ranked ``order``): the input's
    answers, earlier copies' (``before``: :func:`answers`) and the module's."""

    def __init__(self, pred_input: np.ndarray, conf_input: np.ndarray, order: list[int], candidate: Candidate,
                 probabilities: bool, before: list[tuple[np.ndarray, np.ndarray]] | None = None) -> None:  # fmt: skip
        self.pred_input = pred_input
        self.conf_input = conf_input
        self.order = order
        self.candidate = candidate
        self.probabilities = probabilities
        self.before = before or []

    def right(self, module: OnnxModule, x: Any, y: Any) -> np.ndarray:
        from onnxclp.defences.repair import outputs

        mine = answers(outputs(module, x), self.pred_input, self.probabilities)
        pred = gated(self.pred_input, self.conf_input, [*self.before, mine], self.order, self.candidate)
        return pred == y.cpu().numpy()

    def describe(self) -> dict[str, Any]:
        _, k, confidence, s, a, b = self.candidate
        return {"suspects": self.order[:k], "confidence": confidence, "copies_before": len(self.before),
                "sure_suspects": self.order[:s], "joint_suspects": self.order[:a],
                "joint_confidence": b}  # fmt: skip


def answers(out: Any, pred_input: np.ndarray, probabilities: bool) -> tuple[np.ndarray, np.ndarray]:
    """A copy's classes and its probability of the input's answer, from its outputs (a torch tensor, N x C)."""
    from onnxclp.methods._gate import answer_probability

    z = out.detach().cpu().numpy()
    return z.argmax(1), answer_probability(z, pred_input, probabilities)


def gated(pred_input: np.ndarray, conf_input: np.ndarray, copies: list[tuple[np.ndarray, np.ndarray]],
          order: list[int], candidate: Candidate) -> np.ndarray:  # fmt: skip
    """The gated model's classes at ``candidate``, the suspects ranked ``order``, from the input's and its first
    ``candidate.copies`` copies' (:func:`answers`) (``_gate.gated_predictions``)."""
    from onnxclp.methods._gate import gated_predictions

    n, k, confidence, s, a, b = candidate
    used = copies[:n]
    return gated_predictions(pred_input, [c for c, _ in used], order[:k], conf_input, confidence, order[:s],
                             [p for _, p in used], sure_level(len(order)), order[:a], b)  # fmt: skip


@register
class FSTGate(FST):
    name = "fst-gate"
    order = 41
    description = ("FST's repaired copy, consulted where the input answers a suspected target class (target gate); "
                   "adds a copy of the network.")  # fmt: skip
    paper = f"{FST.paper}; the target gate is onnxclp's"
    rewrites = "nodes"
    # scan's next step names fst-sau-gate since session 16 (lower ASR under the guard on both draws of the zoo)
    suggested = False
    params = (EPOCHS, LR, DISTILL, DISTILL_MIX, BATCH, ALPHA, SCOPE, SUSPECTS_FROM, DISTILL_FOCUS)

    def objective(self, state: State) -> Objective:  # pragma: no cover - decide builds the gated one
        raise NotImplementedError

    # the gate's copies: fst-gate has FST's alone; a subclass adds a second (train_copy), consulted after the first
    copies = 1
    # whether the walk tests the copies' sure disagreements before the unsure ones (candidates; fst-sau-gate)
    sure_walk = False
    # the walk's confidence bars, highest first (candidates)
    bars: tuple[float, ...] = CONFIDENCES

    def train_copy(self, state: State, judge: GateJudge) -> tuple[Any, Any, Any, Any]:
        """Train the gate's next copy; returns (module, outcome, settings, objective). ``judge`` is what the run's
        end is tested with: the gate's first candidate with this copy."""
        raise NotImplementedError

    def decide(self, state: State) -> None:
        from onnxclp.defences.repair import finish, outputs, train
        from onnxclp.guard import SELECT_Z, paired_drop
        from onnxclp.methods._gate import are_probabilities, compose, softmax_top, ungated_outputs
        from onnxclp.passes.guard import scores as input_scores

        ranked = suspects_of(state)
        order = ranked.order
        clean = state.clean
        assert clean is not None and state.guard is not None
        device = str(state.options.context.get("device") or "auto")
        x_val, y_val = clean.x_sel, clean.y_sel.numpy()
        logits_input = input_scores(state.model, state.store, x_val, device)  # as the final check runs the input
        pred_input = logits_input.reshape(len(logits_input), -1).argmax(1)
        probabilities = are_probabilities(logits_input)  # a Softmax at the end: the bar reads the output itself
        conf_input = softmax_top(logits_input, probabilities)
        walk = candidates(len(order), self.copies, self.sure_walk, self.bars)
        level = sure_level(len(order))
        # the gate changes answers only on images the input gives a suspect: a suspect with few validation images
        # labelled with it is a change the check cannot measure (synthesized stand-in images, labelled by the input,
        # can hold none): the first suspect's refuses the result, a wider set's ends the walk before it
        need = max(1, int(MIN_CLASS_SHARE * len(y_val) / len(order)))
        counts = np.bincount(y_val.astype(np.int64), minlength=len(order))
        c = order[0]
        if counts[c] < need:
            from onnxclp.guard import blind

            state.guard.unmeasured = (
                f"the target gate changes answers only where the input says a suspected class, and {counts[c]} of "
                f"the {len(y_val)} validation images are labelled with its first suspect, class {c} (at least {need} "
                f"needed: half a class's average share): what it does to that class cannot be measured"
            )
            if not state.options.force:
                blind(state.guard, clean.right_before_selection, y_val, False)  # raises Refused
        p = state.params
        objective = GateObjective(float(p["fst_alpha"]), str(p["fst_scope"]),
                                  GateJudge(pred_input, conf_input, order, walk[0], probabilities))  # fmt: skip
        settings = self.settings(state)
        focus = float(p.values.get("distill_focus", 1.0))
        if focus != 1.0:  # the copy held to the input where the gate consults it (docs/algorithms.md, "fst-gate")
            from dataclasses import replace

            settings = replace(settings, distill_classes=(int(order[0]),), distill_other=focus)
        module, outcome = train(state, objective, settings)  # type: ignore[arg-type]
        trained = [(module, outcome, settings, objective)]
        # the rest of the walk: the copies behind gentler bars and wider suspect sets, in sequence after the first
        # run's end (or, with a selection part, the strongest within budget there); a further copy is trained when
        # the walk reaches it
        right_before = clean.right_before_selection
        assert right_before is not None
        sequence_z = clean.sequence_z(state.guard)
        z = SELECT_Z if sequence_z is None else sequence_z
        budget = float(state.guard.budget)

        def predict(m: Any) -> tuple[np.ndarray, np.ndarray]:
            return answers(outputs(m, x_val.to(next(m.parameters()).device)), pred_input, probabilities)

        preds = [predict(module)]
        ladder: list[dict[str, Any]] = []
        kept = 0
        for i, candidate in enumerate(walk):
            n, k, conf, s, a, b = candidate
            entry = {"copies": n, "suspects": k, "confidence": conf, "classes": order[:k], "sure_suspects": s,
                     "joint_suspects": a, "joint_confidence": b}  # fmt: skip
            short = [c for c in order[: max(k, s, a)] if counts[c] < need]
            if i > 0 and short:  # not measurable: the walk ends before it
                ladder.append({**entry, "unmeasurable": short, "within": False, "drop": None, "bound": None})
                break
            while len(preds) < n:
                judge = GateJudge(pred_input, conf_input, order, candidate, probabilities, before=list(preds))
                extra = self.train_copy(state, judge)
                trained.append(extra)
                preds.append(predict(extra[0]))
            right = gated(pred_input, conf_input, preds, order, candidate) == y_val
            d = paired_drop(right_before, right)
            within = d.bound(z) <= budget + 1e-9
            ladder.append({**entry, "drop": d.drop, "bound": d.bound(z), "within": within,
                           "changed": float(np.mean(right != right_before))})  # fmt: skip
            if i == 0:
                if not outcome.whole:  # the run's end, tested in train(): the sequence ends there
                    break
                continue
            if within:
                kept = i
            elif sequence_z is not None:
                break
        n, k, confidence, s, a, joint_confidence = walk[kept]
        sure_suspects, joint_suspects = order[:s], order[:a]
        notes = len(state.notes)
        values: list[dict[str, np.ndarray]] = []
        described: list[dict[str, Any]] = []
        for j, (m, o, st, obj) in reversed(list(enumerate(trained))):  # the first copy's last: its record stays
            finish(state, m, o, st, obj)
            values.insert(0, dict(state.rewrites))
            state.rewrites = {}  # the input's initializers stay; the copies get the new values
            assert state.training is not None
            if j > 0:
                described.insert(0, {"copy": j + 1, "objective": obj.name, "settings": state.training["settings"],
                                     "curve": state.training["curve"], "seconds": state.training["seconds"],
                                     "copied": state.training["rewritten"], "used": j < n})  # fmt: skip
        del state.notes[notes:]  # finish's notes say "rewritten": these values are the copies'
        used = values[:n]
        suspects = order[:k]
        classes = len(order)
        state.graph_edit = lambda st: compose(st.model, used, suspects, classes, confidence, probabilities,
                                              sure_suspects, level, joint_suspects, joint_confidence)  # fmt: skip
        assert state.training is not None
        # the input's initializers are not rewritten: the new values are the copies' (the report's ``rewritten``
        # stays empty; ``training.copied`` lists the first copy's with their change from the input's)
        state.training["copied"] = state.training.pop("rewritten")
        state.training["rewritten"] = []
        state.training["gate"] = {"order": order, "ranked_by": ranked.by,
                                  ("anomaly_index" if ranked.by == "classifier" else "margins"): ranked.scores,
                                  "suspects": suspects,
                                  "confidence": confidence, "copies": n, "ladder": ladder,
                                  "sure_suspects": sure_suspects, "sure_level": level if s else None,
                                  "joint_suspects": joint_suspects, "joint_confidence": joint_confidence,
                                  "part": clean.selection_name, "in_sequence": sequence_z is not None}  # fmt: skip
        if described:
            state.training["gate"]["further_copies"] = described
        if ranked.why:
            state.training["gate"]["ranking_fallback"] = ranked.why
        state.decisions = []
        others = ungated_outputs(state.model)
        if others:
            state.notes.append(f"{state.params.method}: the model outputs {others} are not computed from its first "
                               "output, which the gate writes: they stay the input network's (ungated); read the "
                               "first")  # fmt: skip
        state.notes.append(
            f"{state.params.method}: "
            + ("FST's copy answers" if n == 1 else f"{n} copies answer (the first that disagrees)")
            + f" where the input says one of classes {suspects} (of {classes}, ranked by "
            + (
                "the classifier's anomaly index)"
                if ranked.by == "classifier"
                else "MM-BD's maximum margins" + (f": {ranked.why})" if ranked.why else ")")
            )
            + (f" with a top probability above {confidence:g}" if confidence > 0 else "")
            + " and the copy disagrees"
            + (
                f" (and, where it says one of classes {sure_suspects} at any probability, where a copy gives that "
                f"class less than {level:.3g} of its probability)"
                if s
                else ""
            )
            + (
                f" (and, where it says one of classes {joint_suspects}"
                + (f" above {joint_confidence:g}" if joint_confidence > 0 else "")
                + ", where every copy disagrees)"
                if a
                else ""
            )
            + f"; {sum(len(v) for v in used)} initializers copied with new values, the "
            "input's unchanged"
            + (f"; {len(trained) - n} further copy trained and not used (over budget)" if len(trained) > n else "")
        )
