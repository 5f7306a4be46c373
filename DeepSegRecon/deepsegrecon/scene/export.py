"""Headless export of a segmentation result: surfaces (STL/OBJ) and an optional scene bundle (.mrb)."""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from ..image import Image
from ..results import SegmentationResult
from ..segio import as_3d
from ._mrml import slicer_module
from .bundle import save_mrb
from .models import SURFACE_FORMATS, export_surfaces, world_surface
from .segmentations import create_closed_surfaces, result_to_segmentation_node
from .volumes import image_to_volume_node


def export_segmentation_result(result: SegmentationResult, source_image: Image, out_dir, stem: str,
                               formats=("stl",), mrb: bool = False, smoothing: float = 0.5) -> dict:
    """Build a fresh scene (volume + segmentation), make closed surfaces and write them.

    Writes ``out_dir/<stem>_models/<segment>.<fmt>`` for each format (``.obj`` comes with a ``.mtl``), and
    ``out_dir/<stem>.mrb`` (volume + segmentation) when ``mrb``. ``out_dir`` is written into as given (the
    CLI passes a staging folder). Returns::

        {"models_dir": Path, "files": {"stl": [Path], "obj": [Path]}, "mrb": Path | None,
         "surfaces": {segment name: vtkPolyData (world RAS, triangulated, with normals)}}
    """
    slicer = slicer_module()
    formats = tuple(str(f).lower().lstrip(".") for f in (formats or ()))
    bad = [f for f in formats if f not in SURFACE_FORMATS]
    if bad:
        raise InputError(f"surface formats {bad} are not supported; use {', '.join(SURFACE_FORMATS)}")
    if source_image is not None and not as_3d(result.labelmap).same_grid(as_3d(source_image)):
        raise InputError("the segmentation is not on the grid of the source image")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scene = slicer.vtkMRMLScene()
    try:
        volume = image_to_volume_node(scene, source_image, stem) if source_image is not None else None
        seg = result_to_segmentation_node(scene, result, reference_volume_node=volume, name=f"{stem} segmentation")
        create_closed_surfaces(seg, smoothing)
        segmentation = seg.GetSegmentation()
        ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
        surfaces = {segmentation.GetSegment(s).GetName(): world_surface(seg, s) for s in ids}
        files = {}
        models_dir = out_dir / f"{stem}_models"
        for fmt in formats:
            files[fmt] = export_surfaces(seg, models_dir, fmt)
        mrb_path = save_mrb(scene, out_dir / f"{stem}.mrb") if mrb else None
    finally:
        scene.Clear(1)
    return {"models_dir": models_dir if formats else None, "files": files, "mrb": mrb_path, "surfaces": surfaces}
