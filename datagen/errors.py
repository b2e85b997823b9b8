"""The one error type for user mistakes."""


class UserError(Exception):
    """A mistake in what the user gave us (a file, a field, an option).

    The message is one line that names what is wrong, where, and how to fix it. The CLI prints
    it as ``datagen: error: <message>`` and exits with status 2; nothing is written.
    """
