"""A tiny RGB rasterizer and PNG writer (zlib + struct), enough to draw a robot's path."""

from __future__ import annotations

import itertools
import math
import struct
import zlib
from pathlib import Path

Color = tuple[int, int, int]


class Canvas:
    """An RGB image in memory.

    Args:
        width: Pixels.
        height: Pixels.
        background: Fill colour.
    """

    def __init__(self, width: int, height: int, background: Color = (255, 255, 255)) -> None:
        self.width = width
        self.height = height
        self.pixels = bytearray(bytes(background) * (width * height))

    def dot(self, x: float, y: float, color: Color, radius: int = 0) -> None:
        """A filled disc (a single pixel for radius 0); parts outside the image are clipped."""
        cx, cy = round(x), round(y)
        for dy in range(-radius, radius + 1):
            for dx in range(-radius, radius + 1):
                px, py = cx + dx, cy + dy
                inside = 0 <= px < self.width and 0 <= py < self.height
                if inside and dx * dx + dy * dy <= radius * radius:
                    i = 3 * (py * self.width + px)
                    self.pixels[i : i + 3] = bytes(color)

    def line(
        self, x0: float, y0: float, x1: float, y1: float, color: Color, width: int = 1
    ) -> None:
        """A straight line, drawn as dots every half pixel (radius ``width // 2``)."""
        steps = max(1, math.ceil(2 * math.hypot(x1 - x0, y1 - y0)))
        for i in range(steps + 1):
            t = i / steps
            self.dot(x0 + (x1 - x0) * t, y0 + (y1 - y0) * t, color, width // 2)

    def png(self) -> bytes:
        """The image as PNG bytes (8-bit RGB, no filtering)."""
        row = 3 * self.width
        raw = b"".join(
            b"\x00" + bytes(self.pixels[y * row : (y + 1) * row]) for y in range(self.height)
        )

        def chunk(kind: bytes, data: bytes) -> bytes:
            return (
                struct.pack(">I", len(data))
                + kind
                + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
            )

        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)
        return (
            b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(raw, 6))
            + chunk(b"IEND", b"")
        )

    def save(self, path: str | Path) -> None:
        """Write the PNG file (atomically: a temporary file, then a rename)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(self.png())
        tmp.replace(path)


def draw_path(points: list[tuple[float, float]], heading_rad: float, size: int = 480) -> Canvas:
    """A top view of a path in metres: 1 m grid, path in blue, start green, robot red.

    Args:
        points: (x, y) positions in metres, oldest first (at least one).
        heading_rad: The robot's current heading (drawn as a short red line).
        size: Image width and height in pixels.
    """
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    cx, cy = (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2
    span = max(max(xs) - min(xs), max(ys) - min(ys), 2.0) * 1.2
    scale = size / span

    def to_px(x: float, y: float) -> tuple[float, float]:
        return (x - cx) * scale + size / 2, size / 2 - (y - cy) * scale

    canvas = Canvas(size, size)
    for metre in range(math.floor(cx - span / 2), math.ceil(cx + span / 2) + 1):
        gx, _ = to_px(metre, 0)
        canvas.line(gx, 0, gx, size - 1, (225, 225, 225))
    for metre in range(math.floor(cy - span / 2), math.ceil(cy + span / 2) + 1):
        _, gy = to_px(0, metre)
        canvas.line(0, gy, size - 1, gy, (225, 225, 225))
    for (xa, ya), (xb, yb) in itertools.pairwise(points):
        canvas.line(*to_px(xa, ya), *to_px(xb, yb), (30, 90, 200), width=3)
    canvas.dot(*to_px(*points[0]), (20, 160, 60), radius=5)
    rx, ry = to_px(*points[-1])
    nose = 0.3 * scale
    tip = (rx + nose * math.cos(heading_rad), ry - nose * math.sin(heading_rad))
    canvas.line(rx, ry, *tip, (200, 30, 30), width=3)
    canvas.dot(rx, ry, (200, 30, 30), radius=6)
    return canvas
