"""User-facing errors: the CLI prints their message (one sentence naming the fix) and exits 1."""


class SemidiffError(Exception):
    """A mistake the user can fix; the message says how."""


class UnknownNameError(SemidiffError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DuplicateNameError(SemidiffError):
    pass
