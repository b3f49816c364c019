"""The package's own errors: bad input a user can fix. The CLI prints these as one line; anything else raises."""

from __future__ import annotations


class SaefeatError(ValueError):
    """Base of saefeat's errors; the message names the file, row, field or key at fault."""


class SAEFormatError(SaefeatError):
    """An SAE file or flag saefeat cannot apply exactly (refused by name, never dropped)."""


class SAESiteError(SaefeatError):
    """An SAE trained at a hook site saefeat cannot read on this host."""


class MissingFileError(SaefeatError, FileNotFoundError):
    """A file or folder the user named (or the package needs) does not exist."""


class OutputExistsError(SaefeatError, FileExistsError):
    """An output would replace something the user owns; pass overwrite=true where that is meant."""
