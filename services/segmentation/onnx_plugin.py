"""A deep-learning segmentation model as a plug-in: ONNX format, run with ONNX Runtime (the
CUDA provider where present, CPU otherwise). Nothing is downloaded: the model is a file the
site configures, with a small JSON description of what it expects and what it outputs.

Contract: the model takes a batch of single-channel 2D slices ``(N, 1, H, W)`` float32 at the
declared ``input_size`` after the declared preprocessing, and returns per-class scores
``(N, C, H, W)`` (argmax → label) or one probability map ``(N, 1, H, W)`` (> 0.5 → label 1).
Labels are named in ``labels`` (index 0 is background).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.ndimage as ndi

from services.segmentation.tasks import Geometry, TaskResult, _measure


@dataclass(frozen=True)
class ModelSpec:
    name: str
    labels: list[str]
    input_size: tuple[int, int]
    modalities: list[str] = field(default_factory=lambda: ["CT"])
    body_parts: list[str] = field(default_factory=list)  # empty: any
    window: tuple[float, float] | None = None  # (center, width) → [0, 1]
    normalize: str | None = None  # "minmax" | "zscore"
    batch: int = 16

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        raw = json.loads(text)
        return cls(
            name=str(raw["name"]),
            labels=[str(v) for v in raw["labels"]],
            input_size=(int(raw["input_size"][0]), int(raw["input_size"][1])),
            modalities=[str(v) for v in raw.get("modalities", ["CT"])],
            body_parts=[str(v).upper() for v in raw.get("body_parts", [])],
            window=tuple(raw["window"]) if raw.get("window") else None,
            normalize=raw.get("normalize"),
            batch=int(raw.get("batch", 16)),
        )


class OnnxSegmenter:
    def __init__(self, model: Path, spec: ModelSpec) -> None:
        import onnxruntime as ort

        available = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        self.session = ort.InferenceSession(str(model), providers=providers)
        self.provider = self.session.get_providers()[0]
        self.input_name = self.session.get_inputs()[0].name
        self.spec = spec

    def applies_to(self, modality: str, body_part: str | None) -> bool:
        if modality not in self.spec.modalities:
            return False
        return not self.spec.body_parts or (body_part or "").upper() in self.spec.body_parts

    def _prepare(self, vol: np.ndarray) -> np.ndarray:
        img = vol.astype(np.float32)
        if self.spec.window is not None:
            center, width = self.spec.window
            img = np.clip((img - (center - width / 2)) / width, 0.0, 1.0)
        if self.spec.normalize == "minmax":
            lo, hi = float(img.min()), float(img.max())
            img = (img - lo) / (hi - lo if hi > lo else 1.0)
        elif self.spec.normalize == "zscore":
            img = (img - float(img.mean())) / float(img.std() or 1.0)
        h, w = self.spec.input_size
        if img.shape[1:] != (h, w):
            img = ndi.zoom(img, (1, h / img.shape[1], w / img.shape[2]), order=1)
        return img[:, None].astype(np.float32)

    def labels(self, vol: np.ndarray) -> np.ndarray:
        x = self._prepare(vol)
        out = np.empty((x.shape[0], *self.spec.input_size), np.uint8)
        for start in range(0, x.shape[0], self.spec.batch):
            scores = self.session.run(None, {self.input_name: x[start : start + self.spec.batch]})[
                0
            ]
            if scores.shape[1] == 1:
                out[start : start + len(scores)] = (scores[:, 0] > 0.5).astype(np.uint8)
            else:
                out[start : start + len(scores)] = scores.argmax(axis=1).astype(np.uint8)
        if out.shape[1:] != vol.shape[1:]:
            out = ndi.zoom(
                out, (1, vol.shape[1] / out.shape[1], vol.shape[2] / out.shape[2]), order=0
            )
        return out

    def run(self, vol: np.ndarray, geo: Geometry) -> TaskResult:
        lab = self.labels(vol)
        masks: dict[str, Any] = {}
        findings = []
        for idx, name in enumerate(self.spec.labels):
            if idx == 0:
                continue
            mask = lab == idx
            masks[f"onnx_{name}"] = mask
            if mask.any():
                findings.append(
                    _measure(mask, geo, f"onnx:{name}", f"{self.spec.name}: {name}", vol)
                )
        return TaskResult(
            f"onnx:{self.spec.name}",
            masks,
            findings,
            {"model": self.spec.name, "provider": self.provider},
        )
