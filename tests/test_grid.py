"""``onnxclp grid``: a 2 models × 3 u grid (plus a method that refuses the models) gives the same JSON with one
worker, two worker processes and a local Ray; a failing cell is an error entry; config parsing; the JSON is
written atomically; ``sweep --workers`` equals the serial sweep."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from onnxclp.cli import app
from onnxclp.errors import OnnxclpError

pytest.importorskip("onnxruntime")
pytest.importorskip("torch")

GOLDEN = Path(__file__).parent / "golden"


def invoke(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two small 16×16 CIFAR-style models (tests/golden), 48 random images, and the 2 × (3 u + anp) config."""
    root = tmp_path_factory.mktemp("grid")
    for name in ("resnet.torchscript.onnx", "vgg.torchscript.onnx"):
        shutil.copy(GOLDEN / name, root / name)
    rng = np.random.default_rng(0)
    np.savez(root / "d.npz", x_test=rng.integers(0, 256, (48, 16, 16, 3), np.uint8), y_test=rng.integers(0, 10, 48))
    (root / "attack.json").write_text(
        json.dumps({"attack": "badnets", "target": 0, "mode": "a2o", "seed": 0, "params": {"size": 3}})
    )
    config = {
        "models": ["resnet.torchscript.onnx", "vgg.torchscript.onnx"],
        "methods": [{"method": "clp", "u": [2, 3, 4]}, "anp"],  # anp needs clean data: refused, an error entry
        "attacks": ["attack.json"],
        "data": "d.npz",
        "limit": 40,
        "baseline": False,
    }
    (root / "grid.json").write_text(json.dumps(config))
    return root


@pytest.fixture(scope="module")
def ray_local() -> Any:
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _grid(setup: Path, *extra: object) -> dict[str, Any]:
    r = invoke("grid", setup / "grid.json", "--output", "-", *extra)
    assert r.exit_code == 1, r.stderr  # 1: some cells have an error entry (anp)
    return json.loads(r.stdout)


def test_grid_cells_and_error_entries(setup: Path) -> None:
    from onnxclp.study import grid

    before = grid.prepared_count()
    out = _grid(setup, "--workers", "1")
    assert grid.prepared_count() - before == 2  # one preparation per (model, attack), reused by its cells
    cells = out["cells"]
    assert out["data"] == "d.npz" and out["limit"] == 40
    assert [(c["model"], c["method"], c["params"]) for c in cells] == [
        (m, meth, p)
        for m in ("resnet.torchscript.onnx", "vgg.torchscript.onnx")
        for meth, p in (("clp", {"u": 2}), ("clp", {"u": 3}), ("clp", {"u": 4}), ("anp", {}))
    ]
    for c in cells:
        assert c["attack"] == "attack.json" and "sanitize_s" not in c
        if c["method"] == "anp":
            assert "clean" in c["error"] and c["acc"] is None and c["asr"] is None
        else:
            assert c["error"] is None and c["n_samples"] == 40 and 0 < c["n_attacked"] < 40
            assert 0 <= c["acc"] <= 1 and 0 <= c["asr"] <= 1 and 0 < c["pruned"] < c["channels"]
    prunes = [c["pruned"] for c in cells[:3]]
    assert prunes == sorted(prunes, reverse=True)  # a higher u prunes fewer channels


def test_same_json_with_two_workers(setup: Path) -> None:
    assert _grid(setup, "--workers", "2") == _grid(setup, "--workers", "1")


def test_same_json_on_ray(setup: Path, ray_local: Any) -> None:
    assert _grid(setup, "--ray", "local") == _grid(setup, "--workers", "1")


def test_baseline_matches_the_evaluator(setup: Path) -> None:
    """The baseline cell's numbers are those of the evaluator on the same samples (prepare + measure)."""
    from onnxclp.study import grid
    from onnxclp.study.measure import measure, prepare

    spec = grid.parse_config({**json.loads((setup / "grid.json").read_text()), "baseline": True}, setup)
    cells = grid.run_grid(spec, workers=1)
    assert len(cells) == 10 and cells[0]["method"] is None and cells[0]["pruned"] == 0
    model = setup / "resnet.torchscript.onnx"
    m = measure(model, prepare(model, setup / "d.npz", attack_config=setup / "attack.json", limit=40))
    assert (cells[0]["acc"], cells[0]["asr"], cells[0]["ra"]) == (m.acc, m.asr, m.ra)


def test_config_forms_and_refusals(setup: Path, tmp_path: Path) -> None:
    from onnxclp.study import grid

    yaml = pytest.importorskip("yaml")
    cfg = {
        "models": [{"path": str(setup / "vgg.torchscript.onnx"), "label": "vgg", "attacks": ["none"]}],
        "methods": [{"method": "lpp", "u": "2:3:0.5", "bias_rate": [0.5, 1.0]}],
        "params": {"u_low": -4.0, "ratio": 0.1},  # ratio: otbr only, not given to lpp
        "data": str(setup / "d.npz"),
    }
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    spec = grid.parse_config(grid.load_config(tmp_path / "g.yaml"), tmp_path, limit=8)
    cells = grid.expand(spec)
    assert [dict(c.params) for c in cells[1:3]] == [
        {"u_low": -4.0, "u": 2.0, "bias_rate": 0.5},
        {"u_low": -4.0, "u": 2.0, "bias_rate": 1.0},
    ]
    assert len(cells) == 1 + 3 * 2 and cells[0].method is None and spec.options.limit == 8
    for bad, message in (
        ({**cfg, "methods": ["nope"]}, "unknown method"),
        ({**cfg, "methods": [{"method": "clp", "u_low": 1.0}]}, "no parameter u_low"),
        ({**cfg, "modles": []}, "unknown key"),
        ({k: v for k, v in cfg.items() if k != "data"}, "no 'data'"),
    ):
        with pytest.raises(OnnxclpError, match=message):
            grid.parse_config(bad, tmp_path)
    r = invoke("grid", setup / "missing.json")
    assert r.exit_code == 2 and "cannot read grid config" in r.stderr


def test_interrupt_leaves_no_output(setup: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxclp.scale

    out = tmp_path / "out.json"
    r = invoke("grid", setup / "grid.json", "--workers", "1", "--output", out)
    assert r.exit_code == 1 and len(json.loads(out.read_text())["cells"]) == 8
    out.write_text("old")

    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(onnxclp.scale, "run_tasks", interrupted)
    r = invoke("grid", setup / "grid.json", "--output", out)
    assert r.exit_code == 130 and out.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]  # no temporary file left behind


def test_sweep_with_workers_equals_serial(setup: Path, tmp_path: Path) -> None:
    args = ["sweep", setup / "vgg.torchscript.onnx", "--data", setup / "d.npz", "--attack-config",
            setup / "attack.json", "--limit", "40", "-u", "2,3"]  # fmt: skip
    one = invoke(*args, "--json", tmp_path / "one.json")
    two = invoke(*args, "--json", tmp_path / "two.json", "--workers", "2")
    assert one.exit_code == 0 and two.exit_code == 0, one.stderr + two.stderr
    assert one.stdout == two.stdout
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    for d in (a, b):
        for p in d["points"]:
            p.pop("sanitize_s")
    assert a == b and len(a["points"]) == 2


# ----------------------------------------------------------------------------------------------------------------
# Clean data: every method cell gets the clean images (shared once), the accuracy guard measures each result


@pytest.fixture(scope="module")
def clean_setup(setup: Path) -> Path:
    """300 random images labelled by the resnet itself (its clean accuracy is 100 % on them, so any change of
    prediction is a drop), at most 100 per class it gives (random images go mostly to one class, and on labels
    that are nearly all one class the guard cannot check anything: a constant answer would pass), and a 1 model ×
    (clp u=1, clp u=50, ft) config reading 200 of them."""
    from onnxclp.eval.runner import OnnxClassifier

    rng = np.random.default_rng(1)
    pool = rng.integers(0, 256, (6000, 16, 16, 3), np.uint8)
    clf = OnnxClassifier(str(setup / "resnet.torchscript.onnx"), device="cpu", layout="nchw")
    pred = clf.predict((pool.transpose(0, 3, 1, 2) / 255.0).astype(np.float32))
    keep = np.sort(np.concatenate([np.flatnonzero(pred == c)[:100] for c in np.unique(pred)]))[:300]
    x, y = pool[keep], pred[keep]
    assert np.bincount(y).max() <= 0.6 * len(y)
    np.savez(setup / "clean.npz", x_train=x, y_train=y)
    config = {
        "models": ["resnet.torchscript.onnx"],
        # u=1 prunes the resnet to chance on these images (refused); u=50 prunes nothing; ft: one epoch
        "methods": [{"method": "clp", "u": [1, 50]}, {"method": "ft", "epochs": 1, "lr": 0.001}],
        "attacks": ["attack.json"],
        "data": "d.npz",
        "limit": 40,
        "baseline": True,
        "clean_data": {"path": "clean.npz", "n": 200, "x_key": "x_train", "y_key": "y_train", "max_acc_drop": 35},
    }
    (setup / "grid-clean.json").write_text(json.dumps(config))
    return setup


def _clean_grid(setup: Path, *extra: object) -> dict[str, Any]:
    r = invoke("grid", setup / "grid-clean.json", "--output", "-", *extra)
    assert r.exit_code == 1, r.stderr  # 1: the refused cell is an error entry
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def clean_one(clean_setup: Path) -> tuple[dict[str, Any], list[str]]:
    """The clean-data grid on one worker, and the data sets read meanwhile (``load_dataset`` calls)."""
    import onnxclp.eval.data

    reads: list[str] = []
    real = onnxclp.eval.data.load_dataset

    def counting(path: Any, *args: Any, **kwargs: Any) -> Any:
        reads.append(Path(path).name)
        return real(path, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(onnxclp.eval.data, "load_dataset", counting)
        one = _clean_grid(clean_setup, "--workers", "1")
    return one, reads


def test_clean_data_cells_guard_and_refusal(clean_setup: Path, clean_one: tuple[dict[str, Any], list[str]]) -> None:
    """The guard's entries on every written method cell, the refused one an error entry with the guard's reason,
    the clean set read once (by the driver, never by a cell), and the same JSON on 2 workers."""
    one, reads = clean_one
    assert sorted(reads) == ["clean.npz", "d.npz"]  # the test set and the clean set, once each
    base, refused, kept, ft = one["cells"]
    assert base["method"] is None and base["guard"] is None and base["error"] is None
    assert refused["params"] == {"u": 1} and refused["error"].startswith("refused: the result lost")
    assert "validation images" in refused["error"] and refused["acc"] is None and refused["guard"] is None
    g = kept["guard"]
    assert kept["error"] is None and kept["pruned"] == 0 and (kept["acc"], kept["asr"]) == (base["acc"], base["asr"])
    assert (g["n_fit"], g["n_val"], g["acc_before"], g["acc_after"], g["drop"]) == (100, 100, 1.0, 1.0, 0.0)
    assert g["accepted"] is True and g["forced"] is False
    assert ft["method"] == "ft" and ft["error"] is None, ft["error"]
    assert ft["guard"]["acc_before"] == 1.0 and ft["guard"]["accepted"] and ft["guard"]["bound"] <= 35
    assert 0 <= ft["acc"] <= 1 and ft["n_attacked"] == base["n_attacked"]

    # the pre-loaded arrays give what `sanitize --clean-data PATH --clean-n 200` measures
    import onnxclp

    ctx = {"clean_data": str(clean_setup / "clean.npz"), "clean_n": 200, "x_key": "x_train", "y_key": "y_train",
           "max_acc_drop": 35, "quiet": True}  # fmt: skip
    _, rep = onnxclp.sanitize(clean_setup / "resnet.torchscript.onnx", "clp", u=1, force=True, context=ctx)
    assert rep.guard["forced"] and f"lost {rep.guard['drop']:.1f} points" in refused["error"]

    assert _clean_grid(clean_setup, "--workers", "2") == one


def test_clean_data_on_ray(clean_setup: Path, clean_one: tuple[dict[str, Any], list[str]], ray_local: Any) -> None:
    assert _clean_grid(clean_setup, "--ray", "local") == clean_one[0]


def test_clean_data_config(clean_setup: Path, tmp_path: Path) -> None:
    from onnxclp.study import grid

    cfg = json.loads((clean_setup / "grid-clean.json").read_text())
    cfg["models"] = [
        "resnet.torchscript.onnx",
        {"path": "vgg.torchscript.onnx", "clean_data": None},  # this model: no clean data
        {"path": "vgg.torchscript.onnx", "label": "v2", "clean_data": "clean.npz"},
    ]
    spec = grid.parse_config(cfg, clean_setup, clean_n=150, max_acc_drop=2)
    a, b, c = (spec.clean_of(m) for m in spec.models)
    assert a is not None and a.label == "clean.npz" and (a.n, a.max_acc_drop, a.x_key) == (150, 2.0, "x_train")
    assert b is None and c is not None and (c.n, c.x_key, c.max_acc_drop) == (150, None, 2.0)
    cli = grid.parse_config(cfg, clean_setup, clean_data=tmp_path / "other.npz")
    assert cli.clean is not None and cli.clean.path == str(tmp_path / "other.npz") and cli.clean.n == 200
    sel = grid.parse_config({**cfg, "clean_data": {"path": "clean.npz", "select_fraction": 0}}, clean_setup)
    assert sel.clean is not None and sel.clean.select_fraction == 0.0  # the guard's selection part, off
    for bad, message in (
        ({**cfg, "clean_data": {"path": "clean.npz", "select_fraction": "all"}}, "must be a number"),
        ({**cfg, "clean_data": {"path": "clean.npz", "nn": 3}}, "unknown key"),
        ({**cfg, "clean_data": {"path": "clean.npz", "n": 0}}, "positive integer"),
        ({**cfg, "clean_data": {"path": "clean.npz", "mean": [0.5]}}, "both mean and std"),
        ({**cfg, "clean_data": {"n": 10}}, "with 'path'"),
    ):
        with pytest.raises(OnnxclpError, match=message):
            grid.parse_config(bad, clean_setup)
    too_few = grid.parse_config({**cfg, "clean_data": {**cfg["clean_data"], "n": 110}}, clean_setup)
    with pytest.raises(OnnxclpError, match="too few"):  # before any cell runs
        grid.resolve(too_few)
