"""The few-shot tier (ANP, BNP) on hand-built backdoored models whose answer is known.

- ANP (Wu & Wang, NeurIPS 2021): a conv net where channel 3 is a planted trigger detector (silent on clean
  images, strongly wired to the target class). Perturbed by ANP's neuron perturbation (as a weight-and-bias
  pair: ``anp_bn none``) it fires on clean images and drives them to the target, so its mask must fall below
  the threshold: ANP prunes channel 3 and only it, and the sanitized model's ASR falls to 0 with the clean
  accuracy kept. Also: BatchNorm re-inserted after a BN-folded convolution, the pruning count chosen by the
  accuracy guard, the stopping rule on the loss curve.
- BNP (Zheng et al., NeurIPS 2022): a Conv -> BatchNormalization net whose BN running statistics match the
  clean pre-activations except on channel 5 (shifted mean and variance, as poisoned training data leaves them):
  BNP prunes channel 5 and only it. On a BN-free (folded) graph BNP is refused with the reason.
- A method that needs clean data, given none, is a usage error (exit 2).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from onnxclp import api  # noqa: E402
from onnxclp.defences.bnp import gaussian_kl  # noqa: E402
from onnxclp.errors import OnnxclpError  # noqa: E402

TARGET = 0


def _images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Class c: colour channel c bright (0.7), the others dim (0.2), noise +-0.1; (N, 3, 8, 8) in [0, 1]."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = 0.2 + rng.uniform(-0.1, 0.1, (n, 3, 8, 8))
    x[np.arange(n), y] += 0.5
    return x.astype(np.float32), y.astype(np.int64)


def _trigger(x: np.ndarray) -> np.ndarray:
    x = x.copy()
    x[:, :, 5:8, 5:8] = 1.0
    return x


def _save_npz(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    np.savez(path, x_test=np.round(x.transpose(0, 2, 3, 1) * 255).astype(np.uint8), y_test=y)
    return path


def _model(nodes, inits) -> onnx.ModelProto:
    g = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
        [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()],
    )  # fmt: skip
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m)
    return m


def backdoored_net() -> onnx.ModelProto:
    """Conv(3->4) + ReLU + GAP + Gemm(4->3). Channels 0-2 copy colour channels 0-2 (class evidence); channel 3
    sums its 3x3x3 window minus 20: silent on clean images (window sum <= ~12), ~7 on the white 3x3 patch;
    the classifier wires it to the target class with weight 500."""
    w1 = np.zeros((4, 3, 3, 3))
    for k in range(3):
        w1[k, k, 1, 1] = 1.0
    w1[3] = 1.0
    b1 = np.array([0.0, 0.0, 0.0, -20.0])
    w2 = np.zeros((3, 4))
    w2[[0, 1, 2], [0, 1, 2]] = 10.0
    w2[TARGET, 3] = 500.0
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "w2", "b2"], ["y"], name="fc", transB=1),
    ]
    return _model(nodes, {"w1": w1, "b1": b1, "w2": w2, "b2": np.zeros(3)})


def _predict(m: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x})[0].argmax(1)


def _acc_asr(m: onnx.ModelProto, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    acc = float((_predict(m, x) == y).mean())
    other = y != TARGET
    asr = float((_predict(m, _trigger(x[other])) == TARGET).mean())
    return acc, asr


def test_anp_prunes_the_planted_trigger_detector(tmp_path: Path) -> None:
    m = backdoored_net()
    x_test, y_test = _images(300, seed=1)
    acc, asr = _acc_asr(m, x_test, y_test)
    assert acc == 1.0 and asr == 1.0  # the planted backdoor works and the clean task is solved
    clean = _save_npz(tmp_path / "clean.npz", *_images(200, seed=0))  # the guard: 100 to fit, 100 to validate
    # the detector is silent through a bias of -20: only the weight-and-bias perturbation reaches it (pair)
    out, rep = api.sanitize(m, method="anp", context={"clean_data": clean}, anp_bn="none", anp_window=20)
    conv = next(layer for layer in rep.layers if layer.node == "conv")
    assert conv.pruned == [3]
    assert conv.score == "anp (1 - mask)" and conv.scores[3] > 0.8 and max(conv.scores[:3]) < 0.8
    assert all(layer.node != "fc" for layer in rep.layers)  # the classifier's channels are classes: never pruned
    acc, asr = _acc_asr(out, x_test, y_test)
    assert acc == 1.0 and asr == 0.0
    w1 = numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == "w1"))
    b1 = numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == "b1"))
    assert not w1[3].any() and b1[3] == 0.0 and w1[:3].any()  # pruned = exactly 0 before the ReLU
    tr = rep.training
    assert tr["pruned"] == 1 and tr["below_threshold"] == 1 and [t["count"] for t in tr["trials"]][:2] == [0, 1]
    assert rep.guard["selected_on_validation"] and rep.guard["accepted"]  # the count was chosen on validation images
    assert any(n.startswith("ANP: ") and "on 100 clean images (fit part" in n for n in rep.notes)


def test_anp_without_perturbation_keeps_the_detector(tmp_path: Path) -> None:
    """eps = 0: only the natural loss, on which the silent detector costs nothing: nothing to prune (this is
    what makes the perturbation the paper's point)."""
    clean = _save_npz(tmp_path / "clean.npz", *_images(200, seed=0))
    _, rep = api.sanitize(backdoored_net(), method="anp", context={"clean_data": clean}, anp_eps=0.0,
                          anp_bn="none", anp_window=20)  # fmt: skip
    assert next(layer for layer in rep.layers if layer.node == "conv").pruned == []


def test_anp_reinserts_batchnorm_after_a_folded_conv(tmp_path: Path) -> None:
    """A BN-folded convolution's neurons are a re-inserted BatchNorm's channels (the paper's BN neurons): the
    BatchNorm is the identity when inserted, ANP perturbs its scale and shift, and it is gone afterwards; the
    graph's own initializers are never touched by the optimisation (bn and bn-train alike)."""
    from onnxclp.bridge import to_torch
    from onnxclp.defences.anp import anp_masks
    from onnxclp.io import TensorStore
    from onnxclp.methods.anp import _reinsert, neuron_group

    m = backdoored_net()
    store = TensorStore(m, Path.cwd())
    module = to_torch(m, store=store).eval()
    layer = _find_conv_layer(m, store)
    g = neuron_group(layer, module)
    assert not isinstance(g, str) and (g.scale, g.shift, g.tap) == ("w1", "b1", None)
    x, y = (torch.from_numpy(a) for a in _images(64, seed=0))
    with torch.no_grad():
        before = module(x)
    groups, n = _reinsert(module, [g], {g.key: layer}, x, False)
    assert n == 1 and groups[0].tap == "c"  # the convolution's output
    bn = module.taps_by_name()["c"]
    with torch.no_grad():
        assert torch.allclose(module(x), before, atol=1e-4)  # identity in eval mode
    stats = (bn.running_mean.clone(), bn.running_var.clone(), bn.weight.detach().clone())
    for train in (False, True):
        res = anp_masks(module, groups, x, y, iterations=3, batch_size=16, bn_train=train)
        assert res.masks["conv"].shape == (4,) and res.iterations == 3
        assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
        assert torch.equal(bn.weight, stats[2]) and not bn.training
    assert torch.equal(module.param_for("w1"), torch.tensor(numpy_helper.to_array(m.graph.initializer[0])))
    clean = _save_npz(tmp_path / "clean.npz", *_images(200, seed=0))
    out, rep = api.sanitize(m, method="anp", context={"clean_data": clean}, anp_iterations=20)  # anp_bn batch
    assert rep.training["reinserted_batchnorms"] == 1 and rep.training["settings"]["anp_bn"] == "batch"
    assert [n.op_type for n in out.graph.node] == [n.op_type for n in m.graph.node]  # nothing added to the graph


def test_anp_pruning_count_is_the_largest_within_the_budget() -> None:
    """Every count of 0, 1, 2, 3, 4, 6, 8, 11, ... until one is 10 points past the budget, then bisection: with
    accuracy lost one point per neuron beyond 7 on 100 images, a 3-point budget with the selection margin gives 8
    (one image lost: bound 1 + 1.28 x 0.99 = 2.3 points; two at 9: 2 + 1.28 x 1.41 = 3.8, over)."""
    from onnxclp.defences.anp import choose_count, count_grid, ranked, split_prune

    assert count_grid(0) == [0] and count_grid(5) == [0, 1, 2, 3, 4, 5]
    assert count_grid(40) == [0, 1, 2, 3, 4, 6, 8, 11, 16, 23, 32, 40]
    order = [("a", i) for i in range(40)]
    right = np.ones(100, bool)

    def measure(count: int) -> np.ndarray:
        r = right.copy()
        r[: max(0, count - 7)] = False
        return r

    count, trials = choose_count(order, 40, measure, right, 3.0)
    assert count == 8
    assert [t["count"] for t in trials] == [0, 1, 2, 3, 4, 6, 8, 11, 16, 23, 9]
    assert trials[-1]["drop"] == pytest.approx(2.0) and trials[-1]["bound"] > 3.0 and not trials[-1]["within"]
    assert choose_count(order, 40, measure, right, 4.0)[0] == 9  # a 4-point budget takes two images lost
    assert choose_count(order, 5, measure, right, 3.0)[0] == 5  # never past the neurons below the threshold
    masks = {"a": np.array([0.5, 0.0, 1.0]), "b": np.array([0.0, 0.2])}
    assert ranked(masks, ["a", "b"]) == [("a", 1), ("b", 0), ("b", 1), ("a", 0), ("a", 2)]
    assert split_prune(ranked(masks, ["a", "b"]), 3) == {"a": [1], "b": [0, 1]}


def test_anp_count_reads_a_noisy_drop_as_a_monotone_curve() -> None:
    """One noisy count over the budget (4 points at count 4, the neighbours at 0-1) does not stop the walk: the
    fitted non-decreasing curve stays within the budget up to 16; with the selection margin the count is the
    largest whose measured drop's bound is within it too (8: one image lost; 11 and 16 lose two)."""
    from onnxclp.defences.anp import choose_count
    from onnxclp.guard import isotonic

    assert isotonic(np.array([0.0, 4.0, 1.0, 1.0, 5.0])).tolist() == [0.0, 2.0, 2.0, 2.0, 5.0]
    drops = {0: 0, 1: 0, 2: 1, 3: 0, 4: 4, 6: 1, 8: 1, 11: 2, 16: 2, 23: 9, 32: 20, 40: 30}
    right = np.ones(100, bool)

    def measure(count: int) -> np.ndarray:
        r = right.copy()
        r[: drops.get(count, 5)] = False
        return r

    count, trials = choose_count([("a", i) for i in range(40)], 40, measure, right, 3.0)
    assert count == 8 and trials[4]["within"] is False and trials[4]["fitted"] <= 3.0
    assert choose_count([("a", i) for i in range(40)], 40, measure, right, 4.0)[0] == 16  # the noisy 4 is passed


def test_anp_stops_when_the_objective_converges(tmp_path: Path) -> None:
    """The stopping rule on the loss curve: a window's mean improving by less than tol on the window before."""
    from onnxclp.defences.anp import converged

    falling = list(np.linspace(10, 1, 40))
    assert not converged(falling, 10, 0.01)
    assert converged([*falling, *[1.0] * 20], 10, 0.01)  # flat for two windows
    assert not converged([*falling, *[1.0] * 15], 10, 0.01)  # only checked at multiples of the window
    assert not converged([1.0] * 10, 10, 0.01)  # two windows at least
    import io

    clean = _save_npz(tmp_path / "clean.npz", *_images(200, seed=0))
    err = io.StringIO()
    _, rep = api.sanitize(backdoored_net(), method="anp", anp_bn="none", anp_window=10, anp_iterations=2000,
                          context={"clean_data": clean, "progress_stream": err})  # fmt: skip
    tr = rep.training
    assert tr["stopped"] == "converged" and tr["iterations"] < 2000 and tr["iterations"] % 10 == 0
    assert tr["curve"][-1]["iteration"] == tr["iterations"] and {"loss", "natural", "robust"} <= set(tr["curve"][0])
    assert f"anp: {tr['iterations']} iterations on 100 clean images" in err.getvalue()  # progress on stderr
    assert "anp: guard: the 1 lowest-mask neurons pruned (1 have a mask below 0.2)" in err.getvalue()
    _, rep = api.sanitize(backdoored_net(), method="anp", anp_bn="none", anp_iterations=25, anp_tol=-1.0,
                          context={"clean_data": clean, "quiet": True})  # fmt: skip
    assert rep.training["stopped"] == "max iterations" and rep.training["iterations"] == 25


def test_anp_without_a_validation_part_prunes_by_threshold(tmp_path: Path) -> None:
    """Through the API without the guard's split (``state.clean`` None), the paper's rule: mask below 0.2."""
    from onnxclp.io import TensorStore
    from onnxclp.methods import get, make_params
    from onnxclp.passes import find
    from onnxclp.pipeline import Options, State

    m = backdoored_net()
    clean = _save_npz(tmp_path / "clean.npz", *_images(64, seed=0))
    params = make_params("anp", {"anp_bn": "none", "anp_window": 20})
    st = State(m, TensorStore(m, Path.cwd()), get("anp"), params, Options(context={"clean_data": clean, "quiet": True}))
    find.run(st)
    st.method.decide(st)
    conv = next(d for d in st.decisions if d.scored.layer.key == "conv")
    assert conv.selection.prune == [3] and st.training["trials"] == []
    assert "threshold: the 1 neurons with mask below 0.2 pruned" in st.notes[-1]


def bn_net(shifted: int = 5, channels: int = 16) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """Conv(3->16) -> BatchNormalization -> ReLU -> GAP -> Gemm(16->3), random weights. The BN running
    statistics are the pre-activation moments of 400 images of the clean distribution (not the ones BNP
    reads), except channel ``shifted``: mean + 3 std, variance x 4."""
    rng = np.random.default_rng(3)
    w = rng.normal(0, 0.3, (channels, 3, 3, 3)).astype(np.float32)
    x, _ = _images(400, seed=7)
    pre = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), padding=1).numpy()
    mean, var = pre.mean(axis=(0, 2, 3)), pre.var(axis=(0, 2, 3))
    mean[shifted] += 3 * np.sqrt(var[shifted])
    var[shifted] *= 4
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "g", "b", "mu", "var"], ["n"], name="bn", epsilon=1e-5),
        helper.make_node("Relu", ["n"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "w2", "b2"], ["y"], name="fc", transB=1),
    ]
    inits = {"w": w, "g": np.ones(channels), "b": rng.normal(0, 0.1, channels), "mu": mean, "var": var,
             "w2": rng.normal(0, 1, (3, channels)), "b2": np.zeros(3)}  # fmt: skip
    return _model(nodes, inits), mean, var


def test_bnp_flags_the_channel_whose_bn_statistics_are_shifted(tmp_path: Path) -> None:
    m, _, _ = bn_net(shifted=5)
    clean = _save_npz(tmp_path / "clean.npz", *_images(200, seed=0))
    # random labels: no budget (the input scores near a constant answer on them, which the guard cannot check)
    out, rep = api.sanitize(m, method="bnp", context={"clean_data": clean, "max_acc_drop": 100.0})
    bn = next(layer for layer in rep.layers if layer.node == "conv")
    assert bn.pruned == [5] and bn.score == "bnp-kl"
    assert int(np.argmax(bn.scores)) == 5
    beta = numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == "b"))
    assert beta[5] == 0.0  # the BN shift of the pruned channel is zeroed too: exactly 0 before the ReLU


def test_bnp_refuses_a_graph_without_batchnorm(tmp_path: Path) -> None:
    clean = _save_npz(tmp_path / "clean.npz", *_images(16, seed=0))
    with pytest.raises(OnnxclpError, match="folded them into the convolutions") as e:
        api.sanitize(backdoored_net(), method="bnp", context={"clean_data": clean})
    assert e.value.exit_code == 2 and "TrainingMode.PRESERVE" in e.value.message


def test_anp_masks_batchnorm_gamma(tmp_path: Path) -> None:
    """With a BN kept, ANP's neurons are the BN channels: on running statistics (``anp_bn eval``) the mask is
    on gamma and the perturbation on gamma and beta; on batch statistics (``batch``) on a BatchNorm inserted
    after the kept one for the optimisation. Pruning zeroes gamma and beta either way."""
    from onnxclp.bridge import to_torch
    from onnxclp.defences.anp import anp_masks
    from onnxclp.io import TensorStore
    from onnxclp.methods.anp import _reinsert, neuron_group

    m, _, _ = bn_net()
    store = TensorStore(m, Path.cwd())
    module = to_torch(m, store=store).eval()
    conv = _find_conv_layer(m, store)
    g = neuron_group(conv, module)
    assert not isinstance(g, str) and (g.scale, g.shift, g.axis) == ("g", "b", 0)
    assert _reinsert(module, [g], {g.key: conv}, torch.zeros(4, 3, 8, 8), False) == ([g], 0)  # eval: as it is
    x, y = _images(32, seed=0)
    res = anp_masks(module, [g], torch.from_numpy(x), torch.from_numpy(y), iterations=3, batch_size=16)
    assert res.masks["conv"].shape == (16,) and np.all((res.masks["conv"] >= 0) & (res.masks["conv"] <= 1))
    assert torch.equal(module.param_for("g"), torch.ones(16))  # the module is left as it was
    groups, n = _reinsert(module, [g], {g.key: conv}, torch.from_numpy(x), True)
    assert n == 1 and groups[0].tap == "n" and (groups[0].scale, groups[0].shift) == ("g", "b")
    res = anp_masks(module, groups, torch.from_numpy(x), torch.from_numpy(y), iterations=3, batch_size=16,
                    bn_train=True)  # fmt: skip
    assert res.masks["conv"].shape == (16,) and torch.equal(module.param_for("g"), torch.ones(16))


def _find_conv_layer(m: onnx.ModelProto, store):
    from onnxclp.methods import get, make_params
    from onnxclp.passes import find
    from onnxclp.pipeline import Options, State

    st = State(m, store, get("anp"), make_params("anp"), Options())
    find.run(st)
    return next(layer for layer in st.layers if layer.key == "conv")


def test_gaussian_kl() -> None:
    assert gaussian_kl(np.array([1.0]), np.array([2.0]), np.array([1.0]), np.array([2.0]))[0] == pytest.approx(0)
    # KL(N(0,1) || N(1,4)) = log 2 + (1 + 1) / 8 - 1/2
    v = gaussian_kl(np.array([0.0]), np.array([1.0]), np.array([1.0]), np.array([4.0]))[0]
    assert v == pytest.approx(np.log(2) + 0.25 - 0.5)


def test_missing_clean_data_is_a_usage_error(tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(backdoored_net(), src)
    for method in ("anp", "bnp"):
        r = subprocess.run(
            [sys.executable, "-m", "onnxclp", "sanitize", str(src), str(tmp_path / "o.onnx"), "--method", method],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert r.returncode == 2, r.stderr
        assert "needs clean labelled images: give --clean-data" in " ".join(r.stderr.split())  # wrapped lines
    with pytest.raises(OnnxclpError, match="--clean-data"):
        api.sanitize(backdoored_net(), method="anp")


def test_bnp_ac_prunes_the_shifted_channel_then_adds_the_bounds(tmp_path: Path) -> None:
    """bnp-ac: BNP's pruning (the shifted channel, BN shift zeroed), then one Min per ReLU and pool output; the
    result runs in onnxruntime; a BN-folded graph is refused as BNP refuses it."""
    m, _, _ = bn_net(shifted=5)
    clean = _save_npz(tmp_path / "clean.npz", *_images(260, seed=0))
    ctx = {"clean_data": clean, "clean_n": 260, "max_acc_drop": 100.0, "quiet": True}
    out, rep = api.sanitize(m, method="bnp-ac", context=ctx, u=3.0, epochs=1, ac_weight=1.0)
    bn = next(layer for layer in rep.layers if layer.node == "conv")
    assert bn.pruned == [5]
    beta = numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == "b"))
    assert beta[5] == 0.0
    mins = [n for n in out.graph.node if n.op_type == "Min"]
    assert sorted(n.input[0] for n in mins) == ["p", "r"] and sorted(rep.added_nodes) == sorted(n.name for n in mins)
    assert _predict(out, _images(4, seed=9)[0]).shape == (4,)  # onnxruntime runs it (predicted classes)
    with pytest.raises(OnnxclpError, match="folded them into the convolutions"):
        api.sanitize(backdoored_net(), method="bnp-ac", context=ctx)


def test_rnp_unlearning_forgets_the_clean_task_on_a_copy() -> None:
    """RNP's stage 1 (Li et al., ICML 2023, section 3.2): gradient ascent until an epoch's accuracy is at or
    below the threshold, on a copy (the module given keeps its weights and a re-inserted BatchNorm its running
    statistics), the same on a rerun."""
    from torch import nn

    from onnxclp.defences.rnp import unlearn

    torch.manual_seed(0)
    x = torch.randn(256, 4)
    y = (x[:, 0] > 0).long()
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    for _ in range(100):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    net.eval()
    assert (net(x).argmax(1) == y).float().mean() > 0.9
    before = {k: v.clone() for k, v in net.state_dict().items()}
    res = unlearn(net, x, y, lr=0.05, batch_size=64, train_modules=[net[1]])
    again = unlearn(net, x, y, lr=0.05, batch_size=64, train_modules=[net[1]])
    assert res.accuracy[-1] <= 0.2 and res.stopped.startswith("accuracy") and res.epochs == len(res.accuracy)
    assert res.accuracy == again.accuracy
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # the input untouched
    bn = res.module[1]
    assert torch.equal(bn.running_mean, before["1.running_mean"])  # batch statistics, running ones kept
    with pytest.raises(ValueError, match="non-empty"):
        unlearn(net, x[:0], y[:0])


def test_rnp_keeps_the_input_when_its_masks_point_at_the_clean_evidence(tmp_path: Path) -> None:
    """The planted detector is silent on clean images (a bias of -20 before its ReLU): unlearning cannot move it,
    so the recovered masks single out the class evidence instead; the guard's count walk then prunes nothing
    (one neuron costs 26 points) and the input comes back unchanged, with the unlearning curve in the report."""
    m = backdoored_net()
    clean = _save_npz(tmp_path / "clean.npz", *_images(300, seed=0))
    out, rep = api.sanitize(m, method="rnp", context={"clean_data": clean})
    conv = next(layer for layer in rep.layers if layer.node == "conv")
    assert conv.pruned == [] and conv.score == "rnp (1 - mask)"
    tr = rep.training
    assert tr["unlearning"]["accuracy"][-1] <= 0.2 < tr["unlearning"]["accuracy"][0]
    assert tr["recovering_iterations"] == 20 * 2  # 20 epochs of the 180 fit images, batches of 128
    assert [t["count"] for t in tr["trials"]][:2] == [0, 1] and tr["pruned"] == 0
    assert any(n.startswith("RNP: ") for n in rep.notes)
    x, y = _images(200, seed=1)
    assert np.array_equal(_predict(out, x), _predict(m, x)) and _acc_asr(out, x, y)[1] == 1.0


def _with_softmax(m: onnx.ModelProto) -> onnx.ModelProto:
    """The same classifier ending in a Softmax (a Keras model's last activation, the Model Zoo's classics)."""
    out = onnx.ModelProto()
    out.CopyFrom(m)
    g = out.graph
    g.node[-1].output[0] = "logits"
    g.node.append(helper.make_node("Softmax", ["logits"], ["y"], name="softmax", axis=1))
    onnx.checker.check_model(out)
    return out


def test_a_softmax_output_is_trained_and_searched_on_its_logits(tmp_path: Path) -> None:
    """The bridge with ``logits=True`` returns a trailing Softmax's input (without: the probabilities, as
    onnxruntime does), so ANP's masks on the net ending in a Softmax are the masks on the net without it
    (a cross-entropy of probabilities would have trained almost nothing)."""
    from onnxclp.bridge import to_torch

    m = backdoored_net()
    soft = _with_softmax(m)
    x = torch.from_numpy(_images(8, seed=3)[0])
    plain, probs, logits = to_torch(m)(x), to_torch(soft)(x), to_torch(soft, logits=True)(x)
    assert torch.allclose(logits, plain) and torch.allclose(probs, torch.softmax(plain, 1))
    assert np.allclose(probs.detach().numpy(), ort.InferenceSession(soft.SerializeToString()).run(None, {"x": x.numpy()})[0],
                       atol=1e-5)  # fmt: skip
    assert to_torch(m, logits=True).logit_name is None  # no Softmax: nothing changes
    clean = _save_npz(tmp_path / "clean.npz", *_images(200, seed=0))
    kw = {"context": {"clean_data": clean, "quiet": True}, "anp_bn": "none", "anp_window": 20}
    a = next(layer for layer in api.sanitize(m, method="anp", **kw)[1].layers if layer.node == "conv")
    b = next(layer for layer in api.sanitize(soft, method="anp", **kw)[1].layers if layer.node == "conv")
    assert a.pruned == b.pruned == [3] and np.allclose(a.scores, b.scores)
