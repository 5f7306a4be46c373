"""DeepSegRecon engine: images, tasks, networks, model store, worker and CLI.

Nothing in this package imports Slicer or Qt, except ``deepsegrecon.scene``,
which needs only the MRML libraries (the ``slicer-core`` wheel or Slicer itself).
"""

from ._version import __version__ as __version__


def __getattr__(name):  # the public runner, imported on first use (keeps ``import deepsegrecon`` light)
    if name == "run":
        from .runner import run

        return run
    if name == "run_batch":
        from .batch import run_batch

        return run_batch
    raise AttributeError(f"module 'deepsegrecon' has no attribute '{name}'")
