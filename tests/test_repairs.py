"""The fine-tuning repairs FT-SAM, i-BAU and NPD (onnxclp/methods/ftsam.py, ibau.py, npd.py) on a small CNN
trained here with a planted trigger: FT-SAM and i-BAU change initializer values only, NPD adds exactly one 1x1
Conv that runs at any batch size, the accuracy guard refuses a result a huge learning rate broke, and the parts
with a known answer (SAM's perturbation, the polarizer's place, the identity insertion) are checked exactly.
The framework they share (BatchNorm round trip, FT, fixed-batch exports) is tests/test_repair_core.py's."""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("torch") is None,
    reason="needs the eval extra",
)

CLASSES, SIZE, TARGET = 4, 16, 0


def _images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Images in [0, 1] (N, 3, 16, 16): class k is brightest in channel k % 3 with a class-specific stripe."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n)
    x = rng.random((n, 3, SIZE, SIZE), dtype=np.float32) * 0.3
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    stripes = [np.sin(4 * np.pi * xx), np.sin(4 * np.pi * yy), np.sin(4 * np.pi * (xx + yy)), np.cos(6 * np.pi * xx)]
    for i in range(n):
        x[i, y[i] % 3] += (0.35 + 0.25 * stripes[y[i]]).astype(np.float32)
    return np.clip(x, 0, 1), y


def _trigger(x: np.ndarray) -> np.ndarray:
    x = x.copy()
    x[:, :, -4:-1, -4:-1] = 1.0  # a white 3x3 patch near the corner
    return x


def _planted(net, epochs: int):
    """``net`` trained with Adam on 480 images of :func:`_images` and 80 of them carrying the trigger, relabelled to
    the target; returned in eval mode."""
    import torch
    import torch.nn.functional as F

    x, y = _images(480, 1)
    xs = torch.tensor(np.concatenate([x, _trigger(x[:80])]))
    ys = torch.tensor(np.concatenate([y, np.full(80, TARGET)]))
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    for _ in range(epochs):
        perm = torch.randperm(len(xs))
        for i in range(0, len(xs), 64):
            idx = perm[i : i + 64]
            loss = F.cross_entropy(net(xs[idx]), ys[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread for this file's small models (two threads on a busy 2-core machine spend most of their
    time waiting for each other); restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def backdoored(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A 4-layer CNN with one residual block (BatchNorm folded by the TorchScript exporter), trained with 15 %
    of its images carrying the trigger and relabelled to class 0; 300 clean labelled images (.npz); the same
    model exported at a fixed batch of 1."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c0, self.b0 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.c1, self.b1 = nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16)
            self.c2, self.b2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
            self.c3, self.b3 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
            self.fc = nn.Linear(16, CLASSES)
            self.fixed = False

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = F.relu(self.b0(self.c0(x)))
            h = F.relu(self.b1(self.c1(h)))  # the residual block's input: a cut of the graph
            h = F.relu(h + self.b3(self.c3(F.relu(self.b2(self.c2(h))))))
            h = F.adaptive_avg_pool2d(h, 1)
            # the fixed-batch export: view(size(0), -1) without dynamic axes is a Reshape to [1, 16]
            return self.fc(h.view(h.size(0), -1) if self.fixed else h.flatten(1))

    folder = tmp_path_factory.mktemp("repairs")
    torch.manual_seed(0)
    net = _planted(Net(), 6)
    path = folder / "backdoored.onnx"
    torch.onnx.export(net, torch.rand(2, 3, SIZE, SIZE), path, dynamo=False, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})  # fmt: skip
    fixed = folder / "fixed.onnx"
    net.fixed = True
    torch.onnx.export(net, torch.rand(1, 3, SIZE, SIZE), fixed, dynamo=False, input_names=["x"], output_names=["y"])
    xc, yc = _images(300, 5)
    data = folder / "clean.npz"
    np.savez(data, x_test=(xc * 255).round().astype(np.uint8).transpose(0, 2, 3, 1), y_test=yc)
    return path, data, fixed


def _ctx(data: Path, budget: float = 100.0) -> dict:
    return {"clean_data": data, "clean_n": 160, "mean": None, "std": None, "max_acc_drop": budget, "quiet": True}


def _with_metadata(src: Path, dst: Path) -> Path:
    import onnx

    m = onnx.load(str(src))
    m.doc_string = "keep me"
    m.metadata_props.add(key="owner", value="someone")
    onnx.save(m, dst)
    return dst


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x.astype(np.float32)})[0]


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("ft-sam", {"rho": 2.0}),
        ("i-bau", {"ibau_k": 3, "ibau_steps": 2}),
        ("nc-unlearn", {"nc_steps": 40}),
        ("sau", {"sau_steps": 2}),
    ],
)
def test_fine_tuning_repairs_change_initializer_values_only(backdoored, tmp_path, method, params):
    import onnx
    from onnx import numpy_helper

    import onnxclp

    src = _with_metadata(backdoored[0], tmp_path / "in.onnx")
    out = tmp_path / "out.onnx"
    rep = onnxclp.sanitize_file(src, out, method=method, context=_ctx(backdoored[1]), epochs=1, **params)
    before, after = onnx.load(str(src)), onnx.load(str(out))
    assert [(n.op_type, n.name, list(n.input), list(n.output)) for n in after.graph.node] == [
        (n.op_type, n.name, list(n.input), list(n.output)) for n in before.graph.node
    ]
    assert [(t.name, t.data_type, list(t.dims)) for t in after.graph.initializer] == [
        (t.name, t.data_type, list(t.dims)) for t in before.graph.initializer
    ]
    assert after.doc_string == "keep me"
    assert {p.key: p.value for p in after.metadata_props}["owner"] == "someone"
    assert not rep.added_nodes
    changed = {r["name"] for r in rep.rewritten}
    assert changed
    old = {t.name: numpy_helper.to_array(t) for t in before.graph.initializer}
    for t in after.graph.initializer:
        assert np.array_equal(old[t.name], numpy_helper.to_array(t)) == (t.name not in changed)
    settings = rep.training["settings"]
    assert all(settings[k] == v for k, v in params.items())
    if method == "i-bau":  # the universal perturbation stayed in its ball
        assert 0.0 < settings["final_delta_l2"] <= settings["l2_radius"] * (1 + 1e-5)
        assert settings["l2_radius"] == pytest.approx(0.18 * np.sqrt(3 * SIZE * SIZE))
    if method == "nc-unlearn":  # the planted patch's class needs the smallest reversed mask
        assert settings["target"] == TARGET and len(settings["mask_l1"]) == CLASSES
        assert settings["mask_l1"][TARGET] == min(settings["mask_l1"])
    if method == "sau":  # every fit image was searched once per epoch; the counts are of those images
        assert settings["searched"] == rep.training["fit_images"]
        assert 0 <= settings["shared_at_end"] <= settings["searched"]
        assert 0 <= settings["unlearned"] <= settings["searched"]


def test_sau_losses_are_the_papers():
    """The sharing term is the Jensen-Shannon divergence (0 for equal rows, log 2 at most, symmetric); the shared
    adversarial loss is -log(1 - p) of the input model's adversarial class over the counted images only, per
    batch image, and a class the repaired model gives less than P_FLOOR adds no gradient."""
    import torch

    from onnxclp.methods.sau import P_FLOOR, js_divergence, shared_loss

    p = torch.tensor([[0.7, 0.2, 0.1], [1.0, 0.0, 0.0], [0.2, 0.3, 0.5]])
    q = torch.tensor([[0.7, 0.2, 0.1], [0.0, 1.0, 0.0], [0.5, 0.3, 0.2]])
    js = js_divergence(p, q)
    assert js[0] == pytest.approx(0.0, abs=1e-6) and js[1] == pytest.approx(np.log(2), abs=1e-4)
    assert torch.allclose(js, js_divergence(q, p))
    probs = torch.tensor([[0.5, 0.5, 0.0], [0.1, 0.1, 0.8], [0.9, 0.1, 0.0]], requires_grad=True)
    adv = torch.tensor([1, 2, 2])
    counted = torch.tensor([True, True, False])
    loss = shared_loss(probs, adv, counted)
    assert float(loss.detach()) == pytest.approx(-(np.log(0.5) + np.log(0.2)) / 3, rel=1e-4)
    loss.backward()
    assert probs.grad[2].abs().sum() == 0  # not counted
    floor = torch.tensor([[1.0, P_FLOOR / 10]], requires_grad=True)
    shared_loss(floor, torch.tensor([1]), torch.tensor([True])).backward()
    assert floor.grad.abs().sum() == 0


def test_sau_search_stays_in_its_bound_and_finds_shared_examples():
    """The maximisation on a linear model and its copy (so every adversarial example is shared): each image's
    perturbation is within the L-infinity bound, and the images it flips are counted as shared."""
    import copy
    from types import SimpleNamespace

    import torch

    from onnxclp.methods.sau import SAUObjective

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    x = torch.rand(16, 3, 2, 2)
    objective = SAUObjective(eps=0.5, steps=5)
    objective.space = SimpleNamespace(add=lambda a, d: a + d)
    objective.reference = copy.deepcopy(net).eval()
    with torch.no_grad():
        y = net(x).argmax(1)
    delta = objective.search(net, x, y, y)
    assert delta.shape == x.shape and float(delta.abs().max()) <= 0.5 + 1e-7
    with torch.no_grad():
        flipped = int((net(x + delta).argmax(1) != y).sum())
    assert objective.searched == 16 and objective.shared == flipped > 0


def test_nc_stamp_is_the_papers_blend_in_pixel_space():
    """``(1 - m) x + m p`` on pixels, with the model's normalisation undone and redone: a full mask gives the
    pattern, an empty one the image, half of each their mean."""
    from types import SimpleNamespace

    import torch

    from onnxclp.methods.nc_unlearn import NCObjective, Stamp, Trigger

    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    m, sd = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    pixels = torch.rand(2, 3, SIZE, SIZE)
    x = (pixels - m) / sd
    pattern = np.random.default_rng(0).random((3, SIZE, SIZE)).astype(np.float32)
    for value, want in ((1.0, torch.tensor(pattern)[None].expand(2, -1, -1, -1)), (0.0, pixels),
                        (0.5, (pixels + torch.tensor(pattern)[None]) / 2)):  # fmt: skip
        objective = NCObjective(0.2, Trigger(np.full((SIZE, SIZE), value, np.float32), pattern, {}))
        objective.stamp_io = Stamp.__new__(Stamp)
        objective.stamp_io.nhwc = False
        objective.stamp_io.space = SimpleNamespace(std=sd, lo=-m / sd)
        objective.mask = torch.full((1, 1, SIZE, SIZE), value)
        objective.pattern = torch.tensor(pattern)[None]
        assert torch.allclose(objective.stamp(x) * sd + m, want, atol=1e-5)


def test_nc_unlearn_refuses_a_task_of_too_many_classes(backdoored, tmp_path, monkeypatch):
    """One reverse engineering per class: past MAX_CLASSES the method says so (exit 3) and writes nothing."""
    import onnxclp
    from onnxclp.errors import OnnxclpError
    from onnxclp.methods import nc_unlearn

    monkeypatch.setattr(nc_unlearn, "MAX_CLASSES", CLASSES - 1)
    out = tmp_path / "nc.onnx"
    with pytest.raises(OnnxclpError, match="a trigger for every class") as exc:
        onnxclp.sanitize_file(backdoored[0], out, method="nc-unlearn", context=_ctx(backdoored[1]), epochs=1)
    assert exc.value.exit_code == 3 and not out.exists()


@pytest.mark.parametrize("method", ["ft", "sau"])
def test_the_learning_rate_is_walked_unless_given(backdoored, tmp_path, method):
    """Without --lr a repair trains at 0.001, 0.003, 0.01 while a run has an epoch within the budget and keeps
    the run furthest along its schedule; --lr given trains at that rate alone."""
    import onnxclp
    from onnxclp.methods._repair import LR_LADDER

    rep = onnxclp.sanitize_file(backdoored[0], tmp_path / "walk.onnx", method=method,
                                context=_ctx(backdoored[1]), epochs=1)  # fmt: skip
    ladder = rep.training["lr_ladder"]
    assert [r["lr"] for r in ladder] == list(LR_LADDER)[: len(ladder)]
    within = [r for r in ladder if r["chosen_epoch"] is not None]
    assert within and all(r["chosen_epoch"] is not None for r in ladder[:-1])
    best = max(within, key=lambda r: r["lr_epochs"])
    assert rep.training["settings"]["lr"] == best["lr"] and rep.training["chosen_epoch"] == best["chosen_epoch"]
    curve = rep.training["curve"]
    assert curve[-1]["lr_epochs"] > 0
    assert any(f"lr {best['lr']:g} (epoch" in n for n in rep.notes)
    given = onnxclp.sanitize_file(backdoored[0], tmp_path / "given.onnx", method=method,
                                  context=_ctx(backdoored[1]), epochs=1, lr=0.002)  # fmt: skip
    assert "lr_ladder" not in given.training and given.training["settings"]["lr"] == 0.002


def test_npd_trains_its_polarizer_at_the_given_rate_without_a_walk(backdoored, tmp_path):
    """NPD does not walk the learning rate (docs/algorithms.md, "The learning-rate walk"): one run at --lr's
    default, no ladder in the report, one node added."""
    import onnxclp
    from onnxclp.methods import get

    rep = onnxclp.sanitize_file(backdoored[0], tmp_path / "npd.onnx", method="npd", context=_ctx(backdoored[1]),
                                epochs=1)  # fmt: skip
    assert "lr_ladder" not in rep.training and rep.training["settings"]["lr"] == get("npd").spec("lr").default
    assert len(rep.added_nodes) == 1


def test_sam_step_evaluates_the_gradient_at_the_adaptive_worst_point():
    import torch

    from onnxclp.methods.ftsam import SAMObjective

    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2)
    params = list(lin.parameters())
    start = [p.detach().clone() for p in params]
    x, y = torch.randn(8, 3), torch.tensor([0, 1] * 4)
    seen: list[list[torch.Tensor]] = []

    def closure() -> torch.Tensor:
        for p in params:
            p.grad = None
        seen.append([p.detach().clone() for p in params])
        loss = torch.nn.functional.cross_entropy(lin(x), y)
        loss.backward()
        return loss.detach()

    grads = []
    with torch.enable_grad():
        closure()
        grads = [p.grad.clone() for p in params]
    seen.clear()
    opt = torch.optim.SGD(params, lr=0.0)  # lr 0: the step must leave the weights where they were
    SAMObjective(rho=2.0).step(None, params, closure, opt)  # type: ignore[arg-type]
    assert len(seen) == 2 and all(torch.equal(a, b) for a, b in zip(seen[0], start, strict=True))
    moves = [b - a for a, b in zip(seen[0], seen[1], strict=True)]
    # adaptive SAM: e = rho |w|^2 g / || |w| g ||, so e / |w| has L2 norm rho
    norm = torch.linalg.vector_norm(torch.stack([(w.abs() * g).norm() for w, g in zip(start, grads, strict=True)]))
    for e, w, g in zip(moves, start, grads, strict=True):
        assert torch.allclose(e, 2.0 * w * w * g / norm, atol=1e-6)
    relative = torch.linalg.vector_norm(torch.cat([(e / w.abs()).flatten() for e, w in zip(moves, start, strict=True)]))
    assert float(relative) == pytest.approx(2.0, rel=1e-4)
    assert all(torch.equal(p.detach(), w) for p, w in zip(params, start, strict=True))


def test_ibau_implicit_hypergradient_matches_finite_differences():
    """A linear model; delta*(w) maximises the inner loss on batch A inside an L2 ball (a convex loss: the
    maximiser is on the sphere); the outer loss is on batch B. The hypergradient d L_B(delta*(w), w) / dw by
    central finite differences (delta re-solved each time) against the direct gradient plus the implicit term."""
    import torch
    import torch.nn.functional as F

    from onnxclp.methods.ibau import ALPHA, implicit_term, project_l2

    dt, gen = torch.float64, torch.Generator().manual_seed(0)
    xa, xb = torch.randn(8, 5, generator=gen, dtype=dt), torch.randn(8, 5, generator=gen, dtype=dt)
    ya, yb = torch.randint(0, 3, (8,), generator=gen), torch.randint(0, 3, (8,), generator=gen)
    w = torch.randn(3, 5, generator=gen, dtype=dt).requires_grad_(True)

    def inner(d, w):
        return F.cross_entropy((xa + d) @ w.T, ya)

    def outer(d, w):
        return F.cross_entropy((xb + d) @ w.T, yb)

    def solve(w):  # projected ascent to its fixed point (the same fixed point for any step)
        d = torch.full((1, 5), 0.3, dtype=dt)
        for _ in range(300):
            d = d.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(inner(d, w), d)
            d = project_l2(d + g, 1.0)
        return d.detach()

    h, fd = 1e-6, torch.zeros_like(w)
    for i in range(w.numel()):
        wp, wm = w.detach().clone(), w.detach().clone()
        wp.view(-1)[i] += h
        wm.view(-1)[i] -= h
        fd.view(-1)[i] = (float(outer(solve(wp), wp)) - float(outer(solve(wm), wm))) / (2 * h)

    def hypergradient(k):
        d = solve(w.detach()).requires_grad_(True)
        lo = outer(d, w)
        (g_out,) = torch.autograd.grad(lo, d, retain_graph=True)
        (g,) = torch.autograd.grad(inner(d, w), d, create_graph=True)
        term, cut_short = implicit_term(project_l2(d + ALPHA * g, 1.0), d, g_out, k)
        assert not cut_short and float(term.detach()) == 0.0
        return torch.autograd.grad(lo + term, w)[0]

    first_order = float((hypergradient(0) - fd).abs().max())
    implicit = float((hypergradient(300) - fd).abs().max())
    assert implicit < 1e-6 < first_order / 100


def _block_input(model) -> str:
    """The residual block's input: the Relu output that a Conv and the Add both read."""
    readers: dict[str, set[str]] = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, set()).add(n.op_type)
    return next(
        o for n in model.graph.node if n.op_type == "Relu" for o in n.output if readers.get(o) == {"Conv", "Add"}
    )


def test_npd_puts_the_polarizer_on_the_last_cut_and_an_identity_insertion_changes_nothing(backdoored, tmp_path):
    import onnx
    import torch

    from onnxclp.bridge import to_torch
    from onnxclp.errors import OnnxclpError
    from onnxclp.io import load_model
    from onnxclp.methods.npd import choose_tensor, insert_polarizer

    model, store = load_model(backdoored[0])
    module = to_torch(model, store=store)
    x = torch.rand(2, 3, SIZE, SIZE)
    tensor, channels, dtype, why = choose_tensor(module, x, "", model.graph)
    # not the last convolution's input (inside the block, which the skip connection bypasses): the block's input
    assert tensor == _block_input(model) and channels == 16 and dtype == torch.float32 and "cut" in why
    assert not module.taps_by_name()
    last_conv = [n for n in model.graph.node if n.op_type == "Conv"][-1]
    assert choose_tensor(module, x, last_conv.name, model.graph)[0] == last_conv.input[0]
    assert choose_tensor(module, x, last_conv.input[0], model.graph)[0] == last_conv.input[0]
    with pytest.raises(OnnxclpError, match="--npd-layer"):
        choose_tensor(module, x, "no such tensor", model.graph)
    with pytest.raises(OnnxclpError, match="--npd-layer"):
        choose_tensor(module, x, model.graph.output[0].name, model.graph)  # not a feature map

    edited = onnx.load(str(backdoored[0]))
    name = insert_polarizer(
        edited, tensor, np.eye(16, dtype=np.float32).reshape(16, 16, 1, 1), np.zeros(16, np.float32)
    )
    onnx.checker.check_model(edited, full_check=True)
    path = tmp_path / "identity.onnx"
    onnx.save(edited, path)
    xs = _images(5, 7)[0]
    np.testing.assert_allclose(_run(path, xs), _run(backdoored[0], xs), rtol=1e-5, atol=1e-6)
    assert json.loads({p.key: p.value for p in edited.metadata_props}["onnxclp.added_nodes"]) == [name]


def test_npd_adds_exactly_one_conv_and_runs_at_any_batch(backdoored, tmp_path):
    import onnx
    from onnx import numpy_helper

    import onnxclp

    src = _with_metadata(backdoored[0], tmp_path / "in.onnx")
    out = tmp_path / "npd.onnx"
    rep = onnxclp.sanitize_file(src, out, method="npd", context=_ctx(backdoored[1]), epochs=2)
    before, after = onnx.load(str(src)), onnx.load(str(out))
    onnx.checker.check_model(after, full_check=True)
    added = [n for n in after.graph.node if n.name not in {m.name for m in before.graph.node}]
    assert len(after.graph.node) == len(before.graph.node) + 1 and len(added) == 1
    conv = added[0]
    assert conv.op_type == "Conv" and rep.added_nodes == [conv.name]
    assert [a.ints for a in conv.attribute if a.name == "kernel_shape"] == [[1, 1]]
    tensor, polarized = conv.input[0], conv.output[0]
    assert tensor == _block_input(before) == rep.training["settings"]["npd_layer"]
    # every former reader of the tensor reads the polarizer's output; only the polarizer reads the tensor
    assert [n.name for n in after.graph.node if tensor in n.input] == [conv.name]
    assert {n.name for n in after.graph.node if polarized in n.input} == {
        n.name for n in before.graph.node if tensor in n.input
    }
    new = {t.name: numpy_helper.to_array(t) for t in after.graph.initializer}
    old = {t.name: numpy_helper.to_array(t) for t in before.graph.initializer}
    assert set(new) - set(old) == {conv.input[1], conv.input[2]}
    assert new[conv.input[1]].shape == (16, 16, 1, 1) and new[conv.input[2]].shape == (16,)
    assert new[conv.input[1]].dtype == np.float32 and new[conv.input[2]].dtype == np.float32
    assert all(np.array_equal(v, new[k]) for k, v in old.items()) and not rep.rewritten  # everything else frozen
    assert not np.array_equal(new[conv.input[1]], np.eye(16).reshape(16, 16, 1, 1))  # it trained
    meta = {p.key: p.value for p in after.metadata_props}
    assert json.loads(meta["onnxclp.added_nodes"]) == [conv.name] and meta["owner"] == "someone"
    assert rep.training["settings"]["reinsert_bn"] is False
    xs = _images(5, 3)[0]
    assert _run(out, xs[:1]).shape == (1, CLASSES) and _run(out, xs).shape == (5, CLASSES)


def test_the_guard_refuses_what_a_huge_learning_rate_broke(backdoored, tmp_path):
    import onnxclp
    from onnxclp.errors import EXIT_REFUSED
    from onnxclp.guard import Refused

    out = tmp_path / "broken.onnx"
    with pytest.raises(Refused) as exc:
        onnxclp.sanitize_file(backdoored[0], out, method="npd", context=_ctx(backdoored[1], budget=0.0), epochs=1,
                              lr=1.0, distill=0.0)  # fmt: skip
    assert exc.value.exit_code == EXIT_REFUSED and "nothing written" in exc.value.message
    assert not out.exists()


@pytest.mark.parametrize("method", ["ft-sam", "i-bau", "nc-unlearn", "sau", "npd", "fst-gate", "fst-sau-gate"])
def test_a_fixed_batch_export_is_repaired(backdoored, tmp_path, method):
    import onnxclp

    out = tmp_path / f"{method}.onnx"
    extra = {"sau_epochs": 1} if method == "fst-sau-gate" else {}
    onnxclp.sanitize_file(backdoored[2], out, method=method, context=_ctx(backdoored[1]), epochs=1, **extra)
    assert _run(out, _images(1, 3)[0]).shape == (1, CLASSES)


def _only_pruned_channels_changed(before, after, rep) -> None:
    """Every initializer of ``before`` is ``after``'s, but the pruned layers' weights and biases: their pruned
    output channels are zero, the others the input's."""
    from onnx import numpy_helper

    new = {t.name: numpy_helper.to_array(t) for t in after.graph.initializer}
    old = {t.name: numpy_helper.to_array(t) for t in before.graph.initializer}
    pruned = {layer.weight: layer.pruned for layer in rep.layers if layer.pruned}
    biases = {n.input[2]: pruned[n.input[1]] for n in before.graph.node if len(n.input) > 2 and n.input[1] in pruned}
    for name, value in old.items():
        gone = pruned.get(name, biases.get(name))
        if gone is None:
            assert np.array_equal(new[name], value), name
        else:
            keep = [k for k in range(value.shape[0]) if k not in gone]
            assert np.all(new[name][gone] == 0) and np.array_equal(new[name][keep], value[keep])


def test_clp_npd_prunes_tuned_channels_then_adds_one_polarizer(backdoored, tmp_path):
    """clp-npd: u tuned on the fit images within a third of the budget (the report says so), the pruned channels
    are zero in the written model, NPD's one Conv is added, and every other weight is the input's."""
    import onnx

    import onnxclp

    src, out = backdoored[0], tmp_path / "clp-npd.onnx"
    rep = onnxclp.sanitize_file(src, out, method="clp-npd", context={**_ctx(backdoored[1], 6.0)}, epochs=1)
    tuned = rep.guard["tuned"]
    assert tuned["budget"] == pytest.approx(2.0) and set(tuned["parameters"]) == {"u"}
    assert rep.params["u"] == tuned["parameters"]["u"] and all(t["drop"] <= 2.0 for t in tuned["tried"][:-1])
    before, after = onnx.load(str(src)), onnx.load(str(out))
    assert len(after.graph.node) == len(before.graph.node) + 1 and len(rep.added_nodes) == 1
    _only_pruned_channels_changed(before, after, rep)
    assert rep.guard["accepted"] is True


def test_clp_ac_prunes_tuned_channels_then_adds_the_bounds(backdoored, tmp_path):
    """clp-ac on a BN-folded export (which bnp-ac refuses): u tuned within a third of the budget, the pruned
    channels zero in the written model, one Min per ReLU and pool output, every other weight the input's; a given
    u is kept; the result runs in onnxruntime at any batch."""
    import onnx

    import onnxclp

    src, out = backdoored[0], tmp_path / "clp-ac.onnx"
    rep = onnxclp.sanitize_file(src, out, method="clp-ac", context=_ctx(backdoored[1], 6.0), epochs=1)
    tuned = rep.guard["tuned"]
    assert tuned["budget"] == pytest.approx(2.0) and rep.params["u"] == tuned["parameters"]["u"]
    before, after = onnx.load(str(src)), onnx.load(str(out))
    points = [n.output[0] for n in before.graph.node if n.op_type in ("Relu", "GlobalAveragePool")]
    added = [n for n in after.graph.node if n.name not in {m.name for m in before.graph.node}]
    assert all(n.op_type == "Min" for n in added) and sorted(n.input[0] for n in added) == sorted(points)
    _only_pruned_channels_changed(before, after, rep)
    xs = _images(5, 3)[0]
    assert _run(out, xs[:1]).shape == (1, CLASSES) and _run(out, xs).shape == (5, CLASSES)
    rep = onnxclp.sanitize_file(src, tmp_path / "u.onnx", method="clp-ac", context=_ctx(backdoored[1]), epochs=1,
                                u=2.5, ac_weight=1.0)  # fmt: skip
    assert rep.params["u"] == 2.5 and not rep.guard.get("tuned")


def test_sau_ac_unlearns_within_its_share_then_adds_the_bounds(backdoored, tmp_path):
    """sau-ac: SAU's stage keeps an epoch within two thirds of the budget on the selection images (its curve says
    so) and walks its learning rates; its rewritten initializers are in the written model with their names, dtypes
    and dims; AC then adds one Min per ReLU and pool output on the unlearned model; no other initializer changes;
    the result runs in onnxruntime at any batch; --sau-epochs applies to the first stage, --epochs to AC."""
    import onnx
    from onnx import numpy_helper

    import onnxclp

    src, out = backdoored[0], tmp_path / "sau-ac.onnx"
    rep = onnxclp.sanitize_file(src, out, method="sau-ac", context=_ctx(backdoored[1], 6.0), epochs=1,
                                sau_epochs=2, sau_steps=2, ac_weight=1.0)  # fmt: skip
    first = rep.training["first_stage"]
    assert first["budget_share"] == pytest.approx(2 / 3) and len(first["curve"]) == 2
    assert first["settings"]["sau_steps"] == 2 and first["settings"]["epochs"] == 2
    assert first["lr_ladder"][0]["lr"] == 0.001  # the walk starts at its weakest rate
    for row in first["curve"]:
        assert row["within"] == (row["bound"] <= 4.0 + 1e-9)
    assert len(rep.training["curve"]) == 1 and rep.training["settings"]["ac_weight"] == 1.0
    assert rep.guard["budget"] == 6.0  # the whole budget again for AC and the final check
    before, after = onnx.load(str(src)), onnx.load(str(out))
    old = {t.name: t for t in before.graph.initializer}
    new = {t.name: t for t in after.graph.initializer}
    rewritten = {r["name"] for r in first["rewritten"]}
    assert rewritten and rewritten <= set(old) and {r["name"] for r in rep.rewritten} == rewritten
    for name, t in old.items():
        a, b = numpy_helper.to_array(t), numpy_helper.to_array(new[name])
        assert (new[name].data_type, list(new[name].dims)) == (t.data_type, list(t.dims))
        assert np.array_equal(a, b) != (name in rewritten), name
    points = [n.output[0] for n in before.graph.node if n.op_type in ("Relu", "GlobalAveragePool")]
    added = [n for n in after.graph.node if n.name not in {m.name for m in before.graph.node}]
    assert all(n.op_type == "Min" for n in added) and sorted(n.input[0] for n in added) == sorted(points)
    assert sorted(rep.added_nodes) == sorted(n.name for n in added)
    assert any(n.startswith("sau-ac: SAU rewrote") for n in rep.notes)
    xs = _images(5, 3)[0]
    assert _run(out, xs[:1]).shape == (1, CLASSES) and _run(out, xs).shape == (5, CLASSES)


def test_fst_head_rewrites_only_the_classifier_and_walks_alpha(backdoored, tmp_path):
    """fst-head: only the classifier's weight and bias change; alpha walks 0.02, 0.05, ... while the validation
    images stay within the budget (a generous budget: every step within, so all four are tried)."""
    import onnx
    from onnx import numpy_helper

    import onnxclp

    src, out = backdoored[0], tmp_path / "fst-head.onnx"
    rep = onnxclp.sanitize_file(src, out, method="fst-head", context=_ctx(backdoored[1]), epochs=1)
    ladder = rep.training["alpha_ladder"]
    assert [s["alpha"] for s in ladder] == [0.02, 0.05, 0.1, 0.2] and all(s["within"] for s in ladder)
    assert rep.training["settings"]["alpha"] == 0.2 and rep.training["settings"]["scope"] == "head"
    before, after = onnx.load(str(src)), onnx.load(str(out))
    old = {t.name: numpy_helper.to_array(t) for t in before.graph.initializer}
    new = {t.name: numpy_helper.to_array(t) for t in after.graph.initializer}
    changed = {k for k in old if not np.array_equal(old[k], new[k])}
    head = next(n for n in before.graph.node if n.op_type in ("Gemm", "MatMul"))
    assert changed and changed <= set(head.input[1:])
    rep = onnxclp.sanitize_file(src, out, method="fst-head", context=_ctx(backdoored[1]), epochs=1, fst_alpha=0.05)
    assert [s["alpha"] for s in rep.training["alpha_ladder"]] == [0.05]  # a given alpha is kept


def test_clp_npd_fst_adds_the_polarizer_and_rewrites_only_the_classifier(backdoored, tmp_path):
    """clp-npd-fst: NPD's one Conv, the pruned channels zero, the classifier rewritten by the third stage (a
    generous budget: an alpha is within), every other initializer the input's; with a zero budget the third stage
    is skipped and said so."""
    import onnx
    from onnx import numpy_helper

    import onnxclp

    src, out = backdoored[0], tmp_path / "cnf.onnx"
    rep = onnxclp.sanitize_file(src, out, method="clp-npd-fst", context=_ctx(backdoored[1]), epochs=1)
    before, after = onnx.load(str(src)), onnx.load(str(out))
    assert len(after.graph.node) == len(before.graph.node) + 1 and len(rep.added_nodes) == 1
    head = next(n for n in before.graph.node if n.op_type in ("Gemm", "MatMul"))
    old = {t.name: numpy_helper.to_array(t) for t in before.graph.initializer}
    new = {t.name: numpy_helper.to_array(t) for t in after.graph.initializer}
    pruned = {layer.weight for layer in rep.layers if layer.pruned}
    biases = {n.input[2] for n in before.graph.node if len(n.input) > 2 and n.input[1] in pruned}
    changed = {k for k in old if not np.array_equal(old[k], new[k])}
    assert set(head.input[1:]) & changed and changed <= set(head.input[1:]) | pruned | biases
    assert rep.training["alpha_ladder"] and rep.training["npd"]["settings"]["npd_layer"]
    assert any("classifier re-learnt at alpha" in n for n in rep.notes)


def test_ac_adds_one_min_per_relu_and_pool_and_records_the_walk(backdoored, tmp_path):
    """ac: one Min node per Relu and GlobalAveragePool output (bounds [1, C, 1, 1], float32), readers rewired, every weight kept, the
    metadata names the nodes; the output runs at any batch; the weight walk is recorded."""
    import onnx
    from onnx import numpy_helper

    import onnxclp

    src = _with_metadata(backdoored[0], tmp_path / "in.onnx")
    out = tmp_path / "ac.onnx"
    rep = onnxclp.sanitize_file(src, out, method="ac", context=_ctx(backdoored[1]), epochs=2)
    before, after = onnx.load(str(src)), onnx.load(str(out))
    onnx.checker.check_model(after, full_check=True)
    points = [n.output[0] for n in before.graph.node if n.op_type in ("Relu", "GlobalAveragePool")]
    added = [n for n in after.graph.node if n.name not in {m.name for m in before.graph.node}]
    assert len(added) == len(points) == rep.training["settings"]["ac_tensors"] == 5  # 4 ReLUs, 1 pool
    assert all(n.op_type == "Min" for n in added) and sorted(rep.added_nodes) == sorted(n.name for n in added)
    assert sorted(n.input[0] for n in added) == sorted(points)
    for n in added:  # only the Min reads the Relu's output; the former readers read the Min's
        assert [m.name for m in after.graph.node if n.input[0] in m.input] == [n.name]
        assert {m.name for m in after.graph.node if n.output[0] in m.input} == {
            m.name for m in before.graph.node if n.input[0] in m.input
        }
    new = {t.name: numpy_helper.to_array(t) for t in after.graph.initializer}
    old = {t.name: numpy_helper.to_array(t) for t in before.graph.initializer}
    assert all(np.array_equal(v, new[k]) for k, v in old.items()) and not rep.rewritten
    for n in added:
        z = new[n.input[1]]
        assert z.dtype == np.float32 and z.shape[0] == 1 and z.ndim == 4 and (z > 0).all()
    meta = {p.key: p.value for p in after.metadata_props}
    assert sorted(json.loads(meta["onnxclp.added_nodes"])) == sorted(rep.added_nodes) and meta["owner"] == "someone"
    settings = rep.training["settings"]
    assert settings["ac_first_mean_margin"] > 0 and len(settings["ac_last_margins"]) == CLASSES
    ladder = rep.training["weight_ladder"]  # walked while each run stayed within the (100-point) budget
    assert [r["weight"] for r in ladder] == [1.0, 4.0, 16.0, 64.0] and settings["ac_weight"] == 64.0
    assert all(r["whole_run_within"] for r in ladder)
    assert len(settings["ac_bound_ratio_median"]) == 5 and all(
        v > 0 for v in settings["ac_bound_ratio_median"].values()
    )
    xs = _images(5, 3)[0]
    assert _run(out, xs[:1]).shape == (1, CLASSES) and _run(out, xs).shape == (5, CLASSES)


def _normalised(src: Path, dst: Path, mean: float, std: float, record: bool) -> Path:
    """``src`` taking ``(x - mean) / std`` instead of pixels ``x`` (a Mul and an Add put the pixels back first), with
    the normalisation recorded in its metadata when ``record``: the same network, fed as models that were trained on
    normalised images are."""
    import onnx
    from onnx import helper, numpy_helper

    from onnxclp.eval.normalize import set_normalization

    m = onnx.load(str(src))
    m.graph.input[0].name = "xn"
    m.graph.initializer.extend([numpy_helper.from_array(np.array(std, np.float32), "n_std"),
                                numpy_helper.from_array(np.array(mean, np.float32), "n_mean")])  # fmt: skip
    m.graph.node.insert(0, helper.make_node("Add", ["xs", "n_mean"], ["x"]))
    m.graph.node.insert(0, helper.make_node("Mul", ["xn", "n_std"], ["xs"]))
    if record:
        set_normalization(m, [mean] * 3, [std] * 3)
    onnx.save(m, dst)
    return dst


def test_sanitize_reads_the_normalisation_the_model_records(backdoored, tmp_path):
    """A model that records its normalisation in its metadata (as evaluate and scan read it) gets its clean images
    normalised that way by sanitize too: the guard measures the input at the accuracy the raw-pixel network has
    on the same images, and the report says where the normalisation came from. --mean/--std still override it."""
    import onnxclp

    ctx = {**_ctx(backdoored[1]), "max_acc_drop": 100.0}
    plain = onnxclp.sanitize_file(backdoored[0], tmp_path / "a.onnx", method="lpp", context=ctx)
    src = _normalised(backdoored[0], tmp_path / "n.onnx", 0.5, 0.25, record=True)
    rep = onnxclp.sanitize_file(src, tmp_path / "b.onnx", method="lpp", context=dict(ctx))
    assert rep.guard["acc_before"] == plain.guard["acc_before"] > 0.5
    assert any("from the model's metadata (onnxclp.normalize)" in n for n in rep.notes)
    given = onnxclp.sanitize_file(src, tmp_path / "c.onnx", method="lpp",
                                  context={**ctx, "mean": [0.0], "std": [1.0]})  # fmt: skip
    assert not any("metadata" in n for n in given.notes) and given.guard["acc_before"] != plain.guard["acc_before"]


def _eight_bit(src: Path, dst: Path) -> Path:
    """``src`` taking uint8 pixels 0..255 (a Cast and a division by 255 first), as TensorFlow-style exports do."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    m = onnx.load(str(src))
    m.graph.input[0].name = "x8"
    m.graph.input[0].type.tensor_type.elem_type = TensorProto.UINT8
    m.graph.initializer.append(numpy_helper.from_array(np.array(255.0, np.float32), "n_255"))
    m.graph.node.insert(0, helper.make_node("Div", ["xf", "n_255"], ["x"]))
    m.graph.node.insert(0, helper.make_node("Cast", ["x8"], ["xf"], to=TensorProto.FLOAT))
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, dst)
    return dst


def test_an_eight_bit_input_is_fed_pixels_0_to_255(backdoored, tmp_path):
    """A uint8 image input takes pixels 0..255: evaluate, the guard (onnxruntime, rounded to integers) and the torch
    bridge (floats 0..255 through the graph's Cast) feed it so, without --mean/--std, and measure what the float
    network measures on the same images; a repair trains on it and writes a model that keeps the uint8 input.
    Before, evaluate and sanitize refused it ('needs a float image input') and MM-BD searched [0, 1]."""
    import onnx
    from onnx import TensorProto

    import onnxclp
    from onnxclp.eval.runner import OnnxClassifier

    src = _eight_bit(backdoored[0], tmp_path / "u8.onnx")
    ctx = {**_ctx(backdoored[1]), "max_acc_drop": 100.0}
    plain = onnxclp.sanitize_file(backdoored[0], tmp_path / "a.onnx", method="ft", context=ctx, epochs=1)
    rep = onnxclp.sanitize_file(src, tmp_path / "b.onnx", method="ft", context=dict(ctx), epochs=1)
    assert rep.guard["acc_before"] == plain.guard["acc_before"] > 0.5
    assert any("8-bit (pixels 0..255)" in n for n in rep.notes)
    out = onnx.load(str(tmp_path / "b.onnx"))
    assert out.graph.input[0].type.tensor_type.elem_type == TensorProto.UINT8
    xs, _ = _images(20, 9)
    clf = OnnxClassifier(str(src), device="cpu")
    ref = OnnxClassifier(str(backdoored[0]), device="cpu").predict(np.round(xs * 255) / 255)
    assert clf.input.dtype == np.uint8 and np.array_equal(clf.predict(xs * 255), ref)
    from onnxclp.defences.run import ModelRun
    from onnxclp.eval.normalize import EIGHT_BIT

    run = ModelRun(None, (3, SIZE, SIZE), 1, None, None, "cpu")  # what MM-BD, OTBR and the synthesis feed it
    assert run.normalization(onnx.load(str(src))) == ([0.0], [1.0 / 255.0], EIGHT_BIT)


def test_the_guard_refuses_when_the_input_scores_near_a_constant_answer(backdoored, tmp_path):
    """Real labels, but the images fed the wrong way (a normalisation the model was not trained with): the input
    scores about what answering one class scores, so no drop the guard measures can show a result is not broken.
    Refused (exit 5) with the reason and what to check; --force writes it with a warning."""
    import onnxclp
    from onnxclp.guard import Refused

    src = _normalised(backdoored[0], tmp_path / "n.onnx", 0.5, 0.004, record=False)  # fed raw pixels: saturated
    ctx = {**_ctx(backdoored[1]), "max_acc_drop": 3.0}
    with pytest.raises(Refused, match=r"the input model scores .*Check that --mean/--std, the labels") as err:
        onnxclp.sanitize_file(src, tmp_path / "out.onnx", method="lpp", context=ctx)
    assert err.value.exit_code == 5 and not (tmp_path / "out.onnx").exists()
    rep = onnxclp.sanitize_file(src, tmp_path / "out.onnx", method="lpp", context=ctx, force=True)
    assert rep.guard["forced"] and any("cannot check" in n for n in rep.notes)


def _half(src: Path, dst: Path) -> Path:
    """``src`` as a float16 graph (what ``model.half()`` exports): float initializers, input and output in float16."""
    import onnx
    from onnx import TensorProto, numpy_helper

    m = onnx.load(str(src))
    for t in m.graph.initializer:
        if t.data_type == TensorProto.FLOAT:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    for vi in (*m.graph.input, *m.graph.output):
        vi.type.tensor_type.elem_type = TensorProto.FLOAT16
    del m.graph.value_info[:]
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, dst)
    return dst


@pytest.mark.parametrize(("method", "params"), [("npd", {}), ("ac", {"ac_weight": 4.0}), ("ft", {})])
def test_a_float16_graph_is_trained_in_float32_and_written_in_float16(backdoored, tmp_path, method, params):
    """A half-precision export (issue 18: every model a user brings): the bridge computes it in float32, and what
    the method writes back (rewritten weights, NPD's polarizer, AC's bounds) is float16 like the graph, so the result
    passes the full check and runs in onnxruntime at any batch. Before, the bridge failed on the first Conv (float
    input, half bias) and NPD wrote a float32 Conv into a float16 graph."""
    import onnx
    from onnx import TensorProto

    import onnxclp

    src = _half(backdoored[0], tmp_path / "half.onnx")
    out = tmp_path / f"{method}.onnx"
    rep = onnxclp.sanitize_file(src, out, method=method, context=_ctx(backdoored[1]), epochs=1, **params)
    after = onnx.load(str(out))
    onnx.checker.check_model(after, full_check=True)
    before = {t.name for t in onnx.load(str(src)).graph.initializer}
    rewritten = {r["name"] for r in rep.rewritten}
    written = [t for t in after.graph.initializer if t.name not in before or t.name in rewritten]
    assert written and all(t.data_type == TensorProto.FLOAT16 for t in written)
    import onnxruntime as ort

    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    xs = _images(5, 3)[0].astype(np.float16)
    assert sess.run(None, {"x": xs})[0].shape == (5, CLASSES)


def test_ac_weight_given_is_not_walked(backdoored, tmp_path):
    import onnxclp

    rep = onnxclp.sanitize_file(backdoored[0], tmp_path / "ac.onnx", method="ac", context=_ctx(backdoored[1]),
                                epochs=1, ac_weight=2.5)  # fmt: skip
    assert [r["weight"] for r in rep.training["weight_ladder"]] == [2.5]
    assert rep.training["settings"]["ac_weight"] == 2.5


def test_ac_bounds_at_the_clean_maximum_change_no_fit_image(backdoored):
    """Before training, every bound is its channel's largest value over the fit images: those images' logits
    are exactly the input's."""
    import torch

    from onnxclp.bridge import to_torch
    from onnxclp.io import load_model
    from onnxclp.methods.ac import _bounded, _cap, _channel_max

    model, store = load_model(backdoored[0])
    module = to_torch(model, store=store).eval()
    x = torch.tensor(_images(64, 7)[0])
    with torch.no_grad():
        ref = module(x)
    chosen, left = _bounded(module, x[:2])
    assert len(chosen) == 5 and left == 0 and all(rank == 4 for *_, rank in chosen)
    tops = _channel_max(module, [t for t, *_ in chosen], x)
    for t, *_ in chosen:
        module.set_tap(t, _cap(tops[t]))
    with torch.no_grad():
        assert torch.equal(module(x), ref)
        lowered = {t: _cap(tops[t] * 0.5) for t, *_ in chosen}
        for t, cap in lowered.items():
            module.set_tap(t, cap)
        assert not torch.equal(module(x), ref)


def _activation_net(tmp_path: Path, activation: str, pool: bool, instance_norm: bool = False) -> Path:
    """Conv -> (InstanceNormalization) -> ``activation`` -> (ReduceMean over H, W, or Flatten) -> Gemm, random
    weights, opset 13."""
    import onnx
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    width = 8 if pool else 8 * SIZE * SIZE
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.normal(0, 0.3, (CLASSES, width)).astype(np.float32), "fc"),
             numpy_helper.from_array(np.ones(8, np.float32), "gamma"),
             numpy_helper.from_array(np.zeros(8, np.float32), "beta")]  # fmt: skip
    norm = [helper.make_node("InstanceNormalization", ["c0", "gamma", "beta"], ["c"])] if instance_norm else []
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c0" if instance_norm else "c"], pads=[1, 1, 1, 1]),
        *norm,
        helper.make_node(activation, ["c"], ["a"]),
        helper.make_node("ReduceMean", ["a"], ["m"], axes=[2, 3], keepdims=0) if pool
        else helper.make_node("Flatten", ["a"], ["m"]),
        helper.make_node("Gemm", ["m", "fc"], ["y"], transB=1),
    ]  # fmt: skip
    graph = helper.make_graph(nodes, activation, [helper.make_tensor_value_info("x", 1, ["n", 3, SIZE, SIZE])],
                              [helper.make_tensor_value_info("y", 1, ["n", CLASSES])], inits)  # fmt: skip
    src = tmp_path / f"{activation}.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), src)
    return src


@pytest.mark.parametrize(("activation", "instance_norm"), [("LeakyRelu", False), ("Elu", True), ("Softplus", False)])
def test_ac_caps_other_activations_and_a_spatial_reduce_mean(backdoored, tmp_path, activation, instance_norm):
    """Beyond the paper's ReLU: the output of another activation unbounded above (after a Conv, or an
    InstanceNormalization), and a ReduceMean over a channels-first map's spatial axes (a global average pool as
    dynamo exports write it), each get a Min."""
    import onnx

    import onnxclp

    src = _activation_net(tmp_path, activation, pool=True, instance_norm=instance_norm)
    rep = onnxclp.sanitize_file(src, tmp_path / "out.onnx", method="ac", context=_ctx(backdoored[1]), epochs=1)
    after = onnx.load(str(tmp_path / "out.onnx"))
    added = [n for n in after.graph.node if n.op_type == "Min"]
    assert sorted(n.input[0] for n in added) == ["a", "m"] and sorted(rep.added_nodes) == sorted(n.name for n in added)


def test_ac_without_an_activation_or_pool_to_clip_is_exit_3(backdoored, tmp_path):
    """A network whose only activation is a Sigmoid and which flattens its map instead of pooling gives AC
    nothing to clip: exit 3 (nothing this method can sanitize), naming another method, never a bad-input exit 2."""
    import onnxclp
    from onnxclp.errors import EXIT_NOTHING, OnnxclpError

    src = _activation_net(tmp_path, "Sigmoid", pool=False)
    with pytest.raises(OnnxclpError, match=r"nothing to clip.*Sigmoid.*fst-sau-gate") as err:
        onnxclp.sanitize_file(src, tmp_path / "out.onnx", method="ac", context=_ctx(backdoored[1]), epochs=1)
    assert err.value.exit_code == EXIT_NOTHING and not (tmp_path / "out.onnx").exists()


def test_a_model_whose_scores_are_not_finite_is_named_not_blamed_on_the_rate(backdoored, tmp_path):
    """Logits multiplied by inf (as a broken export or the wrong normalisation can give): the loss is not finite
    before any update, and the error says the input's scores are, instead of suggesting a smaller --lr."""
    import onnx
    from onnx import helper, numpy_helper

    import onnxclp
    from onnxclp.errors import OnnxclpError

    m = onnx.load(str(backdoored[0]))
    out = m.graph.output[0].name
    for node in m.graph.node:
        node.output[:] = [f"{o}.pre" if o == out else o for o in node.output]
    m.graph.initializer.append(numpy_helper.from_array(np.array([np.inf], np.float32), "inf"))
    m.graph.node.append(helper.make_node("Mul", [f"{out}.pre", "inf"], [out]))
    src = tmp_path / "inf.onnx"
    onnx.save(m, src)
    with pytest.raises(OnnxclpError, match=r"before any update: .* inf or NaN; check the images") as err:
        onnxclp.sanitize_file(src, tmp_path / "out.onnx", method="ft", context=_ctx(backdoored[1]), epochs=1,
                              force=True)  # fmt: skip
    assert err.value.exit_code == 3 and "smaller --lr will not help" in err.value.message


def test_ac_refuses_an_old_opset_it_cannot_broadcast_at():
    from onnx import helper

    from onnxclp.errors import OnnxclpError
    from onnxclp.methods.ac import insert_caps

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", 1, [1, 2, 3, 3])],
                              [helper.make_tensor_value_info("y", 1, [1, 2, 3, 3])])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 7)])
    with pytest.raises(OnnxclpError, match="opset 8"):
        insert_caps(model, {"y": np.ones((1, 2, 1, 1), np.float32)})


def test_ac_margins_of_given_classes_and_a_class_subset_per_step():
    """margins() of rows with their own classes; with more classes than SEARCH_VALUES lets one step search, each
    step searches a seeded subset (the others keep their inputs) and the report says how many."""
    import torch

    from onnxclp.methods.ac import SEARCH_VALUES, ACObjective, margins

    s = torch.tensor([[1.0, 3.0, 2.0], [0.0, -1.0, 4.0]])
    assert margins(s, torch.tensor([1, 2])).tolist() == [1.0, 4.0]
    assert margins(s[:2, :2]).tolist() == [-2.0, -1.0]  # row k, class k

    class Space:
        lo, hi = torch.tensor(0.0), torch.tensor(1.0)

    obj = ACObjective(1.0)
    obj.space = Space()  # type: ignore[assignment]
    obj.inputs = torch.rand(40, 3, 4, 4)
    obj.per_step, obj.gen = 7, torch.Generator().manual_seed(0)
    before = obj.inputs.clone()
    lin = torch.nn.Linear(48, 40)
    module = lambda x: lin(x.flatten(1))  # noqa: E731
    idx, x = obj._search(module)  # type: ignore[arg-type]
    assert len(idx) == 7 and x.shape == (7, 3, 4, 4)
    moved = (obj.inputs != before).flatten(1).any(1)
    assert set(torch.nonzero(moved).flatten().tolist()) <= set(idx.tolist())
    assert SEARCH_VALUES // (3 * 224 * 224) < 1000 <= SEARCH_VALUES // (3 * 32 * 32) * 3  # ImageNet: a subset


def test_dynamic_height_and_width_take_the_clean_images_size_or_the_input_shape(backdoored, tmp_path):
    """An export with dynamic spatial axes leaves H and W open: the clean images given as arrays (an .npz) give the
    size (session 19; before, every repair asked for --input-shape), and the written model keeps its open axes;
    --input-shape gives it too and must fit; with no images to read a size from (a synthesized set) the repairs say
    to give --input-shape."""
    import onnx

    import onnxclp
    from onnxclp.errors import OnnxclpError

    m = onnx.load(str(backdoored[0]))
    dims = m.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "h", "w"
    src = tmp_path / "dynhw.onnx"
    onnx.save(m, src)
    rep = onnxclp.sanitize_file(src, tmp_path / "a.onnx", method="ac", context=_ctx(backdoored[1]), epochs=1,
                                ac_weight=1.0)  # fmt: skip
    assert rep.guard["acc_before"] > 0.5
    out = onnx.load(str(tmp_path / "a.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert (out[2].dim_param, out[3].dim_param) == ("h", "w")
    ctx = {**_ctx(backdoored[1]), "input_shape": (3, SIZE, SIZE)}
    onnxclp.sanitize_file(src, tmp_path / "b.onnx", method="ac", context=ctx, epochs=1, ac_weight=1.0)
    assert _run(tmp_path / "b.onnx", _images(2, 3)[0]).shape == (2, CLASSES)
    with pytest.raises(OnnxclpError, match="does not fit"):
        onnxclp.sanitize_file(src, tmp_path / "c.onnx", method="ac", context={**ctx, "input_shape": (5, 8, 8)})
    with pytest.raises(OnnxclpError, match="--input-shape C,H,W"):
        onnxclp.sanitize_file(src, tmp_path / "d.onnx", method="ft", epochs=1,
                              context={**_ctx(backdoored[1]), "clean_data": "synthetic:200"})  # fmt: skip


def test_clean_arrays_of_another_size_are_resized_to_the_models(backdoored, tmp_path):
    """Clean images as arrays of another size than the model's fixed input (32 x 32 images, a 16 x 16 network) are
    resized (bilinear, as evaluate's --input-size) and the report's guard entry says so; before, the repairs
    stopped at 'resize them first'."""
    import onnx

    import onnxclp

    m = onnx.load(str(backdoored[0]))
    dims = m.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_value = dims[3].dim_value = SIZE // 2  # fully convolutional with a global pool: any size runs
    src = tmp_path / "small.onnx"
    onnx.save(m, src)
    rep = onnxclp.sanitize_file(src, tmp_path / "out.onnx", method="ft", context=_ctx(backdoored[1]), epochs=1)
    assert f"resized from {SIZE}x{SIZE} to the model's {SIZE // 2}x{SIZE // 2} (bilinear)" in rep.guard["data"]


def _scripted_val_right(monkeypatch, fail_calls: set[int]) -> list[int]:
    """Make the repair loop's per-epoch check read every image wrong on the calls in ``fail_calls`` (1-based) and
    measure the module as usual otherwise; returns the list of calls made (its length is the epochs measured)."""
    from onnxclp.defences import repair

    real, calls = repair.val_right, []

    def fake(module, x, y, batch=256):
        calls.append(len(calls) + 1)
        right = real(module, x, y, batch)
        return np.zeros_like(right) if calls[-1] in fail_calls else right

    monkeypatch.setattr(repair, "val_right", fake)
    return calls


def _sequence_ctx(data: Path) -> dict:
    """No selection part: 120 of the 300 images validate (and test the candidates in sequence), 180 fit."""
    return {**_ctx(data, 3.0), "clean_n": 300, "val_fraction": 0.4, "select_fraction": 0}


def _three_part_ctx(data: Path) -> dict:
    """Sessions 6-13's split of 300 images: 100 validate, 100 choose (the selection part), 100 fit."""
    return {**_ctx(data, 3.0), "clean_n": 300, "val_fraction": 0.2, "select_fraction": 0.2}


def test_without_a_selection_part_each_runs_end_is_tested_in_sequence(backdoored, tmp_path, monkeypatch):
    """--select-fraction 0: the candidate is the run's end, tested on the validation part at the guard's
    confidence; an earlier epoch over budget decides nothing, and a run whose end is over budget is recorded as
    failed; the report and the terminal line say the candidates were tested in sequence. With a selection part
    the latest epoch within budget is kept, as before."""
    import onnxclp
    from onnxclp.guard import GuardResult

    calls = _scripted_val_right(monkeypatch, {2})
    rep = onnxclp.sanitize_file(backdoored[0], tmp_path / "seq.onnx", method="ft", context=_sequence_ctx(backdoored[1]),
                                epochs=4, lr=1e-6)  # fmt: skip
    t = rep.training
    assert len(calls) == 4 and len(t["curve"]) == 4
    assert (t["chosen_epoch"], t["failed_in_sequence"], t["tested_in_sequence"]) == (4, False, True)
    assert [c["within"] for c in t["curve"]] == [True, False, True, True]
    assert (rep.guard["n_val"], rep.guard["n_select"], rep.guard["n_fit"]) == (120, 0, 180)
    assert rep.guard["tested_in_sequence"] and rep.guard["accepted"]
    assert "tested its candidates in sequence" in GuardResult(**rep.guard).summary()

    _scripted_val_right(monkeypatch, {4})
    rep = onnxclp.sanitize_file(backdoored[0], tmp_path / "end.onnx", method="ft", context=_sequence_ctx(backdoored[1]),
                                epochs=4, lr=1e-6)  # fmt: skip
    assert (rep.training["chosen_epoch"], rep.training["failed_in_sequence"]) == (None, True)

    _scripted_val_right(monkeypatch, {4})
    rep = onnxclp.sanitize_file(backdoored[0], tmp_path / "three.onnx", method="ft",
                                context=_three_part_ctx(backdoored[1]), epochs=4, lr=1e-6)  # fmt: skip
    t = rep.training
    assert (t["chosen_epoch"], t["failed_in_sequence"], t["tested_in_sequence"]) == (3, False, False)
    assert not rep.guard["tested_in_sequence"]


def test_in_sequence_the_learning_rate_walk_ends_at_the_first_run_that_fails(backdoored, tmp_path, monkeypatch):
    """The learning-rate walk in sequence: the second rate's end fails, so the walk ends there (no third rate) and
    the result is the first rate's end; with a selection part the second run's first epoch within budget lets the
    walk go on."""
    import onnxclp
    from onnxclp.methods._repair import LR_LADDER

    _scripted_val_right(monkeypatch, {4})  # run 1: epochs 1, 2; run 2: epoch 1, then its end fails
    rep = onnxclp.sanitize_file(backdoored[0], tmp_path / "walk.onnx", method="ft",
                                context=_sequence_ctx(backdoored[1]), epochs=2)  # fmt: skip
    ladder = rep.training["lr_ladder"]
    assert [r["chosen_epoch"] for r in ladder] == [2, None]
    assert (rep.training["settings"]["lr"], rep.training["chosen_epoch"]) == (LR_LADDER[0], 2)
    _scripted_val_right(monkeypatch, {4})
    rep = onnxclp.sanitize_file(backdoored[0], tmp_path / "walk3.onnx", method="ft",
                                context=_three_part_ctx(backdoored[1]), epochs=2)  # fmt: skip
    assert len(rep.training["lr_ladder"]) == 3


def test_choose_count_in_sequence_stops_at_the_first_count_over_budget():
    """ANP's count walk on the validation part: counts tested smallest first, the last within budget before the
    first over it is kept, and a larger count that happens to pass again is not taken."""
    from onnxclp.defences.anp import choose_count, count_grid

    right_before = np.ones(200, dtype=bool)
    grid = count_grid(40)
    fails = {grid[4]}  # the fifth count loses 20 images; every other count loses none

    def measure(count: int) -> np.ndarray:
        right = right_before.copy()
        if count in fails:
            right[:20] = False
        return right

    count, trials = choose_count([("g", i) for i in range(40)], 40, measure, right_before, 3.0, sequence_z=1.28)
    assert count == grid[3] and [t["count"] for t in trials] == grid[:5]
    assert all(t["in_sequence"] for t in trials) and [t["within"] for t in trials] == [True] * 4 + [False]


def test_tuning_steps_up_in_sequence_on_the_validation_part(backdoored, tmp_path):
    """CLP's u without a selection part: the candidates within budget on the fit images are tested on the
    validation part weakest first (largest u first), every one before the last within budget, and the u kept is
    the last within before the first over (the weakest when none is)."""
    import onnxclp

    rep = onnxclp.sanitize_file(backdoored[0], tmp_path / "clp.onnx", method="clp",
                                context={**_sequence_ctx(backdoored[1]), "max_acc_drop": 6.0}, force=True)  # fmt: skip
    back = rep.guard["tuned"]["stepped_back"]
    assert back and all(b["in_sequence"] and b["part"] == "validation" for b in back)
    us = [b["u"] for b in back]
    assert us == sorted(us, reverse=True)
    assert all(b["within"] for b in back[:-1])
    passed = [b for b in back if b["within"]]
    if passed:
        assert rep.params["u"] == passed[-1]["u"]
    assert rep.guard["tested_in_sequence"]


def test_in_sequence_a_first_stage_keeps_the_fit_images_choice(backdoored, tmp_path):
    """clp-ac without a selection part: CLP's u is the fit images' choice, not tested on the validation part (its
    second stage's candidates include it, and a test of its own there would make AC's sequence depend on the
    outcome); the single-stage clp still steps up on the validation part."""
    import onnxclp

    ctx = {**_sequence_ctx(backdoored[1]), "max_acc_drop": 6.0}
    rep = onnxclp.sanitize_file(backdoored[0], tmp_path / "clp-ac.onnx", method="clp-ac", context=ctx, epochs=1,
                                ac_weight=1.0, force=True)  # fmt: skip
    tuned = rep.guard["tuned"]
    assert tuned["stepped_back"] == [] and rep.params["u"] == tuned["parameters"]["u"]
    assert any("a first stage: chosen by the bound on the fit images" in n for n in rep.guard["notes"])
    assert rep.guard["tested_in_sequence"]  # AC's run end was tested there
    rep = onnxclp.sanitize_file(backdoored[0], tmp_path / "clp.onnx", method="clp", context=ctx, force=True)
    assert rep.guard["tuned"]["stepped_back"]


def test_in_sequence_a_failed_first_stage_ends_the_sequence(backdoored, tmp_path, monkeypatch):
    """sau-ac in sequence: SAU's second run fails its test, so its walk ends there and AC does not run (no Min
    node, the note says why): the result is SAU's first run. clp-npd-fst: NPD's end fails, so the classifier stage
    does not run."""
    import onnx

    import onnxclp
    from onnxclp.methods._repair import LR_LADDER

    ctx = {**_sequence_ctx(backdoored[1]), "max_acc_drop": 30.0}
    _scripted_val_right(monkeypatch, {2})  # SAU run 1 (one epoch) passes, run 2's end fails
    out = tmp_path / "sau-ac.onnx"
    rep = onnxclp.sanitize_file(backdoored[0], out, method="sau-ac", context=ctx, epochs=1, sau_epochs=1,
                                sau_steps=1, ac_weight=1.0, force=True)  # fmt: skip
    ladder = rep.training["lr_ladder"]
    assert [s["passed"] for s in ladder] == [True, False] and rep.training["settings"]["lr"] == LR_LADDER[0]
    assert not rep.added_nodes and rep.rewritten
    assert all(n.op_type != "Min" for n in onnx.load(str(out)).graph.node)
    assert any("AC is not run" in n for n in rep.notes)

    _scripted_val_right(monkeypatch, {1})  # NPD's one epoch is its end: it fails
    rep = onnxclp.sanitize_file(backdoored[0], tmp_path / "cnf.onnx", method="clp-npd-fst", context=ctx, epochs=1,
                                force=True)  # fmt: skip
    assert rep.training["failed_in_sequence"] and "alpha_ladder" not in rep.training
    assert any("the classifier stage is not run" in n for n in rep.notes)
    assert len(rep.added_nodes) == 1  # the polarizer, as clp-npd writes it


def test_fst_gate_keeps_the_input_and_consults_the_copy_on_suspects(backdoored, tmp_path):
    """fst-gate on the planted backdoor: the classifier ranks the target first among the suspects; the written
    model keeps every input initializer and node, adds the copy (its rewritten initializers under the gate's
    prefix) and the gate, keeps the output's name and runs at any batch; its answers differ from the input's only
    on images the input gives a suspect; the suspect walk is in the report, and with a generous budget it widens
    to every class."""
    import onnx

    import onnxclp
    from onnxclp.methods._gate import PREFIX

    src, out = backdoored[0], tmp_path / "gate.onnx"
    rep = onnxclp.sanitize_file(src, out, method="fst-gate", context=_ctx(backdoored[1]), epochs=2)
    gate = rep.training["gate"]
    assert gate["order"][0] == TARGET and sorted(gate["order"]) == list(range(CLASSES))
    walk = [(s["suspects"], s["confidence"]) for s in gate["ladder"]]
    assert walk == [(1, 0.99), (1, 0.9), (1, 0.5), (1, 0.0), (2, 0.0), (3, 0.0), (4, 0.0)]
    assert gate["suspects"] == gate["order"] and gate["confidence"] == 0.0
    before, after = onnx.load(str(src)), onnx.load(str(out))
    old = {t.name: t for t in before.graph.initializer}
    new = {t.name: t for t in after.graph.initializer}
    assert all(new[k].SerializeToString() == v.SerializeToString() for k, v in old.items())
    assert {n.name for n in before.graph.node} <= {n.name for n in after.graph.node}
    copied = [k for k in new if k.startswith(PREFIX) and k[len(PREFIX) :] in old]
    assert copied and not rep.rewritten and len(rep.added_nodes) > len(before.graph.node)
    # the terminal: no empty layer table and no "not scored" line for a repair; the totals say what it changed
    from rich.console import Console

    from onnxclp.render import print_report, render_plain

    out_rich = io.StringIO()
    print_report(rep, Console(file=out_rich, width=100, highlight=False))
    for text in (render_plain(rep), out_rich.getvalue()):
        assert f"no channel scored or pruned (a repair); {len(rep.added_nodes)} nodes added" in text
        assert "not scored by" not in text and "pruned  " not in text and "mean" not in text
    assert any(s.reason.startswith("fully connected: not scored") for s in rep.skipped)  # the JSON keeps them
    assert {c["name"] for c in rep.training["copied"]} == {k[len(PREFIX) :] for k in copied}
    assert [o.name for o in after.graph.output] == [o.name for o in before.graph.output]
    x = _images(40, 9)[0]
    xt = _trigger(x)
    m, g = _run(src, np.concatenate([x, xt])), _run(out, np.concatenate([x, xt]))
    assert _run(out, x[:1]).shape == (1, CLASSES)
    moved = (m != g).any(axis=1)
    assert np.isin(m.argmax(1)[moved], gate["suspects"]).all()
    asr_in, asr_out = (m.argmax(1)[40:] == TARGET).mean(), (g.argmax(1)[40:] == TARGET).mean()
    assert asr_out <= asr_in


def _without_class(data: Path, cls: int, keep: int, folder: Path) -> Path:
    """The clean images of ``data`` with all but ``keep`` of class ``cls`` left out."""
    with np.load(data) as d:
        x, y = d["x_test"], d["y_test"]
    mask = (y != cls) | (np.cumsum(y == cls) <= keep)
    out = folder / f"without{cls}.npz"
    np.savez(out, x_test=x[mask], y_test=y[mask])
    return out


def _suspect_order(model: Path) -> list[int]:
    """fst-gate's suspect order for ``model``, from its classifier weight (the test fixture's Gemm)."""
    import onnx
    from onnx import numpy_helper

    from onnxclp.detect.classifier import anomaly_index, class_excess

    m = onnx.load(str(model))
    gemm = next(n for n in m.graph.node if n.op_type == "Gemm")
    w = numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == gemm.input[1]))
    a = anomaly_index(class_excess(w))
    return [int(c) for c in np.argsort(-np.abs(a), kind="stable")]


def test_the_gate_refuses_a_first_suspect_the_validation_images_barely_hold(backdoored, tmp_path):
    """The gate changes answers only on images the input gives a suspect: with (almost) no validation images of
    the first suspect the result is refused before any training (exit 5, the reason named); with --force it is
    written, the guard's verdict refused with the blindness note."""
    import onnxclp
    from onnxclp.errors import EXIT_REFUSED, OnnxclpError
    from onnxclp.guard import BLIND_NOTE

    data = _without_class(backdoored[1], TARGET, 1, tmp_path)
    out = tmp_path / "gate.onnx"
    with pytest.raises(OnnxclpError) as exc:
        onnxclp.sanitize_file(backdoored[0], out, method="fst-gate", context=_ctx(data, budget=3.0), epochs=1)
    assert exc.value.exit_code == EXIT_REFUSED and f"first suspect, class {TARGET}" in exc.value.message
    assert not out.exists()
    rep = onnxclp.sanitize_file(backdoored[0], out, method="fst-gate", context=_ctx(data, budget=3.0), epochs=1,
                                force=True)  # fmt: skip
    assert out.exists() and rep.guard["accepted"] is False
    assert any(n.startswith(BLIND_NOTE) and "first suspect" in n for n in rep.guard["notes"])


def test_the_gate_walk_ends_before_a_suspect_set_it_cannot_measure(backdoored, tmp_path):
    """A wider suspect set holding a class with too few validation images is not tested: the walk ends before it
    (the ladder says which class), and the result keeps the narrower gate."""
    import onnxclp

    order = _suspect_order(backdoored[0])
    assert order[0] == TARGET
    data = _without_class(backdoored[1], order[1], 1, tmp_path)
    rep = onnxclp.sanitize_file(backdoored[0], tmp_path / "gate.onnx", method="fst-gate", context=_ctx(data),
                                epochs=1)  # fmt: skip
    ladder = rep.training["gate"]["ladder"]
    assert [e["suspects"] for e in ladder] == [1, 1, 1, 1, 2]
    assert ladder[-1]["unmeasurable"] == [order[1]] and ladder[-1]["drop"] is None
    assert rep.training["gate"]["suspects"] == [TARGET]


@pytest.fixture(scope="module")
def allconv(tmp_path_factory) -> Path:
    """The planted backdoor in an all-convolutional network: the logits are a 3x3 convolution's class maps,
    globally pooled (no layer the classifier detector reads as the classifier: it reads a fully connected layer
    or a 1x1 convolution)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c0 = nn.Conv2d(3, 12, 3, padding=1)
            self.c1 = nn.Conv2d(12, 16, 3, stride=2, padding=1)
            self.head = nn.Conv2d(16, CLASSES, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = F.relu(self.c1(F.relu(self.c0(x))))
            return F.adaptive_avg_pool2d(self.head(h), 1).flatten(1)

    torch.manual_seed(0)
    net = _planted(Net(), 8)
    path = tmp_path_factory.mktemp("allconv") / "allconv.onnx"
    torch.onnx.export(net, torch.rand(2, 3, SIZE, SIZE), path, dynamo=False, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})  # fmt: skip
    return path


def test_the_gate_ranks_by_mmbd_where_the_classifier_cannot_be_read(allconv, backdoored, tmp_path):
    """An all-convolutional head (a 3x3 Conv to the classes, global pool) has no classifier layer the weight ranking reads: the
    gate ranks the suspects by MM-BD's margins instead (the report says so and why), and the result answers as
    the input wherever the input's class is not a kept suspect; ``--suspects-from classifier`` refuses it (exit 3,
    naming the other ranking); on the planted backdoor MM-BD ranks the target first."""
    import onnxclp
    from onnxclp.errors import OnnxclpError

    with pytest.raises(OnnxclpError) as exc:
        onnxclp.sanitize_file(allconv, tmp_path / "no.onnx", method="fst-gate", context=_ctx(backdoored[1]),
                              epochs=1, suspects_from="classifier")  # fmt: skip
    assert exc.value.exit_code == 3 and "--suspects-from mmbd" in exc.value.message
    out = tmp_path / "gate.onnx"
    rep = onnxclp.sanitize_file(allconv, out, method="fst-gate", context=_ctx(backdoored[1]), epochs=1)
    gate = rep.training["gate"]
    assert gate["ranked_by"] == "mmbd" and "anomaly_index" not in gate
    assert "classifier layer cannot be read" in gate["ranking_fallback"]
    assert sorted(gate["order"]) == list(range(CLASSES)) and gate["margins"] == sorted(gate["margins"])[::-1]
    assert any("MM-BD's maximum margins: the classifier layer cannot be read" in n for n in rep.notes)
    x = _images(40, 9)[0]
    m, g = _run(allconv, x), _run(out, x)
    assert _run(out, x[:3]).shape == (3, CLASSES)
    moved = (m != g).any(axis=1)
    assert np.isin(m.argmax(1)[moved], gate["suspects"]).all()
    rep = onnxclp.sanitize_file(backdoored[0], tmp_path / "mm.onnx", method="fst-gate", context=_ctx(backdoored[1]),
                                epochs=1, suspects_from="mmbd")  # fmt: skip
    gate = rep.training["gate"]
    assert gate["ranked_by"] == "mmbd" and gate["order"][0] == TARGET and "ranking_fallback" not in gate


@pytest.mark.parametrize("softmax_first", [False, True])
def test_the_gate_on_a_model_that_returns_logits_and_softmax(backdoored, tmp_path, softmax_first):
    """The planted backdoor exported with its softmax beside its logits. Logits first: the softmax output follows
    the gated logits. Softmax first: the gate reads and writes the softmax, and the notes say the logits output
    stays the input network's."""
    import onnx
    from onnx import TensorProto, helper

    import onnxclp

    m = onnx.load(str(backdoored[0]))
    (y,) = m.graph.output
    m.graph.node.append(helper.make_node("Softmax", [y.name], ["probs"], name="softmax", axis=1))
    probs = helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["n", CLASSES])
    outputs = [probs, y] if softmax_first else [y, probs]
    del m.graph.output[:]
    m.graph.output.extend(outputs)
    src, out = tmp_path / "two.onnx", tmp_path / "gate.onnx"
    onnx.save(m, src)
    rep = onnxclp.sanitize_file(src, out, method="fst-gate", context=_ctx(backdoored[1]), epochs=1)
    import onnxruntime as ort

    x = _images(60, 9)[0].astype(np.float32)
    first, second = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    ungated = [n for n in rep.notes if "stay the input network's" in n]
    if softmax_first:
        assert ungated and repr([y.name]) in ungated[0]
        np.testing.assert_allclose(first.sum(1), 1.0, rtol=1e-5)
    else:
        assert not ungated
        e = np.exp(first - first.max(1, keepdims=True))
        np.testing.assert_allclose(second, e / e.sum(1, keepdims=True), rtol=1e-5, atol=1e-6)


def test_fst_sau_gate_walks_the_first_copy_then_both(backdoored, tmp_path):
    """fst-sau-gate on the planted backdoor, with a budget that lets the walk run: FST's copy alone behind the first
    suspect at the highest bar, then SAU's copy trained and both behind it, the sure moves on the first suspect
    added, the joint moves at falling bars, the lower bars, then wider suspect sets each preceded by its sure and
    joint moves; the written model holds both
    copies (each under its prefix), answers as the input where the input's class is not a kept suspect, and the
    report records SAU's copy and its per-class count of unlearnt images."""
    import onnx

    import onnxclp
    from onnxclp.methods._gate import PREFIX, copy_prefix
    from onnxclp.methods.fst_gate import FINE_CONFIDENCES, candidates

    src, out = backdoored[0], tmp_path / "gate2.onnx"
    rep = onnxclp.sanitize_file(src, out, method="fst-sau-gate", context=_ctx(backdoored[1]), epochs=2,
                                sau_epochs=1)  # fmt: skip
    gate = rep.training["gate"]
    walk = [(s["copies"], s["suspects"], s["confidence"], s["sure_suspects"], s["joint_suspects"],
             s["joint_confidence"]) for s in gate["ladder"]]  # fmt: skip
    assert walk == [tuple(c) for c in candidates(CLASSES, 2, sure=True, bars=FINE_CONFIDENCES)]
    lower = FINE_CONFIDENCES[1:]  # 0.98 ... 0.5, 0
    assert walk[:3] == [(1, 1, 0.99, 0, 0, 0.0), (2, 1, 0.99, 0, 0, 0.0), (2, 1, 0.99, 1, 0, 0.0)]
    assert walk[3 : 3 + len(lower)] == [(2, 1, 0.99, 1, 1, b) for b in lower]
    i = 3 + len(lower)
    assert walk[i : i + len(lower)] == [(2, 1, c, 1, 1, 0.0) for c in lower[:-1]] + [(2, 1, 0.0, 0, 0, 0.0)]
    i += len(lower)
    assert walk[i : i + 2] == [(2, 1, 0.0, 2, 2, 0.0), (2, 2, 0.0, 0, 0, 0.0)] and walk[-1] == (
        2,
        CLASSES,
        0.0,
        0,
        0,
        0.0,
    )
    assert gate["copies"] == 2 and gate["suspects"] == gate["order"]
    (sau,) = gate["further_copies"]
    assert sau["objective"] == "sau" and sau["used"] and sau["copied"]
    counts = sau["settings"]["unlearned_per_class"]
    assert len(counts) == CLASSES and sum(counts) == sau["settings"]["unlearned"]
    after = onnx.load(str(out))
    names = {t.name for t in after.graph.initializer}
    assert any(n.startswith(PREFIX) for n in names) and any(n.startswith(copy_prefix(1)) for n in names)
    x = _images(40, 11)[0]
    m, g = _run(src, x), _run(out, x)
    moved = (m != g).any(axis=1)
    assert np.isin(m.argmax(1)[moved], gate["suspects"]).all()


def _labelled_by(model_path: Path, n: int, folder: Path) -> tuple[Path, np.ndarray, str, bool]:
    """``n`` random uint8 images of the model's input size, labelled with the model's own answers (onnxruntime,
    one image at a time for a graph fixed at batch 1); the npz, the float images as fed, the input's name and
    whether the input is NHWC."""
    import onnx
    import onnxruntime as ort

    m = onnx.load(str(model_path))
    weights = {t.name for t in m.graph.initializer}
    (data,) = [i for i in m.graph.input if i.name not in weights]
    shape = [d.dim_value for d in data.type.tensor_type.shape.dim]
    nhwc = shape[-1] in (1, 3) and shape[1] not in (1, 3)
    h, w, c = shape[1:] if nhwc else (shape[2], shape[3], shape[1])
    x = np.random.default_rng(0).integers(0, 256, (n, h, w, c), dtype=np.uint8)
    xf = x.astype(np.float32) / 255 if nhwc else x.transpose(0, 3, 1, 2).astype(np.float32) / 255
    s = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    y = np.concatenate([s.run(None, {data.name: xf[i : i + 1]})[0].reshape(1, -1).argmax(1) for i in range(n)])
    out = folder / "clean.npz"
    np.savez(out, x_test=x, y_test=y)
    return out, xf, data.name, nhwc


@pytest.mark.parametrize("which", ["squeezenet", "keras"])
def test_the_gate_on_a_model_zoo_classic_and_a_keras_export(which, tmp_path):
    """fst-gate end to end on the ONNX Model Zoo's SqueezeNet as the onnx package ships it (opset 9, IR version 3,
    every initializer a graph input, a batch fixed at 1; random weights) and on tf2onnx's Keras CNN (NHWC input, a
    Transpose first, opset 17 with the ai.onnx.ml domain): the written model passes onnx's full check, keeps the
    IR version, opsets and input, declares its new initializers as graph inputs where IR 3 requires it, runs in
    onnxruntime, and answers as the input wherever the input's class is not a kept suspect."""
    import glob
    import os

    import onnx
    import onnxruntime as ort

    import onnxclp

    if which == "squeezenet":
        from test_compat_opsets import _LIGHT, realize

        found = glob.glob(os.path.join(_LIGHT, "light_squeezenet.onnx"))
        if not found:
            pytest.skip("this onnx package ships no light test models")
        src = tmp_path / "squeezenet.onnx"
        onnx.save(realize(found[0]), src)
    else:
        src = Path(__file__).parent / "models" / "keras_cnn.onnx"
    data, x, name, nhwc = _labelled_by(src, 140, tmp_path)
    out = tmp_path / "gate.onnx"
    ctx = {"clean_data": data, "clean_n": 140, "max_acc_drop": 100.0, "quiet": True}
    rep = onnxclp.sanitize_file(src, out, method="fst-gate", context=ctx, epochs=1, force=True)
    before, after = onnx.load(str(src)), onnx.load(str(out))
    onnx.checker.check_model(after, full_check=True)
    assert after.ir_version == before.ir_version and list(after.opset_import) == list(before.opset_import)
    assert after.graph.input[0] == before.graph.input[0] and nhwc == (which == "keras")
    if after.ir_version < 4:
        assert {t.name for t in after.graph.initializer} <= {i.name for i in after.graph.input}
    gate = rep.training["gate"]
    a = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for i in range(4):  # one image at a time: SqueezeNet's graph is fixed at batch 1
        m, g = a.run(None, {name: x[i : i + 1]})[0], b.run(None, {name: x[i : i + 1]})[0]
        assert g.shape == m.shape
        if m.reshape(1, -1).argmax(1)[0] not in gate["suspects"]:
            np.testing.assert_array_equal(g, m)


def test_the_gate_on_a_binary_classifier(backdoored, tmp_path):
    """Two classes: the classifier ranking needs three, so the gate ranks by MM-BD's two margins (no null is
    fitted to one margin: the result says so) and writes a model that answers as the input outside the suspects."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    import onnxclp

    m = onnx.load(str(backdoored[0]))
    gemm = next(n for n in m.graph.node if n.op_type == "Gemm")
    for t in m.graph.initializer:
        if t.name in gemm.input[1:]:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t)[:2].copy(), t.name))
    m.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 2
    src = tmp_path / "binary.onnx"
    onnx.save(m, src)
    data, x, name, _ = _labelled_by(src, 160, tmp_path)
    out = tmp_path / "gate.onnx"
    rep = onnxclp.sanitize_file(src, out, method="fst-gate", context=_ctx(data), epochs=1)
    gate = rep.training["gate"]
    assert gate["ranked_by"] == "mmbd" and "2 classes (need 3)" in gate["ranking_fallback"]
    assert sorted(gate["order"]) == [0, 1]
    a, g = (
        ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {name: x})[0] for p in (src, out)
    )
    assert g.shape == (len(x), 2)
    keep = ~np.isin(a.argmax(1), gate["suspects"])
    np.testing.assert_array_equal(g[keep], a[keep])


def _qdq(src: Path, dst: Path) -> Path:
    """``src`` quantized by onnxruntime's ``quantize_static`` in the QDQ format, int8 weights per channel: every
    weight an integer initializer read through a DequantizeLinear, every activation quantized and dequantized."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    x = _images(32, 7)[0]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"x": x[i : i + 1]} for i in range(len(x))])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True)
    return dst


def test_a_qdq_graph_runs_exactly_and_its_weights_train_as_floats(backdoored, tmp_path):
    """The bridge on a QDQ export (issue 18: every model a user brings): the same answers as onnxruntime; the
    integer weights are float parameters whose write-back is the file's integers again; a quantized activation
    passes the straight-through gradient, so an input can be optimised through it (before: no parameter at all,
    and 'element 0 of tensors does not require grad' in every training repair and in MM-BD)."""
    import torch

    from onnxclp.bridge import load

    src = _qdq(backdoored[0], tmp_path / "qdq.onnx")
    x = _images(6, 3)[0]
    module = load(src)
    assert module.float_initializer_names and all(
        module._dtype[n].kind == "i" for n in module.float_initializer_names
    )  # every trainable tensor is an integer weight (scales and zero points are not trained)
    with torch.no_grad():
        np.testing.assert_allclose(module(torch.from_numpy(x)).numpy(), _run(src, x), rtol=0, atol=1e-5)
    import onnx
    from onnx import numpy_helper

    stored = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(src)).graph.initializer}
    values = module.state_to_onnx()
    assert all(np.array_equal(values[n], stored[n]) and values[n].dtype == stored[n].dtype for n in values)
    xt = torch.from_numpy(x).requires_grad_(True)
    module(xt).sum().backward()
    assert float(xt.grad.abs().sum()) > 0
    name = next(n for n in module.float_initializer_names if stored[n].dtype == np.int8)
    with torch.no_grad():
        module.param_for(name).mul_(1000.0)  # far past the int8 range at the file's scale
    assert np.abs(module.state_to_onnx([name])[name]).max() >= 127 and module.quantization_clipped[name] > 0
    # read as floats (the input searches): no QuantizeLinear left, the folded ReLUs kept, so the answers are the
    # float export's up to the weights' rounding, and a margin is not capped by the calibration range
    from onnxclp.bridge import to_torch

    floats = to_torch(onnx.load(str(src)), float_activations=True)
    assert not any(op == "QuantizeLinear" for op, *_ in floats._plan)
    with torch.no_grad():
        got = floats(torch.from_numpy(x)).numpy()
        big = floats(torch.from_numpy(x) * 50).numpy()
    ref = _run(backdoored[0], x)
    assert np.abs(got - ref).max() < 0.1 * np.abs(ref).max()
    assert np.abs(big).max() > 2 * np.abs(_run(src, x * 50)).max()  # the quantised graph clips there


@pytest.mark.parametrize(("method", "params"), [("ft", {}), ("npd", {}), ("fst-sau-gate", {"sau_epochs": 1})])
def test_a_qdq_graph_is_repaired_and_written_back_quantized(backdoored, tmp_path, method, params):
    """A repair of a QDQ graph writes integers into the integer weights (same dtype, same scales and zero points)
    and leaves the input's operators as they were; the result passes the full check and runs in onnxruntime."""
    import onnx
    from onnx import numpy_helper

    import onnxclp

    src = _qdq(backdoored[0], tmp_path / "qdq.onnx")
    before = onnx.load(str(src))
    out = tmp_path / f"{method}.onnx"
    rep = onnxclp.sanitize_file(src, out, method=method, context=_ctx(backdoored[1]), epochs=1, **params)
    after = onnx.load(str(out))
    onnx.checker.check_model(after, full_check=True)
    old = {t.name: numpy_helper.to_array(t) for t in before.graph.initializer}
    new = {t.name: numpy_helper.to_array(t) for t in after.graph.initializer}
    rewritten = {r["name"] for r in rep.rewritten}
    if method == "npd":  # the polarizer, a float 1x1 Conv, is the one node added; nothing is rewritten
        assert not rewritten and len(after.graph.node) == len(before.graph.node) + 1
    elif method == "fst-sau-gate":  # the input's initializers unchanged; its copies' weights integers too
        copied = {n: v for n, v in new.items() if n not in old}
        assert not rewritten and any(v.dtype == np.int8 for v in copied.values())
        assert {v.dtype.kind for v in copied.values() if v.ndim > 1} == {"i"}
    else:
        assert rewritten and all(old[n].dtype.kind == "i" and new[n].dtype == old[n].dtype for n in rewritten)
    quant = [n for n, v in old.items() if v.dtype.kind == "f" and n not in rewritten]
    assert all(np.array_equal(old[n], new[n]) for n in quant)  # scales (and every other float) untouched
    kept = {(n.name, n.op_type) for n in after.graph.node}
    assert all((n.name, n.op_type) in kept for n in before.graph.node)
    assert _run(out, _images(5, 3)[0]).shape == (5, CLASSES)


def test_a_fake_quantised_export_is_repaired_through_its_quantizers(backdoored, tmp_path):
    """Quantisation-aware training's export (each float weight -> QuantizeLinear -> DequantizeLinear): the gate
    finds its classifier through the pair and the copies train through it (straight-through); the written model
    passes the full check and runs."""
    import onnx
    from onnx import helper, numpy_helper

    import onnxclp

    m = onnx.load(str(backdoored[0]))
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    nodes = []
    for n in m.graph.node:
        if n.op_type in ("Conv", "Gemm") and n.input[1] in inits:
            w = inits[n.input[1]]
            s = (np.abs(w).reshape(w.shape[0], -1).max(1) / 127).astype(np.float32)
            name = n.input[1]
            m.graph.initializer.extend([numpy_helper.from_array(s, name + "_s"),
                                        numpy_helper.from_array(np.zeros(len(s), np.int8), name + "_z")])  # fmt: skip
            nodes += [helper.make_node("QuantizeLinear", [name, name + "_s", name + "_z"], [name + "_q"], axis=0),
                      helper.make_node("DequantizeLinear", [name + "_q", name + "_s", name + "_z"], [name + "_d"],
                                       axis=0)]  # fmt: skip
            n.input[1] = name + "_d"
        nodes.append(n)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    src = tmp_path / "fake.onnx"
    onnx.save(m, src)
    out = tmp_path / "gate.onnx"
    onnxclp.sanitize_file(src, out, method="fst-sau-gate", context=_ctx(backdoored[1]), epochs=1, sau_epochs=1)
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    assert _run(out, _images(5, 3)[0]).shape == (5, CLASSES)
