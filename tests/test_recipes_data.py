"""CIFAR-10 loading (ImageFolder archives/folders, official batches), cache, splits,
batched augmentation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from localopt.recipes import data as D
from localopt.recipes.synthetic import synthetic_arrays, write_imagefolder, write_official

pytestmark = pytest.mark.usefixtures("one_thread", "isolated_data_env")
_unreachable = D._unreachable     # the real check (the fixture replaces it in every test)


@pytest.fixture(scope="module")
def arrays():
    return synthetic_arrays(n_train=30, n_test=20, seed=1)


def _assert_same(got: D.CifarArrays, want: D.CifarArrays) -> None:
    # ImageFolder order is class by class, files sorted: compare per class, in order.
    for gx, gy, wx, wy in ((got.train_x, got.train_y, want.train_x, want.train_y),
                           (got.test_x, got.test_y, want.test_x, want.test_y)):
        assert gx.dtype == np.uint8 and gx.shape == wx.shape and gx.shape[1:] == (32, 32, 3)
        assert gy.dtype == np.int64
        for c in range(len(want.classes)):
            np.testing.assert_array_equal(gx[gy == c], wx[wy == c])
    assert got.classes == want.classes


@pytest.mark.parametrize("dest", ["tiny.tar.gz", "tiny.tgz", "tiny.tar", "tiny.zip", "tinydir"])
def test_imagefolder_sources_decode_exactly(tmp_path, arrays, dest):
    path = write_imagefolder(tmp_path / dest, arrays, prefix="cifar10/" if "tar" in dest else "")
    got = D.load_cifar10(path)
    _assert_same(got, arrays)
    assert got.description.startswith("CIFAR-10, ImageFolder copy")


def test_imagefolder_labels_follow_sorted_class_folders(tmp_path, arrays):
    got = D.load_cifar10(write_imagefolder(tmp_path / "t.tar.gz", arrays))
    assert got.classes == sorted(arrays.classes) == list(D.CIFAR10_CLASSES)
    assert np.bincount(got.train_y).tolist() == np.bincount(arrays.train_y).tolist()


@pytest.mark.parametrize("archive", [False, True])
def test_official_batches_folder_and_archive(tmp_path, arrays, archive):
    folder = write_official(tmp_path / "official", arrays)
    source = folder
    if archive:  # the official cifar-10-python.tar.gz layout
        import tarfile
        source = tmp_path / "cifar-10-python.tar.gz"
        with tarfile.open(source, "w:gz") as tf:
            tf.add(folder, arcname="cifar-10-batches-py")
    got = D.load_cifar10(source)
    # official batches keep the original order exactly
    np.testing.assert_array_equal(got.train_x, arrays.train_x)
    np.testing.assert_array_equal(got.train_y, arrays.train_y)
    np.testing.assert_array_equal(got.test_x, arrays.test_x)
    assert got.classes == list(D.CIFAR10_CLASSES)
    assert got.description == "CIFAR-10 (official python batches)"
    # the parent folder of cifar-10-batches-py is accepted too (torchvision's root)
    if not archive:
        np.testing.assert_array_equal(D.load_cifar10(tmp_path / "official").test_y,
                                      arrays.test_y)


def test_decoded_arrays_are_cached_by_content(tmp_path, arrays, monkeypatch):
    path = write_imagefolder(tmp_path / "t.zip", arrays)
    first = D.load_cifar10(path)
    assert len(list((tmp_path / "cache").glob("cifar10-*.npz"))) == 1

    def boom(_):
        raise AssertionError("decoded again despite the cache")
    monkeypatch.setattr(D, "read_source", boom)
    again = D.load_cifar10(path)
    np.testing.assert_array_equal(again.train_x, first.train_x)
    assert again.classes == first.classes and again.description == first.description
    # other content -> other key -> decoded again
    write_imagefolder(path, synthetic_arrays(n_train=30, n_test=20, seed=2))
    with pytest.raises(AssertionError, match="decoded again"):
        D.load_cifar10(path)


def test_missing_data_error_lists_the_options(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "default_search_paths", lambda: [tmp_path / "nothing-here"])
    with pytest.raises(D.DataNotFoundError) as e:
        D.find_data(None)
    msg = str(e.value)
    for option in ("--data", "LOCALOPT_DATA", "--download", "nothing-here", "offline in tests"):
        assert option in msg
    with pytest.raises(D.DataNotFoundError, match="--download false"):
        D.find_data(None, download=False)
    with pytest.raises(D.DataNotFoundError, match="--data '/no/such/path'"):
        D.find_data("/no/such/path")
    monkeypatch.setenv("LOCALOPT_DATA", str(tmp_path / "missing.tar.gz"))
    with pytest.raises(D.DataNotFoundError, match="LOCALOPT_DATA"):
        D.find_data(None)


def test_no_data_online_downloads_the_official_set(tmp_path, arrays, monkeypatch, capsys):
    import torchvision
    monkeypatch.setattr(D, "default_search_paths", lambda: [
        tmp_path / "nothing-here", D.cache_dir() / "torchvision" / "cifar-10-batches-py"])
    monkeypatch.setattr(D, "_unreachable", lambda url, timeout=5.0: None)
    calls = []

    class FakeCIFAR10:  # what torchvision.datasets.CIFAR10(root, download=True) leaves on disk
        def __init__(self, root, train=True, download=False):
            calls.append((root, train, download))
            write_official(root, arrays)

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    got = D.load_cifar10()
    assert {c[1] for c in calls} == {True, False} and all(c[2] for c in calls)
    assert calls[0][0] == str(D.cache_dir() / "torchvision")
    err = capsys.readouterr().err
    assert "downloading the official CIFAR-10" in err and D.OFFICIAL_URL in err
    _assert_same(got, arrays)
    calls.clear()                       # found in the cache folder next time: no download
    assert D.find_data(None) == D.cache_dir() / "torchvision" / "cifar-10-batches-py"
    assert not calls


def test_unreachable_server_answers_fast():
    import time
    t = time.perf_counter()
    reason = _unreachable("https://localopt.invalid/x.tar.gz", timeout=2.0)
    assert reason and "localopt.invalid" in reason and time.perf_counter() - t < 10


def test_env_var_and_flag_precedence(tmp_path, arrays, monkeypatch):
    a = write_imagefolder(tmp_path / "a.zip", arrays)
    b = write_imagefolder(tmp_path / "b.zip", arrays)
    monkeypatch.setenv("LOCALOPT_DATA", str(a))
    assert D.find_data(None) == a
    assert D.find_data(str(b)) == b


@pytest.mark.parametrize("archive", D.KNOWN_ARCHIVES)
@pytest.mark.parametrize("how", ["env", "flag"])
def test_a_folder_holding_a_known_archive_finds_it(tmp_path, arrays, monkeypatch, archive, how):
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "README").write_text("a data folder")
    if archive == "cifar-10-python.tar.gz":   # the official archive's layout
        import tarfile
        folder = write_official(tmp_path / "official", arrays)
        with tarfile.open(shared / archive, "w:gz") as tf:
            tf.add(folder, arcname="cifar-10-batches-py")
    else:
        write_imagefolder(shared / archive, arrays, prefix="cifar10/")
    if how == "env":
        monkeypatch.setenv("LOCALOPT_DATA", str(shared))
        assert D.find_data(None) == shared / archive
        got = D.load_cifar10(None)
    else:
        assert D.find_data(str(shared)) == shared / archive
        got = D.load_cifar10(shared)
    assert got.source == str(shared / archive)
    _assert_same(got, arrays)


def test_known_archives_in_order_and_data_folders_kept(tmp_path, arrays):
    shared = tmp_path / "shared"
    shared.mkdir()
    for name in reversed(D.KNOWN_ARCHIVES):
        write_imagefolder(shared / name, arrays)
    assert D.find_data(shared) == shared / D.KNOWN_ARCHIVES[0]
    folder = write_imagefolder(tmp_path / "imagefolder", arrays)   # a data set itself
    write_imagefolder(folder / D.KNOWN_ARCHIVES[0], arrays)
    assert D.find_data(folder) == folder


def test_archive_without_imagefolder_layout_is_a_clear_error(tmp_path):
    import zipfile
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("readme.txt", "hello")
    with pytest.raises(D.DataNotFoundError, match="ImageFolder"):
        D.load_cifar10(bad)


def test_splits_protocols(arrays):
    s = D.make_splits(arrays, "val", "cpu", val_size=10, split_seed=0)
    assert (len(s["train"]), len(s["val"]), len(s["test"])) == (20, 10, 20)
    assert s["train"].x.shape == (20, 3, 32, 32) and s["train"].x.dtype == torch.uint8
    # train and val are disjoint and together the whole training set
    rows = lambda t: {bytes(r) for r in t.x.flatten(1).numpy()}  # noqa: E731
    assert not rows(s["train"]) & rows(s["val"])
    assert rows(s["train"]) | rows(s["val"]) == {bytes(r) for r in
                                                 arrays.train_x.transpose(0, 3, 1, 2)
                                                 .reshape(30, -1)}
    again = D.make_splits(arrays, "val", "cpu", val_size=10, split_seed=0)
    assert torch.equal(again["val"].x, s["val"].x)
    other = D.make_splits(arrays, "val", "cpu", val_size=10, split_seed=1)
    assert not torch.equal(other["val"].x, s["val"].x)
    full = D.make_splits(arrays, "full", "cpu")
    assert set(full) == {"train", "test"} and len(full["train"]) == 30
    with pytest.raises(ValueError, match="--protocol"):
        D.make_splits(arrays, "nope", "cpu")
    with pytest.raises(ValueError, match="--val-size"):
        D.make_splits(arrays, "val", "cpu", val_size=30)


def _crops(x: torch.Tensor, padding: int):
    """All (2p+1)^2 crops of one padded image, and their mirror images."""
    c, h, w = x.shape
    p = torch.nn.functional.pad(x, (padding,) * 4)
    for dy in range(2 * padding + 1):
        for dx in range(2 * padding + 1):
            crop = p[:, dy:dy + h, dx:dx + w]
            yield crop
            yield crop.flip(-1)


def test_augmentation_shapes_content_and_determinism():
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    out = D.random_crop_flip(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.uint8
    # every output image is one crop (maybe mirrored) of its own zero-padded input image
    for i in range(len(x)):
        assert any(torch.equal(out[i], c) for c in _crops(x[i], 4))
    # the draws vary over the batch, and a seed fixes them
    assert sum(not torch.equal(out[i], x[i]) for i in range(16)) >= 12
    assert torch.equal(out, D.random_crop_flip(x, torch.Generator().manual_seed(0)))
    assert not torch.equal(out, D.random_crop_flip(x, torch.Generator().manual_seed(1)))
    # no padding and no flip: identity; flip only: each image mirrored or not
    assert torch.equal(D.random_crop_flip(x, torch.Generator(), padding=0, flip=False), x)
    f = D.random_crop_flip(x, torch.Generator().manual_seed(3), padding=0)
    mirrored = [torch.equal(f[i], x[i].flip(-1)) for i in range(16)]
    assert all(m or torch.equal(f[i], x[i]) for i, m in enumerate(mirrored))
    assert 0 < sum(mirrored) < 16


def test_normalizer_matches_definition():
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    mean = torch.tensor(D.CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(D.CIFAR10_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(D.Normalizer("cpu")(x), (x / 255.0 - mean) / std)
