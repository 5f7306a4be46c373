"""Importing this module registers every task with :func:`deepsegrecon.task.register`."""

# Each capability adds its import here.
from .teeth import task as _teeth_task  # noqa: F401
from .brain import task as _brain_task  # noqa: F401
