"""CXR: a schematic chest radiograph (body, lungs, heart, mediastinum, spine, ribs) with per-subject
anatomy; a lung opacity is a large bright region in a lower lung zone."""

from __future__ import annotations

import numpy as np

OPACITY_GAIN = 0.7  # brightness added by a lung opacity (image range 0-1)


class CxrRenderer:
    """Renders grayscale chest radiographs, (size, size) uint8.

    Anatomy comes from a bank of N_ANATOMIES body shapes per view, drawn once and cached (a subject keeps
    one); each study adds a shift, exposure, noise, and the opacity when present.
    """

    N_ANATOMIES = 32

    def __init__(self, size: int, seed: int = 0) -> None:
        x = np.linspace(-1, 1, size, dtype=np.float32)
        self.u, self.v = np.meshgrid(x, x)  # u: image right (= patient's left), v: down
        self.size = size
        rng = np.random.default_rng([seed, 11])
        self.anatomies = [_anatomy(rng) for _ in range(self.N_ANATOMIES)]
        self.noise = rng.normal(0, 0.015, (2 * size, 2 * size)).astype(np.float32)
        self.mottle = _smooth_noise(rng, 2 * size, size // 32)
        self._cache: dict[tuple[int, str], tuple[np.ndarray, list[np.ndarray]]] = {}

    def _ellipse(self, cu, cv, ru, rv, edge=0.06) -> np.ndarray:
        r2 = ((self.u - cu) / ru) ** 2 + ((self.v - cv) / rv) ** 2
        return 0.5 + 0.5 * np.tanh((1.0 - r2) / (4 * edge))  # soft-edged ellipse: 1 inside, 0 outside

    def _base(self, k: int, view: str) -> tuple[np.ndarray, list[np.ndarray]]:
        """Anatomy k seen in `view`: (image in [0, 1], lung masks used to place an opacity)."""
        if (k, view) in self._cache:
            return self._cache[k, view]
        a = self.anatomies[k]
        img = np.full(self.u.shape, 0.06, dtype=np.float32)
        if view == "LATERAL":
            lungs = [self._ellipse(-0.05, -0.05, 0.55 * a["lung_w"], 0.62 * a["lung_h"])]
            img += 0.5 * self._ellipse(0, 0.05, 0.75, 1.1) - 0.32 * lungs[0]
            img += 0.2 * self._ellipse(0.62, 0, 0.1, 1.0)  # spine (posterior)
            img += 0.25 * self._ellipse(-0.3, 0.3, 0.28 * a["heart"], 0.3)  # heart (anterior)
        else:
            heart = a["heart"] * (1.15 if view == "AP" else 1.0)  # AP magnifies the heart
            img += 0.5 * self._ellipse(0, 0.05, 0.9 * a["body_w"], 1.15)
            lungs = [self._ellipse(s * 0.38, -0.05, 0.27 * a["lung_w"], 0.55 * a["lung_h"]) for s in (-1, 1)]
            ribs = 0.5 + 0.5 * np.sin(2 * np.pi * (self.v * 5.5 + 0.35 * self.u**2) + a["rib_phase"])
            img -= np.maximum(*lungs) * (0.34 - 0.06 * ribs - 0.08 * (self.v + 0.5))
            img += 0.3 * self._ellipse(0.1, 0.22, 0.3 * heart, 0.24)  # heart
            img += 0.22 * self._ellipse(0, -0.3, 0.14, 0.5)  # mediastinum
            img += 0.06 * self._ellipse(0, 0, 0.05, 1.0, edge=0.02)  # spine
            if view == "AP":
                img = 0.9 * img + 0.05  # portable films: lower contrast
        self._cache[k, view] = (img, lungs)
        return img, lungs

    def render(self, rng: np.random.Generator, anatomy: int, view: str, opacity: bool) -> np.ndarray:
        """One study's image: anatomy (bank index) in view PA, AP or LATERAL, with or without opacity."""
        img, lungs = self._base(anatomy, view)
        if opacity:  # a large bright region filling much of a lower lung zone
            side = int(rng.integers(len(lungs)))
            cu = (0.38 * (2 * side - 1) if len(lungs) == 2 else -0.05) + rng.normal(0, 0.03)
            cv, ru, rv = rng.uniform(0.0, 0.15), rng.uniform(0.3, 0.36), rng.uniform(0.4, 0.5)
            oy, ox = rng.integers(0, self.size, 2)
            mottle = self.mottle[oy : oy + self.size, ox : ox + self.size]  # patchy, like consolidation
            img = img + OPACITY_GAIN * mottle * self._ellipse(cu, cv, ru, rv, 0.1) * lungs[side]
        n = self.size
        dy, dx = rng.integers(-n // 40, n // 40 + 1, 2)
        oy, ox = rng.integers(0, n, 2)
        img = (
            np.roll(img, (dy, dx), axis=(0, 1)) * rng.uniform(0.98, 1.02)
            + self.noise[oy : oy + n, ox : ox + n]
        )
        return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def _smooth_noise(rng: np.random.Generator, n: int, blur: int) -> np.ndarray:
    """(n, n) float32 field in [0.7, 1.3]: white noise box-blurred over ~`blur` pixels."""
    from scipy.ndimage import uniform_filter

    x = uniform_filter(rng.normal(size=(n, n)), size=2 * blur + 1, mode="wrap")
    x = (x - x.min()) / (x.max() - x.min())
    return (0.7 + 0.6 * x).astype(np.float32)


def _anatomy(rng: np.random.Generator) -> dict:
    return {
        "lung_w": float(rng.uniform(0.9, 1.1)),
        "lung_h": float(rng.uniform(0.9, 1.1)),
        "heart": float(rng.uniform(0.85, 1.2)),
        "body_w": float(rng.uniform(0.9, 1.05)),
        "rib_phase": float(rng.uniform(0, 6.3)),
    }
