"""Build the bad-input gauntlet: every messy file featx must handle, made by code (no binaries in git).

    python tests/make_gauntlet.py tests/data/gauntlet

``build(folder)`` returns ``{file name: expected outcome}``, where the outcome
is ``"ok"`` (features are computed) or ``"error: <words in the reason>"``.
"""

from __future__ import annotations

import io
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

GOOD = "ok"


def _photo(h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) % 256], -1)
    return np.clip(img + rng.integers(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


def _png_with_size(width: int, height: int) -> bytes:
    """A tiny, valid-looking PNG whose header claims ``width`` x ``height`` pixels."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr:ihdr + 17])) & 0xFFFFFFFF
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


def build(folder: str | Path) -> dict[str, str]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    photo = _photo()
    cases: dict[str, str] = {}

    def save(name: str, img: Image.Image, expected: str = GOOD, **kw) -> None:
        img.save(folder / name, **kw)
        cases[name] = expected

    save("good.jpg", Image.fromarray(photo), quality=92)
    save("one_pixel.png", Image.fromarray(photo[:1, :1]))
    save("elongated_10000x3.png", Image.fromarray(np.tile(photo[:3, :1], (1, 10000, 1))))
    save("gray_L.png", Image.fromarray(photo[..., 0]))
    save("gray_alpha_LA.png", Image.fromarray(np.stack([photo[..., 0], photo[..., 1]], -1), "LA"))
    save("palette_P.png", Image.fromarray(photo).convert("P"))
    pal = Image.fromarray(photo).convert("P")
    save("palette_transparent_P.png", pal, transparency=0)
    save("rgba.png", Image.fromarray(np.dstack([photo, photo[..., :1]]), "RGBA"))
    save("cmyk.jpg", Image.fromarray(photo).convert("CMYK"), quality=92)
    save("gray16.png", Image.fromarray((photo[..., 0].astype(np.uint16) * 257)))
    frames = [Image.fromarray(photo), Image.fromarray(255 - photo)]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:])
    cases["animated.gif"] = GOOD
    for o in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = o
        save(f"exif_orientation_{o}.jpg", Image.fromarray(photo), exif=exif.tobytes(), quality=92)
    save("bitmap.bmp", Image.fromarray(photo))
    save("tiff.tif", Image.fromarray(photo))
    save("webp.webp", Image.fromarray(photo))

    # --- failures
    (folder / "empty.jpg").write_bytes(b"")
    cases["empty.jpg"] = "error: empty file (0 bytes)"
    (folder / "page.jpg").write_text("<!doctype html><html><body>404 Not Found</body></html>")
    cases["page.jpg"] = "error: not a recognised image format"
    jpg = io.BytesIO()
    Image.fromarray(_photo(200, 200)).save(jpg, format="JPEG", quality=95)
    (folder / "truncated.jpg").write_bytes(jpg.getvalue()[: len(jpg.getvalue()) // 2])
    cases["truncated.jpg"] = "error: truncated"
    png = io.BytesIO()
    Image.fromarray(_photo(200, 200)).save(png, format="PNG")
    (folder / "truncated.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    cases["truncated.png"] = "error: truncated"
    (folder / "bomb.png").write_bytes(_png_with_size(60000, 60000))
    cases["bomb.png"] = "error: decompression bomb"
    ico = io.BytesIO()
    Image.fromarray(photo).save(ico, format="ICO")
    (folder / "icon.ico").write_bytes(ico.getvalue())
    cases["icon.ico"] = "error: not a recognised image format"
    (folder / "a_directory.jpg").mkdir(exist_ok=True)
    cases["a_directory.jpg"] = "error: is a directory"
    cases["missing.jpg"] = "error: file not found"  # listed, never written
    return cases


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "tests/data/gauntlet")
    for name, outcome in build(out).items():
        print(f"{name:<32} {outcome}")
