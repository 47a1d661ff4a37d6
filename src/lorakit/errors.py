"""Errors lorakit raises on bad input: one base class so callers can catch them all."""


class LorakitError(ValueError):
    """Bad input or state; the message names the problem and the fix."""


class FormatError(LorakitError):
    """A file or state dict that lorakit cannot read: missing, corrupt, or for another model."""
