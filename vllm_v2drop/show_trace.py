"""``vllm-v2drop show-trace``: draw which patches of an image / video V2Drop kept, per stage.

Reads one request from a trace (``{"v2drop": {"trace": DIR}}`` writes one JSON line per
request: its layers and, per vision item, ``first`` / ``rows`` and per stage the original
prompt positions it kept) and draws, per vision item, one panel per stage: the item with
the kept patches bright and the dropped ones dimmed (a video as a grid of its frames), the
way the paper shows V2Drop's spatially even selection.

Patch geometry. The trace has an item's row count, not its patch grid; the grid is the
factorisation ``frames x h x w = rows`` whose ``w / h`` is closest to the picture's aspect
ratio (a video's ``frames`` is its frame count over the temporal patch size, 2 on Qwen, or
the frame count itself; ``--grid TxHxW`` sets it). Rows are read in raster order (frame,
row, column), item row ``i`` at prompt position ``first + i``: exact for items whose
embedding rows are one contiguous raster (LLaVA-1.5, Qwen2-VL / Qwen2.5-VL images and
videos, LLaVA-OneVision videos, whose one trailing newline row is not drawn); approximate for
LLaVA-OneVision / LLaVA-NeXT images (tiles plus newline rows). PIL only.
"""

from __future__ import annotations

import glob
import json
import math
import os
from collections.abc import Sequence

import numpy as np

__all__ = ["find_request", "infer_grid", "load_video", "render", "show_trace"]


def find_request(trace: str, request_id: str) -> dict:
    """The trace line of ``request_id`` (exact, or vLLM's ``ID-suffix`` / ``chatcmpl-ID...``)."""
    paths = sorted(glob.glob(os.path.join(trace, "*.jsonl"))) if os.path.isdir(trace) else [trace]
    hits = []
    for path in paths:
        with open(path) as f:
            for line in f:
                rec = json.loads(line)
                rid = rec["request_id"]
                if rid == request_id or rid.startswith(request_id + "-") or rid.startswith(f"chatcmpl-{request_id}"):
                    hits.append(rec)
    if not hits:
        raise SystemExit(f"show-trace: request {request_id!r} is not in {trace}")
    return hits[-1]


def _factor(n: int, aspect: float) -> tuple[int, int]:
    """``(h, w)`` with ``h * w == n`` and ``w / h`` closest to ``aspect``."""
    best = (1, n)
    for h in range(1, n + 1):
        if n % h == 0:
            w = n // h
            if abs(math.log(w / h) - math.log(aspect)) < abs(math.log(best[1] / best[0]) - math.log(aspect)):
                best = (h, w)
    return best


def infer_grid(rows: int, aspect: float, frames: int = 1) -> tuple[int, int, int]:
    """``(t, h, w)`` patch grid of an item of ``rows`` rows (see the module docstring).

    Candidates: ``t`` of 1, the frame count or half of it (Qwen's temporal patches), over all
    ``rows`` or all but a trailing separator row (LLaVA-OneVision ends a video with one newline
    row: 16 frames of 4 x 4 patches are 257 rows); the one whose frames fit ``aspect`` best wins,
    a whole-item grid on a tie.
    """
    best, best_cost = (1, 1, rows), math.inf
    for n, penalty in ((rows, 0.0), (rows - 1, 0.05)):
        for t in sorted({1, math.ceil(frames / 2), frames}):
            if n < 1 or n % t:
                continue
            h, w = _factor(n // t, aspect)
            cost = abs(math.log(w / h) - math.log(aspect)) + penalty + (0.0 if t > 1 or frames == 1 else 1.0)
            if cost < best_cost:
                best, best_cost = (t, h, w), cost
    return best


def load_video(path: str) -> np.ndarray:
    """Frames ``(T, H, W, 3)`` uint8 of an ``.npy`` array or a video file (OpenCV)."""
    if path.endswith(".npy"):
        return np.load(path)
    import cv2

    cap, frames = cv2.VideoCapture(path), []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    if not frames:
        raise SystemExit(f"show-trace: no frames in {path}")
    return np.stack(frames)


def _panel(picture, grid: tuple[int, int], kept: set[int], offset: int, cell: int):
    """One frame: ``picture`` resized to the patch grid, dropped patches dimmed, kept ones outlined."""
    from PIL import Image, ImageDraw

    h, w = grid
    img = picture.convert("RGB").resize((w * cell, h * cell))
    dim = Image.new("RGB", img.size, (0, 0, 0))
    mask = Image.new("L", img.size, 170)  # 170/255 of black over dropped patches
    draw = ImageDraw.Draw(mask)
    for i in range(h * w):
        if offset + i in kept:
            y, x = divmod(i, w)
            draw.rectangle([x * cell, y * cell, (x + 1) * cell - 1, (y + 1) * cell - 1], fill=0)
    out = Image.composite(dim, img, mask)
    lines = ImageDraw.Draw(out)
    for i in range(h * w):
        if offset + i in kept:
            y, x = divmod(i, w)
            lines.rectangle([x * cell, y * cell, (x + 1) * cell - 1, (y + 1) * cell - 1], outline=(255, 215, 0))
    return out


def render(record: dict, pictures: Sequence, grids: Sequence[tuple[int, int, int]] | None = None,
           cell: int = 24):
    """A PIL image: one row per vision item, one panel per stage (stage 0 = every row).

    ``pictures[i]`` is item ``i``'s PIL image, or a list of PIL frames for a video.
    """
    from PIL import Image, ImageDraw

    items = record["items"]
    if len(pictures) < len(items):
        raise SystemExit(f"show-trace: the request has {len(items)} vision item(s) "
                         f"({', '.join(it['modality'] for it in items)}); give one --image / --video per item")
    layers = record["layers"]
    rows_out, pad, title = [], 8, 18
    for k, item in enumerate(items):
        pic = pictures[k]
        frames = pic if isinstance(pic, list) else [pic]
        aspect = frames[0].width / frames[0].height
        t, h, w = grids[k] if grids and grids[k] else infer_grid(item["rows"], aspect, len(frames))
        cols = math.ceil(math.sqrt(t))
        frame_rows = math.ceil(t / cols)
        stages = [list(range(item["first"], item["first"] + item["rows"]))] + item["kept"]
        panels = []
        for s, kept_pos in enumerate(stages):
            kept = {p - item["first"] for p in kept_pos}
            fw, fh = w * cell, h * cell
            board = Image.new("RGB", (cols * fw + (cols - 1) * 2, frame_rows * fh + (frame_rows - 1) * 2 + title),
                              (255, 255, 255))
            for f in range(t):
                frame = frames[min(len(frames) - 1, f * len(frames) // t)]
                tile = _panel(frame, (h, w), kept, f * h * w, cell)
                board.paste(tile, ((f % cols) * (fw + 2), title + (f // cols) * (fh + 2)))
            where = "input" if s == 0 else f"layer {layers[s - 1]}+"
            ImageDraw.Draw(board).text((2, 2), f"{item['modality']} {k}, {where}: {len(kept)}/{item['rows']}",
                                       fill=(0, 0, 0))
            panels.append(board)
        width = sum(p.width for p in panels) + pad * (len(panels) + 1)
        height = max(p.height for p in panels) + 2 * pad
        row = Image.new("RGB", (width, height), (255, 255, 255))
        x = pad
        for p in panels:
            row.paste(p, (x, pad))
            x += p.width + pad
        rows_out.append(row)
    out = Image.new("RGB", (max(r.width for r in rows_out), sum(r.height for r in rows_out)), (255, 255, 255))
    y = 0
    for r in rows_out:
        out.paste(r, (0, y))
        y += r.height
    return out


def _parse_grid(text: str | None) -> tuple[int, int, int] | None:
    if not text:
        return None
    parts = [int(p) for p in text.lower().split("x")]
    return tuple(parts) if len(parts) == 3 else (1, *parts)  # type: ignore[return-value]


def show_trace(trace: str, request_id: str, images: Sequence[str] = (), video: str | None = None,
               out: str = "v2drop-trace.png", grid: str | None = None, cell: int = 24) -> str:
    """Draw ``request_id`` of ``trace`` into ``out``; items take the pictures in prompt order
    (images as given, the video where the trace has it)."""
    from PIL import Image

    record = find_request(trace, request_id)
    images = list(images)
    pictures = []
    for item in record["items"]:
        if item["modality"] == "video" and video is not None:
            pictures.append([Image.fromarray(f) for f in load_video(video)])
        elif images:
            pictures.append(Image.open(images.pop(0)))
    grids = [_parse_grid(grid)] * len(record["items"]) if grid else None
    render(record, pictures, grids, cell).save(out)
    return out
