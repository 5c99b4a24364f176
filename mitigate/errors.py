"""Errors raised for bad input: each says what was wrong and what is accepted."""


class MitigationError(ValueError):
    """Base class: a request mitigate cannot honour."""


class UnsupportedModelError(MitigationError, TypeError):
    """The model is not a supported vision-language model."""


class UnknownMethodError(MitigationError, KeyError):
    """A method or preset name that is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ConfigError(MitigationError):
    """A parameter that is unknown, of the wrong type, or out of range."""


class ModelLoadError(MitigationError):
    """A model that cannot be loaded: a missing folder, an unknown or unreachable id, the wrong family."""


class DeviceError(MitigationError):
    """A device (``--device-map``) that this machine does not have."""


class ImageError(MitigationError):
    """An image file that is missing, empty, corrupt or truncated."""


class RunFolderError(MitigationError):
    """A run folder that is in use by another run, or holds the results of a different run."""


class NothingScoredError(MitigationError):
    """A run in which no sample could be scored (every one failed)."""
