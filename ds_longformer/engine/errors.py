"""The engine's user errors: a flag, a DeepSpeed config, a checkpoint or a launch environment that cannot
work. The task programs print them as one message, without a traceback (tasks_common.cli)."""


class UserError(Exception):
    """A mistake in what the user gave; the message names the flag, file or variable and the fix."""


class DivergenceError(UserError):
    """Training diverged: a non-finite loss or gradient norm (or fp16's loss scaler giving up). The
    message names the step and the checkpoint to resume from with other settings."""
