"""Importing this module registers every task with :func:`deepsegrecon.task.register`."""

# Each capability adds its import here.
