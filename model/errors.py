"""Errors raised by `model/`. The command line turns them into one line and exit code 2."""


class ModelError(Exception):
    """Base class: a model could not be built, loaded or run as asked."""


class ModelLoadError(ModelError):
    """Weights are missing, unreadable, or do not fit the configuration."""


class AudioTooLongError(ModelError):
    """The clip is longer than the model's input window (30 s in `official` mode)."""


class DeviceError(ModelError):
    """The device or dtype asked for cannot be used here (no CUDA, no bfloat16 units, ...)."""


class DeviceMemoryError(DeviceError):
    """The model does not fit in the device's free memory."""
