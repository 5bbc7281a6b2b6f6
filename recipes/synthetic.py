"""Tiny synthetic CIFAR-format datasets, written in the layouts ``recipes.data`` reads.

For tests and smoke runs without the real data:

    python -m recipes.synthetic /tmp/tiny.tar.gz        # ImageFolder archive
    python -m recipes.train --data /tmp/tiny.tar.gz --epochs 1 --val-size 20
"""
from __future__ import annotations

import io
import pickle
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np

from .data import CIFAR10_CLASSES, CifarArrays

__all__ = ["synthetic_arrays", "write_imagefolder", "write_official"]


def synthetic_arrays(n_train: int = 100, n_test: int = 40, num_classes: int = 10,
                     seed: int = 0) -> CifarArrays:
    """Random 32x32 RGB images; each class gets its own mean colour so that the task is
    learnable.  Labels cycle through the classes."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(40, 216, size=(num_classes, 3))

    def make(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.arange(n, dtype=np.int64) % num_classes
        noise = rng.integers(-40, 40, size=(n, 32, 32, 3))
        return np.clip(colours[y][:, None, None, :] + noise, 0, 255).astype(np.uint8), y

    (trx, tr_y), (tex, te_y) = make(n_train), make(n_test)
    classes = list(CIFAR10_CLASSES[:num_classes]) if num_classes <= 10 else \
        [f"class{i:03d}" for i in range(num_classes)]
    return CifarArrays(trx, tr_y, tex, te_y, classes, "synthetic", "synthetic")


def _png(img: np.ndarray) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _imagefolder_files(a: CifarArrays, prefix: str = "") -> dict[str, bytes]:
    files = {}
    for split, xs, ys in (("train", a.train_x, a.train_y), ("test", a.test_x, a.test_y)):
        for i, (img, label) in enumerate(zip(xs, ys)):
            files[f"{prefix}{split}/{a.classes[label]}/{i:05d}.png"] = _png(img)
    return files


def write_imagefolder(dest: Path | str, arrays: CifarArrays, prefix: str = "") -> Path:
    """Lossless (PNG) ImageFolder copy of ``arrays``: a folder, or an archive when ``dest``
    ends in .tar, .tar.gz, .tgz or .zip.  ``prefix`` nests the tree (e.g. ``"cifar10/"``)."""
    dest = Path(dest)
    files = _imagefolder_files(arrays, prefix)
    name = dest.name.lower()
    if name.endswith(".zip"):
        with zipfile.ZipFile(dest, "w") as zf:
            for path, blob in files.items():
                zf.writestr(path, blob)
    elif name.endswith((".tar", ".tar.gz", ".tgz")):
        with tarfile.open(dest, "w:gz" if name.endswith(("gz", "tgz")) else "w") as tf:
            for path, blob in files.items():
                info = tarfile.TarInfo(path)
                info.size = len(blob)
                tf.addfile(info, io.BytesIO(blob))
    else:
        for path, blob in files.items():
            (dest / path).parent.mkdir(parents=True, exist_ok=True)
            (dest / path).write_bytes(blob)
    return dest


def write_official(root: Path | str, arrays: CifarArrays) -> Path:
    """torchvision's ``cifar-10-batches-py`` layout (5 train batches, test batch, meta)
    under ``root``; returns the ``cifar-10-batches-py`` folder."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)

    def dump(name: str, x: np.ndarray, y: np.ndarray) -> None:
        data = x.transpose(0, 3, 1, 2).reshape(len(x), -1)
        blob = {"batch_label": name, "labels": [int(v) for v in y], "data": data,
                "filenames": [f"{i}.png" for i in range(len(x))]}
        (folder / name).write_bytes(pickle.dumps(blob))

    for i, idx in enumerate(np.array_split(np.arange(len(arrays.train_y)), 5), start=1):
        dump(f"data_batch_{i}", arrays.train_x[idx], arrays.train_y[idx])
    dump("test_batch", arrays.test_x, arrays.test_y)
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": list(arrays.classes)}))
    return folder


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m recipes.synthetic DEST (folder, .tar.gz, .zip)")
    print(write_imagefolder(sys.argv[1], synthetic_arrays()))
