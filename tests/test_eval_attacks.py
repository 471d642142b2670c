"""Triggers against hand-computed pixels (docs/algorithms.md, "Attacks") and attack configuration files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from onnxclp.errors import OnnxclpError
from onnxclp.eval.attacks import (
    ATTACKS,
    BPP,
    SIG,
    AttackConfig,
    BadNets,
    Blended,
    Patch,
    WaNet,
    attacked_mask,
    build_attack,
    load_attack_config,
    save_attack_config,
    target_labels,
)


def grey(n: int = 2, c: int = 3, h: int = 8, w: int = 8, value: float = 0.5) -> torch.Tensor:
    return torch.full((n, c, h, w), value)


def ramp(n: int = 2, c: int = 3, h: int = 8, w: int = 8) -> torch.Tensor:
    return torch.arange(n * c * h * w, dtype=torch.float32).reshape(n, c, h, w) / (n * c * h * w)


# ---------------------------------------------------------------------------------------------------- badnets


def test_badnets_default_is_white_3x3_bottom_right() -> None:
    x = grey(h=8, w=10)
    out = BadNets().apply(x)
    assert torch.equal(out[:, :, 5:8, 7:10], torch.ones(2, 3, 3, 3))
    expected = x.clone()
    expected[:, :, 5:, 7:] = 1.0
    assert torch.equal(out, expected)
    assert torch.equal(x, grey(h=8, w=10)), "apply must not modify its input"


def test_badnets_position_size_and_per_channel_value() -> None:
    x = ramp(h=8, w=8)
    out = build_attack("badnets", {"size": 2, "position": [1, 3], "value": [1.0, 0.0, 0.25]}).apply(x)
    expected = x.clone()
    expected[:, 0, 1:3, 3:5] = 1.0
    expected[:, 1, 1:3, 3:5] = 0.0
    expected[:, 2, 1:3, 3:5] = 0.25
    assert torch.equal(out, expected)


@pytest.mark.parametrize(
    ("position", "rows", "cols"),
    [
        ("top-left", slice(0, 3), slice(0, 3)),
        ("top-right", slice(0, 3), slice(5, 8)),
        ("bottom-left", slice(4, 7), slice(0, 3)),
        ([-4, -5], slice(3, 6), slice(3, 6)),
    ],
)
def test_badnets_corners_and_negative_positions(position: object, rows: slice, cols: slice) -> None:
    x = torch.zeros(1, 1, 7, 8)
    out = build_attack("badnets", {"position": position}).apply(x)
    expected = torch.zeros(1, 1, 7, 8)
    expected[:, :, rows, cols] = 1.0
    assert torch.equal(out, expected)


def test_badnets_patch_image_with_alpha(tmp_path) -> None:
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[..., 0] = 255  # red patch
    rgba[..., 3] = [[255, 0, 255], [255, 255, 0]]  # half of it transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "p.png")
    x = grey(n=1, h=6, w=6, value=0.2)
    out = build_attack("badnets", {"image": str(tmp_path / "p.png")}).apply(x)
    expected = x.clone()
    opaque = torch.tensor([[1, 0, 1], [1, 1, 0]], dtype=torch.bool)
    region = expected[0, :, 4:6, 3:6]
    region[0][opaque] = 1.0
    region[1][opaque] = 0.0
    region[2][opaque] = 0.0
    assert torch.allclose(out, expected, atol=1e-7)


def test_patch_that_does_not_fit_is_one_clear_error() -> None:
    with pytest.raises(OnnxclpError, match=r"5×5 patch .* does not fit in a 4×4 image"):
        build_attack("badnets", {"size": 5}).apply(torch.zeros(1, 3, 4, 4))


# ---------------------------------------------------------------------------------------------------- blended


def test_blended_arithmetic_with_an_image(tmp_path) -> None:
    Image.fromarray(np.full((4, 4, 3), (255, 0, 51), np.uint8)).save(tmp_path / "b.png")
    x = ramp(h=4, w=4)
    out = build_attack("blended", {"alpha": 0.25, "image": str(tmp_path / "b.png")}).apply(x)
    pattern = torch.tensor([1.0, 0.0, 0.2]).view(1, 3, 1, 1)
    assert torch.allclose(out, 0.75 * x + 0.25 * pattern, atol=1e-6)


def test_blended_image_is_resized_to_the_input(tmp_path) -> None:
    Image.fromarray(np.full((10, 7, 3), 255, np.uint8)).save(tmp_path / "w.png")
    out = build_attack("blended", {"alpha": 0.5, "image": str(tmp_path / "w.png")}).apply(torch.zeros(1, 3, 4, 6))
    assert torch.allclose(out, torch.full((1, 3, 4, 6), 0.5))


def test_blended_seeded_pattern_is_deterministic() -> None:
    x = grey(n=3)
    a, b = Blended(seed=7).apply(x), Blended(seed=7).apply(x)
    assert torch.equal(a, b)
    assert not torch.equal(a, Blended(seed=8).apply(x))
    P = Blended(seed=7).pattern(3, 8, 8)
    assert torch.allclose(a, 0.8 * x + 0.2 * P)
    assert float(P.min()) >= 0.0 and float(P.max()) < 1.0
    gen = torch.Generator().manual_seed(7)  # the documented recipe: torch.rand from a seeded CPU generator
    assert torch.equal(P, torch.rand((3, 8, 8), generator=gen))


# ---------------------------------------------------------------------------------------------------- sig


def test_sig_formula_by_hand() -> None:
    # W = 12, f = 3: sin(2π·j·3/12) = sin(π·j/2) = 0, 1, 0, -1, 0, 1, ...
    x = grey(n=1, c=1, h=2, w=12, value=0.5)
    out = build_attack("sig", {"delta": 0.1, "frequency": 3}).apply(x)
    expected_row = torch.tensor([0.5, 0.6, 0.5, 0.4] * 3)
    assert torch.allclose(out[0, 0, 0], expected_row, atol=1e-6)
    assert torch.allclose(out[0, 0, 1], expected_row, atol=1e-6)


def test_sig_clips_and_defaults() -> None:
    atk = SIG()
    assert atk.config() == {"delta": 40 / 255, "frequency": 6.0}
    x = torch.ones(1, 3, 4, 32)
    out = atk.apply(x)
    j = torch.arange(32, dtype=torch.float64)
    expected = (1 + 40 / 255 * torch.sin(2 * math.pi * j * 6 / 32)).clamp(0, 1).float()
    assert torch.allclose(out[0, 2, 3], expected, atol=1e-6)
    assert float(out.max()) == 1.0


# ---------------------------------------------------------------------------------------------------- wanet


def test_wanet_with_zero_strength_is_the_identity() -> None:
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    out = build_attack("wanet", {"s": 0.0}).apply(x)
    assert torch.equal(out, x)


def test_wanet_matches_the_backdoorbench_recipe() -> None:
    # An independent transcription of docs/algorithms.md, "Attacks" / BackdoorBench's attack/wanet.py.
    k, s, H = 4, 0.5, 16
    gen = torch.Generator().manual_seed(3)
    ins = torch.rand(1, 2, k, k, generator=gen) * 2 - 1
    ins = ins / torch.mean(torch.abs(ins))
    noise_grid = F.interpolate(ins, size=H, mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    array1d = torch.linspace(-1, 1, steps=H)
    a, b = torch.meshgrid(array1d, array1d, indexing="ij")
    identity_grid = torch.stack((b, a), 2)[None, ...]
    grid = torch.clamp((identity_grid + s * noise_grid / H) * 1.0, -1, 1)
    x = torch.rand(2, 3, H, H, generator=gen)
    expected = F.grid_sample(x, grid.repeat(2, 1, 1, 1), align_corners=True)
    out = WaNet(seed=3).apply(x)
    assert torch.allclose(out, expected, atol=1e-6)
    assert not torch.allclose(out, x, atol=1e-3)


def test_wanet_field_from_a_saved_file_equals_the_seeded_one(tmp_path) -> None:
    seeded = WaNet({"k": 5}, seed=11)
    assert torch.allclose(seeded.field().abs().mean(), torch.tensor(1.0))
    seeded.save_field(tmp_path / "field.npy")
    loaded = WaNet({"grid": str(tmp_path / "field.npy")}, seed=999)
    assert loaded.config()["k"] == 5
    x = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    assert torch.equal(loaded.apply(x), seeded.apply(x))
    # BackdoorBench's upsampled noise_grid (1, H, W, 2) works too, at its own size
    noise = F.interpolate(seeded.field(), size=(12, 12), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    np.save(tmp_path / "noise.npy", noise.numpy())
    assert torch.allclose(WaNet({"grid": str(tmp_path / "noise.npy")}).apply(x), seeded.apply(x), atol=1e-6)
    with pytest.raises(OnnxclpError, match="12×12 noise grid but images are 8×8"):
        WaNet({"grid": str(tmp_path / "noise.npy")}).apply(torch.zeros(1, 3, 8, 8))


def test_wanet_rejects_a_bad_grid_file(tmp_path) -> None:
    np.save(tmp_path / "bad.npy", np.zeros((3, 4, 5), np.float32))
    with pytest.raises(OnnxclpError, match=r"must be \(2, k, k\) or \(H, W, 2\)"):
        WaNet({"grid": str(tmp_path / "bad.npy")})
    with pytest.raises(OnnxclpError, match="no such file"):
        WaNet({"grid": str(tmp_path / "missing.npy")})


# ---------------------------------------------------------------------------------------------------- bpp


def test_bpp_levels_by_hand() -> None:
    x = torch.tensor([0.0, 0.1, 0.2, 0.3, 0.6, 0.93, 1.0]).view(1, 1, 1, 7)
    out = BPP().apply(x)  # 8 levels: round(7x)/7 -> 0, round(0.7)=1, round(1.4)=1, 2, 4, round(6.51)=7, 7
    assert torch.allclose(out.flatten(), torch.tensor([0, 1, 1, 2, 4, 7, 7]) / 7)
    two = build_attack("bpp", {"levels": 2}).apply(x)
    assert torch.equal(two.flatten(), torch.tensor([0.0, 0, 0, 0, 1, 1, 1]))


@settings(max_examples=30, deadline=None)
@given(levels=st.integers(2, 64), seed=st.integers(0, 2**16))
def test_bpp_output_is_on_the_levels_and_nearest(levels: int, seed: int) -> None:
    x = torch.randint(0, 256, (1, 3, 5, 5), generator=torch.Generator().manual_seed(seed)).float() / 255
    out = build_attack("bpp", {"levels": levels}).apply(x)
    steps = out * (levels - 1)
    assert torch.allclose(steps, steps.round(), atol=1e-5)
    assert float((out - x).abs().max()) <= 0.5 / (levels - 1) + 1e-6


# ---------------------------------------------------------------------------------------------------- patch


def test_patch_image_and_mask_by_hand(tmp_path) -> None:
    Image.fromarray(np.full((2, 2, 3), (0, 255, 0), np.uint8)).save(tmp_path / "g.png")
    Image.fromarray(np.array([[255, 0], [128, 255]], np.uint8), "L").save(tmp_path / "m.png")
    x = grey(n=1, h=5, w=5, value=0.4)
    params = {"image": str(tmp_path / "g.png"), "mask": str(tmp_path / "m.png"), "position": [1, 2], "opacity": 0.5}
    out = build_attack("patch", params).apply(x)
    m = torch.tensor([[1.0, 0.0], [128 / 255, 1.0]]) * 0.5
    expected = x.clone()
    green = torch.tensor([0.0, 1.0, 0.0]).view(3, 1, 1)
    expected[0, :, 1:3, 2:4] = (1 - m) * 0.4 + m * green
    assert torch.allclose(out, expected, atol=1e-6)


def test_patch_without_image_is_a_seeded_random_patch() -> None:
    atk = Patch({"size": [2, 3]}, seed=4)
    out = atk.apply(torch.zeros(2, 3, 6, 6))
    patch, mask = atk.pattern(3)
    assert torch.equal(mask, torch.ones(1, 2, 3))
    assert torch.equal(out[:, :, 4:6, 3:6], patch.expand(2, 3, 2, 3))
    assert float(out[:, :, :4].abs().max()) == 0.0
    assert torch.equal(out, Patch({"size": [2, 3]}, seed=4).apply(torch.zeros(2, 3, 6, 6)))


# ---------------------------------------------------------------------------------------------------- all attacks


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_every_attack_is_vectorised_deterministic_and_in_range(name: str) -> None:
    x = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    atk = build_attack(name, {}, seed=1)
    out = atk.apply(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    one_by_one = torch.cat([atk.apply(x[i : i + 1]) for i in range(5)])
    assert torch.allclose(out, one_by_one, atol=1e-6)
    assert torch.equal(out, build_attack(name, {}, seed=1).apply(x))
    assert atk.apply(x[:0]).shape == (0, 3, 16, 16)
    assert set(atk.config()) == set(ATTACKS[name].defaults)


def test_grey_images_are_supported() -> None:
    x = torch.zeros(2, 1, 8, 8)
    for name in ATTACKS:
        assert build_attack(name, {}).apply(x).shape == x.shape


def test_bad_parameters_are_one_line_errors() -> None:
    with pytest.raises(OnnxclpError, match=r"badnets: unknown parameter\(s\) alpha \(allowed: size, position"):
        build_attack("badnets", {"alpha": 0.1})
    with pytest.raises(OnnxclpError, match="unknown attack 'trojan'"):
        build_attack("trojan")
    with pytest.raises(OnnxclpError, match=r"blended: params.alpha must be in \[0.0, 1.0\]"):
        build_attack("blended", {"alpha": 1.5})
    with pytest.raises(OnnxclpError, match=r"bpp: params\.levels must be at least 2"):
        build_attack("bpp", {"levels": 1})
    with pytest.raises(OnnxclpError, match=r"params\.position must be one of"):
        build_attack("badnets", {"position": "middle"})
    with pytest.raises(OnnxclpError, match=r"expected a batch \(N, C, H, W\)"):
        BadNets().apply(torch.zeros(3, 8, 8))


# ---------------------------------------------------------------------------------------------------- labels


def test_label_rules() -> None:
    y = np.array([0, 1, 2, 3, 0])
    assert attacked_mask(y, 0, "a2o").tolist() == [False, True, True, True, False]
    assert attacked_mask(y, 0, "a2a").all()
    assert target_labels(y, 2, "a2o", 4).tolist() == [2] * 5
    assert target_labels(y, 0, "a2a", 4).tolist() == [1, 2, 3, 0, 1]
    with pytest.raises(OnnxclpError, match="unknown attack mode"):
        attacked_mask(y, 0, "one2one")


# ---------------------------------------------------------------------------------------------------- config files


def test_config_round_trip_with_relative_paths(tmp_path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    WaNet({"k": 6}, seed=5).save_field(run / "grid.npy")
    atk = WaNet({"grid": str(run / "grid.npy"), "s": 0.75}, seed=5)
    save_attack_config(run / "attack.json", atk, target=3, mode="a2a", normalize={"mean": [0.5], "std": [0.25]})
    raw = json.loads((run / "attack.json").read_text())
    assert raw == {
        "attack": "wanet",
        "target": 3,
        "mode": "a2a",
        "seed": 5,
        "params": {"k": 6, "s": 0.75, "grid_rescale": 1.0, "grid": "grid.npy", "grid_kind": "field"},
        "normalize": {"mean": [0.5], "std": [0.25]},
    }
    moved = tmp_path / "moved"
    (run).rename(moved)  # the folder can move: the grid path is relative to the JSON file
    cfg = load_attack_config(moved / "attack.json")
    assert (cfg.target, cfg.mode, cfg.seed) == (3, "a2a", 5)
    x = torch.rand(2, 3, 10, 10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(cfg.build().apply(x), atk.apply(x))


def test_config_defaults_are_filled_in(tmp_path) -> None:
    save_attack_config(tmp_path / "a.json", build_attack("badnets", {"size": 4}, seed=2))
    cfg = load_attack_config(tmp_path / "a.json")
    assert cfg == AttackConfig(
        "badnets", 0, "a2o", 2, {"size": 4, "position": "bottom-right", "value": 1.0, "image": None}, None
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "is not valid JSON"),
        ('{"attack": "nope"}', "'attack' must be one of"),
        ('{"attack": "sig", "mode": "x"}', "'mode' must be one of"),
        ('{"attack": "sig", "target": -1}', "'target' must be a class index"),
        ('{"attack": "sig", "extra": 1}', "unknown key"),
        ('{"attack": "sig", "normalize": {"mean": [0.5]}}', "'normalize' must be"),
    ],
)
def test_bad_config_files(tmp_path, content: str, message: str) -> None:
    path = tmp_path / "c.json"
    path.write_text(content)
    with pytest.raises(OnnxclpError, match=message):
        load_attack_config(path)
