"""Training and fine-tuning, task-independent: case folders, the training loop, multi-GPU (DDP).

* :mod:`.cases`: case folders users already have (modality patterns, ``.seg.nrrd`` / NIfTI / NRRD labels,
  label maps), ``case.json`` cases written by :func:`write_case`, validation with clear messages.
* :mod:`.engine`: :class:`TrainConfig`, :func:`train` (one process or one DDP rank) and :func:`fit`
  (from a :class:`Recipe` and a cases folder: what the CLI calls).
* :mod:`.ddp`: ``torchrun`` entry point and :func:`launch` (spawn N local processes).
"""

from .cases import Case, CaseData, check_cases, find_cases, load_case, read_label_map, write_case

__all__ = ["Case", "CaseData", "check_cases", "find_cases", "load_case", "read_label_map", "write_case"]
