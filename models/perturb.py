"""Perturbations for robustness checks (``deepaudit evaluate --perturb``).

Archives are re-encoded, resized and filtered; a detector whose score moves with that is
scoring the encoder. Each perturbation is applied to every aligned face crop before the
classifier sees it (face detection runs on the original frames), deterministically.

Specs: ``jpeg:Q`` (re-encode at quality Q, 1-100), ``resize:S`` (down to S of the side,
0 < S < 1, and back up), ``blur:SIGMA`` (Gaussian, pixels), ``noise:STD`` (Gaussian, uint8
units, fixed seed), ``pgd:EPS`` (a white-box PGD evasion attack through the detector
itself, EPS pixel levels in L-inf: models/adversarial.py; the classify stage runs it,
since it needs the model). ``none`` is the unperturbed baseline.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

KINDS = ("none", "jpeg", "resize", "blur", "noise", "pgd")


@dataclass(frozen=True)
class Perturbation:
    kind: str
    value: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown perturbation {self.kind!r}; use one of "
                             f"{', '.join(KINDS)} (e.g. jpeg:50,resize:0.5,blur:1.5)")
        ok = {"none": True, "jpeg": 1 <= self.value <= 100, "resize": 0 < self.value < 1,
              "blur": 0 < self.value <= 20, "noise": 0 < self.value <= 100,
              "pgd": 0 < self.value <= 32}[self.kind]
        if not ok:
            limits = {"jpeg": "1-100", "resize": "between 0 and 1", "blur": "in (0, 20]",
                      "noise": "in (0, 100]", "pgd": "in (0, 32] pixel levels"}[self.kind]
            raise ValueError(f"{self.kind}:{self.value:g}: the value must be {limits}")

    @classmethod
    def parse(cls, spec: str) -> Perturbation:
        """``"jpeg:50"`` -> Perturbation("jpeg", 50); ``"none"`` -> the baseline."""
        spec = spec.strip()
        if spec.lower() == "none":
            return cls("none")
        kind, _, value = spec.partition(":")
        if not value:
            raise ValueError(f"perturbation {spec!r} needs a value, e.g. {kind}:50")
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"perturbation {spec!r}: {value!r} is not a number") from None
        return cls(kind.strip().lower(), number)

    @property
    def name(self) -> str:
        return "none" if self.kind == "none" else f"{self.kind}:{self.value:g}"


def parse_perturbations(text: str | None) -> list[Perturbation]:
    """``"jpeg:50,resize:0.5"`` -> [none, jpeg:50, resize:0.5] (the baseline always first,
    duplicates dropped)."""
    out = [Perturbation("none")]
    for part in (text or "").split(","):
        if not part.strip():
            continue
        p = Perturbation.parse(part)
        if p not in out:
            out.append(p)
    return out


def apply_perturbation(img: np.ndarray, p: Perturbation) -> np.ndarray:
    """The perturbed copy of an RGB uint8 ``[H, W, 3]`` image (the input is unchanged)."""
    if p.kind == "none":
        return img
    if p.kind == "pgd":
        raise ValueError("pgd needs the model: the classify stage applies it (model.attack)")
    h, w = img.shape[:2]
    if p.kind == "jpeg":
        bgr = np.ascontiguousarray(img[..., ::-1])
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(round(p.value))])
        if not ok:
            raise RuntimeError("JPEG encoding failed")
        return np.ascontiguousarray(cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1])
    if p.kind == "resize":
        small = (max(1, round(w * p.value)), max(1, round(h * p.value)))
        down = cv2.resize(np.ascontiguousarray(img), small, interpolation=cv2.INTER_AREA)
        return cv2.resize(down, (w, h), interpolation=cv2.INTER_LINEAR)
    if p.kind == "blur":
        return cv2.GaussianBlur(np.ascontiguousarray(img), (0, 0), p.value)
    rng = np.random.default_rng(0)  # noise: the same pattern on every run
    noisy = img.astype(np.float32) + rng.normal(0.0, p.value, img.shape).astype(np.float32)
    return np.clip(noisy + 0.5, 0, 255).astype(np.uint8)
