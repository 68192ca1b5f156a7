"""One exception tree for the whole library; the CLI maps each class to one exit code."""

from __future__ import annotations


class WeightmarkError(Exception):
    """Base of every error the library raises on purpose. `exit_code` is the CLI's code."""

    exit_code = 1


class UsageError(WeightmarkError):
    """The caller asked for something that does not make sense (bad option combination)."""

    exit_code = 2


class InputFileError(WeightmarkError):
    """A file given to us is missing, malformed, hostile or not what the command expects."""

    exit_code = 3

    def __init__(self, path: object, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class FormatError(InputFileError):
    """A weights file breaks its format's rules (header, offsets, lengths, dtypes)."""


class KeyProblem(WeightmarkError):
    """Lab keys are missing, locked, or the passphrase is wrong."""

    exit_code = 4


class RegistryError(WeightmarkError):
    """The registry is missing, inconsistent, or does not know the thing asked for."""

    exit_code = 4


class NotFound(RegistryError):
    """A licensee, model or entry that the registry does not hold."""


class PolicyDenied(WeightmarkError):
    """The jurisdiction policy forbids this issue."""

    exit_code = 5
