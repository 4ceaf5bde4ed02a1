"""Helpers shared by the example scripts: a PNG writer without dependencies, a 3x5 digit font
for labels in such PNGs, and the peak-memory probes."""
from __future__ import annotations

import os
import struct
import sys
import zlib
from typing import Any

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

def smoke_caps(args: Any, **caps: Any) -> None:
    """--smoke: the cpu backend unless one is named, and every option in `caps` at most its cap."""
    args.backend = args.backend or "cpu"
    for k, cap in caps.items():
        setattr(args, k, min(getattr(args, k), cap))


# 3x5 bitmaps of 0-9, rows top to bottom, 3 bits each
_FONT = {0: "111101101101111", 1: "010110010010111", 2: "111001111100111", 3: "111001111001111",
         4: "101101111001001", 5: "111100111001111", 6: "111100111101111", 7: "111001010010010",
         8: "111101111101111", 9: "111101111001111"}


def write_png(path: str, img: np.ndarray) -> None:
    """Write an 8-bit grayscale (H, W) or RGB (H, W, 3) array as a PNG (zlib, no other deps)."""
    a = np.asarray(img)
    if a.dtype != np.uint8:
        a = (np.clip(a, 0, 1) * 255).astype(np.uint8)
    if a.ndim == 2:
        color = 0
    elif a.ndim == 3 and a.shape[2] == 3:
        color = 2
    else:
        raise ValueError(f"write_png: expected (H, W) or (H, W, 3), got {a.shape}")
    h, w = a.shape[:2]
    raw = b"".join(b"\x00" + a[r].tobytes() for r in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    with open(path, "wb") as f:
        f.write(png)


def draw_digit(canvas: np.ndarray, d: int, top: int, left: int, value: Any, scale: int = 1) -> None:
    """Draw digit d (3x5 font, scaled) into canvas at (top, left) with `value`."""
    bits = _FONT[int(d)]
    for i, b in enumerate(bits):
        if b == "1":
            r, c = divmod(i, 3)
            canvas[top + r * scale: top + (r + 1) * scale, left + c * scale: left + (c + 1) * scale] = value


def digit_grid_png(path: str, images: np.ndarray, pred: np.ndarray, true: np.ndarray,
                   cols: int = 8) -> str:
    """A grid of digit images (N, 1, H, W) with predicted (green if right, red if wrong) and
    true (white) labels under each; matplotlib if importable, else our PNG writer. Returns the
    writer used."""
    n = len(images)
    rows = (n + cols - 1) // cols
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.2, rows * 1.4))
        for k, ax in enumerate(np.asarray(axes).reshape(-1)):
            ax.axis("off")
            if k < n:
                ax.imshow(images[k, 0], cmap="gray")
                ok = pred[k] == true[k]
                ax.set_title(f"{pred[k]} ({true[k]})", color="green" if ok else "red", fontsize=9)
        fig.suptitle("predicted (true)")
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return "matplotlib"
    except ImportError:
        pass
    h, w = images.shape[2:]
    s = 2
    cell_h, cell_w = h + 7 * s, max(w, 8 * 4 * s // 2 + 2)
    canvas = np.zeros((rows * cell_h, cols * cell_w, 3), np.uint8)
    for k in range(n):
        r, c = divmod(k, cols)
        y0, x0 = r * cell_h, c * cell_w
        canvas[y0:y0 + h, x0:x0 + w] = (np.clip(images[k, 0], 0, 1) * 255).astype(np.uint8)[..., None]
        color = (0, 220, 0) if pred[k] == true[k] else (230, 0, 0)
        draw_digit(canvas, pred[k], y0 + h + s, x0 + 1, color, s)
        draw_digit(canvas, true[k], y0 + h + s, x0 + 1 + 5 * s, (255, 255, 255), s)
    write_png(path, canvas)
    return "png"


