"""The model version each task runs with in a scene: kept in a singleton parameter node, so it is saved with
the scene (None: the store's default)."""

from __future__ import annotations

from ._mrml import check_scene, slicer_module

SELECTION_TAG = "DeepSegReconModels"  # singleton tag of the scene's model-selection parameter node
_SELECTION_PREFIX = "ActiveModelVersion."


def _selection_node(scene, create: bool):
    slicer = slicer_module()
    node = scene.GetSingletonNode(SELECTION_TAG, "vtkMRMLScriptedModuleNode")
    if node is None and create:
        node = slicer.vtkMRMLScriptedModuleNode()
        node.SetSingletonTag(SELECTION_TAG)
        node.SetName(SELECTION_TAG)
        node.SetAttribute("ModuleName", "DeepSegRecon")
        node.HideFromEditorsOn()
        node = scene.AddNode(node)
    return node


def active_model_version(scene, task: str) -> str | None:
    """The model version chosen for ``task`` in this scene (:func:`set_active_model_version`), or None."""
    if scene is None:
        return None
    node = _selection_node(scene, create=False)
    if node is None:
        return None
    return node.GetParameter(_SELECTION_PREFIX + task) or None


def set_active_model_version(scene, task: str, version: str | None) -> None:
    """Choose the model version the next run of ``task`` uses in this scene (None: the store's default)."""
    check_scene(scene)
    node = _selection_node(scene, create=version is not None)
    if node is None:
        return
    if version is None:
        node.UnsetParameter(_SELECTION_PREFIX + task)
    else:
        node.SetParameter(_SELECTION_PREFIX + task, str(version))
