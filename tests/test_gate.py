"""The target gate (onnxclp/methods/_gate.py, fst-gate): exact composition checked with onnxruntime on small
graphs built with onnx.helper; the method end to end on the planted-backdoor CNN of test_repairs."""

from __future__ import annotations

import json

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def _mlp(opset: int, ir: int, seed: int = 0) -> onnx.ModelProto:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w1, b1 = rng.normal(size=(4, 6)).astype(np.float32), rng.normal(size=6).astype(np.float32)
    w2, b2 = rng.normal(size=(6, 3)).astype(np.float32), rng.normal(size=3).astype(np.float32)
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "w2", "b2"], ["logits"], name="fc2"),
    ]
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))],
        doc_string="kept",
    )  # fmt: skip
    if ir < 4:  # IR 3: every initializer is also a graph input
        graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in graph.initializer)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir)
    model.metadata_props.add(key="author", value="someone")
    return model


def _pair(opset: int, ir: int, wrap=None) -> tuple[onnx.ModelProto, onnx.ModelProto, np.ndarray]:
    """The MLP and its "repaired copy" (the classifier weight's columns reversed), ``wrap`` applied to both; the
    copy's new ``w2``."""
    from onnx import numpy_helper

    model, copy_model = _mlp(opset, ir), _mlp(opset, ir)
    if wrap is not None:
        model, copy_model = wrap(model), wrap(copy_model)
    w2 = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w2"))[:, ::-1].copy()
    for t in copy_model.graph.initializer:
        if t.name == "w2":
            t.CopyFrom(numpy_helper.from_array(w2, "w2"))
    return model, copy_model, w2


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x})[0]


@pytest.mark.parametrize(("opset", "ir"), [(13, 7), (9, 4), (8, 3)])
def test_compose_answers_as_the_input_but_where_a_suspect_meets_a_disagreeing_copy(opset, ir):
    """The gated model's logits are the copy's exactly where the input's class is a suspect and the copy's class
    differs, the input's elsewhere (Where from opset 9, arithmetic before); the input's initializers, names,
    output name, opset, IR version, doc string and metadata are kept; the copy shares the unchanged weights."""
    from onnx import numpy_helper

    from onnxclp.methods._gate import PREFIX, compose, gated_predictions

    model, copy_model, copy_w2 = _pair(opset, ir)
    x = np.random.default_rng(1).normal(size=(400, 4)).astype(np.float32)
    m_logits, r_logits = _run(model, x), _run(copy_model, x)
    before = {t.name: numpy_helper.to_array(t).copy() for t in model.graph.initializer}
    added = compose(model, {"w2": copy_w2}, [1], 3)
    onnx.checker.check_model(model)
    out = _run(model, x)
    pm, pr = m_logits.argmax(1), r_logits.argmax(1)
    use = (pm == 1) & (pm != pr)
    assert use.any() and (~use).any()
    np.testing.assert_array_equal(out[use], r_logits[use])
    np.testing.assert_array_equal(out[~use], m_logits[~use])
    np.testing.assert_array_equal(out.argmax(1), gated_predictions(pm, pr, [1]))
    assert _run(model, x[:1]).shape == (1, 3)
    assert [o.name for o in model.graph.output] == ["logits"]
    assert (model.opset_import[0].version, model.ir_version, model.graph.doc_string) == (opset, ir, "kept")
    after = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert all(np.array_equal(after[k], v) for k, v in before.items())
    assert set(after) - set(before) == {PREFIX + "w2", PREFIX + "suspects", PREFIX + "half"}
    assert {n.name for n in model.graph.node} >= {"fc1", "relu", "fc2"} and len(added) == len(model.graph.node) - 3
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["author"] == "someone" and json.loads(meta["onnxclp.gate"])["suspects"] == [1]
    assert json.loads(meta["onnxclp.added_nodes"]) == added


def _with_outputs(model: onnx.ModelProto, first_softmax: bool) -> onnx.ModelProto:
    """The MLP returning its softmax and its class beside its logits (logits first), or its softmax first and the
    logits beside it (``first_softmax``)."""
    from onnx import TensorProto, helper

    g = model.graph
    g.node.extend([helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=1)])
    probs = helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 3])
    logits = g.output[0]
    if first_softmax:
        del g.output[:]
        g.output.extend([probs, logits])
        return model
    g.node.extend([helper.make_node("ArgMax", ["logits"], ["label"], name="argmax", axis=1, keepdims=0)])
    g.output.extend([probs, helper.make_tensor_value_info("label", TensorProto.INT64, ["N"])])
    return model


@pytest.mark.parametrize(("opset", "ir"), [(13, 7), (8, 3)])
def test_compose_gates_the_outputs_computed_from_the_first(opset, ir):
    """A model returning its softmax and its class beside its logits: both follow the gated logits (the input's
    Softmax and ArgMax read the gated output, moved after the gate; names and order of the outputs kept). With the
    softmax first and the logits beside it, the logits output is not computed from the gated one: it stays the
    input's, and ungated_outputs names it."""
    from onnxclp.methods._gate import compose, gated_predictions, ungated_outputs

    model, copy_model, copy_w2 = _pair(opset, ir, wrap=lambda m: _with_outputs(m, False))
    assert ungated_outputs(model) == []
    x = np.random.default_rng(1).normal(size=(300, 4)).astype(np.float32)
    m_logits, r_logits = _run(model, x), _run(copy_model, x)
    compose(model, {"w2": copy_w2}, [1], 3)
    onnx.checker.check_model(model)
    assert [o.name for o in model.graph.output] == ["logits", "probs", "label"]
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    out, probs, label = s.run(None, {"x": x})
    expected = gated_predictions(m_logits.argmax(1), r_logits.argmax(1), [1])
    assert (expected != m_logits.argmax(1)).any()
    np.testing.assert_array_equal(out.argmax(1), expected)
    np.testing.assert_array_equal(label, expected)
    e = np.exp(out - out.max(1, keepdims=True))
    np.testing.assert_allclose(probs, e / e.sum(1, keepdims=True), rtol=1e-5, atol=1e-6)
    assert [n.name for n in model.graph.node][-2:] == ["softmax", "argmax"]

    model = _with_outputs(_mlp(opset, ir), True)
    assert ungated_outputs(model) == ["logits"]


def test_compose_refuses_what_it_cannot_copy():
    from onnx import helper

    from onnxclp.errors import OnnxclpError
    from onnxclp.methods._gate import compose

    with pytest.raises(OnnxclpError, match="opset 7"):
        compose(_mlp(6, 3), {}, [0], 3)
    model = _mlp(13, 7)
    model.graph.node.append(helper.make_node("If", ["c"], ["o"], then_branch=helper.make_graph([], "t", [], []),
                                             else_branch=helper.make_graph([], "e", [], [])))  # fmt: skip
    with pytest.raises(OnnxclpError, match="nested graphs"):
        compose(model, {}, [0], 3)


@pytest.mark.parametrize(("opset", "ir"), [(18, 8), (13, 7), (8, 3)])
def test_compose_with_a_confidence_bar_consults_the_copy_only_where_the_input_is_sure(opset, ir):
    """With ``confidence``, the copy answers only where the input's top softmax probability is above it too (the
    ReduceMax form of the model's opset); numpy's :func:`gated_predictions` gives the same answers."""

    from onnxclp.methods._gate import compose, gated_predictions, softmax_top

    model, copy_model, w2 = _pair(opset, ir)
    x = np.random.default_rng(2).normal(size=(400, 4)).astype(np.float32)
    m_logits, r_logits = _run(model, x), _run(copy_model, x)
    compose(model, {"w2": w2}, [0, 1], 3, confidence=0.9)
    onnx.checker.check_model(model)
    out = _run(model, x)
    pm, pr, conf = m_logits.argmax(1), r_logits.argmax(1), softmax_top(m_logits)
    use = np.isin(pm, [0, 1]) & (pm != pr) & (conf > 0.9)
    assert use.any() and (np.isin(pm, [0, 1]) & (pm != pr) & ~use).any()
    np.testing.assert_array_equal(out[use], r_logits[use])
    np.testing.assert_array_equal(out[~use], m_logits[~use])
    np.testing.assert_array_equal(out.argmax(1), gated_predictions(pm, pr, [0, 1], conf, 0.9))


def test_compose_reads_probabilities_as_they_are():
    """A model whose output is already a softmax: the bar compares the output itself (a second softmax would
    squash every probability below the bar)."""
    from onnx import helper

    from onnxclp.methods._gate import are_probabilities, compose, gated_predictions, softmax_top

    def with_softmax(model: onnx.ModelProto) -> onnx.ModelProto:
        fc2 = next(n for n in model.graph.node if n.name == "fc2")
        fc2.output[0] = "scores"
        model.graph.node.append(helper.make_node("Softmax", ["scores"], ["logits"], name="sm", axis=1))
        return model

    model, copy_model, w2 = _pair(13, 7, with_softmax)
    x = np.random.default_rng(3).normal(size=(400, 4)).astype(np.float32)
    m_out, r_out = _run(model, x), _run(copy_model, x)
    assert are_probabilities(m_out) and not are_probabilities(np.log(m_out))
    conf = softmax_top(m_out, probabilities=True)
    compose(model, {"w2": w2}, [0, 1], 3, confidence=0.7, probabilities=True)
    out = _run(model, x)
    expected = gated_predictions(m_out.argmax(1), r_out.argmax(1), [0, 1], conf, 0.7)
    assert (expected != m_out.argmax(1)).any()
    np.testing.assert_array_equal(out.argmax(1), expected)


@pytest.mark.parametrize(("opset", "ir"), [(13, 7), (9, 4), (8, 3)])
@pytest.mark.parametrize("confidence", [0.0, 0.6])
def test_compose_with_two_copies_answers_with_the_first_that_disagrees(opset, ir, confidence):
    """Two copies behind one gate: where the gate is open (a suspect, above the bar), the first copy's logits where
    its class differs from the input's, else the second's where that differs, else the input's; numpy's
    :func:`gated_predictions` with both copies gives the same classes; each copy's initializers under its own
    prefix, the input's unchanged."""
    from onnx import numpy_helper

    from onnxclp.methods._gate import PREFIX, compose, copy_prefix, gated_predictions, softmax_top

    model, first, w2 = _pair(opset, ir)
    second = _mlp(opset, ir)
    w2b = np.roll(numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w2")), 1, axis=1)
    for t in second.graph.initializer:
        if t.name == "w2":
            t.CopyFrom(numpy_helper.from_array(w2b, "w2"))
    x = np.random.default_rng(4).normal(size=(600, 4)).astype(np.float32)
    m, r1, r2 = _run(model, x), _run(first, x), _run(second, x)
    before = {t.name: numpy_helper.to_array(t).copy() for t in model.graph.initializer}
    compose(model, [{"w2": w2}, {"w2": w2b}], [0, 2], 3, confidence=confidence)
    onnx.checker.check_model(model)
    out = _run(model, x)
    pm, p1, p2 = m.argmax(1), r1.argmax(1), r2.argmax(1)
    gate = np.isin(pm, [0, 2]) & (softmax_top(m) > confidence)
    use1 = gate & (p1 != pm)
    use2 = gate & ~use1 & (p2 != pm)
    assert use1.any() and use2.any() and (~(use1 | use2)).any()
    np.testing.assert_array_equal(out[use1], r1[use1])
    np.testing.assert_array_equal(out[use2], r2[use2])
    np.testing.assert_array_equal(out[~(use1 | use2)], m[~(use1 | use2)])
    np.testing.assert_array_equal(out.argmax(1), gated_predictions(pm, [p1, p2], [0, 2], softmax_top(m), confidence))
    after = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert all(np.array_equal(after[k], v) for k, v in before.items())
    assert {PREFIX + "w2", copy_prefix(1) + "w2"} <= set(after) and copy_prefix(1) != PREFIX
    meta = json.loads({p.key: p.value for p in model.metadata_props}["onnxclp.gate"])
    assert meta["copies"] == [PREFIX, copy_prefix(1)] and meta["rewritten"] == [1, 1]


def _as_4d(model: onnx.ModelProto) -> onnx.ModelProto:
    """The MLP with its output reshaped to (N, 3, 1, 1), as a 1x1-convolution classifier writes it."""
    from onnx import TensorProto, helper, numpy_helper

    fc2 = next(n for n in model.graph.node if n.name == "fc2")
    fc2.output[0] = "scores"
    model.graph.initializer.append(numpy_helper.from_array(np.array([-1, 3, 1, 1], dtype=np.int64), "shape4"))
    model.graph.node.append(helper.make_node("Reshape", ["scores", "shape4"], ["logits"], name="to4d"))
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3, 1, 1]))
    return model


def _two_copies(opset: int, ir: int, four_d: bool = False):
    """The MLP (output (N, 3) or (N, 3, 1, 1)), its two "repaired copies" (``w2`` reversed; ``w2`` rolled) and
    their new ``w2``s."""
    from onnx import numpy_helper

    model, first, w2 = _pair(opset, ir, _as_4d if four_d else None)
    second = _as_4d(_mlp(opset, ir)) if four_d else _mlp(opset, ir)
    w2b = np.roll(numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w2")), 1, axis=1)
    for t in second.graph.initializer:
        if t.name == "w2":
            t.CopyFrom(numpy_helper.from_array(w2b, "w2"))
    return model, first, second, w2, w2b


@pytest.mark.parametrize(("opset", "ir", "four_d"), [(18, 8, False), (13, 7, True), (9, 4, False), (8, 3, True)])
def test_compose_with_sure_moves_adds_the_copies_sure_disagreements(opset, ir, four_d):
    """``sure_suspects``: besides the bar's moves, a copy answers where the input says one of those classes at any
    confidence and the copy gives that class less than ``sure_level`` of its softmax (Flatten, one-hot, ReduceSum
    in the model's opset form; (N, C) and (N, C, 1, 1) outputs); the first copy that qualifies answers. onnxruntime
    and numpy's :func:`gated_predictions` (with :func:`answer_probability`) agree on every row, and the sure moves
    reach rows the bar alone leaves."""

    from onnxclp.methods._gate import answer_probability, compose, gated_predictions, softmax_top

    model, first, second, w2, w2b = _two_copies(opset, ir, four_d)
    x = (3 * np.random.default_rng(5).normal(size=(2000, 4))).astype(np.float32)
    m, r1, r2 = _run(model, x), _run(first, x), _run(second, x)
    compose(model, [{"w2": w2}, {"w2": w2b}], [0], 3, confidence=0.9, sure_suspects=[0, 2], sure_level=1 / 3)
    onnx.checker.check_model(model)
    out = _run(model, x)
    assert out.shape == m.shape
    m2, o2 = m.reshape(len(m), -1), out.reshape(len(out), -1)
    pm, p1, p2 = m2.argmax(1), r1.reshape(len(r1), -1).argmax(1), r2.reshape(len(r2), -1).argmax(1)
    pa = [answer_probability(r, pm) for r in (r1, r2)]
    expected = gated_predictions(pm, [p1, p2], [0], softmax_top(m), 0.9, sure_suspects=[0, 2], p_answer=pa,
                                 sure_level=1 / 3)  # fmt: skip
    np.testing.assert_array_equal(o2.argmax(1), expected)
    bar_only = gated_predictions(pm, [p1, p2], [0], softmax_top(m), 0.9)
    moved_by_sure = expected != bar_only
    assert moved_by_sure.any() and np.isin(pm[moved_by_sure], [0, 2]).all()
    assert all((pa[0][i] < 1 / 3) or (pa[1][i] < 1 / 3) for i in np.flatnonzero(moved_by_sure))
    # a copy that disagrees without being sure (its probability of the input's class at or above the level) and
    # below the bar does not answer
    unsure = np.isin(pm, [0, 2]) & (softmax_top(m) <= 0.9) & (p1 != pm) & (pa[0] >= 1 / 3) & (p2 == pm)
    assert unsure.any() and (o2.argmax(1)[unsure] == pm[unsure]).all()
    meta = json.loads({p.key: p.value for p in model.metadata_props}["onnxclp.gate"])
    assert meta["sure_suspects"] == [0, 2] and abs(meta["sure_level"] - 1 / 3) < 1e-12


def test_gated_predictions_sure_moves_by_hand():
    """Exact cases: the bar's move, a sure move below the bar, an unsure disagreement kept, the second copy
    answering where the first is not sure, a class outside the sure suspects kept."""
    from onnxclp.methods._gate import gated_predictions

    pred_input = np.array([0, 0, 0, 0, 1])
    conf = np.array([0.95, 0.6, 0.6, 0.6, 0.6])
    c1, c2 = np.array([1, 2, 2, 2, 2]), np.array([2, 1, 1, 1, 0])
    p1 = np.array([0.4, 0.05, 0.3, 0.3, 0.01])  # copy 1's probability of the input's class
    p2 = np.array([0.4, 0.4, 0.05, 0.3, 0.01])
    out = gated_predictions(pred_input, [c1, c2], [0], conf, 0.9, sure_suspects=[0], p_answer=[p1, p2], sure_level=0.1)
    np.testing.assert_array_equal(out, [1, 2, 1, 0, 1])


@pytest.mark.parametrize(("copies", "sure", "fine"), [(1, False, False), (2, False, False), (2, True, False),
                                                     (2, True, True)])  # fmt: skip
def test_each_candidate_of_the_walk_moves_at_least_what_the_one_before_moved(copies, sure, fine):
    """The walk's order (fst_gate.candidates): on random answers of the input and the copies, every candidate's
    moved rows include the previous candidate's (with the sure and joint moves too), so stopping at the first over
    budget keeps the most that passed."""
    from onnxclp.methods.fst_gate import CONFIDENCES, FINE_CONFIDENCES, candidates, gated

    rng = np.random.default_rng(7)
    classes, n = 5, 4000
    pred_input = rng.integers(0, classes, n)
    conf = rng.uniform(0.2, 1.0, n)
    copies_ = [(rng.integers(0, classes, n), rng.uniform(0, 0.5, n)) for _ in range(copies)]
    order = list(rng.permutation(classes))
    bars = FINE_CONFIDENCES if fine else CONFIDENCES
    walk = candidates(classes, copies, sure, bars)
    assert {c.confidence for c in walk} | {c.joint_confidence for c in walk if c.joint} == set(bars)
    assert walk[0] == (1, 1, 0.99, 0, 0, 0.0) and walk[-1] == (copies, classes, 0.0, 0, 0, 0.0)
    assert any(c.sure or c.joint for c in walk) == sure
    moved_before = np.zeros(n, dtype=bool)
    for candidate in walk:
        out = gated(pred_input, conf, copies_, order, candidate)
        moved = out != pred_input
        assert (moved | ~moved_before).all() and moved.sum() >= moved_before.sum()
        moved_before = moved
    assert moved_before.sum() == sum((copies_[0][0] != pred_input) | (copies_[-1][0] != pred_input))


@pytest.mark.parametrize(("opset", "ir", "four_d"), [(18, 8, True), (13, 7, False), (9, 4, True), (8, 3, False)])
@pytest.mark.parametrize("joint_confidence", [0.0, 0.6])
def test_compose_with_joint_moves_moves_where_every_copy_disagrees(opset, ir, four_d, joint_confidence):
    """``joint_suspects``: the first copy also answers where the input says one of those classes (above
    ``joint_confidence``) and every copy disagrees, on top of the bar's and the sure moves; onnxruntime and numpy's
    :func:`gated_predictions` agree on every row; a row where only one copy disagrees, below the bar and unsure,
    keeps the input's answer."""

    from onnxclp.methods._gate import answer_probability, compose, gated_predictions, softmax_top

    model, first, second, w2, w2b = _two_copies(opset, ir, four_d)
    x = (3 * np.random.default_rng(6).normal(size=(3000, 4))).astype(np.float32)
    m, r1, r2 = _run(model, x), _run(first, x), _run(second, x)
    compose(model, [{"w2": w2}, {"w2": w2b}], [0], 3, confidence=0.95, sure_suspects=[0], sure_level=0.05,
            joint_suspects=[0, 1], joint_confidence=joint_confidence)  # fmt: skip
    onnx.checker.check_model(model)
    out = _run(model, x).reshape(len(x), -1)
    m2 = m.reshape(len(m), -1)
    pm, p1, p2 = m2.argmax(1), r1.reshape(len(x), -1).argmax(1), r2.reshape(len(x), -1).argmax(1)
    conf, pa = softmax_top(m), [answer_probability(r, pm) for r in (r1, r2)]
    expected = gated_predictions(pm, [p1, p2], [0], conf, 0.95, [0], pa, 0.05, [0, 1], joint_confidence)
    np.testing.assert_array_equal(out.argmax(1), expected)
    without = gated_predictions(pm, [p1, p2], [0], conf, 0.95, [0], pa, 0.05)
    joint_rows = expected != without
    assert joint_rows.any() and ((p1 != pm) & (p2 != pm))[joint_rows].all()
    assert (expected[joint_rows] == p1[joint_rows]).all() and np.isin(pm[joint_rows], [0, 1]).all()
    if joint_confidence > 0:
        assert (conf[joint_rows] > joint_confidence).all()
    lone = np.isin(pm, [0, 1]) & (conf <= 0.95) & (p1 != pm) & (p2 == pm) & (pa[0] >= 0.05)
    assert lone.any() and (out.argmax(1)[lone] == pm[lone]).all()
    meta = json.loads({p.key: p.value for p in model.metadata_props}["onnxclp.gate"])
    assert meta["joint_suspects"] == [0, 1] and meta["joint_confidence"] == joint_confidence
