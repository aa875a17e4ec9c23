"""The ``external`` protection: protected images made elsewhere, read from an npz or a PNG folder, checked
against the train set, measured, and keyed by the source's content (its contract, as the generic one in
tests/test_components.py cannot run without a file)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_components import assert_image_set_contract, digits_batch, rgb_batch

from bench.cli import main
from bench.core.components import PROTECTIONS, ImageSet, Protection
from bench.core.registry import ConfigError
from bench.data.datasets import DATASETS
from bench.store.keys import make_key
from bench.store.records import RecordLog
from conftest import TINY, run_subprocess, tiny_matrix

CPU = torch.device("cpu")


@pytest.fixture(scope="module", params=["digits", "rgb"])
def batch(request) -> ImageSet:
    return {"digits": digits_batch, "rgb": rgb_batch}[request.param]()


@pytest.fixture(scope="module")
def digits() -> ImageSet:
    return digits_batch()


def noisy(data: ImageSet, amount: int = 3, seed: int = 0) -> torch.Tensor:
    """``data``'s images with ±``amount`` added to every pixel (random signs), clamped to [0, 255]."""
    sign = torch.randint(0, 2, data.images.shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return (data.images.int() + amount * sign).clamp(0, 255).to(torch.uint8)


def write_npz(path: Path, images: torch.Tensor, layout: str = "nhwc", **arrays) -> Path:
    """Save N×C×H×W ``images`` as numpy/PIL releases do (N×H×W×C), as N×C×H×W, or as N×H×W (one channel)."""
    array = images.numpy()
    array = {"nhwc": array.transpose(0, 2, 3, 1), "nchw": array, "nhw": array[:, 0]}[layout]
    np.savez(path, **{"images": array, **arrays})
    return path


def write_pngs(folder: Path, images: torch.Tensor, width: int = 0) -> Path:
    """One PNG per image, named by index (zero-padded to ``width`` digits)."""
    folder.mkdir()
    for i, image in enumerate(images):
        array = image.permute(1, 2, 0).numpy()
        Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(folder / f"{str(i).zfill(width)}.png")
    return folder


def external(path: Path | str) -> Protection:
    return PROTECTIONS.create("external", path=str(path))


def folder_sha256(folder: Path) -> str:
    """Independent reference: names and bytes of the PNGs in index order."""
    digest = hashlib.sha256()
    for file in sorted(folder.glob("*.png"), key=lambda f: int(f.stem)):
        data = file.read_bytes()
        digest.update(f"{file.name}\0{len(data)}\0".encode() + data)
    return digest.hexdigest()


# ------------------------------------------------------------------ round trips and the contract


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_npz_round_trip(tmp_path, batch, layout):
    """Both layouts give back exactly the images written; contract: uint8, shape, labels, no mutation, deterministic."""
    protected = noisy(batch)
    path = write_npz(tmp_path / "poison.npz", protected, layout, labels=batch.labels.numpy())
    protection = external(path)
    assert_image_set_contract(lambda: protection.protect(batch, seed=3, device=CPU), batch)
    out = protection.protect(batch, seed=0, device=CPU)
    assert torch.equal(out.images, protected)
    assert torch.equal(protection.protect(batch, seed=7, device=CPU).images, protected), "the seed must not matter"
    assert out.info["source_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert out.info["source"] == str(path) and out.info["linf"] == 3


def test_npz_without_channel_axis_and_other_key(tmp_path, digits):
    """Greyscale as N×H×W, and an npz whose only array (besides labels) has another name."""
    protected = noisy(digits)
    nhw = write_npz(tmp_path / "nhw.npz", protected, "nhw")
    np.savez(tmp_path / "x.npz", x=protected.numpy().transpose(0, 2, 3, 1), labels=digits.labels.numpy())
    for path in (nhw, tmp_path / "x.npz"):
        assert torch.equal(external(path).protect(digits, seed=0, device=CPU).images, protected)


@pytest.mark.parametrize("width", [0, 5])
def test_png_folder_round_trip(tmp_path, batch, width):
    """``0.png`` … and ``00000.png`` … give back exactly the images written; the sha256 covers names and bytes."""
    protected = noisy(batch)
    folder = write_pngs(tmp_path / "pngs", protected, width)
    protection = external(folder)
    assert_image_set_contract(lambda: protection.protect(batch, seed=3, device=CPU), batch)
    out = protection.protect(batch, seed=0, device=CPU)
    assert torch.equal(out.images, protected)
    assert out.info["source_sha256"] == folder_sha256(folder) == protection.spec()["params"]["source_sha256"]


def test_measured_budget(tmp_path, batch):
    """L∞ in pixel units, mean per-image L2 in [0, 1] units and the share of changed values, measured."""
    protected = noisy(batch, amount=3)
    info = external(write_npz(tmp_path / "p.npz", protected)).protect(batch, seed=0, device=CPU).info
    diff = (protected.numpy().astype(np.float64) - batch.images.numpy()) / 255
    assert info["linf"] == 3
    assert info["l2"] == pytest.approx(np.sqrt((diff ** 2).reshape(len(diff), -1).sum(1)).mean(), rel=1e-5)
    assert info["changed_fraction"] == pytest.approx((diff != 0).mean(), rel=1e-6)
    assert 0.5 < info["changed_fraction"] <= 1
    half = batch.images.clone()
    half[:20] = noisy(batch, amount=9)[:20]  # a larger change on half the images only
    info = external(write_npz(tmp_path / "h.npz", half)).protect(batch, seed=0, device=CPU).info
    assert info["linf"] == 9 and 0.2 < info["changed_fraction"] <= 0.5
    info = external(write_npz(tmp_path / "c.npz", batch.images)).protect(batch, seed=0, device=CPU).info
    assert (info["linf"], info["l2"], info["changed_fraction"]) == (0, 0.0, 0.0)


# ------------------------------------------------------------------ refusals


def refusal(path: Path | str, train: ImageSet) -> str:
    with pytest.raises(ConfigError) as err:
        external(path).protect(train, seed=0, device=CPU)
    return str(err.value)


def test_wrong_count(tmp_path, digits):
    message = refusal(write_npz(tmp_path / "p.npz", noisy(digits)[:-1]), digits)
    assert "39 images" in message and "train set has 40" in message and "train order" in message


def test_wrong_shape(tmp_path, digits):
    """RGB images for a greyscale set, and 8×8 images for 16×16 ones: the shapes are named."""
    rgb = noisy(digits).repeat(1, 3, 1, 1)
    message = refusal(write_npz(tmp_path / "rgb.npz", rgb), digits)
    assert "(40, 16, 16, 3)" in message and "1×16×16" in message
    small = noisy(digits)[:, :, ::2, ::2]
    assert "(40, 8, 8, 1)" in refusal(write_npz(tmp_path / "small.npz", small), digits)


@pytest.mark.parametrize("dtype", [np.float32, np.uint16])
def test_wrong_dtype(tmp_path, digits, dtype):
    path = tmp_path / "p.npz"
    np.savez(path, images=noisy(digits).numpy().astype(dtype))
    message = refusal(path, digits)
    assert np.dtype(dtype).name in message and "not uint8" in message
    with pytest.raises(ConfigError, match="not uint8"):
        external(path).spec()  # refused while planning, before anything runs


def test_mismatched_labels(tmp_path, digits):
    path = write_npz(tmp_path / "p.npz", noisy(digits), labels=digits.labels.roll(1).numpy())
    assert "differ from the train labels" in refusal(path, digits)


def test_missing_png_index(tmp_path, digits):
    """A gap is named while planning and when protecting; a missing last image when protecting."""
    folder = write_pngs(tmp_path / "pngs", noisy(digits))
    (folder / "7.png").unlink()
    assert "missing indices: [7]" in refusal(folder, digits)
    with pytest.raises(ConfigError, match=r"missing indices: \[7\]"):
        external(folder).spec()
    (folder / "39.png").rename(folder / "7.png")
    assert "missing indices: [39]" in refusal(folder, digits)
    shutil.copy(folder / "7.png", folder / "39.png")
    shutil.copy(folder / "7.png", folder / "40.png")
    assert "extra: [40]" in refusal(folder, digits)


def test_bad_png_folders(tmp_path, digits):
    """Two files for one index, a file not named by an index, a 16-bit PNG, and an empty folder."""
    folder = write_pngs(tmp_path / "pngs", noisy(digits))
    shutil.copy(folder / "3.png", folder / "003.png")
    message = refusal(folder, digits)
    assert "3.png" in message and "of its own" in message
    (folder / "003.png").rename(folder / "cat.png")
    assert "cat.png" in refusal(folder, digits) and "not named by a train index" in refusal(folder, digits)
    (folder / "cat.png").unlink()
    Image.fromarray(np.full((16, 16), 1000, dtype=np.uint16)).save(folder / "5.png")
    message = refusal(folder, digits)
    assert "5.png" in message and "8-bit" in message
    message = refusal(write_pngs(tmp_path / "empty", noisy(digits)[:0]), digits)
    assert "0 PNGs" in message and "missing indices: [0, 1, 2, 3, 4]" in message


def test_empty_missing_and_unreadable_paths(tmp_path, digits):
    assert "set path" in refusal("", digits)
    assert PROTECTIONS.create("external").spec()["params"] == {"path": ""}  # nothing to hash yet
    assert "nope.npz does not exist" in refusal(tmp_path / "nope.npz", digits)
    with pytest.raises(ConfigError, match="nope.npz does not exist"):
        external(tmp_path / "nope.npz").spec()  # refused while planning too
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    assert "cannot read images" in refusal(tmp_path / "junk.npz", digits)
    np.savez(tmp_path / "two.npz", a=noisy(digits).numpy(), b=noisy(digits).numpy())
    assert "name the images array 'images'" in refusal(tmp_path / "two.npz", digits)


# ------------------------------------------------------------------ cache key


def test_spec_follows_the_content(tmp_path, digits):
    """The spec is JSON-able, holds the source's sha256, changes with the bytes and not with the place."""
    path = write_npz(tmp_path / "p.npz", noisy(digits, seed=0))
    first = external(path).spec()
    assert first["params"] == {"source_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    assert json.loads(json.dumps(first)) == first
    write_npz(path, noisy(digits, seed=1))  # same size, rewritten at once: the hash must not be stale
    second = external(path).spec()
    assert second != first and make_key(second) != make_key(first)
    copy = tmp_path / "elsewhere" / "copy.npz"
    copy.parent.mkdir()
    shutil.copy(path, copy)
    assert external(copy).spec() == second
    folder = write_pngs(tmp_path / "pngs", noisy(digits))
    before = external(folder).spec()
    Image.fromarray(noisy(digits, seed=5)[4, 0].numpy()).save(folder / "4.png")
    assert external(folder).spec() != before


# ------------------------------------------------------------------ through the CLI


def matrix_with(tmp_path: Path, source: Path) -> Path:
    text = TINY.format(extra_countermeasures="").replace("cwp = { size_fraction = 0.375 }",
                                                         f'external = {{ path = "{source}" }}')
    assert "external" in text
    return tiny_matrix(tmp_path, text=text)


def tiny_digits() -> ImageSet:
    return DATASETS.create("digits", per_class=20, test_per_class=10).load()[0]


def test_cli_runs_an_external_poison(tmp_path):
    """`bench run` on a matrix naming an npz made for its digits subset: exit 0 and a record with the
    source's sha256 and the measured budget."""
    train = tiny_digits()
    source = write_npz(tmp_path / "poison.npz", noisy(train), labels=train.labels.numpy())
    matrix = matrix_with(tmp_path, source)
    proc = run_subprocess(["run", "--matrix", str(matrix), "--results", str(tmp_path / "r"), "--jobs", "1",
                           "--only", "protection=external"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    (record,) = RecordLog(tmp_path / "r" / "runs" / "tiny" / "records.jsonl").read()
    assert record.status == "ok" and record.protection == "external", record.error
    assert record.protect_info["source_sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert record.protect_info["linf"] == 3 and record.linf == pytest.approx(3 / 255)


def test_cli_refuses_a_bad_file_before_running(tmp_path):
    """A float npz is refused while planning: exit 2 with the message, nothing trained."""
    source = tmp_path / "poison.npz"
    np.savez(source, images=tiny_digits().images.numpy().astype(np.float32) / 255)
    proc = run_subprocess(["run", "--matrix", str(matrix_with(tmp_path, source)), "--results", str(tmp_path / "r")],
                          tmp_path)
    assert proc.returncode == 2 and "external" in proc.stderr and "float32, not uint8" in proc.stderr
    assert not (tmp_path / "r" / "runs").exists()


def test_cli_records_a_file_for_another_train_set(tmp_path, capsys):
    """A file made for another subset (wrong count) fails its cell with the message and the run exits 1."""
    source = write_npz(tmp_path / "poison.npz", noisy(digits_batch()))
    code = main(["run", "--matrix", str(matrix_with(tmp_path, source)), "--results", str(tmp_path / "r"),
                 "--jobs", "1", "--only", "protection=external"])
    assert code == 1
    (record,) = RecordLog(tmp_path / "r" / "runs" / "tiny" / "records.jsonl").read()
    assert record.status == "error" and "40 images" in record.error and "train set has 200" in record.error
    printed = capsys.readouterr()
    assert "train set has 200" in printed.out + printed.err
