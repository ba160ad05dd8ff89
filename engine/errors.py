"""Exception types users can catch; the CLI prints their message as one line without a traceback."""


class EngineError(Exception):
    """Base class for ddpm-engine errors that are the user's to fix (bad files, missing backends)."""


class EngineFileError(EngineError):
    """A missing, corrupt, truncated or mismatched engine directory or artefact."""


class BackendUnavailableError(EngineError):
    """A backend whose library or device is not present on this machine."""
