"""Errors meant for the user: main.py prints their one-line message and exits with code 2."""


class UserError(Exception):
    """A problem with the user's input (config, data, checkpoint); the message says what to do."""


class DataError(UserError):
    """A data set is missing, malformed or inconsistent with the configuration."""


class CheckpointError(UserError):
    """A checkpoint is missing, corrupt or does not match the configuration."""


class TrainingError(UserError):
    """Training cannot continue (e.g. a NaN loss); the message names the task, epoch and term."""
