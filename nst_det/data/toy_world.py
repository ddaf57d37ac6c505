"""The toy world: coloured shapes on textured backgrounds, rendered deterministically.

Both toy data sets (VOC-style detection and ImageFolder classification) are drawn from this one
world, so a classifier pretrained on the classification set transfers to the detection set.
Colour carries no class information (it is drawn independently of the shape), so a model has to
learn shape; the backgrounds are textured and carry clutter blobs that are not objects.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

TOY_CLASSES = ("circle", "triangle", "square", "star", "cross")


@dataclass
class ToyObject:
    """One rendered object: class index and its tight box (x0, y0, x1, y1), pixels, inclusive."""

    label: int
    box: tuple[int, int, int, int]


def textured_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A smooth random texture: a colour gradient, a few sinusoidal gratings and pixel noise.

    Returns:
        uint8 array of shape (height, width, 3), RGB.
    """
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(40, 215, size=3).astype(np.float32)
    slope = rng.uniform(-0.4, 0.4, size=(2, 3)).astype(np.float32)
    img = base + xx[..., None] * slope[0] + yy[..., None] * slope[1]
    for _ in range(3):
        freq = rng.uniform(0.03, 0.25)
        angle = rng.uniform(0, np.pi)
        phase = rng.uniform(0, 2 * np.pi)
        wave = np.sin(freq * (xx * np.cos(angle) + yy * np.sin(angle)) + phase)
        img += wave[..., None] * rng.uniform(5, 25, size=3).astype(np.float32)
    img += rng.normal(0, 6, size=img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def _shape_polygon(label: int, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """Vertices (K, 2) of a polygonal shape; circles are approximated with 48 vertices."""
    name = TOY_CLASSES[label]
    if name == "circle":
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        pts = np.stack([np.cos(t), np.sin(t)], 1)
    elif name == "triangle":
        t = np.array([0, 2, 4]) * np.pi / 3 - np.pi / 2
        pts = np.stack([np.cos(t), np.sin(t)], 1)
    elif name == "square":
        pts = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float64) * 0.75
    elif name == "star":
        t = np.arange(10) * np.pi / 5 - np.pi / 2
        radius = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        pts = np.stack([np.cos(t) * radius, np.sin(t) * radius], 1)
    elif name == "cross":
        a, b = 0.3, 0.95
        pts = np.array(
            [[-a, -b], [a, -b], [a, -a], [b, -a], [b, a], [a, a], [a, b], [-a, b], [-a, a],
             [-b, a], [-b, -a], [-a, -a]], np.float64
        )
    else:
        raise ValueError(f"unknown toy class index {label}")
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return pts @ rot.T * r + np.array([cx, cy])


def draw_object(
    rng: np.random.Generator, img: np.ndarray, label: int, cx: float, cy: float, r: float
) -> ToyObject:
    """Draw one shape of class `label` centred at (cx, cy) with radius r into `img` (in place)."""
    height, width = img.shape[:2]
    poly = _shape_polygon(label, cx, cy, r, rng.uniform(0, 2 * np.pi))
    colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
    # 4 bits of sub-pixel precision give anti-aliased-looking edges with cv2's integer API
    cv2.fillPoly(img, [np.round(poly * 16).astype(np.int32)], colour, cv2.LINE_AA, shift=4)
    x0, y0 = np.floor(poly.min(0)).astype(int)
    x1, y1 = np.ceil(poly.max(0)).astype(int)
    box = (max(0, x0), max(0, y0), min(width - 1, x1), min(height - 1, y1))
    return ToyObject(label=label, box=box)


def draw_clutter(rng: np.random.Generator, img: np.ndarray, count: int) -> None:
    """Blurry ellipses that are not objects: the detector must learn to ignore them."""
    height, width = img.shape[:2]
    for _ in range(count):
        centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        axes = tuple(int(rng.integers(2, max(3, side // 10))) for side in (width, height))
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        cv2.ellipse(img, centre, axes, float(rng.uniform(0, 180)), 0, 360, colour, -1, cv2.LINE_AA)
