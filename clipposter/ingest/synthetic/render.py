"""Drawing synthetic posters: one band per genre with that genre's palette and shapes, a title band.

Genre cues are deliberately coarse and global (palette of large areas, big shapes), so even a small
random-weight image encoder at low resolution carries enough genre signal for a linear probe.
With cue="region" the genres sit in one quadrant instead and the rest of the poster is decoy genre
art: a pooled embedding mixes the two, a head that attends over patch tokens can look at the quadrant.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from clipposter.errors import ConfigError
from clipposter.ingest.synthetic.text import sample_genres

RGB = tuple[int, int, int]


@dataclass(frozen=True)
class _Palette:
    top: RGB  # background gradient, top colour
    bottom: RGB  # background gradient, bottom colour
    accents: tuple[RGB, ...]  # shape colours
    ink: RGB  # title-band colour when this genre is the primary one


_PALETTES: dict[str, _Palette] = {
    "Action": _Palette((190, 30, 15), (255, 140, 0), ((255, 230, 60), (255, 255, 240), (30, 20, 20)), (40, 10, 5)),
    "Comedy": _Palette((255, 215, 30), (255, 245, 150), ((255, 70, 150), (30, 160, 255), (255, 255, 255)), (60, 50, 0)),
    "Drama": _Palette((65, 80, 105), (150, 160, 178), ((22, 26, 36), (200, 205, 215)), (20, 24, 32)),
    "Horror": _Palette((8, 0, 0), (115, 0, 12), ((210, 0, 0), (230, 228, 215), (0, 0, 0)), (0, 0, 0)),
    "Romance": _Palette((255, 180, 210), (245, 95, 150), ((220, 15, 75), (255, 255, 255), (255, 215, 230)), (90, 10, 40)),
    "Sci-Fi": _Palette((0, 8, 55), (0, 190, 215), ((0, 255, 255), (150, 80, 255), (235, 250, 255)), (0, 10, 35)),
    "Western": _Palette((250, 165, 50), (125, 62, 20), ((255, 225, 100), (55, 95, 40), (85, 45, 15)), (50, 25, 5)),
    "Animation": _Palette((40, 190, 255), (130, 255, 90),
                          ((255, 0, 200), (255, 230, 0), (0, 220, 120), (255, 110, 0), (120, 60, 255)), (30, 0, 80)),
}


def _jitter(rnd: random.Random, color: RGB, amount: int = 18) -> RGB:
    return tuple(max(0, min(255, c + rnd.randint(-amount, amount))) for c in color)  # type: ignore[return-value]


def _gradient(rnd: random.Random, pal: _Palette, w: int, h: int) -> np.ndarray:
    """A vertical gradient with a random tilt, as float32 HxWx3."""
    top = np.array(_jitter(rnd, pal.top), dtype=np.float32)
    bottom = np.array(_jitter(rnd, pal.bottom), dtype=np.float32)
    tilt = rnd.uniform(-0.35, 0.35)
    ys = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None]
    xs = np.linspace(-0.5, 0.5, w, dtype=np.float32)[None, :]
    t = np.clip(ys + tilt * xs, 0.0, 1.0)[..., None]
    return top * (1.0 - t) + bottom * t


def _heart(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float, fill: RGB) -> None:
    draw.ellipse((cx - r, cy - r * 0.6, cx, cy + r * 0.4), fill=fill)
    draw.ellipse((cx, cy - r * 0.6, cx + r, cy + r * 0.4), fill=fill)
    draw.polygon([(cx - r * 0.97, cy), (cx + r * 0.97, cy), (cx, cy + r * 1.15)], fill=fill)


def _star(cx: float, cy: float, r_out: float, r_in: float, points: int, phase: float) -> list[tuple[float, float]]:
    out = []
    for j in range(points * 2):
        r = r_out if j % 2 == 0 else r_in
        a = phase + math.pi * j / points
        out.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    return out


def _draw_action(draw: ImageDraw.ImageDraw, rnd: random.Random, w: int, h: int, pal: _Palette) -> None:
    # Diagonal stripes across the whole band, then an explosion burst.
    slope = rnd.choice((-1, 1)) * rnd.uniform(0.6, 1.4)
    width = rnd.uniform(0.08, 0.14) * w
    x = -h * abs(slope) + rnd.uniform(0, width)
    while x < w + h * abs(slope):
        color = _jitter(rnd, rnd.choice(pal.accents[:2]), 20)
        dx = h * slope
        draw.polygon([(x, 0), (x + width, 0), (x + width + dx, h), (x + dx, h)], fill=color)
        x += width * rnd.uniform(2.2, 3.2)
    cx, cy = rnd.uniform(0.3, 0.7) * w, rnd.uniform(0.35, 0.65) * h
    r = rnd.uniform(0.3, 0.45) * min(w, h * 1.3)
    phase = rnd.uniform(0, math.pi)
    points = rnd.randint(9, 14)
    draw.polygon(_star(cx, cy, r, r * 0.55, points, phase), fill=_jitter(rnd, (255, 120, 0)))
    draw.polygon(_star(cx, cy, r * 0.65, r * 0.35, points, phase + 0.2), fill=_jitter(rnd, (255, 235, 80)))


def _draw_comedy(draw: ImageDraw.ImageDraw, rnd: random.Random, w: int, h: int, pal: _Palette) -> None:
    # Big polka dots on a loose grid.
    step = rnd.uniform(0.24, 0.32) * w
    r = step * rnd.uniform(0.28, 0.36)
    colors = [_jitter(rnd, c) for c in pal.accents]
    row = 0
    y = rnd.uniform(0, step / 2)
    while y < h + r:
        x = (step / 2 if row % 2 else 0) + rnd.uniform(-step * 0.1, step * 0.1)
        while x < w + r:
            rr = r * rnd.uniform(0.85, 1.15)
            draw.ellipse((x - rr, y - rr, x + rr, y + rr), fill=rnd.choice(colors))
            x += step
        y += step * 0.87
        row += 1


def _draw_drama(draw: ImageDraw.ImageDraw, rnd: random.Random, w: int, h: int, pal: _Palette) -> None:
    # One large dark silhouette: a tall block with a head, standing on a floor line.
    body_w = rnd.uniform(0.32, 0.48) * w
    cx = rnd.uniform(0.3, 0.7) * w
    top = rnd.uniform(0.3, 0.45) * h
    color = _jitter(rnd, pal.accents[0], 10)
    draw.rectangle((cx - body_w / 2, top, cx + body_w / 2, h), fill=color)
    head = body_w * rnd.uniform(0.28, 0.36)
    draw.ellipse((cx - head, top - head * 1.9, cx + head, top + head * 0.1), fill=color)
    wx = rnd.choice((0.05, 0.6)) * w
    draw.rectangle((wx, 0.12 * h, wx + 0.3 * w, 0.12 * h + 0.18 * h), outline=_jitter(rnd, pal.accents[1]), width=2)


def _draw_horror(draw: ImageDraw.ImageDraw, rnd: random.Random, w: int, h: int, pal: _Palette) -> None:
    # Pale moon, jagged black spikes rising from below, a red crack.
    mr = rnd.uniform(0.1, 0.16) * w
    mx, my = rnd.uniform(0.2, 0.8) * w, rnd.uniform(0.15, 0.35) * h
    draw.ellipse((mx - mr, my - mr, mx + mr, my + mr), fill=_jitter(rnd, pal.accents[1], 10))
    pts = [(0.0, float(h))]
    x = 0.0
    while x < w:
        x += rnd.uniform(0.06, 0.14) * w
        pts.append((x - rnd.uniform(0.02, 0.05) * w, h * rnd.uniform(0.25, 0.6)))
        pts.append((x, h * rnd.uniform(0.75, 0.95)))
    pts.append((float(w), float(h)))
    draw.polygon(pts, fill=_jitter(rnd, pal.accents[2], 6))
    x, y = rnd.uniform(0.2, 0.8) * w, 0.0
    crack = [(x, y)]
    while y < h * 0.8:
        x += rnd.uniform(-0.12, 0.12) * w
        y += rnd.uniform(0.08, 0.16) * h
        crack.append((x, y))
    draw.line(crack, fill=_jitter(rnd, pal.accents[0]), width=max(2, w // 40))


def _draw_romance(draw: ImageDraw.ImageDraw, rnd: random.Random, w: int, h: int, pal: _Palette) -> None:
    # Soft bokeh circles behind one to three large hearts.
    for _ in range(rnd.randint(5, 9)):
        r = rnd.uniform(0.06, 0.14) * w
        x, y = rnd.uniform(0, w), rnd.uniform(0, h)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=_jitter(rnd, pal.accents[2], 12))
    for _ in range(rnd.randint(1, 3)):
        r = rnd.uniform(0.18, 0.3) * min(w, h * 1.2)
        _heart(draw, rnd.uniform(0.25, 0.75) * w, rnd.uniform(0.3, 0.6) * h, r, _jitter(rnd, pal.accents[0]))


def _draw_scifi(draw: ImageDraw.ImageDraw, rnd: random.Random, w: int, h: int, pal: _Palette) -> None:
    # Stars, a ringed planet and a perspective grid floor.
    for _ in range(rnd.randint(15, 30)):
        x, y = rnd.uniform(0, w), rnd.uniform(0, h * 0.6)
        draw.rectangle((x, y, x + 1, y + 1), fill=pal.accents[2])
    pr = rnd.uniform(0.18, 0.28) * w
    px, py = rnd.uniform(0.25, 0.75) * w, rnd.uniform(0.2, 0.4) * h
    draw.ellipse((px - pr, py - pr, px + pr, py + pr), fill=_jitter(rnd, pal.accents[1]))
    draw.ellipse((px - pr * 1.7, py - pr * 0.35, px + pr * 1.7, py + pr * 0.35), outline=_jitter(rnd, pal.accents[0]),
                 width=max(2, w // 60))
    horizon = rnd.uniform(0.55, 0.7) * h
    grid = _jitter(rnd, pal.accents[0], 10)
    vx = rnd.uniform(0.35, 0.65) * w
    for j in range(-6, 7):
        draw.line([(vx, horizon), (vx + j * w * 0.25, h)], fill=grid, width=1)
    y, gap = horizon, (h - horizon) * 0.06
    while y < h:
        draw.line([(0, y), (w, y)], fill=grid, width=1)
        gap *= 1.45
        y += gap


def _draw_western(draw: ImageDraw.ImageDraw, rnd: random.Random, w: int, h: int, pal: _Palette) -> None:
    # Low sun sinking into a horizon, mesas, a brown ground and saguaro cacti.
    horizon = rnd.uniform(0.55, 0.7) * h
    sr = rnd.uniform(0.2, 0.3) * w
    sx = rnd.uniform(0.3, 0.7) * w
    draw.ellipse((sx - sr, horizon - sr * 1.2, sx + sr, horizon + sr * 0.8), fill=_jitter(rnd, pal.accents[0]))
    ground = _jitter(rnd, pal.accents[2], 12)
    mx = rnd.uniform(-0.1, 0.5) * w
    mw = rnd.uniform(0.3, 0.5) * w
    mh = rnd.uniform(0.1, 0.18) * h
    draw.polygon([(mx, horizon), (mx + mw * 0.2, horizon - mh), (mx + mw * 0.8, horizon - mh), (mx + mw, horizon)],
                 fill=ground)
    draw.rectangle((0, horizon, w, h), fill=ground)
    cactus = _jitter(rnd, pal.accents[1], 12)
    for _ in range(rnd.randint(1, 2)):
        cx = rnd.uniform(0.1, 0.9) * w
        cw = rnd.uniform(0.06, 0.09) * w
        ctop = horizon - rnd.uniform(0.2, 0.35) * h
        base = horizon + rnd.uniform(0.05, 0.15) * (h - horizon)
        draw.rounded_rectangle((cx - cw / 2, ctop, cx + cw / 2, base), radius=cw / 2, fill=cactus)
        arm_y = ctop + (base - ctop) * rnd.uniform(0.3, 0.5)
        draw.rounded_rectangle((cx - cw * 2, arm_y, cx, arm_y + cw * 0.8), radius=cw / 3, fill=cactus)
        draw.rounded_rectangle((cx - cw * 2, arm_y - cw * 1.6, cx - cw * 1.2, arm_y + cw * 0.8), radius=cw / 3,
                               fill=cactus)


def _draw_animation(draw: ImageDraw.ImageDraw, rnd: random.Random, w: int, h: int, pal: _Palette) -> None:
    # Overlapping rounded blobs in saturated colours with cartoon outlines.
    outline = max(2, w // 70)
    for _ in range(rnd.randint(4, 7)):
        bw, bh = rnd.uniform(0.25, 0.5) * w, rnd.uniform(0.2, 0.45) * h
        x, y = rnd.uniform(-0.1, 0.9) * w - bw / 2, rnd.uniform(0.0, 1.0) * h - bh / 2
        color = _jitter(rnd, rnd.choice(pal.accents), 15)
        if rnd.random() < 0.5:
            draw.ellipse((x, y, x + bw, y + bh), fill=color, outline=(20, 20, 30), width=outline)
        else:
            draw.rounded_rectangle((x, y, x + bw, y + bh), radius=min(bw, bh) / 2.5, fill=color,
                                   outline=(20, 20, 30), width=outline)
    # A pair of googly eyes on the scene, the cheapest "character" cue.
    ex, ey, er = rnd.uniform(0.3, 0.7) * w, rnd.uniform(0.3, 0.7) * h, rnd.uniform(0.06, 0.09) * w
    for dx in (-er * 1.1, er * 1.1):
        draw.ellipse((ex + dx - er, ey - er, ex + dx + er, ey + er), fill=(255, 255, 255), outline=(20, 20, 30),
                     width=outline)
        draw.ellipse((ex + dx - er * 0.4, ey - er * 0.2, ex + dx + er * 0.4, ey + er * 0.6), fill=(20, 20, 30))


_DRAWERS: dict[str, Callable[[ImageDraw.ImageDraw, random.Random, int, int, _Palette], None]] = {
    "Action": _draw_action, "Comedy": _draw_comedy, "Drama": _draw_drama, "Horror": _draw_horror,
    "Romance": _draw_romance, "Sci-Fi": _draw_scifi, "Western": _draw_western, "Animation": _draw_animation,
}


def _vignette(arr: np.ndarray, strength: float) -> np.ndarray:
    h, w = arr.shape[:2]
    ys = np.linspace(-1.0, 1.0, h, dtype=np.float32)[:, None]
    xs = np.linspace(-1.0, 1.0, w, dtype=np.float32)[None, :]
    mask = 1.0 - strength * np.clip((xs ** 2 + ys ** 2) / 1.6, 0.0, 1.0)
    return arr * mask[..., None]


@lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def _draw_title(img: Image.Image, band_top: int, title: str, pal: _Palette, rnd: random.Random) -> None:
    w, h = img.size
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, band_top, w, h), fill=_jitter(rnd, pal.ink, 10))
    text = title.upper()
    size = max(8, int((h - band_top) * 0.42))
    font = _font(size)
    while size > 8 and draw.textlength(text, font=font) > w * 0.92:
        size -= 1
        font = _font(size)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x = (w - (right - left)) / 2 - left
    y = band_top + ((h - band_top) - (bottom - top)) / 2 - top
    draw.text((x, y), text, font=font, fill=(245, 240, 230))


def _band_edges(rnd: random.Random, k: int, height: int) -> list[int]:
    """k+1 band edges over [0, height], equal shares with jitter so layouts vary."""
    edges = [0]
    for j in range(1, k):
        edges.append(int(round(height * (j / k + rnd.uniform(-0.06, 0.06)))))
    edges.append(height)
    return edges


CUES = ("global", "region")
# The title band of a region-cue poster: one ink for every genre, so the band carries no genre cue.
_NEUTRAL = _Palette((128, 128, 128), (128, 128, 128), ((128, 128, 128),), (45, 45, 50))


def cue_box(size: tuple[int, int]) -> tuple[int, int, int]:
    """(left, top, side) of the square that holds a region-cue poster's genre art: the top-left
    quadrant of the poster's central square (what a centre-cropping preprocess keeps), so at
    most a quarter of the encoder's view carries the genres."""
    w, h = size
    title_top = int(round(h * 0.82))  # the title band never starts above this
    side = min(w, h) // 2
    top = max(0, min((h - w) // 2, title_top - side))
    return 0, top, side


def render_poster(rnd: random.Random, genres: Sequence[str], title: str, size: tuple[int, int],
                  cue: str = "global") -> Image.Image:
    """The poster of `genres` (primary first) with `title`, as a (width, height) = `size` RGB image.

    cue="global": the genres' bands fill the poster and the title band takes the primary genre's ink.
    cue="region": the genres' art fills only `cue_box(size)`; the rest of the poster is the art of
    1-3 decoy genres drawn independently of `genres` (clutter that looks like genre art, so an
    embedding of the whole poster mixes the real cue with a random one), under a neutral title band.
    Every random choice comes from `rnd`, so the same stream gives the same pixels.
    """
    if cue not in CUES:
        raise ConfigError("cue", f"must be one of {', '.join(CUES)}, got {cue!r}")
    w, h = size
    title_top = int(round(h * rnd.uniform(0.82, 0.86)))
    if cue == "global":
        img = _paint_bands(rnd, genres, w, h, title_top)
        ink = _PALETTES[genres[0]]
    else:
        decoys = sample_genres(rnd, tuple(_PALETTES))
        img = _paint_bands(rnd, decoys, w, h, title_top)
        left, top, side = cue_box(size)
        img.paste(_paint_bands(rnd, genres, side, side, side), (left, top))
        ink = _NEUTRAL
    # Global colour jitter and grain so no two posters of a genre share exact pixel statistics.
    noise_rng = np.random.default_rng(rnd.getrandbits(64))
    arr = np.asarray(img, dtype=np.float32)
    arr = arr * rnd.uniform(0.88, 1.08) + np.array([rnd.uniform(-10, 10) for _ in range(3)], dtype=np.float32)
    arr += noise_rng.normal(0.0, 5.0, size=arr.shape).astype(np.float32)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    _draw_title(img, title_top, title, ink, rnd)
    return img


def _paint_bands(rnd: random.Random, genres: Sequence[str], w: int, h: int, title_top: int) -> Image.Image:
    """A (w, h) image whose rows above `title_top` hold one band per genre (primary first) over the
    primary genre's gradient; the rows below are left black for the title band."""
    primary = _PALETTES[genres[0]]
    base = _gradient(rnd, primary, w, title_top)
    img = Image.new("RGB", (w, h))
    edges = _band_edges(rnd, len(genres), title_top)
    for j, genre in enumerate(genres):
        y0, y1 = edges[j], edges[j + 1]
        pal = _PALETTES[genre]
        band = base[y0:y1]
        if j > 0:  # the band's own genre tints it strongly, the primary background still shows
            alpha = rnd.uniform(0.7, 0.85)
            band = band * (1 - alpha) + _gradient(rnd, pal, w, y1 - y0) * alpha
        tile = Image.fromarray(np.clip(band, 0, 255).astype(np.uint8), "RGB")
        _DRAWERS[genre](ImageDraw.Draw(tile), rnd, w, y1 - y0, pal)
        if genre == "Horror":
            tile = Image.fromarray(np.clip(_vignette(np.asarray(tile, dtype=np.float32), 0.75), 0, 255)
                                   .astype(np.uint8), "RGB")
        img.paste(tile, (0, y0))
    return img

