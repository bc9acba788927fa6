"""One exception family for tessera: every message names the file, record, field and what was expected."""


class TesseraError(Exception):
    """Base class of every error tessera raises on purpose."""


class ConfigError(TesseraError, ValueError):
    """A configuration field holds a value tessera cannot honour."""


class CheckpointError(TesseraError):
    """A checkpoint directory is missing, incomplete, or holds tensors of the wrong shape."""


class ImageTokenMismatchError(TesseraError, ValueError):
    """The number of image-token slots in the text differs from the number of image features."""


class DataError(TesseraError, ValueError):
    """An input record (conversation, image, label) cannot be used."""


class ImageTooLargeError(DataError):
    """An image, or what preprocessing would make of it, holds more pixels than allowed."""


class TrainingError(TesseraError):
    """Training cannot go on: the loss or the gradient norm is no longer a finite number."""


class ProcessGroupError(TesseraError):
    """Another process of a torchrun run stopped while this one waited for it to exchange numbers."""
