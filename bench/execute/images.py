"""Image files for ``bench protect``: each PNG/JPEG read into 8-bit pixels by one explicit rule per mode, and PNGs
written all or none, never through a link.

Reading (``read_image``; only the PNG and JPEG decoders are used, whatever the extension says):

- EXIF orientation is applied first (``PIL.ImageOps.exif_transpose``): pixels as a viewer shows them.
- ``L`` as is; ``1`` → ``L`` (0 or 255).
- 16-bit greyscale (``I;16``, ``I;16B``, ``I;16L``, ``I;16N``) → ``L`` by ``value >> 8`` (the high byte: 65535 →
  255). ``I`` (32-bit; older Pillows open 16-bit PNGs so) is taken as 16-bit the same way when every value is in
  0…65535, and refused otherwise.
- ``F`` (floating point) is refused: its pixels have no standard range to map to 0…255.
- ``P``/``PA`` (palette) → the palette's colours, then as ``RGB``/``RGBA``; an image whose converted pixels are all
  grey (R = G = B) is ``L``: a grey palette is one channel, as its content is.
- Alpha (``LA``, ``RGBA``, ``PA``) is composited on black, ``round(c · α / 255)``: the output has no alpha, so it
  shows what is visible, and the colours hidden under transparent pixels (erased content, often) are not published.
- ``RGB`` as is (16-bit RGB/RGBA PNGs: Pillow keeps each channel's high byte, as ``>> 8``); ``CMYK`` (JPEG) and
  other colour modes → ``RGB`` by Pillow's conversion (no ICC profile applied).
- Anything else, and any file the decoders reject (not an image, empty, truncated, over Pillow's
  ``MAX_IMAGE_PIXELS`` decompression-bomb bound), is a ConfigError naming the file.

Writing (``StagedPngs``): the PNGs go to a new private folder (``mkdtemp``, ``.bench-protect-*``) in the output
folder, and ``commit`` moves them all into place (``os.replace`` swaps a link for the file, never writes into the
link's target); leaving the ``with`` block removes that folder, so a failed run leaves no partial file (a killed one
leaves that hidden folder alone).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Self

import numpy as np

from bench.core.registry import ConfigError

if TYPE_CHECKING:
    from PIL.Image import Image as PilImage

EXTENSIONS = (".png", ".jpg", ".jpeg")
SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")
COLOUR = ("RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")


def read_image(path: Path) -> np.ndarray:
    """The pixels of the PNG/JPEG ``path`` as uint8 H×W×C (C = 1 or 3), by the rules of the module docstring."""
    from PIL import Image, ImageOps

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # refuse, do not decode, huge images
            with Image.open(path, formats=("PNG", "JPEG")) as image:
                ImageOps.exif_transpose(image, in_place=True)
                return _pixels(image, path)
    except ConfigError:
        raise
    except Exception as err:  # decoders raise many types on bad bytes (OSError, SyntaxError, ValueError …)
        raise ConfigError(f"--input file {path} cannot be read as a PNG/JPEG image ({type(err).__name__}: {err}); "
                          "remove it from the folder or re-save it as a PNG") from err


def _pixels(image: PilImage, path: Path) -> np.ndarray:
    mode = image.mode
    if mode in SIXTEEN_BIT or mode == "I":
        values = np.asarray(image)
        if mode == "I" and values.size and (values.min() < 0 or values.max() > 65535):
            raise ConfigError(f"--input file {path} holds 32-bit pixels outside 0…65535 (mode I); save it as an "
                              "8- or 16-bit PNG")
        return (values.astype(np.uint32) >> 8).astype(np.uint8)[..., None]
    if mode in ("L", "1"):
        return np.asarray(image.convert("L"))[..., None]
    if mode in ("P", "PA"):
        rgba = np.asarray(image.convert("RGBA"))
        grey = (rgba[..., :1] == rgba[..., 1:3]).all()
        return _composite(rgba[..., :1] if grey else rgba[..., :3], rgba[..., 3:])
    if mode == "LA":
        la = np.asarray(image)
        return _composite(la[..., :1], la[..., 1:])
    if mode == "RGBA":
        rgba = np.asarray(image)
        return _composite(rgba[..., :3], rgba[..., 3:])
    if mode in COLOUR:
        return np.asarray(image.convert("RGB"))
    raise ConfigError(f"--input file {path} has pixel mode {mode!r}, which bench protect does not convert (floating "
                      "point has no standard 0…255 range); save it as an 8-bit greyscale or RGB PNG")


def _composite(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """``colour`` over black with ``alpha`` (uint8), rounded: round(c · α / 255)."""
    if alpha.min() == 255:
        return np.ascontiguousarray(colour)
    return ((colour.astype(np.uint32) * alpha + 127) // 255).astype(np.uint8)


def with_path(err: OSError, path: Path) -> OSError:
    """``err`` (disk full, permission denied …) as an OSError naming ``path``: of the errno's subclass, as open()
    raises it, with ``filename`` set."""
    if err.errno is not None:
        return OSError(err.errno, err.strerror or str(err), str(path))
    named = OSError(f"cannot write {path}: {err}")
    named.filename = str(path)
    return named


class StagedPngs:
    """PNGs written into a new private folder in ``folder`` and moved to their names there by ``commit`` alone."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.stage: Path | None = None
        self.names: list[str] = []

    def __enter__(self) -> Self:
        try:
            self.stage = Path(tempfile.mkdtemp(prefix=".bench-protect-", dir=self.folder))
        except OSError as err:
            raise with_path(err, self.folder) from err
        return self

    def add(self, name: str, pixels: np.ndarray) -> None:
        """Write H×W×C uint8 ``pixels`` as the future ``folder/name``; an OSError names that path."""
        from PIL import Image

        assert self.stage is not None, "use StagedPngs in a with block"
        try:
            Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(self.stage / name, format="PNG")
        except OSError as err:
            raise with_path(err, self.folder / name) from err
        self.names.append(name)

    def commit(self) -> None:
        """Move every staged PNG to its name (replacing what is there: the caller checked that it may)."""
        assert self.stage is not None, "use StagedPngs in a with block"
        for name in self.names:
            try:
                os.replace(self.stage / name, self.folder / name)
            except OSError as err:
                raise with_path(err, self.folder / name) from err

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        if self.stage is not None:  # after an error (or Ctrl-C) before commit, the PNGs not moved go with it
            shutil.rmtree(self.stage, ignore_errors=True)
