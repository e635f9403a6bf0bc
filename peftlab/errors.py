"""The one error type users see: a one-line message that says what is wrong and how to fix it."""


class PeftlabError(ValueError):
    """A user error (bad config, option, path or data). Recipes print it as one line and exit non-zero."""


class RunInterrupted(Exception):
    """A run stopped on a signal (SIGTERM from a scheduler, Ctrl-C) after saving a checkpoint it can resume from."""

    def __init__(self, signal_name: str, step: int, checkpoint: str | None):
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint
        where = f"checkpoint {checkpoint} saved" if checkpoint else "no checkpoint saved yet"
        super().__init__(f"{signal_name} at step {step}, {where}")
