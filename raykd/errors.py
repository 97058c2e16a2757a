"""Errors a user can act on. The CLI prints them as one clean line; tests match their messages."""

from __future__ import annotations


class UserError(Exception):
    """Something about the user's input or configuration is wrong; the message says what and where."""


class FormatError(UserError, ValueError):
    """A line or row of an input file does not match its format. Names the file, the line and what was
    expected."""

    def __init__(self, file: str, line: int | None, message: str):
        self.file, self.line, self.reason = file, line, message
        where = f"{file}, line {line}" if line is not None else file
        super().__init__(f"{where}: {message}")
