"""Errors that map onto the exit codes of the BIDS Apps execution spec (SPEC §2)."""

from __future__ import annotations


class DeepAnatError(Exception):
    """Base class: a one-line message for the user and the process exit code."""

    exit_code = 1


class UsageError(DeepAnatError):
    exit_code = 64


class InvalidDatasetError(DeepAnatError):
    """The input is not a valid BIDS dataset."""

    exit_code = 16


class NothingSelectedError(DeepAnatError):
    """Participant labels or filters selected no data."""

    exit_code = 18


class InvalidInputError(DeepAnatError):
    """Input data exists but cannot be used (bad gradients, corrupt image, mismatched model)."""

    exit_code = 65


class MissingInputError(DeepAnatError):
    """A required input file does not exist."""

    exit_code = 66


class UnknownAnalysisLevelError(DeepAnatError):
    exit_code = 17


class OutputNotWritableError(DeepAnatError):
    """The output or work folder cannot be created or written (sysexits EX_CANTCREAT)."""

    exit_code = 73
