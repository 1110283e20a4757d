"""Errors that name what was wrong: the file, the tensor path or the config key."""


class CqjaxError(ValueError):
    """Base class of cqjax's own errors."""


class ConfigError(CqjaxError):
    """A model config has a key or value that cqjax does not understand."""


class CheckpointError(CqjaxError):
    """A checkpoint is missing, malformed or does not match its config."""


class FormatError(CqjaxError):
    """Stored data does not follow its format (a packed layout, an encoding, a bound)."""
