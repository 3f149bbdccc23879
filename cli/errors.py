"""Errors the CLI reports as one line (no traceback wall) and a non-zero exit code."""


class UserError(Exception):
    """A problem the user can fix (bad path, missing GPU, missing optional package).

    ``exit_code`` lets a handler choose the process exit status (default 2).
    """

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code
