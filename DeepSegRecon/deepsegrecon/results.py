"""What a task returns: a segmentation, volumes, a transform or a new model version; each saves to and loads
from a folder (``result.json`` beside its images), which is how results cross from a worker process."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .image import Image


@dataclass
class SegmentInfo:
    name: str
    label: int
    color: tuple  # RGB in 0..1
    terminology: str = ""  # Slicer terminology entry string, may be empty


@dataclass
class SegmentationResult:
    labelmap: Image  # integer labels on the input grid
    segments: list  # [SegmentInfo], only those present
    absent: list = field(default_factory=list)  # names of expected segments not found
    report: dict = field(default_factory=dict)
    kind: str = "segmentation"

    def save(self, folder: Path) -> None:
        _write(folder, {"kind": self.kind, "segments": [asdict(s) for s in self.segments], "absent": self.absent,
                        "report": self.report}, {"labelmap": self.labelmap})

    @classmethod
    def load(cls, folder: Path) -> SegmentationResult:
        meta = _read_meta(folder)
        lab = _read_images(folder, ["labelmap"])["labelmap"]
        segs = [SegmentInfo(s["name"], s["label"], tuple(s["color"]), s.get("terminology", "")) for s in meta["segments"]]
        return cls(lab, segs, meta.get("absent", []), meta.get("report", {}))


@dataclass
class VolumeResult:
    volumes: dict  # name -> Image
    report: dict = field(default_factory=dict)
    kind: str = "volume"

    def save(self, folder: Path) -> None:
        _write(folder, {"kind": self.kind, "volumes": list(self.volumes), "report": self.report}, self.volumes)

    @classmethod
    def load(cls, folder: Path) -> VolumeResult:
        meta = _read_meta(folder)
        return cls(_read_images(folder, meta["volumes"]), meta.get("report", {}))


@dataclass
class TransformResult:
    matrix_lps: np.ndarray  # 4x4, maps CT LPS points into the target frame
    images: dict = field(default_factory=dict)  # name -> Image (e.g. the final DRR)
    report: dict = field(default_factory=dict)
    kind: str = "transform"

    def save(self, folder: Path) -> None:
        _write(folder, {"kind": self.kind, "matrix_lps": np.asarray(self.matrix_lps).tolist(),
                        "images": list(self.images), "report": self.report}, self.images)

    @classmethod
    def load(cls, folder: Path) -> TransformResult:
        meta = _read_meta(folder)
        return cls(np.array(meta["matrix_lps"]), _read_images(folder, meta["images"]), meta.get("report", {}))


@dataclass
class ModelResult:
    """A new model version written into the store by a training or fine-tuning job."""

    task: str
    version: str
    manifest: dict = field(default_factory=dict)
    history: list = field(default_factory=list)  # one dict per epoch: epoch, loss, val_dice, ...
    report: dict = field(default_factory=dict)
    kind: str = "model"

    def save(self, folder: Path) -> None:
        _write(folder, {"kind": self.kind, "task": self.task, "version": self.version, "manifest": self.manifest,
                        "history": self.history, "report": self.report})

    @classmethod
    def load(cls, folder: Path) -> ModelResult:
        meta = _read_meta(folder)
        return cls(meta["task"], meta["version"], meta.get("manifest", {}), meta.get("history", []),
                   meta.get("report", {}))


RESULT_TYPES = {"segmentation": SegmentationResult, "volume": VolumeResult, "transform": TransformResult,
                "model": ModelResult}


def load_result(folder: Path):
    return RESULT_TYPES[_read_meta(folder)["kind"]].load(folder)


def _write(folder, meta: dict, images: dict | None = None) -> None:
    """``images`` ({name: Image}) as ``<name>.nrrd``, then ``meta`` as ``result.json``, into ``folder``."""
    from .io import write_image

    folder = Path(folder)
    for name, img in (images or {}).items():
        write_image(img, folder / f"{name}.nrrd")
    (folder / "result.json").write_text(json.dumps(meta, indent=1, default=_json_default))


def _read_meta(folder) -> dict:
    return json.loads((Path(folder) / "result.json").read_text())


def _read_images(folder, names) -> dict:
    from .io import read_image

    return {n: read_image(Path(folder) / f"{n}.nrrd") for n in names}


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"cannot serialise {type(o).__name__}")
