"""The one exception type for user mistakes: the CLI prints it as one line and exits with 2."""


class UserError(Exception):
    """A mistake in the user's input (unknown model, missing path, bad layer name, bad checkpoint)."""
