"""Errors the engine raises on purpose, each with the worker/CLI exit code it maps to."""

EXIT_OK = 0
EXIT_INTERNAL = 1  # a bug: unexpected exception
EXIT_INPUT = 2  # bad input image, parameter or path
EXIT_MODEL = 3  # missing, corrupt or wrong-task weights
EXIT_CANCELLED = 4  # the user cancelled
EXIT_RESOURCES = 5  # not enough memory or disk


class DeepSegReconError(Exception):
    exit_code = EXIT_INTERNAL


class InputError(DeepSegReconError, ValueError):
    """The input (image, parameter, path) cannot be used; the message names the problem."""

    exit_code = EXIT_INPUT


class ModelError(DeepSegReconError):
    """Weights are missing, corrupt, fail their checksum or belong to another task."""

    exit_code = EXIT_MODEL


class Cancelled(DeepSegReconError):
    exit_code = EXIT_CANCELLED


class ResourceError(DeepSegReconError):
    """The job would need more memory or disk than is available."""

    exit_code = EXIT_RESOURCES
