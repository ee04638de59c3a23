"""The engine's user errors: a flag, a DeepSpeed config, a checkpoint or a launch environment that cannot
work. The task programs print them as one message, without a traceback (tasks_common.cli)."""


class UserError(Exception):
    """A mistake in what the user gave; the message names the flag, file or variable and the fix."""
