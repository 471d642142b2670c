"""The target gate: a repaired copy of the network consulted only where the input network answers a suspected
target class (``fst-gate``; docs/algorithms.md, "The target gate").

A repair that removes a backdoor from a few hundred clean images also moves many clean predictions (FST's
re-learnt classifier loses 10-30 points at 500 images, docs/results-repair.md), more than the guard's validation
images can certify. An all-to-one backdoor only ever *adds* answers of its target class ``t``: on a triggered input
the backdoored network says ``t``. So the written model keeps the input network's answer everywhere except where
it says a suspected class and the repaired copy disagrees; there it answers with the copy's logits. A clean image
changes only when the input says a suspect and the copy says otherwise, a triggered one whenever the copy has
unlearnt the trigger. What this costs is written down: the model holds both networks (the copy shares every
initializer the repair left unchanged), about twice the compute, and it is only as good as the suspect list (a
backdoor whose target is not on it passes: docs/algorithms.md).

Written: the input's nodes as they were, but for its first output, renamed (``<output>.input``); a copy of every
node under the prefix ``onnxclp.gate/`` reading the rewritten initializers (new names under the prefix) and the
input's unchanged ones; then ``ArgMax`` of both, the suspect mask (a ``Gather`` of a constant 0/1 vector by the
input's class), ``Equal``/``Not``/``And``, and ``Where`` (opset 9 on; before it, ``input * (not use) + copy * use``),
which writes the output under its own name. With several copies (``fst-sau-gate``) each has its own prefix
(``onnxclp.gate2/``...) and the first that disagrees with the input answers: ``Where`` nested, the first copy's
outermost. With sure moves (``sure_suspects``, fst-sau-gate's walk), a copy also answers where the input says one of
those classes at any confidence and the copy gives that class less than the level of its softmax: ``Softmax`` of
the copy, ``Equal`` of the input's class with the class indices (one-hot), ``ReduceSum`` of their product, ``Less``,
``Or`` with the bar's gate. The input's nodes that read its first output (a Softmax or an ArgMax writing another
model output) read the gated one, so those outputs follow the gate; an output not computed from the first (logits
returned beside a softmax that comes first) stays the input network's, and the method's notes say so
(:func:`ungated_outputs`). Opsets, metadata and doc strings are kept; ``onnxclp.added_nodes`` lists the
nodes added and ``onnxclp.gate`` records the suspects and the copies.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import numpy as np

from onnxclp.errors import OnnxclpError
from onnxclp.methods._insert import names_in, record_added, unique

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    import onnx

PREFIX = "onnxclp.gate/"
METADATA_KEY = "onnxclp.gate"


def gated_predictions(pred_input: np.ndarray, pred_copy: np.ndarray | Sequence[np.ndarray], suspects: Sequence[int],
                      conf_input: np.ndarray | None = None, confidence: float = 0.0, sure_suspects: Sequence[int] = (),
                      p_answer: Sequence[np.ndarray] | None = None, sure_level: float = 0.0,
                      joint_suspects: Sequence[int] = (), joint_confidence: float = 0.0) -> np.ndarray:  # fmt: skip
    """What the gated model answers, from the networks' answers: where the input's answer is a suspect and the
    input's top softmax probability ``conf_input`` is above ``confidence``, the first copy (of ``pred_copy``, one
    array or several, in order) whose answer differs; else the input's (the graph :func:`compose` writes, as
    numpy). With ``sure_suspects``, a copy also answers where the input's answer is one of those (at any
    confidence), the copy's answer differs and the copy gives the input's answer less than ``sure_level`` of its
    probability (``p_answer``: per copy, its softmax probability of the input's answer; :func:`answer_probability`):
    the copy's sure disagreements. With ``joint_suspects``, the first copy also answers where the input's answer
    is one of those (above ``joint_confidence``) and *every* copy's answer differs: the copies' joint
    disagreements."""
    copies = [pred_copy] if isinstance(pred_copy, np.ndarray) else list(pred_copy)
    open_ = np.isin(pred_input, np.asarray(list(suspects), dtype=np.int64))
    if confidence > 0:
        assert conf_input is not None
        open_ &= conf_input > confidence
    sure_open = np.isin(pred_input, np.asarray(list(sure_suspects), dtype=np.int64))
    if sure_open.any():
        assert p_answer is not None and len(p_answer) >= len(copies)
    joint = np.isin(pred_input, np.asarray(list(joint_suspects), dtype=np.int64))
    if joint_confidence > 0:
        assert conf_input is not None
        joint &= conf_input > joint_confidence
    for pred in copies:
        joint &= pred != pred_input
    out = np.array(pred_input, copy=True)
    for i, pred in enumerate(copies):
        gate = open_ | (sure_open & (np.asarray(p_answer[i]) < sure_level)) if sure_open.any() else open_  # type: ignore[index]
        gate = gate | joint
        use = gate & (out == pred_input) & (pred != pred_input)  # not yet moved by an earlier copy
        out = np.where(use, pred, out)
    return out


def downstream(nodes: Sequence[onnx.NodeProto], name: str) -> set[int]:
    """ids of the ``nodes`` that read the tensor ``name`` or anything computed from it."""
    reached, found = {name}, set()
    for n in nodes:  # a graph's nodes are in topological order (the checker's rule)
        if any(i in reached for i in n.input):
            found.add(id(n))
            reached.update(o for o in n.output if o)
    return found


def ungated_outputs(model: onnx.ModelProto) -> list[str]:
    """The model outputs after the first that are not computed from it: the target gate writes the first, so these
    stay the input network's (a network that returns its logits beside its softmax, the softmax first)."""
    graph = model.graph
    if len(graph.output) < 2:
        return []
    nodes = list(graph.node)
    after = downstream(nodes, graph.output[0].name)
    made = {o for n in nodes if id(n) in after for o in n.output}
    return [o.name for o in graph.output[1:] if o.name not in made]


def answer_probability(outputs: np.ndarray, pred_input: np.ndarray, probabilities: bool = False) -> np.ndarray:
    """A copy's softmax probability (its output itself, with ``probabilities``) of the class the input answers,
    per row of ``outputs`` (N, C[, 1, 1])."""
    z = np.asarray(outputs, dtype=np.float64).reshape(len(outputs), -1)
    if not probabilities:
        z = np.exp(z - z.max(axis=1, keepdims=True))
        z = z / z.sum(axis=1, keepdims=True)
    return z[np.arange(len(z)), np.asarray(pred_input, dtype=np.int64)]


def are_probabilities(outputs: np.ndarray) -> bool:
    """Whether a model's outputs (N, C[, 1, 1]) are already probabilities (a Softmax at the end): every row
    non-negative and summing to 1. The gate's bar then reads them as they are."""
    z = np.asarray(outputs, dtype=np.float64).reshape(len(outputs), -1)
    return bool(len(z)) and bool(np.all(z >= 0)) and bool(np.allclose(z.sum(axis=1), 1.0, atol=1e-3))


def softmax_top(logits: np.ndarray, probabilities: bool = False) -> np.ndarray:
    """The top softmax probability per row of ``logits`` (N, C[, 1, 1]); with ``probabilities``, the top output
    itself."""
    z = np.asarray(logits, dtype=np.float64).reshape(len(logits), -1)
    if probabilities:
        return z.max(axis=1)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return (z / z.sum(axis=1, keepdims=True)).max(axis=1)


def _default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def copy_prefix(i: int) -> str:
    """The name prefix of the gate's ``i``-th copy (0-based): ``onnxclp.gate/``, then ``onnxclp.gate2/``, ..."""
    return PREFIX if i == 0 else f"onnxclp.gate{i + 1}/"


def compose(model: onnx.ModelProto, rewritten: Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray]],
            suspects: Sequence[int], classes: int, confidence: float = 0.0, probabilities: bool = False,
            sure_suspects: Sequence[int] = (), sure_level: float = 0.0, joint_suspects: Sequence[int] = (),
            joint_confidence: float = 0.0) -> list[str]:  # fmt: skip
    """Add the repaired copies (``rewritten``: initializer name -> new value, one mapping per copy, the first
    consulted first) and the gate to ``model`` in place (module docstring); returns the names of the nodes added.
    ``probabilities``: the output is already a softmax, and the bar reads it as it is. ``sure_suspects`` and
    ``sure_level``: a copy also answers where the input says one of those classes and the copy gives that class
    less than ``sure_level`` of its softmax probability; ``joint_suspects`` and ``joint_confidence``: the first copy
    also answers where the input says one of those classes above that bar and every copy disagrees
    (:func:`gated_predictions`)."""
    from onnx import helper, numpy_helper

    versions = [rewritten] if not isinstance(rewritten, (list, tuple)) else list(rewritten)
    if not versions:
        raise OnnxclpError("internal: the gate was given no copy", 4)
    graph = model.graph
    opset = _default_opset(model)
    if opset < 7:
        raise OnnxclpError(
            f"the target gate needs opset 7 or later (ArgMax, Equal and And on tensors); the model has {opset}", 3
        )
    if any(a.HasField("g") or len(a.graphs) for n in graph.node for a in n.attribute):
        raise OnnxclpError("the target gate copies the network, and this one has nested graphs (If, Loop, Scan)", 3)
    if not graph.output:
        raise OnnxclpError("the model has no output to gate", 3)
    out = graph.output[0]
    if not any(out.name in n.output for n in graph.node):
        raise OnnxclpError(f"the model's output {out.name!r} is not computed by a node: nothing to gate", 3)
    elem = out.type.tensor_type.elem_type
    taken = names_in(graph)
    inits = {t.name: t for t in graph.initializer}
    originals = list(graph.node)
    y = out.name
    copies: list[onnx.NodeProto] = []
    y_copies: list[str] = []
    for i, values in enumerate(versions):
        missing = sorted(set(values) - set(inits))
        if missing:
            raise OnnxclpError(f"internal: the gate's copy rewrote {missing[:3]}, which are not initializers", 4)
        prefix = copy_prefix(i)

        def copy_name(name: str, prefix: str = prefix) -> str:
            return unique(prefix + name, taken)

        renamed: dict[str, str] = {}  # the copy's names: rewritten initializers and every tensor a node writes
        for name, value in values.items():
            new = copy_name(name)
            renamed[name] = new
            dtype = helper.tensor_dtype_to_np_dtype(inits[name].data_type)  # the dtype alone: data may be external
            graph.initializer.append(numpy_helper.from_array(
                np.asarray(value, dtype=dtype).reshape(tuple(inits[name].dims)), new))  # fmt: skip
        for n in originals:
            for o in n.output:
                if o:
                    renamed[o] = copy_name(o)
        first = len(copies)
        for n in originals:
            c = type(n)()
            c.CopyFrom(n)
            c.name = copy_name(c.name) if c.name else copy_name(f"{n.op_type}_{len(copies) - first}")
            for j, name in enumerate(c.input):
                if name in renamed:  # a rewritten initializer or a tensor the network computes: the copy's
                    c.input[j] = renamed[name]
            for j, name in enumerate(c.output):
                if name:
                    c.output[j] = renamed[name]
            copies.append(c)
        y_copies.append(renamed[y])

    # the input's own first output is renamed, and the gate writes the output's name; the input's nodes after it (a
    # Softmax or an ArgMax writing another model output) read the gated output, and are moved after the gate
    y_input = unique(f"{y}.input", taken)
    after = downstream(originals, y)
    for n in originals:
        for j, name in enumerate(n.output):
            if name == y:
                n.output[j] = y_input
    for v in graph.value_info:
        if v.name == y:
            v.name = y_input

    def t(name: str) -> str:
        return unique(PREFIX + name, taken)

    def nth(name: str, i: int) -> str:  # the i-th copy's gate tensors and nodes: the first copy's names unsuffixed
        return t(name if i == 0 else f"{name}_{i + 1}")

    half, a_in = t("half"), t("argmax_input")
    graph.initializer.append(numpy_helper.from_array(np.array(0.5, dtype=np.float32), half))
    gate = [helper.make_node("ArgMax", [y_input], [a_in], name=t("ArgMax_input"), axis=1, keepdims=1)]

    def one_of(listed: Sequence[int], kind: str = "") -> str:  # where the input's class is one of ``listed``
        mask = np.zeros(classes, dtype=np.float32)  # a 0/1 vector over the classes, gathered by the input's class
        mask[list(listed)] = 1.0
        values, gathered, out_ = t(kind + "suspects"), t(kind + "mask"), t(kind + "suspect")
        graph.initializer.append(numpy_helper.from_array(mask, values))
        gate.extend([helper.make_node("Gather", [values, a_in], [gathered], name=t(f"Gather_{kind}suspect"), axis=0),
                     helper.make_node("Greater", [gathered, half], [out_], name=t(f"Greater_{kind}suspect"))])  # fmt: skip
        return out_

    sus = one_of(suspects)

    def softmax(y_name: str, tag: str) -> str:  # the output's softmax in float32 (the thresholds' type)
        source = y_name
        if elem not in (0, 1):
            source = t(f"{tag}_float")
            gate.append(helper.make_node("Cast", [y_name], [source], name=t(f"Cast_{tag}"), to=1))
        if probabilities:
            return source
        prob = t(f"softmax_{tag}")
        gate.append(helper.make_node("Softmax", [source], [prob], name=t(f"Softmax_{tag}"), axis=1))
        return prob

    tops: list[str] = []

    def top_input() -> str:  # the input's top softmax probability (N, 1[, ...]), built once
        if not tops:
            top = t("top_input")
            prob = softmax(y_input, "input")
            if opset >= 18:
                axes = t("axes")
                graph.initializer.append(numpy_helper.from_array(np.array([1], dtype=np.int64), axes))
                gate.append(helper.make_node("ReduceMax", [prob, axes], [top], name=t("ReduceMax_input"), keepdims=1))
            else:
                gate.append(helper.make_node("ReduceMax", [prob], [top], name=t("ReduceMax_input"), axes=[1],
                                             keepdims=1))  # fmt: skip
            tops.append(top)
        return tops[0]

    def above(suspect: str, bar: float, tag: str) -> str:  # the suspect mask where the input is above the bar
        # the bar's tensors: "confidence", "sure", "open" for the gate's own (the names since session 15)
        prefix = "" if tag == "confidence" else tag + "_"
        thr, sure, both = t(tag), t(prefix + "sure"), t(prefix + "open")
        graph.initializer.append(numpy_helper.from_array(np.array(bar, dtype=np.float32), thr))
        gate.extend([helper.make_node("Greater", [top_input(), thr], [sure], name=t(f"Greater_{tag}")),
                     helper.make_node("And", [suspect, sure], [both], name=t(f"And_{tag}"))])  # fmt: skip
        return both

    opened = sus
    if confidence > 0:  # and only where the input is sure of its answer: its top softmax probability
        opened = above(sus, confidence, "confidence")
    sure_open: str | None = None
    if len(sure_suspects):  # the sure moves: a mask of their suspects, and the input's class one-hot (N, C)
        sure_open = one_of(sure_suspects, "sure_")
        level, class_ids, column = t("sure_level"), t("classes"), t("column")
        a_flat, hot, onehot, shape_a = t("argmax_input_flat"), t("onehot_input"), t("onehot_input_float"), t("shape")
        graph.initializer.extend([numpy_helper.from_array(np.array(sure_level, dtype=np.float32), level),
                                  numpy_helper.from_array(np.arange(classes, dtype=np.int64), class_ids),
                                  numpy_helper.from_array(np.array([-1, 1], dtype=np.int64), column)])  # fmt: skip
        gate += [
            helper.make_node("Reshape", [a_in, column], [a_flat], name=t("Reshape_input")),  # Flatten: float only <9
            helper.make_node("Equal", [a_flat, class_ids], [hot], name=t("Equal_onehot")),
            helper.make_node("Cast", [hot], [onehot], name=t("Cast_onehot"), to=1),
            helper.make_node("Shape", [a_in], [shape_a], name=t("Shape_input")),
        ]

        if opset >= 13:  # ReduceSum's axes are an input from opset 13
            axes_sum = t("axes_sum")
            graph.initializer.append(numpy_helper.from_array(np.array([1], dtype=np.int64), axes_sum))

    def reduce_sum(x: str, y_: str, name: str) -> onnx.NodeProto:  # over axis 1, kept
        if opset >= 13:
            return helper.make_node("ReduceSum", [x, axes_sum], [y_], name=name, keepdims=1)
        return helper.make_node("ReduceSum", [x], [y_], name=name, axes=[1], keepdims=1)

    differs: list[str] = []  # per copy: its class differs from the input's
    for i, y_copy in enumerate(y_copies):
        a_copy, eq, ne = nth("argmax_copy", i), nth("agree", i), nth("differ", i)
        gate += [
            helper.make_node("ArgMax", [y_copy], [a_copy], name=nth("ArgMax_copy", i), axis=1, keepdims=1),
            helper.make_node("Equal", [a_in, a_copy], [eq], name=nth("Equal", i)),
            helper.make_node("Not", [eq], [ne], name=nth("Not", i)),
        ]
        differs.append(ne)
    joint: str | None = None
    if len(joint_suspects):  # the joint moves: a joint suspect (above its bar) where every copy disagrees
        jsus = one_of(joint_suspects, "joint_")
        jopen = above(jsus, joint_confidence, "joint_confidence") if joint_confidence > 0 else jsus
        every = differs[0]
        for i in range(1, len(differs)):
            both_ne = nth("every_differs", i)
            gate.append(helper.make_node("And", [every, differs[i]], [both_ne], name=nth("And_every", i)))
            every = both_ne
        joint = t("joint")
        gate.append(helper.make_node("And", [jopen, every], [joint], name=t("And_joint")))
    uses: list[str] = []  # per copy: the gate is open, the copy disagrees, and no earlier copy was used
    taken_by: str | None = None  # the gate used an earlier copy
    for i, y_copy in enumerate(y_copies):
        ne, use = differs[i], nth("use_copy", i)
        gate_i = opened
        if sure_open is not None:  # or the input says a sure-move suspect and the copy gives it under the level
            p_copy, flat, picked, p_ans, p_shaped, under, sure_i, either = (
                softmax(y_copy, f"copy{'' if i == 0 else i + 1}"), nth("copy_flat", i), nth("picked", i),
                nth("p_answer", i), nth("p_answer_shaped", i), nth("under", i), nth("sure_copy", i),
                nth("either", i))  # fmt: skip
            gate += [
                helper.make_node("Flatten", [p_copy], [flat], name=nth("Flatten_copy", i), axis=1),
                helper.make_node("Mul", [flat, onehot], [picked], name=nth("Mul_answer", i)),
                reduce_sum(picked, p_ans, nth("ReduceSum_answer", i)),
                helper.make_node("Reshape", [p_ans, shape_a], [p_shaped], name=nth("Reshape_answer", i)),
                helper.make_node("Less", [p_shaped, level], [under], name=nth("Less_level", i)),
                helper.make_node("And", [sure_open, under], [sure_i], name=nth("And_sure", i)),
                helper.make_node("Or", [opened, sure_i], [either], name=nth("Or_sure", i)),
            ]
            gate_i = either
        if joint is not None:  # or every copy disagrees behind the joint suspects (then the first answers)
            with_joint = nth("or_joint", i)
            gate.append(helper.make_node("Or", [gate_i, joint], [with_joint], name=nth("Or_joint", i)))
            gate_i = with_joint
        gate.append(helper.make_node("And", [gate_i, ne], [use], name=nth("And", i)))
        if taken_by is not None:
            free, only = nth("free", i), nth("use_only", i)
            gate += [helper.make_node("Not", [taken_by], [free], name=nth("Not_taken", i)),
                     helper.make_node("And", [use, free], [only], name=nth("And_free", i))]  # fmt: skip
            any_ = nth("taken", i)
            gate.append(helper.make_node("Or", [taken_by, use], [any_], name=nth("Or_taken", i)))
            taken_by, use = any_, only
        else:
            taken_by = use
        uses.append(use)
    if opset >= 9:  # the first copy's Where outermost: y = Where(use_1, copy_1, Where(use_2, copy_2, ... input))
        acc = y_input
        for i in range(len(y_copies) - 1, -1, -1):
            target = y if i == 0 else nth("gated", i)
            gate.append(helper.make_node("Where", [uses[i], y_copies[i], acc], [target], name=nth("Where", i)))
            acc = target
    else:  # out = input * (not used) + sum_i copy_i * use_i: exact where each use is 0 or 1 (finite logits)
        assert taken_by is not None
        keep, f_keep, kept = t("keep"), t("keep_float"), t("kept")
        gate += [
            helper.make_node("Not", [taken_by], [keep], name=t("Not_keep")),
            helper.make_node("Cast", [keep], [f_keep], name=t("Cast_keep"), to=elem or 1),
            helper.make_node("Mul", [y_input, f_keep], [kept], name=t("Mul_input")),
        ]
        acc = kept
        for i, y_copy in enumerate(y_copies):
            f_use, moved = nth("use_float", i), nth("moved", i)
            target = y if i == len(y_copies) - 1 else nth("sum", i)
            gate += [
                helper.make_node("Cast", [uses[i]], [f_use], name=nth("Cast_use", i), to=elem or 1),
                helper.make_node("Mul", [y_copy, f_use], [moved], name=nth("Mul_copy", i)),
                helper.make_node("Add", [acc, moved], [target], name=nth("Add", i)),
            ]
            acc = target
    if after:
        moved = [n for n in originals if id(n) in after]
        ordered = [n for n in originals if id(n) not in after] + copies + gate + moved
        kept = [type(n)() for n in ordered]
        for k, n in zip(kept, ordered, strict=True):
            k.CopyFrom(n)
        del graph.node[:]
        graph.node.extend(kept)
    else:
        graph.node.extend(copies + gate)
    if model.ir_version < 4:  # IR 3: every initializer is also a graph input
        listed = {i.name for i in graph.input}
        graph.input.extend(helper.make_tensor_value_info(x.name, x.data_type, list(x.dims))
                           for x in graph.initializer if x.name not in listed)  # fmt: skip
    added = [n.name for n in copies + gate]
    record_added(model, added)
    model.metadata_props.add(key=METADATA_KEY, value=json.dumps({
        "suspects": [int(s) for s in suspects], "confidence": confidence, "copy_prefix": PREFIX,
        **({"sure_suspects": [int(s) for s in sure_suspects], "sure_level": sure_level} if len(sure_suspects) else {}),
        **({"joint_suspects": [int(s) for s in joint_suspects], "joint_confidence": joint_confidence}
           if len(joint_suspects) else {}),
        "copies": [copy_prefix(i) for i in range(len(versions))],
        "rewritten": len(versions[0]) if len(versions) == 1 else [len(v) for v in versions]}))  # fmt: skip
    return added
