"""Training and fine-tuning, task-independent: case folders, the training loop, multi-GPU (DDP).

* :mod:`.cases`: case folders users already have (modality patterns, ``.seg.nrrd`` / NIfTI / NRRD labels,
  label maps), ``case.json`` cases written by :func:`write_case`, validation with clear messages.
* :mod:`.labels`: label maps (dict, JSON, CSV, Slicer colour table).
* :mod:`.data`: case -> tensors, the lazily reading dataset, MONAI augmentation.
* :mod:`.losses`: ROI-aware Dice / Dice + CE, per-class validation Dice.
* :mod:`.engine`: :class:`TrainConfig`, :func:`train` (one process or one DDP rank).
* :mod:`.recipe`: :class:`Recipe` (what a task tells the engine), :func:`get_recipe`, :func:`fit` (what the
  CLI calls).
* :mod:`.ddp`: ``torchrun`` entry point and :func:`launch` (spawn N local processes).
"""

from .cases import Case, CaseData, check_cases, find_cases, load_case, read_label_map, write_case

__all__ = ["Case", "CaseData", "check_cases", "find_cases", "load_case", "read_label_map", "write_case"]
