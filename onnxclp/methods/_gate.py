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
which writes the output under its own name. The model's other outputs, opsets, metadata and doc strings are kept;
``onnxclp.added_nodes`` lists the nodes added and ``onnxclp.gate`` records the suspects.
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


def gated_predictions(pred_input: np.ndarray, pred_copy: np.ndarray, suspects: Sequence[int],
                      conf_input: np.ndarray | None = None, confidence: float = 0.0) -> np.ndarray:  # fmt: skip
    """What the gated model answers, from the two networks' answers: the copy's where the input's is a suspect,
    the input's top softmax probability ``conf_input`` is above ``confidence`` and the two differ, else the input's
    (the graph :func:`compose` writes, as numpy)."""
    use_copy = np.isin(pred_input, np.asarray(list(suspects), dtype=np.int64)) & (pred_input != pred_copy)
    if confidence > 0:
        assert conf_input is not None
        use_copy &= conf_input > confidence
    return np.where(use_copy, pred_copy, pred_input)


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


def compose(model: onnx.ModelProto, rewritten: Mapping[str, np.ndarray], suspects: Sequence[int],
            classes: int, confidence: float = 0.0, probabilities: bool = False) -> list[str]:  # fmt: skip
    """Add the repaired copy (``rewritten``: initializer name -> new value) and the gate to ``model`` in place
    (module docstring); returns the names of the nodes added. ``probabilities``: the output is already a softmax,
    and the bar reads it as it is."""
    from onnx import helper, numpy_helper

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
    missing = sorted(set(rewritten) - set(inits))
    if missing:
        raise OnnxclpError(f"internal: the gate's copy rewrote {missing[:3]}, which are not initializers", 4)

    def copy_name(name: str) -> str:
        return unique(PREFIX + name, taken)

    renamed: dict[str, str] = {}  # the copy's names: rewritten initializers and every tensor a node writes
    for name, value in rewritten.items():
        new = copy_name(name)
        renamed[name] = new
        dtype = helper.tensor_dtype_to_np_dtype(inits[name].data_type)  # the dtype alone: its data may be external
        graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype=dtype).reshape(tuple(inits[name].dims)),
                                                         new))  # fmt: skip
    for n in graph.node:
        for o in n.output:
            if o:
                renamed[o] = copy_name(o)
    copies = []
    for n in graph.node:
        c = type(n)()
        c.CopyFrom(n)
        if c.name:
            c.name = copy_name(c.name)
        else:
            c.name = copy_name(f"{n.op_type}_{len(copies)}")
        for i, name in enumerate(c.input):
            if name in renamed:  # a rewritten initializer or a tensor the network computes: the copy's
                c.input[i] = renamed[name]
        for i, name in enumerate(c.output):
            if name:
                c.output[i] = renamed[name]
        copies.append(c)

    # the input's own first output is renamed, and the gate writes the output's name
    y = out.name
    y_input = unique(f"{y}.input", taken)
    for n in graph.node:
        for i, name in enumerate(n.input):
            if name == y:
                n.input[i] = y_input
        for i, name in enumerate(n.output):
            if name == y:
                n.output[i] = y_input
    for v in graph.value_info:
        if v.name == y:
            v.name = y_input
    y_copy = renamed[y]

    def t(name: str) -> str:
        return unique(PREFIX + name, taken)

    mask = np.zeros(classes, dtype=np.float32)
    mask[list(suspects)] = 1.0
    mask_name, half = t("suspects"), t("half")
    graph.initializer.extend([numpy_helper.from_array(mask, mask_name),
                              numpy_helper.from_array(np.array(0.5, dtype=np.float32), half)])  # fmt: skip
    a_in, a_copy, m, sus, eq, ne, use = (t(s) for s in ("argmax_input", "argmax_copy", "mask", "suspect", "agree",
                                                          "differ", "use_copy"))  # fmt: skip
    gate = [
        helper.make_node("ArgMax", [y_input], [a_in], name=t("ArgMax_input"), axis=1, keepdims=1),
        helper.make_node("ArgMax", [y_copy], [a_copy], name=t("ArgMax_copy"), axis=1, keepdims=1),
        helper.make_node("Gather", [mask_name, a_in], [m], name=t("Gather_suspect"), axis=0),
        helper.make_node("Greater", [m, half], [sus], name=t("Greater_suspect")),
        helper.make_node("Equal", [a_in, a_copy], [eq], name=t("Equal")),
        helper.make_node("Not", [eq], [ne], name=t("Not")),
        helper.make_node("And", [sus, ne], [use], name=t("And")),
    ]
    if confidence > 0:  # and only where the input is sure of its answer: its top softmax probability
        prob, top, thr, sure, both = t("softmax_input"), t("top_input"), t("confidence"), t("sure"), t("use_sure")
        graph.initializer.append(numpy_helper.from_array(np.array(confidence, dtype=np.float32), thr))
        if elem not in (0, 1):  # the threshold is float32: compare in float32
            cast = t("input_float")
            gate.append(helper.make_node("Cast", [y_input], [cast], name=t("Cast_input"), to=1))
            source = cast
        else:
            source = y_input
        if probabilities:
            prob = source
        else:
            gate.append(helper.make_node("Softmax", [source], [prob], name=t("Softmax_input"), axis=1))
        if opset >= 18:
            axes = t("axes")
            graph.initializer.append(numpy_helper.from_array(np.array([1], dtype=np.int64), axes))
            gate.append(helper.make_node("ReduceMax", [prob, axes], [top], name=t("ReduceMax_input"), keepdims=1))
        else:
            gate.append(helper.make_node("ReduceMax", [prob], [top], name=t("ReduceMax_input"), axes=[1], keepdims=1))
        gate += [helper.make_node("Greater", [top, thr], [sure], name=t("Greater_sure")),
                 helper.make_node("And", [use, sure], [both], name=t("And_sure"))]  # fmt: skip
        use = both
    if opset >= 9:
        gate.append(helper.make_node("Where", [use, y_copy, y_input], [y], name=t("Where")))
    else:  # out = input * (not use) + copy * use: exact where use is 0 or 1 (finite logits)
        keep, f_keep, f_use, a, b = t("keep"), t("keep_float"), t("use_float"), t("kept"), t("moved")
        gate += [
            helper.make_node("Not", [use], [keep], name=t("Not_keep")),
            helper.make_node("Cast", [keep], [f_keep], name=t("Cast_keep"), to=elem or 1),
            helper.make_node("Cast", [use], [f_use], name=t("Cast_use"), to=elem or 1),
            helper.make_node("Mul", [y_input, f_keep], [a], name=t("Mul_input")),
            helper.make_node("Mul", [y_copy, f_use], [b], name=t("Mul_copy")),
            helper.make_node("Add", [a, b], [y], name=t("Add")),
        ]
    graph.node.extend(copies + gate)
    if model.ir_version < 4:  # IR 3: every initializer is also a graph input
        from onnx import helper as h

        listed = {i.name for i in graph.input}
        graph.input.extend(h.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                           for t in graph.initializer if t.name not in listed)  # fmt: skip
    added = [n.name for n in copies + gate]
    record_added(model, added)
    model.metadata_props.add(key=METADATA_KEY, value=json.dumps({"suspects": [int(s) for s in suspects], "confidence": confidence,
                                                                  "copy_prefix": PREFIX,
                                                                  "rewritten": len(rewritten)}))  # fmt: skip
    return added
