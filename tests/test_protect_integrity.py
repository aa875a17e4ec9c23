"""`bench protect` integrity (issue 35; audit defects 2, 4 and 14): no write through a link, no file replaced
without --overwrite, no output folder in or around the input, every Pillow mode read by a documented conversion,
unreadable files refused by name before anything is written, writes all or none, L∞ within the protection's ε."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import shutil
import stat
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench.cli import main
from bench.core.components import PROTECTIONS
from bench.core.registry import ConfigError
from bench.execute import encrypt
from bench.execute.encrypt import protect_folder
from bench.store.cache import Cache, umask
from bench.testing import coloured, digits_set

CHEAP = {"surrogate": "cnn", "surrogate_epochs": 1, "epochs": 1, "width": 8, "batch_size": 64}
EPSILON = 8


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    """A results folder with ConfounderGAN entries fitted on real digits: ``grey`` (1×16×16), ``rgb`` (3×16×16),
    and ``loose``: the grey generator (ε = 8) under a spec of ε = 1, a consistent-looking but wrong entry."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("protect") / "results"
    cache = Cache(root / "cache")
    for key, data in (("grey", digits_set()), ("rgb", coloured(digits_set()))):
        protection = PROTECTIONS.create("confoundergan", **CHEAP)
        fitted = protection.fit(data, seed=0, device=torch.device("cpu"))
        cache.save("protected", key, fitted.data, {"spec": protection.spec(), "seed": 0}, fitted.models)
        if key == "grey":
            loose = PROTECTIONS.create("confoundergan", **{**CHEAP, "epsilon": 1.0})
            cache.save("protected", "loose", fitted.data, {"spec": loose.spec(), "seed": 0}, fitted.models)
    return root


def protect(results: Path, source: Path, target: Path, key: str = "grey", **options) -> str:
    return protect_folder(key, source, target, results=results, device="cpu", **options)


def grey_images(n: int = 5) -> np.ndarray:
    return digits_set().images[:n, 0].numpy()  # N×16×16


def rgb_images(n: int = 5) -> np.ndarray:
    return coloured(digits_set()).images[:n].permute(0, 2, 3, 1).numpy().copy()  # N×16×16×3


def write(folder: Path, images: np.ndarray, suffix: str = ".png") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"img{i}{suffix}" for i in range(len(images))]
    for path, image in zip(paths, images):
        Image.fromarray(image).save(path)
    return paths


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(np.int16)


def files(folder: Path) -> list[str]:
    return sorted(os.listdir(folder)) if folder.exists() else []


# ------------------------------------------------------------------ links and existing files


def test_links_in_the_output_are_never_written_through(results, tmp_path, capsys):
    """Audit defect 2: a symlink and a hard link to inputs and a symlink to an unrelated file sat where outputs go;
    all targets were overwritten (exit 0). Now refused (exit 2), even with --overwrite for links to inputs; with
    --overwrite an unrelated link is replaced by the output, its target untouched."""
    inputs = write(tmp_path / "in", grey_images(3))
    keep = tmp_path / "precious" / "keep.png"
    keep.parent.mkdir()
    Image.fromarray(grey_images(4)[3]).save(keep)
    out = tmp_path / "out"
    out.mkdir()
    (out / "img0.png").symlink_to(inputs[0])
    os.link(inputs[1], out / "img1.png")
    (out / "img2.png").symlink_to(keep)
    before = {p: sha(p) for p in [*inputs, keep]}
    with pytest.raises(ConfigError, match=r"already holds img0.png, img1.png, img2.png: .*--overwrite"):
        protect(results, tmp_path / "in", out)
    with pytest.raises(ConfigError, match="is an --input file"):
        protect(results, tmp_path / "in", out, overwrite=True)
    assert main(["protect", "--model", "grey", "--results", str(results), "--input", str(tmp_path / "in"),
                 "--output", str(out), "--device", "cpu", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "is an --input file" in err and "Traceback" not in err
    assert {p: sha(p) for p in before} == before and files(out) == ["img0.png", "img1.png", "img2.png"]
    (out / "img0.png").unlink()
    (out / "img1.png").unlink()
    protect(results, tmp_path / "in", out, overwrite=True)
    assert {p: sha(p) for p in before} == before  # originals and the unrelated file kept
    assert not (out / "img2.png").is_symlink() and (out / "img2.png").stat().st_nlink == 1
    assert np.abs(pixels(out / "img2.png") - grey_images(3)[2]).max() <= EPSILON
    assert files(out) == ["img0.png", "img1.png", "img2.png"]  # and no temporary file left


def test_existing_outputs_are_refused_unless_overwrite(results, tmp_path):
    write(tmp_path / "in", grey_images(5))
    out = tmp_path / "out"
    protect(results, tmp_path / "in", out)
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(out / "img4.png")  # "the user's" file
    written = {name: sha(out / name) for name in files(out)}
    with pytest.raises(ConfigError, match=r"already holds img0.png, img1.png, img2.png and 2 more"):
        protect(results, tmp_path / "in", out)
    assert {name: sha(out / name) for name in files(out)} == written
    protect(results, tmp_path / "in", out, overwrite=True)
    assert np.abs(pixels(out / "img4.png") - grey_images(5)[4]).max() <= EPSILON and len(files(out)) == 5
    assert {stat.S_IMODE((out / name).stat().st_mode) for name in files(out)} == {0o666 & ~umask()}  # as open() makes


def test_a_large_folder_is_read_twice_with_the_same_result(results, tmp_path, monkeypatch):
    """Pixels over KEEP_BYTES are not kept between the checking pass and encryption: decoded again, same PNGs."""
    write(tmp_path / "in", grey_images(5))
    protect(results, tmp_path / "in", tmp_path / "kept", batch_size=2)
    monkeypatch.setattr(encrypt, "KEEP_BYTES", 0)
    protect(results, tmp_path / "in", tmp_path / "again", batch_size=2)
    assert files(tmp_path / "again") == files(tmp_path / "kept") and len(files(tmp_path / "kept")) == 5
    assert all(sha(tmp_path / "again" / name) == sha(tmp_path / "kept" / name) for name in files(tmp_path / "kept"))


def test_output_folder_in_or_around_the_input_is_refused(results, tmp_path):
    source = tmp_path / "in"
    write(source, grey_images(2))
    (tmp_path / "link").symlink_to(source)
    (tmp_path / "a file").write_text("x")
    cases = {source / "protected": "is inside --input", tmp_path / "link" / "sub": "is inside --input",
             tmp_path: "is inside --output", tmp_path / "link": "is the --input folder",
             source / ".." / "in": "is the --input folder", tmp_path / "a file": "is not a folder"}
    for target, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            protect(results, source, target)
    assert files(source) == ["img0.png", "img1.png"] and (tmp_path / "a file").read_text() == "x"


# ------------------------------------------------------------------ pixel modes


def alpha(shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)


def composite(colour: np.ndarray, a: np.ndarray) -> np.ndarray:
    return (colour.astype(np.uint32) * a + 127) // 255


def sixteen_bit(folder: Path) -> np.ndarray:
    """16-bit PNGs whose high bytes are the digits (the low bytes noise): the audit's outputs were only 0/255."""
    low = alpha((5, 16, 16)).astype(np.uint16)
    for i, image in enumerate(grey_images().astype(np.uint16) << 8 | low):
        Image.fromarray(image).save(folder / f"img{i}.png")
        assert Image.open(folder / f"img{i}.png").mode == "I;16"
    return grey_images()


def grey_palette(folder: Path) -> np.ndarray:
    """Audit: a grey palette image was counted as 3 channels (refused by a grey model)."""
    for i, image in enumerate(grey_images()):
        Image.fromarray(image).convert("P").save(folder / f"img{i}.png")
    return grey_images()


def colour_palette(folder: Path) -> np.ndarray:
    for i, image in enumerate(rgb_images()):
        Image.fromarray(image).quantize(64).save(folder / f"img{i}.png")
    return np.stack([np.asarray(Image.open(folder / f"img{i}.png").convert("RGB")) for i in range(5)])


def rgba(folder: Path) -> np.ndarray:
    """Alpha composited on black (the colour under transparent pixels is not published)."""
    a = alpha((5, 16, 16, 1))
    for i, image in enumerate(np.concatenate([rgb_images(), a], -1)):
        Image.fromarray(image).save(folder / f"img{i}.png")
    return composite(rgb_images(), a)


def grey_alpha(folder: Path) -> np.ndarray:
    a = alpha((5, 16, 16))
    for i, image in enumerate(np.stack([grey_images(), a], -1)):
        Image.fromarray(image, "LA").save(folder / f"img{i}.png")
    return composite(grey_images(), a)


def cmyk_jpeg(folder: Path) -> np.ndarray:
    for i, image in enumerate(rgb_images()):
        Image.fromarray(image).convert("CMYK").save(folder / f"img{i}.jpg", quality=95)
        assert Image.open(folder / f"img{i}.jpg").mode == "CMYK"
    return np.stack([np.asarray(Image.open(folder / f"img{i}.jpg").convert("RGB")) for i in range(5)])


def exif_rotated_jpeg(folder: Path) -> np.ndarray:
    """Stored sideways with EXIF orientation 6 (rotate 90° clockwise to view): read as viewed."""
    exif = Image.Exif()
    exif[0x0112] = 6
    for i, image in enumerate(grey_images()):
        Image.fromarray(np.rot90(image)).save(folder / f"img{i}.jpg", quality=100, exif=exif.tobytes())
    stored = np.stack([np.asarray(Image.open(folder / f"img{i}.jpg")) for i in range(5)])
    return np.rot90(stored, -1, axes=(1, 2))


def one_bit(folder: Path) -> np.ndarray:
    for i, image in enumerate(grey_images()):
        Image.fromarray(image > 127).save(folder / f"img{i}.png")
    return np.where(grey_images() > 127, 255, 0)


MODES = {"16-bit": (sixteen_bit, "grey"), "grey palette": (grey_palette, "grey"), "RGBA": (rgba, "rgb"),
         "LA": (grey_alpha, "grey"), "colour palette": (colour_palette, "rgb"), "CMYK JPEG": (cmyk_jpeg, "rgb"),
         "EXIF-rotated JPEG": (exif_rotated_jpeg, "grey"), "1-bit": (one_bit, "grey")}


@pytest.mark.parametrize("mode", MODES)
def test_each_pixel_mode_is_converted_as_documented(mode, results, tmp_path):
    """The outputs are within ε of the documented 8-bit conversion, and changed. Failed on the old code: 16-bit
    (clipped to 0/255), grey palette (refused as 3 channels), RGBA and LA (alpha dropped), EXIF (not rotated);
    the colour palette, CMYK and 1-bit cases are guards (the old code got them right)."""
    make, key = MODES[mode]
    (tmp_path / "in").mkdir()
    expected = make(tmp_path / "in").astype(np.int16)
    protect(results, tmp_path / "in", tmp_path / "out", key=key, batch_size=2)
    out = np.stack([pixels(tmp_path / "out" / f"img{i}.png") for i in range(5)])
    assert out.shape == expected.shape
    assert np.abs(out - expected).max() <= EPSILON and np.abs(out - expected).max() > 0


# ------------------------------------------------------------------ unreadable files, failed writes, ε


def png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def truncated_png() -> bytes:
    noise = io.BytesIO()
    Image.fromarray(alpha((16, 16))).save(noise, format="PNG")  # the models' size: only decoding finds it cut
    return noise.getvalue()[:len(noise.getvalue()) // 2]


BAD = {"random bytes": ("zz.png", lambda: np.random.default_rng(1).bytes(500)), "empty": ("zz.png", lambda: b""),
       "text": ("zz.jpg", lambda: b"just some notes\n"), "truncated": ("zz.png", truncated_png),
       "decompression bomb": ("zz.png", lambda: png_header(20000, 20000)),
       "TIFF named .png": ("zz.png", lambda: tiff_bytes())}


def tiff_bytes() -> bytes:
    data = io.BytesIO()
    Image.fromarray(grey_images(1)[0]).save(data, format="TIFF")
    return data.getvalue()


@pytest.mark.parametrize("case", [*BAD, "symlink to /etc/passwd"])
def test_unreadable_files_are_named_and_nothing_is_written(case, results, tmp_path, capsys):
    """Audit defect 14: tracebacks (UnidentifiedImageError, DecompressionBombError, a truncated file unnamed), and
    with --batch-size 2 four outputs written before the truncated file failed. Now exit 2 naming the file, and the
    output folder (existing and empty here) stays empty."""
    write(tmp_path / "in", grey_images(4))
    name = "zz.png"
    if case in BAD:
        name, make = BAD[case]
        (tmp_path / "in" / name).write_bytes(make())
    else:
        (tmp_path / "in" / name).symlink_to("/etc/passwd")
    (tmp_path / "out").mkdir()
    with pytest.raises(ConfigError, match=f"--input file {tmp_path / 'in' / name} cannot be read"):
        protect(results, tmp_path / "in", tmp_path / "out", batch_size=2)
    assert files(tmp_path / "out") == []
    assert main(["protect", "--model", "grey", "--results", str(results), "--input", str(tmp_path / "in"),
                 "--output", str(tmp_path / "out"), "--device", "cpu", "--batch-size", "2"]) == 2
    err = capsys.readouterr().err
    assert name in err and "Traceback" not in err and files(tmp_path / "out") == []


def test_a_failed_write_leaves_no_file(results, tmp_path, monkeypatch, capsys):
    """Disk full at the third PNG: an OSError naming that output, and no output nor temporary file left (the old
    code had written two); the CLI says so in one line, exit 1."""
    write(tmp_path / "in", grey_images(5))
    save, calls = Image.Image.save, []

    def full(self, fp, *args, **kwargs):
        calls.append(fp)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", full)
    with pytest.raises(OSError, match="No space left on device") as failure:
        protect(results, tmp_path / "in", tmp_path / "out", batch_size=2)
    assert failure.value.errno == errno.ENOSPC and failure.value.filename == str(tmp_path / "out" / "img2.png")
    assert files(tmp_path / "out") == []
    calls.clear()
    assert main(["protect", "--model", "grey", "--results", str(results), "--input", str(tmp_path / "in"),
                 "--output", str(tmp_path / "out"), "--device", "cpu", "--batch-size", "2"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "img2.png" in err and "No space left" in err and files(tmp_path / "out") == []


def test_an_encryption_over_epsilon_is_refused(results, tmp_path):
    """An entry whose models change pixels by more than its protection's ε (audit defect 6: an edited ε made
    outputs 255 levels off) is refused before anything is written."""
    write(tmp_path / "in", grey_images(5))
    with pytest.raises(ConfigError, match=r"changed a pixel by [2-8]/255, over confoundergan's ε = 1"):
        protect(results, tmp_path / "in", tmp_path / "out", key="loose")
    assert files(tmp_path / "out") == []


def test_an_edited_manifest_is_refused(results, tmp_path):
    """The audit's edit: the generator's ε raised from 8 to 255 in manifest.json (valid JSON)."""
    copy = tmp_path / "results"
    shutil.copytree(results / "cache" / "protected" / "grey", copy / "cache" / "protected" / "grey")
    manifest = copy / "cache" / "protected" / "grey" / "manifest.json"
    text = manifest.read_text()
    assert text.count('"epsilon": 8.0') == 2  # the spec's and the generator's arch
    manifest.write_text(text.replace('"epsilon": 8.0', '"epsilon": 255.0'))
    write(tmp_path / "in", grey_images(2))
    with pytest.raises(ConfigError, match=f"cache entry {copy / 'cache' / 'protected' / 'grey'} did not verify"):
        protect(copy, tmp_path / "in", tmp_path / "out")
    assert files(tmp_path / "out") == []
