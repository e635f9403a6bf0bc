"""The one error type users see: a one-line message that says what is wrong and how to fix it."""


class PeftlabError(ValueError):
    """A user error (bad config, option, path or data). Recipes print it as one line and exit non-zero."""
