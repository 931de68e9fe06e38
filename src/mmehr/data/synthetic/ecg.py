"""ECG: a dipole model of the P, Q, R, S, T waves (Gaussian waves as in ECGSYN, McSharry et al. 2003,
the model behind neurokit2.ecg_simulate), projected on the 12 lead vectors, composed beat by beat."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

ECG_FS = 500
ECG_SECONDS = 10
ECG_GAIN = 200.0  # ADC units per mV, as MIMIC-IV-ECG
ECG_NATIVE_LEADS = ("I", "II", "III", "aVR", "aVF", "aVL", "V1", "V2", "V3", "V4", "V5", "V6")

# Lead vectors (x = patient's left, y = inferior, z = anterior); limb leads III, aVR, aVL, aVF are
# derived from I and II (Einthoven/Goldberger), so the 12 leads obey the real relations.
_LEAD_VECTORS = np.array(
    [
        [1.0, 0.0, 0.0],  # I
        [0.5, 0.866, 0.0],  # II
        [-0.6, 0.1, 0.8],  # V1
        [-0.2, 0.1, 1.0],  # V2
        [0.3, 0.1, 0.9],  # V3
        [0.7, 0.1, 0.6],  # V4
        [0.9, 0.1, 0.3],  # V5
        [1.0, 0.1, 0.0],  # V6
    ]
)


def _direction(angle_deg: float, z: float) -> np.ndarray:
    a = math.radians(angle_deg)
    v = np.array([math.cos(a), math.sin(a), z])
    return v / np.linalg.norm(v)


def _gauss_kernel(sigma_s: float, fs: int) -> np.ndarray:
    half = int(4 * sigma_s * fs)
    x = np.arange(-half, half + 1) / fs
    return np.exp(-0.5 * (x / sigma_s) ** 2)


@dataclass
class EcgMorphology:
    """Per-subject ECG shape: electrical axis (deg), wave amplitudes (mV), intervals (s), lead gains."""

    qrs_axis: float
    r_amp: float
    t_amp: float
    p_amp: float
    pr: float
    qrs_width: float
    lead_gain: np.ndarray  # (8,): I, II, V1..V6

    @classmethod
    def sample(cls, rng: np.random.Generator) -> EcgMorphology:
        return cls(
            qrs_axis=float(np.clip(rng.normal(45, 25), -30, 100)),
            r_amp=float(rng.uniform(0.9, 1.6)),
            t_amp=float(rng.uniform(0.2, 0.45)),
            p_amp=float(rng.uniform(0.08, 0.2)),
            pr=float(rng.uniform(0.13, 0.20)),
            qrs_width=float(rng.uniform(0.85, 1.2)),
            lead_gain=rng.normal(1.0, 0.06, 8),
        )

    def dipoles(self) -> np.ndarray:
        """(6, 3) dipole of each wave: P, Q (septal), R, S (terminal), T, fibrillatory activity."""
        return np.stack(
            [
                self.p_amp * _direction(60, 0.2),
                0.12 * np.array([-0.6, -0.2, 0.75]),
                self.r_amp * _direction(self.qrs_axis, -0.5),
                0.35 * np.array([-0.25, -0.55, -0.8]),
                self.t_amp * _direction(self.qrs_axis - 15, 0.35),
                _direction(70, 0.6),
            ]
        )


class EcgRenderer:
    """Renders 10 s, 500 Hz, 12-lead ECGs in mV, shape (5000, 12), leads in MIMIC's native order.

    Sinus rhythm: ~75/min (55-100), RR varies a few % (respiratory arrhythmia), P waves present.
    Atrial fibrillation: ~125/min (95-170), independent irregular RR (CV ~0.2), no P waves, 4-9 Hz
    fibrillatory waves. Asystole (a canary after a death): baseline wander and noise only.
    Leads III, aVR, aVL, aVF are derived from I and II as an ECG machine does, so they obey
    Einthoven's and Goldberger's relations exactly (up to quantisation).
    """

    def __init__(self, seed: int = 0) -> None:
        self.n = ECG_FS * ECG_SECONDS
        self.t = np.arange(self.n) / ECG_FS
        self.noise = 0.012 * np.random.default_rng([seed, 12]).standard_normal(
            (8 * self.n, 8), dtype=np.float32
        )

    def _beats(self, rng, af: bool) -> tuple[np.ndarray, np.ndarray]:
        """R-peak times (s) and the RR interval before each (s)."""
        if af:
            rr_mean = 60.0 / float(np.clip(rng.normal(125, 15), 95, 170))
            rr = rr_mean * np.exp(rng.normal(0, 0.22, 64))
        else:
            rr_mean = 60.0 / float(np.clip(rng.normal(75, 10), 55, 100))
            resp = 0.04 * np.sin(2 * np.pi * np.arange(64) * rr_mean / 4.5 + rng.uniform(0, 6.3))
            rr = rr_mean * (1 + 0.02 * rng.normal(size=64) + resp)
        rr = np.clip(rr, 0.3, 1.6)
        beats = np.cumsum(rr) - rng.uniform(0, rr_mean)
        keep = beats < ECG_SECONDS + 0.5
        return beats[keep], np.concatenate([[rr_mean], rr])[: keep.sum()]

    def render(
        self, rng: np.random.Generator, morph: EcgMorphology, *, af: bool, asystole: bool = False
    ) -> np.ndarray:
        n, fs, t = self.n, ECG_FS, self.t
        waves = np.zeros((6, n))  # activation of P, Q, R, S, T, f-waves over time
        if not asystole:
            beats, prev_rr = self._beats(rng, af)
            w = morph.qrs_width
            shapes = [(-morph.pr, 0.022), (-0.028 * w, 0.008 * w), (0.0, 0.011 * w), (0.032 * w, 0.011 * w)]
            shapes.append((0.29 * np.sqrt(prev_rr), 0.055))  # T: QT scales with sqrt(RR) (Bazett)
            for j, (offset, sigma) in enumerate(shapes):
                if j == 0 and af:
                    continue  # no P waves in AF
                idx = np.round((beats + offset) * fs).astype(int)
                impulses = np.zeros(n)
                np.add.at(impulses, idx[(idx >= 0) & (idx < n)], 1.0)
                waves[j] = np.convolve(impulses, _gauss_kernel(sigma, fs), mode="same")
            if af:
                f = sum(
                    rng.uniform(0.3, 1) * np.sin(2 * np.pi * rng.uniform(4.5, 8.5) * t + rng.uniform(0, 6.3))
                    for _ in range(3)
                )
                waves[5] = f / 3 * rng.uniform(0.1, 0.2) * (1 + 0.3 * np.sin(2 * np.pi * 0.3 * t))
        eight = ((_LEAD_VECTORS @ morph.dipoles().T) @ waves).T * morph.lead_gain  # (n, 8): I, II, V1..V6
        coarse = np.arange(0, ECG_SECONDS + 0.1, 0.1)  # baseline wander, evaluated every 100 ms
        wander = rng.uniform(0.02, 0.1, 8) * np.sin(
            2 * np.pi * rng.uniform(0.1, 0.4, 8) * coarse[:, None] + rng.uniform(0, 6.3, 8)
        )
        eight += np.stack([np.interp(t, coarse, wander[:, k]) for k in range(8)], axis=1)
        o = int(rng.integers(0, 7 * n))
        eight += self.noise[o : o + n]
        lead_i, lead_ii = eight[:, 0], eight[:, 1]
        limb = {"I": lead_i, "II": lead_ii, "III": lead_ii - lead_i, "aVR": -(lead_i + lead_ii) / 2, "aVF": lead_ii - lead_i / 2, "aVL": lead_i - lead_ii / 2}  # fmt: skip
        return np.concatenate(
            [np.stack([limb[k] for k in ECG_NATIVE_LEADS[:6]], axis=1), eight[:, 2:]], axis=1
        )
