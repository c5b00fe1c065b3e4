"""User-facing errors. The CLI prints these as one line and exits non-zero, without a traceback."""
import textwrap


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


def cause_line(exc: BaseException, limit: int = 400) -> str:
    """An underlying exception (a library's, a download's) as the cause in a one-line error: its first
    line, whole when it fits in `limit` characters, else cut after a whole word with "…"; its type's
    name when it has no message."""
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    if not first:
        return type(exc).__name__
    if len(first) <= limit:
        return first
    short = textwrap.shorten(first, width=limit, placeholder=" …")
    # one word longer than the limit (a long path or URL) leaves only the placeholder: cut inside it
    return short if short != "…" and short.strip() != "…" else first[:limit - 1] + "…"
