"""What a training run stops with: each message is one line that says what to change."""


class SetupError(RuntimeError):
    """The run cannot start as configured (a run dir in use, a tracker that does not start,
    a checkpoint that cannot be resumed)."""


class TrainingError(RuntimeError):
    """The run cannot go on (it diverged, a checkpoint could not be written)."""
