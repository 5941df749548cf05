"""The one exception type users see.

Every error meant for a user is a :class:`DinoregError` whose message is a single sentence naming the
file or value at fault. The CLI prints it (no traceback) and exits with status 2.
"""


class DinoregError(Exception):
    """A user-facing error: ``str(err)`` is one clear sentence naming the file or value at fault."""
