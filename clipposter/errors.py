"""User-facing errors. The CLI prints these as one line and exits non-zero, without a traceback."""


class ClipposterError(Exception):
    """An expected failure with a message that names the file or field and what to do."""


class PosterError(ClipposterError):
    """A poster that cannot be used; `path` names it and `reason` says why."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class ConfigError(ClipposterError, ValueError):
    """A setting with a value that cannot work. `field` names the parameter as the Python API spells it
    (`num_heads`); the CLI prints the flag that sets it (`--heads`) in its place."""

    def __init__(self, field: str, problem: str):
        self.field = field
        self.problem = problem
        super().__init__(f"{field} {problem}")
