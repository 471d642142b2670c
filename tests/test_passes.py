"""Each pass of the pipeline alone (onnxclp/pipeline.py), on small onnx.helper graphs.

A test builds a :class:`~onnxclp.pipeline.State` the way :func:`onnxclp.api.run_method` does, runs the passes the
one under test depends on, then that pass, and checks what it changed in the state or the model.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from builders import init, model
from onnx import helper, numpy_helper

from onnxclp import __version__, scores, scoring
from onnxclp.api import _state
from onnxclp.errors import OnnxclpError
from onnxclp.methods import Params, make_params
from onnxclp.passes import annotate, decide, exclude, find, fuse_bn, inline, prune, report, score, streams
from onnxclp.pipeline import Options, PassResult, State
from onnxclp.select import Selection

BACKDOOR = 5  # the channel of conv1 with an outlying kernel
EPS = 1e-5


def _weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(16, 3, 3, 3)).astype(np.float32)
    w1[BACKDOOR] *= 10
    return {
        "W1": w1,
        "B1": rng.normal(size=16).astype(np.float32),
        "W2": rng.normal(size=(16, 16, 1, 1)).astype(np.float32),
        "gamma": rng.uniform(0.5, 2.0, size=16).astype(np.float32),
        "beta": rng.normal(size=16).astype(np.float32),
        "mean": rng.normal(size=16).astype(np.float32),
        "var": rng.uniform(0.5, 2.0, size=16).astype(np.float32),
        "F1": rng.normal(size=(8, 16)).astype(np.float32),
        "F2": rng.normal(size=(10, 8)).astype(np.float32),
    }


def _net(metadata: dict[str, str] | None = None) -> onnx.ModelProto:
    """x -> conv1 (+bias) -> Relu -> conv2 -> bn -> Relu -> GAP -> Flatten -> fc1 -> Relu -> fc2 -> y."""
    w = _weights()
    nodes = [
        helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "W2"], ["c2"], name="conv2"),
        helper.make_node("BatchNormalization", ["c2", "gamma", "beta", "mean", "var"], ["b2"], name="bn", epsilon=EPS),
        helper.make_node("Relu", ["b2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "F1"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["rh"], name="relu3"),
        helper.make_node("Gemm", ["rh", "F2"], ["y"], name="fc2", transB=1),
    ]
    m = model(nodes, [("x", ["N", 3, 8, 8])], [("y", ["N", 10])], [init(k, v) for k, v in w.items()])
    for k, v in (metadata or {}).items():
        m.metadata_props.add(key=k, value=v)
    return m


def _make(m: onnx.ModelProto, method: str = "clp", options: Options | None = None, **values) -> State:
    return _state(m, make_params(method, values), options or Options(), None)


def _run(state: State, *passes) -> list[PassResult]:
    return [p.run(state) for p in passes]


def _init(state: State, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(t) for t in state.model.graph.initializer if t.name == name)


# -- find -----------------------------------------------------------------------------------------------------------


def test_find_indexes_the_graph_and_lists_scored_layers():
    state = _make(_net())
    (result,) = _run(state, find)
    assert state.index is not None
    assert [layer.key for layer in state.layers] == ["conv1", "conv2", "fc1", "fc2"]
    assert [layer.key for layer in state.found] == ["conv1", "conv2", "fc1", "fc2"]
    assert result.changed == 4
    by_key = {layer.key: layer for layer in state.layers}
    assert by_key["conv2"].affine is not None and by_key["conv2"].affine.kind == "BatchNormalization"
    assert by_key["conv1"].affine is None and by_key["conv1"].bias is not None
    assert by_key["fc2"].is_output and by_key["fc2"].is_fc and not by_key["fc1"].is_output


def test_find_skips_a_layer_whose_weight_is_not_constant_with_the_reason():
    m = model(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="dyn")],
        [("x", ["N", 3, 4, 4]), ("w", [4, 3, 1, 1])],
        [("y", ["N", 4, 4, 4])],
    )
    state = _make(m)
    _run(state, find)
    assert state.layers == []
    assert [(s.node, s.op) for s in state.skipped] == [("dyn", "Conv")]
    assert state.skipped[0].reason


# -- exclude --------------------------------------------------------------------------------------------------------


def test_exclude_moves_excluded_and_unscored_fc_layers_to_skipped_with_reasons():
    state = _make(_net(), options=Options(exclude=("^conv2$",)))
    _, result = _run(state, find, exclude)
    assert [layer.key for layer in state.layers] == ["conv1"]
    reasons = {s.node: s.reason for s in state.skipped}
    assert set(reasons) == {"conv2", "fc1", "fc2"}
    assert "excluded by --exclude" in reasons["conv2"] and "^conv2$" in reasons["conv2"]
    assert "fully connected" in reasons["fc1"] and "--include-fc" in reasons["fc1"]
    assert result.changed == 3
    assert [layer.key for layer in state.found] == ["conv1", "conv2", "fc1", "fc2"]  # found is untouched


def test_exclude_keeps_fully_connected_layers_for_a_method_that_scores_them():
    state = _make(_net(), "lpp")
    _, result = _run(state, find, exclude)
    assert [layer.key for layer in state.layers] == ["conv1", "conv2", "fc1", "fc2"]
    assert result.changed == 0 and state.skipped == []


def test_exclude_matches_weight_names_and_refuses_a_bad_pattern():
    state = _make(_net(), options=Options(exclude=("^W1$",)))
    _run(state, find, exclude)
    assert "conv1" not in [layer.key for layer in state.layers]
    state = _make(_net(), options=Options(exclude=("(",)))
    find.run(state)
    with pytest.raises(OnnxclpError, match="--exclude"):
        exclude.run(state)


# -- score ----------------------------------------------------------------------------------------------------------


def test_score_multiplies_the_norm_by_the_batchnorm_scale():
    w = _weights()
    state = _make(_net())
    *_, result = _run(state, find, exclude, score)
    assert result.changed == 2 and [s.layer.key for s in state.scored] == ["conv1", "conv2"]
    s1, s2 = (s.scores for s in state.scored)
    assert all(s.kind == "spectral" for s in state.scored)
    np.testing.assert_allclose(s1, scores.spectral(w["W1"]), rtol=1e-12)
    bn_scale = np.abs(w["gamma"].astype(np.float64) / np.sqrt(w["var"].astype(np.float64) + EPS))
    np.testing.assert_allclose(s2, bn_scale * scores.spectral(w["W2"]), rtol=1e-12)
    assert int(np.argmax(s1)) == BACKDOOR


def test_score_uses_the_method_score_or_the_one_asked_for():
    w = _weights()
    state = _make(_net(), "lpp")
    _run(state, find, exclude, score)
    by_key = {s.layer.key: s for s in state.scored}
    assert {s.kind for s in state.scored} == {"l2"}
    np.testing.assert_allclose(by_key["fc1"].scores, np.linalg.norm(w["F1"], axis=1), rtol=1e-6)
    state = _state(_net(), make_params("clp", score="l2"), Options(), None)
    _run(state, find, exclude, score)
    np.testing.assert_allclose(state.scored[0].scores, scores.l2(w["W1"]), rtol=1e-12)


def test_score_is_a_no_op_for_a_method_without_a_score():
    state = _make(_net())
    state.params = Params(method="clp", score="", include_fc=False, values={"u": 3.0})
    _run(state, find, exclude)
    assert score.run(state) == PassResult() and state.scored == []


# -- decide ---------------------------------------------------------------------------------------------------------


def test_decide_prunes_the_outlier_and_never_the_classifier():
    state = _make(_net(), "clp", u=3.0)
    *_, result = _run(state, find, exclude, score, decide)
    by_key = {d.scored.layer.key: d for d in state.decisions}
    assert by_key["conv1"].selection.prune == [BACKDOOR]
    th = by_key["conv1"].selection.thresholds
    s = state.scored[0].scores
    assert th is not None and th.upper == pytest.approx(s.mean() + 3.0 * s.std(ddof=1))
    assert result.changed == sum(len(d.selection.prune) + len(d.selection.rescale) for d in state.decisions)


def test_decide_gives_the_classifier_the_method_classifier_step_only():
    state = _make(_net(), "lpp", topk=3)
    _run(state, find, exclude, score, decide)
    fc2 = next(d for d in state.decisions if d.scored.layer.key == "fc2")
    assert fc2.note == decide.OUTPUT_NOTE
    assert fc2.selection.prune == [] and fc2.selection.rescale == {}
    w = _weights()["F2"].astype(np.float64)
    m = int(np.argmax(w.mean(axis=1)))
    assert fc2.topk is not None and fc2.topk.target == m and len(fc2.topk.columns) == 3
    state = _make(_net(), "lpp")  # topk = 0 by default: the classifier is left alone
    _run(state, find, exclude, score, decide)
    assert next(d for d in state.decisions if d.scored.layer.key == "fc2").topk is None


# -- streams --------------------------------------------------------------------------------------------------------


def _residual() -> onnx.ModelProto:
    """x -> conv_a -> Relu -> r; conv_b(r); s = r + conv_b(r): conv_a and conv_b write one stream."""
    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("Conv", ["x", "Wa"], ["a"], name="conv_a"),
        helper.make_node("Relu", ["a"], ["r"], name="relu_a"),
        helper.make_node("Conv", ["r", "Wb"], ["b"], name="conv_b"),
        helper.make_node("Add", ["r", "b"], ["s"], name="add"),
        helper.make_node("Relu", ["s"], ["y"], name="relu_out"),
    ]
    inits = [init("Wa", rng.normal(size=(8, 3, 1, 1))), init("Wb", rng.normal(size=(8, 8, 1, 1)))]
    return model(nodes, [("x", ["N", 3, 4, 4])], [("y", ["N", 8, 4, 4])], inits)


def _coupled_state(options: Options) -> State:
    """The residual model decided by CLP, then channel 2 pruned in both layers (and 6 in conv_a only)."""
    state = _make(_residual(), options=options)
    _run(state, find, exclude, score, decide)
    for d in state.decisions:
        assert d.selection.thresholds is not None
        d.selection.prune = [2, 6] if d.scored.layer.key == "conv_a" else [2]
    return state


def test_streams_reports_a_channel_pruned_in_two_layers_of_one_residual_stream():
    state = _coupled_state(Options(streams="all"))
    result = streams.run(state)
    assert result.changed == 1
    (c,) = state.coupled
    assert c.channel == 2 and sorted(c.layers) == ["conv_a", "conv_b"] and c.merge == "add"
    assert {d.scored.layer.key: d.selection.prune for d in state.decisions} == {"conv_a": [2, 6], "conv_b": [2]}


def test_streams_strongest_keeps_a_coupled_prune_only_where_it_is_most_outlying():
    state = _coupled_state(Options())
    z = {}
    for d in state.decisions:
        th = d.selection.thresholds
        z[d.scored.layer.key] = (d.scored.scores[2] - th.mean) / th.std
    keep = max(z, key=z.get)
    streams.run(state)
    pruned = {d.scored.layer.key: d.selection.prune for d in state.decisions}
    assert [key for key, p in pruned.items() if 2 in p] == [keep]
    assert 6 in pruned["conv_a"]  # not coupled: untouched
    (c,) = state.coupled
    assert c.kept == keep


def test_streams_reports_nothing_for_prunes_in_separate_layers():
    state = _make(_net())
    _run(state, find, exclude, score, decide)
    for d in state.decisions:
        d.selection = Selection(prune=[2])
    assert streams.run(state) == PassResult() and state.coupled == []


# -- prune ----------------------------------------------------------------------------------------------------------


def test_prune_zeroes_exactly_the_decided_channels():
    w = _weights()
    state = _make(_net(), "clp", u=3.0)
    _run(state, find, exclude, score, decide)
    for d in state.decisions:  # conv1: no affine; conv2: a kept BatchNorm
        d.selection = Selection(prune=[BACKDOOR] if d.scored.layer.key == "conv1" else [1, 4])
    result = prune.run(state)
    assert result.changed == 3
    w1, b1 = _init(state, "W1"), _init(state, "B1")
    keep = [k for k in range(16) if k != BACKDOOR]
    assert not w1[BACKDOOR].any() and b1[BACKDOOR] == 0
    np.testing.assert_array_equal(w1[keep], w["W1"][keep])
    np.testing.assert_array_equal(b1[keep], w["B1"][keep])
    gamma, beta = _init(state, "gamma"), _init(state, "beta")
    keep = [k for k in range(16) if k not in (1, 4)]
    assert gamma[[1, 4]].tolist() == [0, 0] and beta[[1, 4]].tolist() == [0, 0]
    np.testing.assert_array_equal(gamma[keep], w["gamma"][keep])
    np.testing.assert_array_equal(beta[keep], w["beta"][keep])
    np.testing.assert_array_equal(_init(state, "W2"), w["W2"])  # the BN carries the prune, not the kernel


def test_prune_rescales_and_applies_the_classifier_step():
    w = _weights()
    state = _make(_net(), "lpp", topk=2)
    _run(state, find, exclude, score, decide)
    for d in state.decisions:
        d.selection = Selection(rescale={3: 0.5}) if d.scored.layer.key == "fc1" else Selection()
    fc2 = next(d for d in state.decisions if d.scored.layer.key == "fc2")
    assert fc2.topk is not None
    prune.run(state)
    f1 = _init(state, "F1")
    np.testing.assert_allclose(f1[3], 0.5 * w["F1"][3], rtol=1e-6)
    np.testing.assert_array_equal(np.delete(f1, 3, axis=0), np.delete(w["F1"], 3, axis=0))
    f2 = _init(state, "F2")
    assert not f2[fc2.topk.target, fc2.topk.columns].any()
    assert np.count_nonzero(f2 != w["F2"]) == 2


def test_prune_does_nothing_without_editing():
    w = _weights()
    state = _make(_net(), "clp", options=Options(edit=False), u=3.0)
    _run(state, find, exclude, score, decide)
    assert prune.run(state) == PassResult()
    np.testing.assert_array_equal(_init(state, "W1"), w["W1"])


# -- report ---------------------------------------------------------------------------------------------------------


def test_report_assembles_one_entry_per_decided_layer():
    state = _make(_net(), "clp", u=3.0)
    *_, result = _run(state, find, exclude, score, decide, streams, prune, report)
    rep = state.report
    assert rep is not None and result.changed == 2
    assert rep.method == "clp" and rep.params["u"] == 3.0 and rep.version == __version__
    assert [(e.node, e.pruned, e.role) for e in rep.layers] == [
        ("conv1", [BACKDOOR], "hidden"),
        ("conv2", [], "hidden"),
    ]
    assert rep.layers[1].affine is not None and rep.layers[0].score == "spectral"
    assert rep.layers[0].threshold == state.decisions[0].selection.thresholds.upper
    assert {s.node for s in rep.skipped} == {"fc1", "fc2"}
    assert rep.pruned_channels == 1


# -- annotate -------------------------------------------------------------------------------------------------------


def _metadata(m: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in m.metadata_props}


def test_annotate_writes_the_metadata_entries_and_keeps_others():
    state = _make(_net({"author": "someone", "onnxclp.method": "stale"}), "clp", u=3.0)
    *_, result = _run(state, find, exclude, score, decide, streams, prune, report, annotate)
    meta = _metadata(state.model)
    assert result.changed == 1
    assert meta["author"] == "someone"
    assert meta["onnxclp.version"] == __version__ and meta["onnxclp.method"] == "clp"
    assert json.loads(meta["onnxclp.params"]) == state.params.as_dict()
    assert meta["onnxclp.pruned_channels"] == "1"
    assert "onnxclp.rescaled_channels" not in meta  # CLP never rescales
    assert [p.key for p in state.model.metadata_props].count("onnxclp.method") == 1


def test_annotate_counts_rescales_for_a_method_that_rescales_and_skips_a_scan():
    state = _make(_net(), "lpp")
    _run(state, find, exclude, score, decide, streams, prune, report, annotate)
    assert _metadata(state.model)["onnxclp.rescaled_channels"] == str(state.report.rescaled_channels)
    state = _make(_net(), "clp", options=Options(edit=False))
    _run(state, find, exclude, score, decide, streams, prune, report)
    assert annotate.run(state) == PassResult() and "onnxclp.method" not in _metadata(state.model)


# -- fuse_bn --------------------------------------------------------------------------------------------------------


def test_fuse_bn_folds_the_batchnorm_and_leaves_the_scores_unchanged():
    plain = _make(_net())
    _run(plain, find, exclude, score)
    state = _make(_net(), options=Options(fuse_bn=True))
    (result,) = _run(state, fuse_bn)
    assert result.changed == 1 and state.fused_batchnorms == 1
    ops = [n.op_type for n in state.model.graph.node]
    assert "BatchNormalization" not in ops
    conv2 = next(n for n in state.model.graph.node if n.name == "conv2")
    assert conv2.output[0] == "b2" and len(conv2.input) == 3  # took over the BN's output, gained a bias
    assert not {"gamma", "beta", "mean", "var"} & {t.name for t in state.model.graph.initializer}
    _run(state, find, exclude, score)
    assert state.scored[1].layer.affine is None
    for a, b in zip(plain.scored, state.scored, strict=True):
        np.testing.assert_allclose(b.scores, a.scores, rtol=1e-5)


def test_fuse_bn_does_nothing_unless_asked():
    state = _make(_net())
    assert fuse_bn.run(state) == PassResult()
    assert "BatchNormalization" in [n.op_type for n in state.model.graph.node]


def test_fuse_bn_refuses_a_score_that_reads_batchnorm_statistics(monkeypatch):
    class NeedsBN(scoring.Score):
        name = "needs-bn"
        description = "test score that reads the BatchNorm statistics"
        needs_batchnorm = True

        def compute(self, view):
            return np.zeros(view.weight.shape[0])

    real_get = scoring.get
    monkeypatch.setattr(scoring, "get", lambda name: NeedsBN() if name == "needs-bn" else real_get(name))
    state = _make(_net(), options=Options(fuse_bn=True))
    state.params = Params(method="clp", score="needs-bn", include_fc=False, values={"u": 3.0})
    with pytest.raises(OnnxclpError, match=r"--fuse-bn .*score 'needs-bn'"):
        fuse_bn.run(state)
    assert "BatchNormalization" in [n.op_type for n in state.model.graph.node]  # nothing folded


# -- inline ---------------------------------------------------------------------------------------------------------


def _with_function() -> onnx.ModelProto:
    """The main graph calls a local function ``local.Block(x, W)`` whose body is one Conv."""
    body = helper.make_function(
        "local",
        "Block",
        ["x", "w"],
        ["y"],
        [helper.make_node("Conv", ["x", "w"], ["y"], name="inner_conv")],
        [helper.make_opsetid("", 17)],
    )
    rng = np.random.default_rng(2)
    m = model(
        [helper.make_node("Block", ["x", "W"], ["y"], name="call", domain="local")],
        [("x", ["N", 3, 4, 4])],
        [("y", ["N", 4, 4, 4])],
        [init("W", rng.normal(size=(4, 3, 1, 1)))],
    )
    m.opset_import.append(helper.make_opsetid("local", 1))
    m.functions.append(body)
    return m


def test_inline_replaces_function_calls_so_their_layers_are_found():
    state = _make(_with_function())
    assert inline.run(state) == PassResult()  # not asked: the function stays, its Conv is skipped
    find.run(state)
    assert state.layers == [] and any("inside" in s.reason for s in state.skipped)

    state = _make(_with_function(), options=Options(inline_functions=True))
    (result,) = _run(state, inline)
    assert result.changed == 1 and state.inlined_functions == ["local.Block"]
    assert len(state.model.functions) == 0
    assert [n.op_type for n in state.model.graph.node] == ["Conv"]
    find.run(state)
    assert [layer.op for layer in state.layers] == ["Conv"]
    assert state.store is not None and state.layers[0].weight.tensor.name == "W"
