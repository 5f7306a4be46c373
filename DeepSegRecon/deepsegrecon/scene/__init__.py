"""Scene adapter: engine results <-> MRML nodes (``slicer-core`` wheel or 3D Slicer), no Qt.

Every function takes the scene (or a node) as an argument; nothing uses ``slicer.app`` or
``slicer.mrmlScene``, so the same code runs in Slicer and headless.
"""

from ._mrml import ensure_converter_rules

# A vtkSegmentation copies the factory's conversion rules when it is constructed: register them (unless the
# application already has, as Slicer does) before any segmentation node exists.
ensure_converter_rules()

from .bundle import load_mrb, save_mrb
from .models import export_segments_to_models, export_surfaces, folder_models, world_surface
from .segmentations import create_closed_surfaces, result_to_segmentation_node, segmentation_node_to_labelmap
from .volumes import image_to_volume_node, volume_node_to_image

__all__ = [
    "ensure_converter_rules",
    "image_to_volume_node", "volume_node_to_image",
    "result_to_segmentation_node", "segmentation_node_to_labelmap", "create_closed_surfaces",
    "export_segments_to_models", "export_surfaces", "folder_models", "world_surface",
    "save_mrb", "load_mrb",
]
