"""Scenes as Medical Reality Bundles (``.mrb``): a zip of the MRML scene file and every node's data."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ..errors import InputError
from ..files import check_writable_dir
from ._mrml import check_scene, ensure_converter_rules, slicer_module


def save_mrb(scene, path) -> Path:
    """Write ``scene`` to ``path`` (.mrb) with ``vtkMRMLScene.WriteToMRB``, atomically (temporary + rename).

    Nodes without a storage node get their default one, as Slicer's "Save scene as bundle" does.
    """
    check_scene(scene)
    slicer = slicer_module()
    path = Path(path).absolute()  # MRML refuses relative folders ("not a full path")
    if path.suffix.lower() != ".mrb":
        raise InputError(f"a scene bundle must end in .mrb, got {path.name}")
    check_writable_dir(path.parent)
    path.parent.mkdir(parents=True, exist_ok=True)
    url, root = scene.GetURL(), scene.GetRootDirectory()
    messages = slicer.vtkMRMLMessageCollection() if hasattr(slicer, "vtkMRMLMessageCollection") else None
    # WriteToMRB names the bundle's inner folder after the file and works in a folder beside it: write into a
    # hidden folder beside the target, under the final name, then rename.
    work = Path(tempfile.mkdtemp(prefix=".mrb-", dir=path.parent))
    try:
        tmp = work / path.name
        ok = scene.WriteToMRB(str(tmp), None, messages) if messages is not None else scene.WriteToMRB(str(tmp))
        if not ok or not tmp.is_file():
            detail = messages.GetAllMessagesAsString() if messages is not None else ""
            raise InputError(f"could not save the scene to {path.name}" + (f": {detail.strip()}" if detail else ""))
        os.replace(tmp, path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        # WriteToMRB leaves the scene pointing at its temporary bundle folder; put the scene's location back
        scene.SetURL(url or "")
        scene.SetRootDirectory(root or "")
    return path


def load_mrb(path, scene=None):
    """Read a ``.mrb`` into a new scene (or add it to ``scene``) and return the scene.

    Sets up the cache and data-IO managers ``ReadFromMRB`` needs; the bundle is unpacked into a temporary
    folder that is removed once the data are in memory.
    """
    slicer = slicer_module()
    path = Path(path)
    if not path.is_file():
        raise InputError(f"scene bundle {path} does not exist")
    ensure_converter_rules()
    if scene is None:
        scene = slicer.vtkMRMLScene()
    check_scene(scene)
    tmp = Path(tempfile.mkdtemp(prefix="deepsegrecon-mrb-"))
    old_cache, old_io = scene.GetCacheManager(), scene.GetDataIOManager()
    cwd = os.getcwd()  # a failed ReadFromMRB leaves the process inside its (then deleted) unpack folder
    try:
        cache = slicer.vtkCacheManager()
        cache.SetRemoteCacheDirectory(str(tmp / "cache"))
        io = slicer.vtkDataIOManager()
        io.SetCacheManager(cache)
        scene.SetCacheManager(cache)
        scene.SetDataIOManager(io)
        messages = slicer.vtkMRMLMessageCollection() if hasattr(slicer, "vtkMRMLMessageCollection") else None
        ok = scene.ReadFromMRB(str(path), False, messages) if messages is not None else scene.ReadFromMRB(str(path))
        if not ok:
            detail = messages.GetAllMessagesAsString().strip() if messages is not None else ""
            raise InputError(f"cannot read scene bundle {path.name}" + (f": {detail}" if detail else ""))
    finally:
        os.chdir(cwd)
        if old_cache is not None:
            scene.SetCacheManager(old_cache)
        if old_io is not None:
            scene.SetDataIOManager(old_io)
        shutil.rmtree(tmp, ignore_errors=True)
    return scene
