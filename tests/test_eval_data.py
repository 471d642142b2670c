"""Data loaders on small fixtures built here: .npz, ImageFolder, CIFAR python batches (safe unpickling)."""

from __future__ import annotations

import os
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from onnxclp.errors import OnnxclpError
from onnxclp.eval.data import FolderImages, load_cifar_batch, load_dataset, load_npz


def rng_images(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


# ---------------------------------------------------------------------------------------------------- .npz


def test_npz_hwc_uint8(tmp_path) -> None:
    x = rng_images((5, 4, 6, 3))
    y = np.array([0, 1, 2, 1, 0])
    np.savez(tmp_path / "d.npz", x_test=x, y_test=y)
    data = load_dataset(tmp_path / "d.npz")
    assert (len(data), data.channels, data.height, data.width) == (5, 3, 4, 6)
    batch = data.images(np.array([1, 3]))
    assert batch.dtype == torch.float32 and batch.shape == (2, 3, 4, 6)
    expected = torch.from_numpy(x[[1, 3]]).permute(0, 3, 1, 2).float() / 255
    assert torch.equal(batch, expected)
    assert torch.equal(data.images(np.array([2, 3, 4])), torch.from_numpy(x[2:5]).permute(0, 3, 1, 2).float() / 255)
    assert data.labels.dtype == np.int64 and data.labels.tolist() == y.tolist()


def test_npz_chw_float_grey_and_other_keys(tmp_path) -> None:
    x = np.random.default_rng(1).random((4, 3, 5, 5)).astype(np.float64)
    np.savez(tmp_path / "chw.npz", images=x, labels=np.array([[1], [0], [1], [1]]))
    data = load_npz(tmp_path / "chw.npz", "images", "labels")
    assert data.layout == "chw" and data.labels.tolist() == [1, 0, 1, 1]
    assert torch.allclose(data.images(np.arange(4)), torch.from_numpy(x).float())
    np.savez(tmp_path / "grey.npz", x_test=rng_images((3, 7, 7)), y_test=np.arange(3))
    grey = load_dataset(tmp_path / "grey.npz")
    assert (grey.channels, grey.height, grey.width) == (1, 7, 7)


def test_npz_channel_hint_settles_ambiguous_layouts(tmp_path) -> None:
    np.savez(tmp_path / "amb.npz", x_test=rng_images((2, 3, 4, 4)), y_test=np.arange(2))
    assert load_npz(tmp_path / "amb.npz", channels=3).layout == "chw"
    assert load_npz(tmp_path / "amb.npz", channels=4).layout == "hwc"


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x_test": rng_images((2, 4, 4, 3))}, "no array 'y_test' \\(it has: x_test\\); choose others with --x-key"),
        ({"x_test": rng_images((2, 4, 4, 3)), "y_test": np.arange(3)}, "2 images but 3 labels"),
        ({"x_test": rng_images((2, 4, 4, 3)), "y_test": np.array([0, -1])}, "labels must be >= 0"),
        ({"x_test": rng_images((2, 4, 4, 3)), "y_test": np.array([0.5, 1])}, "labels must be integers"),
        ({"x_test": np.full((2, 4, 4, 3), 255.0), "y_test": np.arange(2)}, "float images must lie in \\[0, 1\\]"),
        ({"x_test": rng_images((2, 4, 4, 3)).astype(np.uint16), "y_test": np.arange(2)}, "uint8 or float"),
        ({"x_test": rng_images((2, 5, 5, 6)), "y_test": np.arange(2)}, "cannot tell the channel axis"),
        ({"x_test": rng_images((2, 4)), "y_test": np.arange(2)}, "images must be \\(N, H, W, C\\)"),
    ],
)
def test_npz_errors_are_one_line(tmp_path, arrays: dict[str, np.ndarray], message: str) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(OnnxclpError, match=message) as info:
        load_dataset(tmp_path / "bad.npz")
    assert "\n" not in info.value.message


def test_npz_refuses_object_arrays_and_non_npz(tmp_path) -> None:
    np.savez(tmp_path / "obj.npz", x_test=np.array([{"a": 1}], dtype=object), y_test=np.arange(1))
    with pytest.raises(OnnxclpError, match=r"cannot read .* as \.npz"):
        load_dataset(tmp_path / "obj.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(OnnxclpError, match=r"cannot read .* as \.npz"):
        load_dataset(tmp_path / "junk.npz")
    with pytest.raises(OnnxclpError, match="no such data file or folder"):
        load_dataset(tmp_path / "missing.npz")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(OnnxclpError, match="unrecognised data"):
        load_dataset(tmp_path / "notes.txt")


# ---------------------------------------------------------------------------------------------------- folders


def make_folder(root, sizes: dict[str, list[tuple[int, int]]]) -> dict[str, list[np.ndarray]]:
    made: dict[str, list[np.ndarray]] = {}
    for i, (cls, shapes) in enumerate(sizes.items()):
        (root / cls).mkdir(parents=True)
        made[cls] = []
        for j, (h, w) in enumerate(shapes):
            arr = rng_images((h, w, 3), seed=10 * i + j)
            Image.fromarray(arr).save(root / cls / f"img{j}.png")
            made[cls].append(arr)
    return made


def test_image_folder_classes_are_sorted_names(tmp_path) -> None:
    made = make_folder(tmp_path / "ds", {"dog": [(6, 5)] * 2, "cat": [(6, 5)], "emu": [(6, 5)]})
    (tmp_path / "ds" / "dog" / "notes.txt").write_text("ignored")
    data = load_dataset(tmp_path / "ds")
    assert isinstance(data, FolderImages)
    assert data.classes == ["cat", "dog", "emu"]
    assert data.labels.tolist() == [0, 1, 1, 2]
    batch = data.images(np.array([0, 2]))
    assert batch.shape == (2, 3, 6, 5)
    assert torch.equal(batch[0], torch.from_numpy(made["cat"][0]).permute(2, 0, 1).float() / 255)
    assert torch.equal(batch[1], torch.from_numpy(made["dog"][1]).permute(2, 0, 1).float() / 255)


def test_image_folder_sizes_grey_and_resize(tmp_path) -> None:
    make_folder(tmp_path / "ds", {"a": [(6, 6), (8, 8)], "b": [(6, 6)]})
    data = load_dataset(tmp_path / "ds")
    with pytest.raises(OnnxclpError, match="is 8×8, the first image is 6×6; pass --input-size"):
        data.images(np.array([0, 1]))
    resized = load_dataset(tmp_path / "ds", size=(4, 5), channels=1)
    batch = resized.images(np.arange(3))
    assert batch.shape == (3, 1, 4, 5)
    with pytest.raises(OnnxclpError, match="no class sub-folders"):
        load_dataset(tmp_path / "ds" / "a")
    with pytest.raises(OnnxclpError, match="--x-key/--y-key apply to"):
        load_dataset(tmp_path / "ds", x_key="x")


# ---------------------------------------------------------------------------------------------------- CIFAR


def _short(b: bytes) -> bytes:  # SHORT_BINSTRING: a Python 2 str
    return b"U" + bytes([len(b)]) + b


def _int(v: int) -> bytes:
    return b"K" + bytes([v]) if 0 <= v < 256 else b"J" + struct.pack("<i", v)


def python2_cifar_pickle(data: np.ndarray, labels: list[int]) -> bytes:
    """The bytes a Python 2 cPickle.dump(protocol=2) of a CIFAR batch dict holds, opcode by opcode."""
    n, width = data.shape
    dtype = (
        b"cnumpy\ndtype\n" + _short(b"u1") + _int(0) + _int(1) + b"\x87R"
        b"(" + _int(3) + _short(b"|") + b"NNN" + _int(-1) + _int(-1) + _int(0) + b"tb"
    )
    array = (
        b"cnumpy.core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n" + _int(0) + b"\x85" + _short(b"b") + b"\x87R"
        b"(" + _int(1) + _int(n) + _int(width) + b"\x86" + dtype + b"\x89"
        b"T" + struct.pack("<I", data.nbytes) + data.tobytes() + b"tb"
    )
    label_list = b"](" + b"".join(_int(v) for v in labels) + b"e"
    return (
        b"\x80\x02}("
        + _short(b"batch_label")
        + _short(b"testing batch 1 of 1")
        + _short(b"labels")
        + label_list
        + _short(b"data")
        + array
        + b"u."
    )


def cifar_rows(n: int) -> tuple[np.ndarray, list[int]]:
    return rng_images((n, 3072), seed=5), [i % 10 for i in range(n)]


def test_cifar_python2_batch_directory(tmp_path) -> None:
    rows, labels = cifar_rows(4)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(python2_cifar_pickle(rows, labels))
    data = load_dataset(folder)
    assert (len(data), data.channels, data.height, data.width) == (4, 3, 32, 32)
    assert data.labels.tolist() == labels
    expected = torch.from_numpy(rows.reshape(4, 3, 32, 32)).float() / 255  # rows are CHW planes
    assert torch.equal(data.images(np.arange(4)), expected)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_batches_written_by_python3(tmp_path, protocol: int) -> None:
    rows, labels = cifar_rows(3)
    path = tmp_path / "test_batch"
    path.write_bytes(pickle.dumps({b"data": rows, b"fine_labels": labels}, protocol=protocol))
    data = load_cifar_batch(path)
    assert data.labels.tolist() == labels
    assert np.array_equal(data.x, rows.reshape(3, 3, 32, 32))
    assert load_dataset(path).labels.tolist() == labels  # a batch file given directly


class _Exploit:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def test_hostile_pickles_are_refused_without_running_anything(tmp_path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "test_batch"
    path.write_bytes(pickle.dumps({b"data": _Exploit(str(marker)), b"labels": [0]}, protocol=2))
    with pytest.raises(OnnxclpError, match=r"refused to load global (posix|os|nt)\.system"):
        load_cifar_batch(path)
    assert not marker.exists()
    path.write_bytes(pickle.dumps({b"data": np.array([object()], dtype=object), b"labels": [0]}, protocol=2))
    with pytest.raises(OnnxclpError, match="refused"):
        load_cifar_batch(path)
    path.write_bytes(b"\x80\x02cbuiltins\neval\n(U\x041+1tR.")
    with pytest.raises(OnnxclpError, match=r"refused to load global builtins\.eval"):
        load_cifar_batch(path)


def test_cifar_missing_entries(tmp_path) -> None:
    path = tmp_path / "test_batch"
    path.write_bytes(pickle.dumps({b"pixels": np.zeros((1, 3072), np.uint8), b"labels": [0]}, protocol=4))
    with pytest.raises(OnnxclpError, match=r"no 'data' entry \(it has: pixels, labels\)"):
        load_cifar_batch(path)
    path.write_bytes(pickle.dumps([1, 2], protocol=4))
    with pytest.raises(OnnxclpError, match="expected a pickled dict"):
        load_cifar_batch(path)
