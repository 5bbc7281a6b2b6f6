"""CIFAR-10 as uint8 tensors in memory, with batched augmentation on the training device.

Sources (see :func:`find_data`):

* torchvision's official ``cifar-10-batches-py`` folder (pickle batches), or the official
  ``cifar-10-python.tar.gz`` archive, or -- when none is found and the machine is online --
  the official set, downloaded through torchvision (``--download false`` turns that off);
* an ImageFolder layout -- ``train/<class>/*`` and ``test/<class>/*`` -- as a folder or as a
  ``.tar``/``.tar.gz``/``.tgz``/``.zip`` archive, e.g. the offline JPEG-q75 copy
  ``../shared/data/cifar10-jpeg75.tar.gz``.  Class folders sort into label order.

Decoding happens once; the uint8 arrays are cached as ``.npz`` in ``$LOCALOPT_CACHE``
(default ``~/.cache/localopt``), keyed by the source's sha256 (files) or by the names, sizes
and mtimes of its files (folders).
"""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["CifarArrays", "DataNotFoundError", "find_data", "load_cifar10", "cache_dir",
           "Split", "make_splits", "random_crop_flip", "Normalizer", "CIFAR10_MEAN",
           "CIFAR10_STD", "PROTOCOLS"]

REPO = Path(__file__).resolve().parents[1]
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
#: sha256 of the offline copy described in ../shared/data/README.md
JPEG75_SHA256 = "3f6e34ecec129806e0e400217f33e7b0001ca617200fe91c3508771ccdcd5d28"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp")
PROTOCOLS = {
    "val": "train on 45k of the 50k training images, validate on the other 5k (fixed by "
           "split_seed) every epoch, test on the 10k test set once at the end",
    "full": "train on all 50k training images, test on the 10k test set once at the end "
            "(no validation set)",
}


class DataNotFoundError(FileNotFoundError):
    """No CIFAR-10 where we looked; the message lists the options."""


@dataclass
class CifarArrays:
    """Decoded CIFAR-10: images ``(N, 32, 32, 3)`` uint8 (HWC), labels int64."""
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: list[str]
    description: str          # for tables and plots, e.g. "CIFAR-10, JPEG-q75 copy"
    source: str               # where it came from


def cache_dir() -> Path:
    return Path(os.environ.get("LOCALOPT_CACHE") or Path.home() / ".cache" / "localopt")


def default_search_paths() -> list[Path]:
    """Where :func:`find_data` looks when neither ``--data`` nor ``LOCALOPT_DATA`` is set."""
    paths = [Path.cwd() / "data" / "cifar10-jpeg75.tar.gz",   # a data/ folder where you run
             Path.cwd() / "data" / "cifar-10-batches-py"]
    if (REPO / "pyproject.toml").is_file():                   # running from a checkout
        paths += [REPO / "data" / "cifar10-jpeg75.tar.gz",       # its ignored data/ folder
                  REPO / "data" / "cifar-10-batches-py",
                  REPO.parent / "shared" / "data" / "cifar10-jpeg75.tar.gz"]
    paths.append(cache_dir() / "torchvision" / "cifar-10-batches-py")   # a previous download
    return list(dict.fromkeys(paths))


#: archives a data folder may hold, in the order they are preferred: ``--data DIR`` and
#: ``LOCALOPT_DATA=DIR`` find them in ``DIR`` (e.g. a shared data folder)
KNOWN_ARCHIVES = ("cifar10-jpeg75.tar.gz", "cifar-10-python.tar.gz")


def _known_in_folder(p: Path) -> Path:
    """``p`` itself, or -- when ``p`` is a folder that is not a data set itself (no official
    batches, no ``train/`` and ``test/`` class folders) but holds one of
    :data:`KNOWN_ARCHIVES` -- that archive."""
    if not p.is_dir() or (p / "data_batch_1").is_file() \
            or (p / "cifar-10-batches-py").is_dir() \
            or ((p / "train").is_dir() and (p / "test").is_dir()):
        return p
    return next((p / name for name in KNOWN_ARCHIVES if (p / name).is_file()), p)


#: where torchvision fetches the official CIFAR-10 (163 MB)
OFFICIAL_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


def _not_found(msg: str, searched: Iterable[Path] = ()) -> DataNotFoundError:
    lines = [msg, "Options:",
             "  --data PATH             a cifar-10-batches-py folder, the official "
             "cifar-10-python.tar.gz,",
             "                          or an ImageFolder folder/archive (.tar.gz/.tgz/.tar/.zip)"
             " with train/<class>/ and test/<class>/",
             "                          or a folder holding " + " or ".join(KNOWN_ARCHIVES),
             "  LOCALOPT_DATA=PATH      the same, from the environment",
             "  --download true         (default) fetch the official CIFAR-10 when nothing is "
             f"found (needs internet) into {cache_dir() / 'torchvision'}"]
    searched = list(searched)
    if searched:
        lines.append("Searched: " + ", ".join(str(p) for p in searched))
    return DataNotFoundError("\n".join(lines))


def find_data(data: str | os.PathLike | None = None, download: bool = True) -> Path:
    """The CIFAR-10 source to use: ``data`` (the ``--data`` flag), else ``$LOCALOPT_DATA``,
    else the first of :func:`default_search_paths` that exists, else -- when ``download`` is
    set (the default) and the official server answers -- the official set, fetched through
    torchvision into ``$LOCALOPT_CACHE/torchvision`` with a progress bar.  Offline, the error
    lists the options at once (the server check gives up after a few seconds).  A folder
    given by ``data`` or ``$LOCALOPT_DATA`` may also be one that holds a known archive
    (:data:`KNOWN_ARCHIVES`)."""
    for given, origin in ((data, "--data"), (os.environ.get("LOCALOPT_DATA"), "LOCALOPT_DATA")):
        if given:
            p = Path(given).expanduser()
            if not p.exists():
                raise _not_found(f"{origin} {str(given)!r}: no such file or folder.")
            return _known_in_folder(p)
    searched = default_search_paths()
    for p in searched:
        if p.exists():
            return p
    if not download:
        raise _not_found("No CIFAR-10 data found (and --download false).", searched)
    reason = _unreachable(OFFICIAL_URL)
    if reason:
        raise _not_found(f"No CIFAR-10 data found, and the official copy cannot be fetched "
                         f"({reason}).", searched)
    return _download(searched)


def _unreachable(url: str, timeout: float = 5.0) -> str | None:
    """Why ``url``'s server cannot be reached (``None`` when it answers): a short check so that
    an offline machine gets the options at once instead of a long hang in the download."""
    import socket
    from urllib.parse import urlparse
    u = urlparse(url)
    try:
        socket.create_connection((u.hostname, u.port or 443), timeout=timeout).close()
    except OSError as e:
        return f"{u.hostname} is not reachable: {e}"
    return None


def _download(searched: Iterable[Path] = ()) -> Path:
    import sys

    import torchvision
    root = cache_dir() / "torchvision"
    print(f"localopt: no CIFAR-10 found locally; downloading the official CIFAR-10 (163 MB) "
          f"from {OFFICIAL_URL} into {root} (once; --data PATH or LOCALOPT_DATA use a local "
          "copy, --download false stops here)", file=sys.stderr, flush=True)
    try:
        torchvision.datasets.CIFAR10(str(root), train=True, download=True)
        torchvision.datasets.CIFAR10(str(root), train=False, download=True)
    except Exception as e:  # connection reset, proxy, disk full...
        raise _not_found(f"No CIFAR-10 data found, and downloading it failed ({e}).",
                         searched) from e
    return root / "cifar-10-batches-py"


# ----------------------------------------------------------------------------- readers

def _official_batch(blob: bytes) -> tuple[np.ndarray, np.ndarray]:
    d = pickle.loads(blob, encoding="latin1")
    x = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    y = np.asarray(d.get("labels", d.get("fine_labels")), dtype=np.int64)
    return np.ascontiguousarray(x), y


def _from_official(files: dict[str, bytes], source: str) -> CifarArrays:
    """``files``: base name -> bytes for data_batch_1..5, test_batch, batches.meta."""
    need = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    missing = [n for n in need if n not in files]
    if missing:
        raise _not_found(f"--data {source!r}: official CIFAR-10 batches missing: {missing}.")
    train = [_official_batch(files[n]) for n in need[:5]]
    test_x, test_y = _official_batch(files["test_batch"])
    classes = list(CIFAR10_CLASSES)
    if "batches.meta" in files:
        classes = list(pickle.loads(files["batches.meta"], encoding="latin1")["label_names"])
    return CifarArrays(np.concatenate([t[0] for t in train]), np.concatenate([t[1] for t in train]),
                       test_x, test_y, classes, "CIFAR-10 (official python batches)", source)


def _decode(blob: bytes, name: str) -> np.ndarray:
    from PIL import Image
    with Image.open(io.BytesIO(blob)) as im:
        a = np.asarray(im.convert("RGB"), dtype=np.uint8)
    if a.shape != (32, 32, 3):
        raise ValueError(f"--data: image {name} is {a.shape[1]}x{a.shape[0]}, expected 32x32")
    return a


def _from_imagefolder(members: Iterator[tuple[str, bytes]], source: str) -> CifarArrays:
    """``members``: (path inside the source, bytes); paths end in ``<split>/<class>/<file>``."""
    found: dict[str, dict[str, list[tuple[str, bytes]]]] = {"train": {}, "test": {}}
    for path, blob in members:
        parts = path.replace("\\", "/").split("/")
        if len(parts) >= 3 and parts[-3] in found and path.lower().endswith(IMAGE_SUFFIXES):
            found[parts[-3]].setdefault(parts[-2], []).append((parts[-1], blob))
    if not found["train"] or not found["test"]:
        raise _not_found(f"--data {source!r}: found no train/<class>/<image> and "
                         "test/<class>/<image> files (ImageFolder layout).")
    classes = sorted(found["train"])
    if sorted(found["test"]) != classes:
        raise ValueError(f"--data {source!r}: train classes {classes} differ from test classes "
                         f"{sorted(found['test'])}")
    out = []
    for split in ("train", "test"):
        xs, ys = [], []
        for label, cls in enumerate(classes):
            for name, blob in sorted(found[split][cls]):
                xs.append(_decode(blob, f"{split}/{cls}/{name}"))
                ys.append(label)
        out += [np.stack(xs), np.asarray(ys, dtype=np.int64)]
    desc = f"CIFAR-10, ImageFolder copy ({Path(source).name})"
    return CifarArrays(*out, classes=classes, description=desc, source=source)


def _tar_members(path: Path) -> Iterator[tuple[str, bytes]]:
    with tarfile.open(path, "r:*") as tf:
        for m in tf:
            if m.isfile():
                yield m.name, tf.extractfile(m).read()


def _zip_members(path: Path) -> Iterator[tuple[str, bytes]]:
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if not info.is_dir():
                yield info.filename, zf.read(info)


def _dir_members(path: Path) -> Iterator[tuple[str, bytes]]:
    for f in sorted(path.rglob("*")):
        if f.is_file():
            yield f.relative_to(path).as_posix(), f.read_bytes()


OFFICIAL_NAMES = {f"data_batch_{i}" for i in range(1, 6)} | {"test_batch", "batches.meta"}


def read_source(path: Path) -> CifarArrays:
    """Decode a CIFAR-10 source (no cache)."""
    path = Path(path)
    if path.is_dir():
        official = path / "cifar-10-batches-py" if (path / "cifar-10-batches-py").is_dir() else path
        if (official / "data_batch_1").is_file():
            return _from_official({f.name: f.read_bytes() for f in official.iterdir()
                                   if f.name in OFFICIAL_NAMES}, str(path))
        return _from_imagefolder(_dir_members(path), str(path))
    name = path.name.lower()
    if name.endswith(".zip"):
        members = _zip_members
    elif name.endswith((".tar", ".tar.gz", ".tgz")):
        members = _tar_members
    else:
        raise _not_found(f"--data {str(path)!r}: not a folder nor a .tar/.tar.gz/.tgz/.zip "
                         "archive.")
    items = list(members(path))
    official = {Path(n).name: b for n, b in items if Path(n).name in OFFICIAL_NAMES}
    if "data_batch_1" in official:
        return _from_official(official, str(path))
    return _from_imagefolder(iter(items), str(path))


# ----------------------------------------------------------------------------- cache

def _source_key(path: Path) -> str:
    h = hashlib.sha256()
    if path.is_dir():
        for f in sorted(path.rglob("*")):
            if f.is_file():
                st = f.stat()
                h.update(f"{f.relative_to(path).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n"
                         .encode())
        return "dir-" + h.hexdigest()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_cifar10(data: str | os.PathLike | None = None, download: bool = True,
                 use_cache: bool = True) -> CifarArrays:
    """Find (:func:`find_data`), decode once, and cache CIFAR-10 as uint8 arrays."""
    path = find_data(data, download)
    key = _source_key(path)
    cached = cache_dir() / f"cifar10-{key[:24]}.npz"
    if use_cache and cached.is_file():
        z = np.load(cached, allow_pickle=False)
        return CifarArrays(z["train_x"], z["train_y"], z["test_x"], z["test_y"],
                           [str(c) for c in z["classes"]], str(z["description"]), str(path))
    arrays = read_source(path)
    if key == JPEG75_SHA256:
        arrays.description = "CIFAR-10, JPEG-q75 copy"
    if use_cache:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".tmp{os.getpid()}.npz")
        np.savez(tmp, train_x=arrays.train_x, train_y=arrays.train_y, test_x=arrays.test_x,
                 test_y=arrays.test_y, classes=np.asarray(arrays.classes),
                 description=np.asarray(arrays.description))
        os.replace(tmp, cached)
    return arrays


# ----------------------------------------------------------------------------- on device

@dataclass
class Split:
    """Images ``(N, 3, H, W)`` uint8 and labels ``(N,)`` int64, on one device."""
    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return len(self.y)


def _to_split(x: np.ndarray, y: np.ndarray, device: torch.device) -> Split:
    xt = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).contiguous()
    return Split(xt.to(device), torch.from_numpy(np.asarray(y, dtype=np.int64)).to(device))


def make_splits(arrays: CifarArrays, protocol: str, device: torch.device | str,
                val_size: int = 5000, split_seed: int = 0) -> dict[str, Split]:
    """``{"train", "val"?, "test"}`` on ``device`` under ``protocol`` (see :data:`PROTOCOLS`).

    ``"val"`` holds out ``val_size`` training images chosen by ``split_seed`` (fixed across runs
    and seeds, so every rule is validated on the same images), as BioTorch's 45k/5k benchmark.
    """
    device = torch.device(device)
    if protocol not in PROTOCOLS:
        raise ValueError(f"--protocol {protocol!r}: choose one of {', '.join(PROTOCOLS)}")
    splits = {"test": _to_split(arrays.test_x, arrays.test_y, device)}
    if protocol == "full":
        splits["train"] = _to_split(arrays.train_x, arrays.train_y, device)
        return splits
    n = len(arrays.train_y)
    if not 0 < val_size < n:
        raise ValueError(f"--val-size {val_size}: must be between 1 and {n - 1} for this data")
    order = np.random.default_rng(split_seed).permutation(n)
    val, train = np.sort(order[:val_size]), np.sort(order[val_size:])
    splits["train"] = _to_split(arrays.train_x[train], arrays.train_y[train], device)
    splits["val"] = _to_split(arrays.train_x[val], arrays.train_y[val], device)
    return splits


def random_crop_flip(x: Tensor, generator: torch.Generator, padding: int = 4,
                     flip: bool = True) -> Tensor:
    """Random crop with zero ``padding`` and random horizontal flip of a batch ``(B, C, H, W)``
    in one gather on ``x``'s device; the draws come from ``generator`` (same device)."""
    b, c, h, w = x.shape
    dev = x.device
    padded = F.pad(x, (padding,) * 4)
    oy = torch.randint(0, 2 * padding + 1, (b, 1), generator=generator, device=dev)
    ox = torch.randint(0, 2 * padding + 1, (b, 1), generator=generator, device=dev)
    cols = torch.arange(w, device=dev).expand(b, w)
    if flip:
        mirror = torch.rand(b, 1, generator=generator, device=dev) < 0.5
        cols = torch.where(mirror, w - 1 - cols, cols)
    rows = (oy + torch.arange(h, device=dev))[:, None, :, None]
    cols = (ox + cols)[:, None, None, :]
    return padded[torch.arange(b, device=dev)[:, None, None, None],
                  torch.arange(c, device=dev)[None, :, None, None], rows, cols]


class Normalizer:
    """uint8 ``(B, 3, H, W)`` -> float32 ``(x / 255 - mean) / std`` as one multiply-add."""

    def __init__(self, device: torch.device | str, mean=CIFAR10_MEAN, std=CIFAR10_STD) -> None:
        std_t = torch.tensor(std, device=device).view(1, -1, 1, 1)
        self.scale = 1.0 / (255.0 * std_t)
        self.shift = -torch.tensor(mean, device=device).view(1, -1, 1, 1) / std_t

    def __call__(self, x: Tensor) -> Tensor:
        return torch.addcmul(self.shift, x.float(), self.scale)
