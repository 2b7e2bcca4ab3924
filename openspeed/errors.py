"""Errors a user can cause. The CLI prints their message as one line, never a traceback."""


class OpenSpeedError(Exception):
    """Base class for user-facing errors: bad config, missing file, bad sample, bad layout."""


class ConfigError(OpenSpeedError):
    """A config key, value or combination is invalid."""


class CheckpointError(OpenSpeedError):
    """A checkpoint or model directory is missing, incomplete or unreadable."""


class DataError(OpenSpeedError):
    """A data file is missing or unreadable as a whole."""


class BadSampleError(OpenSpeedError):
    """One sample cannot be used (missing image, corrupt file, malformed record, too long).

    The loader skips it and counts it under ``reason``.
    """

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
