"""The few domain exceptions. The CLI turns them into `ERROR ...` and an exit code.

Anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations


class GonkaError(Exception):
    """Base of every error a user can cause (bad input, missing files, bad signatures)."""

    exit_code = 2


class ValidationError(GonkaError):
    """Bad input, located as precisely as we can: file, line and field."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 field: str | None = None) -> None:
        self.file, self.line, self.field, self.reason = file, line, field, message
        where = ":".join(str(p) for p in (file, line) if p is not None)
        prefix = f"{where}: " if where else ""
        fld = f"field '{field}': " if field else ""
        super().__init__(f"{prefix}{fld}{message}")


class SignatureError(GonkaError):
    """A signature that does not verify, or a signer we do not know."""

    exit_code = 3
