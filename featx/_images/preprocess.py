"""Inputs to model-ready batches.

Accepted inputs (``X``):

- a sequence (list, tuple, 1-D object array, pandas Series, one-column
  DataFrame) of items, each a file path (str or PathLike), the bytes of an
  image file, a PIL image, a numpy array (H x W or H x W x C, C in 1/3/4) or a
  torch tensor (H x W or C x H x W);
- a numpy batch ``N x H x W x C`` (or ``N x H x W`` grayscale);
- a torch batch ``N x C x H x W`` (or ``N x H x W``).

Pixel values: uint8 (0-255), uint16 (0-65535, scaled) or float in [0, 1].

Every image becomes 8-bit RGB by one rule, before it is resized:

- uint16 and float pixels are scaled to 0-255 and rounded (``round(x * 255)``,
  ``round(x * 255 / 65535)``), so the same picture as a file, uint8, uint16,
  float or tensor gives the same pixels, and hence the same features. Models
  are trained on 8-bit images resized the way Pillow does it (rounded to 8
  bits after each resampling pass); resizing a float image instead moves
  features by 2-3% on real photographs (half a grey level of difference,
  amplified by the network), so featx works in 8 bits throughout;
- L, 1, I;16, I, F (grayscale): replicated to three channels; 16-bit values are
  scaled by 255/65535, never clipped to 255;
- P without transparency, CMYK, YCbCr, LAB, HSV: Pillow's conversion to RGB;
- RGBA, LA, PA, P with transparency: alpha-composited onto a white background
  (what an image viewer shows);
- EXIF orientation is applied; an animated image gives its first frame.

Then: resize so that the shorter side is ``resize_size`` (antialiased, the
model's interpolation), center-crop to ``input_size``. Decoding and resizing run
in the DataLoader's workers; the batch travels as uint8 and is normalised on
the compute device.
"""

from __future__ import annotations

import io
import os
import stat
import threading
import warnings
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms.v2 import functional as TF
from torchvision.transforms import InterpolationMode

from .._exceptions import ChannelsWarning, ImageLoadError
from .containers import ArrowColumn, arrow_column
from .remote import Unreadable, URLError, is_url, local_path, read_url

__all__ = ["as_items", "Items", "ImageDataset", "collate", "load_error", "normalize_batch", "item_path", "item_bytes",
           "unit_pixels", "TIFF_MAGIC"]

_INTERP = {
    "nearest": InterpolationMode.NEAREST,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
}
#: Pillow formats featx decodes; anything else (EPS, PSD, ICO, PDF, ...) is refused. JPEG includes MPO
#: (multi-picture phone photos); AVIF needs Pillow >= 11.2 (native), HEIF (iPhone HEIC) the heif extra.
ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP", "AVIF", "HEIF")

#: ISO-BMFF brands of HEIF images (``ftyp`` box): HEIC/HEVC stills and sequences, and the generic ones.
_HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1")

#: An image whose long side, once resized, would exceed this many times the
#: crop is first cropped around its centre (bounds memory for 10000x3 strips).
_MAX_ASPECT_BEFORE_PRECROP = 8


class _BadItem(Exception):
    """An item cannot be turned into an image; carries the reason only."""


# ------------------------------------------------------------------- X -> items


class Items:
    """Random access to the items of ``X`` without copying a numpy/torch batch."""

    def __init__(self, data: Any, kind: str):
        self.data = data
        self.kind = kind  # "list", "np_batch", "torch_batch"

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> Any:
        return self.data[i]


def _is_path(item: Any) -> bool:
    return isinstance(item, (str, os.PathLike))


class NamedBytes(bytes):
    """The bytes of an image file that came with a name (a dataset's ``{"bytes": ..., "path": ...}``).

    It is bytes everywhere (decoding, the cache's content key); the name is
    only for messages.
    """

    path: str | None = None

    def __reduce__(self):  # to DataLoader workers, with the name
        return (named_bytes, (bytes(self), self.path))


def named_bytes(data: bytes, path: str | None) -> NamedBytes:
    out = NamedBytes(data)
    out.path = path
    return out


def _from_record(item: dict) -> Any:
    """A Hugging Face ``Image(decode=False)`` record (``{"bytes": ..., "path": ...}``): its bytes, else its path."""
    data, path = item.get("bytes"), item.get("path")
    if data is not None:
        return named_bytes(bytes(data), None if path is None else os.fspath(path))
    if path is not None:
        return os.fspath(path)
    return item  # neither: refused per item by load_item, naming the keys


def item_path(item: Any) -> str | None:
    """The file path or URL of an item (or the name its bytes came with), or None."""
    if isinstance(item, NamedBytes):
        return item.path
    if isinstance(item, Unreadable):
        return item.url
    return os.fspath(item) if _is_path(item) else None


def _pandas_column(X: Any) -> np.ndarray:
    """A Series, or a one-column DataFrame, as an object array of its items (references, not copies)."""
    if hasattr(X, "columns"):  # DataFrame
        if X.shape[1] != 1:
            raise ValueError(
                f"X is a DataFrame with {X.shape[1]} columns {list(X.columns)[:5]}; featx expects one "
                "column of images (e.g. file paths). Select it (X['path']) or use a ColumnTransformer."
            )
        X = X.iloc[:, 0]
    return X.to_numpy(dtype=object)


def as_items(X: Any) -> Items:
    """Normalise ``X`` to :class:`Items`, rejecting what is clearly not a collection of images."""
    if _is_path(X) or isinstance(X, (bytes, Image.Image)):
        raise ValueError(
            f"X must be a sequence of images, got a single {type(X).__name__}. Wrap it in a list: [X]."
        )
    mod = type(X).__module__
    column = arrow_column(X)  # pyarrow, or a Hugging Face datasets column: read a value at a time
    if column is not None:
        if len(column) == 0:
            raise ValueError("X is empty: featx needs at least one image.")
        return Items(ArrowColumn(column, _from_record), "list")
    if mod.startswith("pandas"):
        X = _pandas_column(X)
    if isinstance(X, torch.Tensor):
        X = X.detach()
        if X.ndim == 4 or X.ndim == 3:
            items = Items(X, "torch_batch")
        else:
            raise ValueError(
                f"a torch tensor X must be a batch N x C x H x W (or N x H x W), got shape {tuple(X.shape)}."
            )
    elif isinstance(X, np.ndarray):
        if X.dtype == object or X.dtype.kind in "US":
            if X.ndim == 2 and X.shape[1] == 1:
                X = X[:, 0]
            if X.ndim != 1:
                raise ValueError(
                    f"X is an array of objects with shape {X.shape}; featx expects a 1-D sequence of images."
                )
            items = Items(list(X), "list")
        elif X.ndim in (3, 4):
            items = Items(X, "np_batch")
        elif X.ndim == 2:
            raise ValueError(
                f"X is a 2-D numeric array of shape {X.shape}, which looks like a feature matrix. featx "
                "expects images: a list of file paths, PIL images or arrays, or a batch N x H x W x C. "
                "To pass a single grayscale image, use [X]."
            )
        else:
            raise ValueError(
                f"X is a {X.ndim}-D numeric array of shape {X.shape}; featx expects images: a list of "
                "paths/PIL images/arrays, or a batch N x H x W x C."
            )
    else:
        try:
            items = Items(list(X), "list")
        except TypeError as exc:
            raise ValueError(
                f"X must be a sequence of images (paths, PIL images, arrays), got {type(X).__name__}."
            ) from exc
    if len(items) == 0:
        raise ValueError("X is empty: featx needs at least one image.")
    if items.kind == "list" and any(isinstance(it, dict) for it in items.data):
        items.data = [_from_record(it) if isinstance(it, dict) else it for it in items.data]
    return items


# ---------------------------------------------------------------- decoding


def _to_rgb_pil(img: Image.Image) -> np.ndarray:
    """Apply featx's image-mode rule; return H x W x 3 uint8."""
    mode = img.mode
    if mode == "RGB":
        return np.asarray(img)
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img).astype(np.float32)
        if mode == "I" and arr.max(initial=0) <= 255 and arr.min(initial=0) >= 0:
            arr /= 255.0  # an 8-bit image stored as 32-bit ints
        else:
            arr /= 65535.0
        return np.repeat(to_uint8(np.clip(arr, 0.0, 1.0))[..., None], 3, axis=2)
    if mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        return np.repeat(to_uint8(_check_float(arr))[..., None], 3, axis=2)
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
    return np.asarray(img.convert("RGB"))


def to_uint8(arr: np.ndarray) -> np.ndarray:
    """Float pixels in [0, 1] -> uint8, rounded to the nearest level (``u8 / 255`` maps back to ``u8``)."""
    return np.rint(np.asarray(arr, dtype=np.float32) * 255.0).astype(np.uint8)


def _check_float(arr: np.ndarray) -> np.ndarray:
    if not np.isfinite(arr).all():
        raise _BadItem("the array contains NaN or infinite values")
    lo, hi = float(arr.min(initial=0.0)), float(arr.max(initial=0.0))
    if lo < 0.0 or hi > 1.0:
        raise _BadItem(
            f"float pixel values must lie in [0, 1], got min {lo:.4g}, max {hi:.4g}; "
            "divide by 255 (or pass uint8)"
        )
    return arr.astype(np.float32, copy=False)


_SOF_MARKERS = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))


def _jpeg_frame(data: bytes) -> tuple[int, int, int, int] | None:
    """(precision, height, width, components) from a JPEG's SOF header, or None."""
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if 0xD0 <= marker <= 0xD8 or marker == 0x01:  # markers without a length
            i += 2
            continue
        if marker in _SOF_MARKERS:
            if i + 10 > n:
                return None
            return data[i + 4], int.from_bytes(data[i + 5:i + 7], "big"), int.from_bytes(data[i + 7:i + 9], "big"), data[i + 9]
        if marker == 0xDA:  # scan data before any frame header
            return None
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def _plain_jpeg(data: bytes) -> tuple[int, int] | None:
    """(height, width) of a plain 8-bit RGB/grayscale JPEG within the pixel limit, else None."""
    if data[:3] != b"\xff\xd8\xff" or b"\xff\xd9" not in data[-1024:]:
        return None
    frame = _jpeg_frame(data)
    if frame is None:
        return None
    precision, h, w, comps = frame
    limit = Image.MAX_IMAGE_PIXELS
    if precision != 8 or comps not in (1, 3) or h * w == 0 or (limit and h * w > limit):
        return None
    return h, w


def _fast_jpeg(data: bytes, draft_size: int | None) -> torch.Tensor | None:
    """Decode a plain 8-bit RGB/grayscale JPEG with torchvision (libjpeg-turbo, GIL released).

    It gives the same pixels as Pillow, faster (libjpeg-turbo without the PIL round trip). Anything
    unusual (CMYK, 12-bit, no end-of-image marker, more pixels than Pillow
    allows, or big enough for Pillow's DCT-domain downscaling to pay) returns
    None, and Pillow handles it with featx's usual rules and error messages.
    """
    size = _plain_jpeg(data)
    if size is None or (draft_size is not None and min(size) // 2 >= draft_size) or size[0] * size[1] > max_pixels():
        return None
    op = _jpeg_op()
    if op is None:
        return None
    try:
        return op(torch.frombuffer(bytearray(data), dtype=torch.uint8), _RGB_MODE, True)
    except RuntimeError:
        return None


def _device_jpeg(data: bytes, device: torch.device) -> torch.Tensor | None:
    """Decode a plain JPEG on ``device`` (nvJPEG on CUDA), or None to use the CPU path.

    The CUDA decoder ignores EXIF orientation, so rotated photos go through
    the CPU path, as do the JPEGs :func:`_fast_jpeg` leaves to Pillow.
    """
    if _plain_jpeg(data) is None or _jpeg_op() is None:
        return None
    try:
        with Image.open(io.BytesIO(data)) as img:  # reads the header only
            if img.getexif().get(0x0112, 1) != 1:
                return None
    except Exception:
        return None
    t = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    try:
        if device.type == "cuda":
            return torch.ops.image.decode_jpegs_cuda([t], _RGB_MODE, device)[0]
        return _jpeg_op()(t, _RGB_MODE, False).to(device)
    except RuntimeError:
        return None


_RGB_MODE = 3  # torchvision.io.ImageReadMode.RGB


def _jpeg_op():
    """torchvision's CPU JPEG decoder op (called directly: its Python wrapper warns of a
    future move to TorchCodec on every call), or None where this torchvision lacks it."""
    global _JPEG_OP
    if _JPEG_OP is False:
        try:
            import torchvision.io  # noqa: F401  (registers the image ops)
            from torchvision.io import ImageReadMode

            assert ImageReadMode.RGB.value == _RGB_MODE
            _JPEG_OP = torch.ops.image.decode_jpeg
        except (ImportError, AttributeError, RuntimeError, AssertionError):
            _JPEG_OP = None
    return _JPEG_OP


_JPEG_OP: Any = False


def _is_heif(data: bytes) -> bool:
    """An ISO-BMFF ``ftyp`` box naming a HEIF brand (and not AVIF, which Pillow reads itself)."""
    if data[4:8] != b"ftyp":
        return False
    brands = data[8:12], *(data[i:i + 4] for i in range(16, min(len(data), int.from_bytes(data[:4], "big")), 4))
    return b"avif" not in brands and b"avis" not in brands and any(b in _HEIF_BRANDS for b in brands)


_HEIF_READY: list[bool] = []
_HEIF_LOCK = threading.Lock()


def _heif_opener() -> None:
    """Register pillow-heif's HEIF reader with Pillow once, or say which extra installs it."""
    with _HEIF_LOCK:
        if _HEIF_READY:
            return
        try:
            import pillow_heif
        except ImportError:
            raise _BadItem("a HEIC/HEIF image (iPhone photo); reading it needs the heif extra: "
                           "pip install 'featx[heif]'") from None
        pillow_heif.register_heif_opener()
        _HEIF_READY.append(True)


#: Largest image decoded at full size (``FEATX_MAX_PIXELS``): about 200 MB as 8-bit RGB, well under Pillow's
#: decompression-bomb limit; JPEGs above it are decoded at a reduced DCT scale where that brings them under.
DEFAULT_MAX_PIXELS = 64_000_000


def max_pixels() -> int:
    """The decode budget in pixels: ``$FEATX_MAX_PIXELS``, else :data:`DEFAULT_MAX_PIXELS`."""
    try:
        return int(os.environ.get("FEATX_MAX_PIXELS", DEFAULT_MAX_PIXELS))
    except ValueError:
        return DEFAULT_MAX_PIXELS


def _open_image(src: io.BytesIO, draft_size: int | None) -> np.ndarray:
    """Decode image-file bytes with Pillow under featx's rules (files are read by the caller).

    Images over ``Image.MAX_IMAGE_PIXELS`` are refused from their header,
    before any pixel is allocated (Pillow itself only warns up to twice the
    limit; a warnings filter is not used here because decoding runs in
    threads and ``warnings.catch_warnings`` is not thread-safe).
    """
    try:
        Image.init()
        with Image.open(src, formats=[f for f in ALLOWED_FORMATS if f in Image.OPEN]) as img:
            limit = Image.MAX_IMAGE_PIXELS
            if limit and img.size[0] * img.size[1] > limit:
                raise _BadItem(
                    f"image too large (decompression bomb guard): {img.size[0]} x {img.size[1]} pixels is over "
                    f"Pillow's limit of {limit} (PIL.Image.MAX_IMAGE_PIXELS)"
                )
            if draft_size is not None and img.format == "JPEG":
                # Decode at a reduced DCT scale when that still leaves at least
                # twice the resize target: near-identical after antialiasing.
                img.draft("RGB", (draft_size, draft_size))
            budget = max_pixels()
            if img.size[0] * img.size[1] > budget:  # after the draft: what would really be decoded
                raise _BadItem(
                    f"image too large to decode: {img.size[0]} x {img.size[1]} pixels ({img.format} cannot be "
                    f"decoded at a reduced size) is over FEATX_MAX_PIXELS={budget}; downscale it, or raise "
                    "FEATX_MAX_PIXELS if the memory is there"
                )
            img.load()  # decode now: truncated data fails here, inside this error handling
            if img.format == "TIFF":
                _check_tiff_bands(src, img)
            img = ImageOps.exif_transpose(img)
            return _to_rgb_pil(img)
    except UnidentifiedImageError:
        bands = _tiff_layout(src.getvalue())
        if bands is not None:
            raise _BadItem(f"a TIFF with {bands} that Pillow cannot decode as RGB(A): to use every band, pass "
                           "in_chans=<number of bands> (the backbone's first convolution is adapted)") from None
        raise _BadItem(
            f"not a recognised image format (featx reads {', '.join(ALLOWED_FORMATS)}; is it really an image?)"
        ) from None
    except Image.DecompressionBombError as exc:
        raise _BadItem(f"image too large (decompression bomb guard): {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt data
        raise _BadItem(f"corrupt or truncated image data ({exc})") from None


#: The first four bytes of a TIFF (little- and big-endian; classic and BigTIFF).
TIFF_MAGIC = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")


def _tiff_layout(data: bytes) -> str | None:
    """How a TIFF holds its bands ("12 samples per pixel", "20 pages of 30 x 12 ..."), None if not a TIFF
    or tifffile (installed with scikit-image; ``pip install tifffile``) is missing."""
    if data[:4] not in TIFF_MAGIC:
        return None
    try:
        import tifffile

        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            page, pages = tif.pages[0], len(tif.pages)
            spp = int(page.samplesperpixel)
            shape = tuple(tif.series[0].shape) if tif.series else None
    except Exception:  # noqa: BLE001 - not readable by tifffile either: say nothing more
        return None
    if pages > 1 and spp == 1:
        return f"{pages} pages of {page.shape[1]} x {page.shape[0]} (tifffile reads it as {shape}: a band stack?)"
    return f"{spp} samples per pixel"


def _check_tiff_bands(src: io.BytesIO, img: Image.Image) -> None:
    """Warn when Pillow reads a TIFF as fewer bands than it holds (extra samples dropped, a stack's first page)."""
    n_frames = getattr(img, "n_frames", 1)
    extra = img.tag_v2.get(338) if hasattr(img, "tag_v2") else None  # ExtraSamples
    spp = int(img.tag_v2.get(277, 1)) if hasattr(img, "tag_v2") else 1  # SamplesPerPixel
    alpha = spp == 4 and img.mode in ("RGBA", "LA") and extra not in (None, 0, (0,))
    if (spp > 3 and not alpha and img.mode != "CMYK") or (n_frames > 1 and spp == 1):
        layout = _tiff_layout(src.getvalue()) or (f"{n_frames} pages" if n_frames > 1 else f"{spp} samples per pixel")
        warnings.warn(f"a TIFF with {layout} is read as one {img.mode} image of {img.size[0]} x {img.size[1]} "
                      "(what Pillow decodes): its other bands are not used; pass in_chans=<number of bands> to "
                      "use them all.", ChannelsWarning, stacklevel=2)


def unit_pixels(arr: np.ndarray) -> np.ndarray | None:
    """featx's pixel rule: None for uint8 (kept as it is), else float32 in [0, 1] (uint16 / 65535, floats checked)."""
    if arr.dtype == np.uint8:
        return None
    if arr.dtype == np.uint16:
        return arr.astype(np.float32) / 65535.0
    if arr.dtype.kind == "f":
        return _check_float(np.asarray(arr, dtype=np.float32))
    raise _BadItem(f"unsupported pixel dtype {arr.dtype}; use uint8, uint16 or float in [0, 1]")


def _array_to_hwc(arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3:
        raise _BadItem(f"an image array must be H x W or H x W x C, got shape {arr.shape}")
    c = arr.shape[2]
    if c not in (1, 3, 4):
        if arr.shape[0] in (1, 3, 4):
            raise _BadItem(
                f"array of shape {arr.shape} looks channels-first; featx expects numpy images as "
                "H x W x C (transpose with arr.transpose(1, 2, 0))"
            )
        raise _BadItem(f"an image array with {c} channels (shape {arr.shape}), but in_chans=3 reads 1, 3 or 4 "
                       f"(grayscale, RGB, RGBA): pass in_chans={c} to use every band")
    if c == 4:
        warnings.warn("a 4-channel image array is read as RGBA: its fourth channel is taken as transparency and "
                      "composited onto white. If it is a fourth band (near-infrared, say), pass in_chans=4 to use "
                      "it, or arr[..., :3] for RGB.", ChannelsWarning, stacklevel=2)
    unit = unit_pixels(arr)
    if c == 4:  # RGBA: composite onto white, like images read from files
        if unit is None:
            unit = arr.astype(np.float32) / 255.0
        alpha = unit[..., 3:4]
        unit = unit[..., :3] * alpha + (1.0 - alpha)
    if unit is not None:
        arr = to_uint8(unit)
    if c == 1:
        arr = np.repeat(arr, 3, axis=2)
    return arr


_NOT_REGULAR = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                (stat.S_ISSOCK, "a socket"))


def read_file(path: str) -> bytes:
    """The bytes of a regular file; anything else (a FIFO, a device, a socket) is a per-item error at once.

    The file is opened without blocking, so a FIFO with no writer cannot
    hang the run (a plain ``open`` waits for a writer forever, and no signal
    interrupts the thread that waits), and its type is checked on the open
    descriptor before anything is read.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise _BadItem("file not found") from None
    except IsADirectoryError:
        raise _BadItem("is a directory, not an image file") from None
    except PermissionError:
        raise _BadItem("permission denied") from None
    except OSError as exc:  # a socket (ENXIO), a name too long, ...
        raise _BadItem(f"cannot be opened ({exc.strerror or exc})") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise _BadItem("is a directory, not an image file")
        if not stat.S_ISREG(mode):
            kind = next((name for test, name in _NOT_REGULAR if test(mode)), "not a regular file")
            raise _BadItem(f"is {kind}, not a regular file; featx reads image files only")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        with os.fdopen(fd, "rb") as f:
            fd = -1
            return f.read()
    except OSError as exc:
        raise _BadItem(f"cannot be read ({exc.strerror or exc})") from None
    finally:
        if fd >= 0:
            os.close(fd)


def read_source(path: str) -> bytes:
    """The bytes of a local file (:func:`read_file`) or of an fsspec URL (:mod:`featx._images.remote`)."""
    if not is_url(path):
        return read_file(path)
    local = local_path(path)
    if local is not None:
        return read_file(local)
    try:
        return read_url(path)
    except URLError as exc:
        raise _BadItem(str(exc)) from None


def item_bytes(item: Any) -> bytes | None:
    """The file bytes of a path, URL or bytes item (None for a decoded item: PIL image, array, tensor);
    a missing, unreadable or empty one is a per-item error."""
    if item is None:
        raise _BadItem("item is None")
    if isinstance(item, Unreadable):  # a URL whose read failed while it was keyed for the cache
        raise _BadItem(item.reason)
    if not (_is_path(item) or isinstance(item, (bytes, bytearray, memoryview))):
        return None
    data = read_source(os.fspath(item)) if _is_path(item) else bytes(item)
    if not data:
        raise _BadItem("empty file (0 bytes)" if _is_path(item) else "empty bytes (0 bytes)")
    return data


def load_item(item: Any, draft_size: int | None = None, decode_device: torch.device | None = None) -> torch.Tensor:
    """One item -> a C x H x W uint8 RGB tensor.

    With ``decode_device``, plain JPEGs are decoded there (the result lives on
    that device); everything else is decoded on the CPU.
    """
    data = item_bytes(item)
    if data is not None:
        if _is_heif(data):
            _heif_opener()
        fast = _device_jpeg(data, decode_device) if decode_device is not None else _fast_jpeg(data, draft_size)
        if fast is not None:
            return fast
        arr = _open_image(io.BytesIO(data), draft_size)
    elif isinstance(item, Image.Image):
        arr = _to_rgb_pil(ImageOps.exif_transpose(item))
    elif isinstance(item, np.ndarray):
        if item.dtype.kind not in "uif":
            raise _BadItem(f"unsupported array dtype {item.dtype}")
        arr = _array_to_hwc(item)
    elif isinstance(item, torch.Tensor):
        t = item.detach().cpu()
        if t.ndim == 3 and t.shape[0] in (1, 3, 4):
            t = t.permute(1, 2, 0)
        elif t.ndim == 3:
            raise _BadItem(f"a torch image must be C x H x W (C in 1/3/4) or H x W, got shape {tuple(t.shape)}")
        if t.dtype == torch.bfloat16 or t.dtype == torch.float16:
            t = t.float()
        arr = _array_to_hwc(t.numpy())
    elif isinstance(item, dict):
        raise _BadItem(f"a record with keys {sorted(map(str, item))[:6]} has neither 'bytes' nor 'path' (a Hugging "
                       "Face Image(decode=False) record has both)")
    else:
        raise _BadItem(
            f"unsupported item type {type(item).__name__}; use a path, image bytes, a PIL image, "
            "a numpy array, a torch tensor or a {'bytes': ..., 'path': ...} record"
        )
    arr = np.ascontiguousarray(arr)
    if not arr.flags.writeable:  # torch cannot wrap read-only memory safely
        arr = arr.copy()
    return torch.from_numpy(arr).permute(2, 0, 1)


def resize_shorter(img: torch.Tensor, cfg: dict[str, Any], size: int | None = None) -> torch.Tensor:
    """Resize the shorter side to ``size`` (default ``resize_size``), antialiased.

    A very elongated image is first cut to the centre that the crop will keep
    (plus a margin), so a 10000 x 3 strip is not blown up to millions of pixels.
    """
    h, w = img.shape[-2:]
    rs = cfg["resize_size"] if size is None else size
    ch, cw = cfg["input_size"]
    short, long_ = min(h, w), max(h, w)
    if long_ * rs / short > _MAX_ASPECT_BEFORE_PRECROP * max(ch, cw):
        keep = int(np.ceil(max(ch, cw) * short / rs)) + 2 * int(np.ceil(short / rs)) + 2
        if h > w:
            top = (h - keep) // 2
            img = img[..., top:top + keep, :]
        else:
            left = (w - keep) // 2
            img = img[..., :, left:left + keep]
    return TF.resize(img, [rs], interpolation=_INTERP[cfg["interpolation"]], antialias=True)


def resize_crop(img: torch.Tensor, cfg: dict[str, Any]) -> torch.Tensor:
    """Resize the shorter side to ``resize_size`` and center-crop ``input_size``."""
    return TF.center_crop(resize_shorter(img, cfg), list(cfg["input_size"]))


#: Test-time augmentations: the views each image becomes (features are averaged over them).
TTA_VIEWS = {None: 1, "hflip": 2, "five_crop": 5, "ten_crop": 10, "multiscale": 3}
#: Zooms of ``tta="multiscale"``: the shorter side resized to these multiples of ``resize_size``.
MULTISCALE = (0.875, 1.0, 1.25)


def tta_views(img: torch.Tensor, cfg: dict[str, Any], tta: str | None) -> torch.Tensor:
    """The views of one decoded image for test-time augmentation: ``V x C x H x W``.

    ``hflip``: the center crop and its mirror image. ``five_crop``: the four
    corner crops and the center crop of the resized image. ``ten_crop``: those
    and their mirror images. ``multiscale``: center crops after resizing the
    shorter side to 0.875, 1 and 1.25 times ``resize_size`` (the whole image,
    the usual view, and a closer look).
    """
    size = list(cfg["input_size"])
    if tta is None:
        return resize_crop(img, cfg)[None]
    if tta == "hflip":
        center = resize_crop(img, cfg)
        return torch.stack([center, TF.horizontal_flip(center)])
    if tta in ("five_crop", "ten_crop"):
        resized = resize_shorter(img, cfg)
        crops = TF.five_crop(resized, size) if tta == "five_crop" else TF.ten_crop(resized, size)
        return torch.stack(list(crops))
    if tta == "multiscale":
        views = []
        for zoom in MULTISCALE:
            rs = max(int(round(zoom * cfg["resize_size"])), *size)
            views.append(TF.center_crop(resize_shorter(img, cfg, rs), size))
        return torch.stack(views)
    raise ValueError(f"tta={tta!r} is invalid. It must be one of {list(TTA_VIEWS)}.")


class ImageDataset(torch.utils.data.Dataset):
    """Items at ``indices`` of ``items``, decoded and resized; errors are returned, not raised.

    Each element is ``(index, tensor or None, reason or None)``, so that a bad
    item inside a worker process reaches the main process as data and becomes
    one clear :class:`featx.ImageLoadError` there.
    """

    def __init__(self, items: Items, indices: np.ndarray, cfg: dict[str, Any],
                 decode_device: torch.device | None = None, tta: str | None = None, loader: Any = None):
        self.items = items
        self.load = loader or load_item  # another loader for other channel counts (featx._images.bands)
        self.indices = indices
        self.cfg = cfg
        self.draft_size = 2 * cfg["resize_size"]
        self.decode_device = decode_device  # decode JPEGs there and hand over tensors on it
        self.tta = tta  # None: one C x H x W crop per item; else V x C x H x W views

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int):
        i = int(self.indices[k])
        try:
            item = self.items[i]
            if self.items.kind == "np_batch":
                img = self.load(np.asarray(item))
            elif self.items.kind == "torch_batch":
                img = self.load(item)
            else:
                img = self.load(item, self.draft_size, self.decode_device)
            img = resize_crop(img, self.cfg) if self.tta is None else tta_views(img, self.cfg, self.tta)
            if self.decode_device is not None:
                img = img.to(self.decode_device)
            return i, img, None
        except _BadItem as exc:
            return i, None, str(exc)
        except Exception as exc:  # anything else still names the item in the main process
            return i, None, f"{type(exc).__name__}: {exc}"


def load_error(items: Items, errors: list[tuple[int, str]]) -> ImageLoadError:
    """The error for the first of a batch's unreadable items, naming its index and path."""
    i, reason = errors[0]
    return ImageLoadError(i, item_path(items[i]), reason)


def collate(batch: list) -> tuple[torch.Tensor, torch.Tensor | None, list[tuple[int, str]]]:
    """Stack a batch (uint8: every image is 8-bit by featx's rule)."""
    idx = torch.tensor([b[0] for b in batch], dtype=torch.long)
    errors = [(b[0], b[2]) for b in batch if b[2] is not None]
    imgs = [b[1] for b in batch if b[1] is not None]
    if errors:
        idx = torch.tensor([b[0] for b in batch if b[1] is not None], dtype=torch.long)
    if not imgs:
        return idx, None, errors
    return idx, torch.stack(imgs), errors


def as_unit_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 in [0, 1]; a float tensor (already in [0, 1]) -> float32."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


def normalize_batch(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 or [0, 1] float ... x 3 x H x W -> normalised float32."""
    return as_unit_float(x).sub_(mean).div_(std)
