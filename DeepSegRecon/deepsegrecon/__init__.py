"""DeepSegRecon engine: images, tasks, networks, model store, worker and CLI.

Nothing in this package imports Slicer or Qt, except ``deepsegrecon.scene``,
which needs only the MRML libraries (the ``slicer-core`` wheel or Slicer itself).
"""

__version__ = "0.1.0"
