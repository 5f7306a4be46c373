"""Importing this module registers every task with :func:`deepsegrecon.task.register`."""

# Each capability adds its import here.
from .brain import task as _brain_task  # noqa: F401
from .cbct import task as _cbct_task  # noqa: F401
from .slices import task as _slices_task  # noqa: F401
from .teeth import task as _teeth_task  # noqa: F401
from .xray import task as _xray_task  # noqa: F401
