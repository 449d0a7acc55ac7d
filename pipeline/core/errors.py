"""Errors a user can fix: every message names the bad thing and what to do about it.

The command line turns any `BancacheError` into a one-paragraph message and exit status 2, without a
traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class BancacheError(Exception):
    """Base class of every error caused by input, configuration or files on disk."""


class ParamsError(BancacheError, ValueError):
    """A params.yaml key is unknown, of the wrong type, or out of range."""


class DatasetError(BancacheError, ValueError):
    """A prepared dataset file is missing, malformed or not what a stage expects."""


class ResultsError(BancacheError, ValueError):
    """A results file (metrics/ensemble/, a sweep's JSON) names a column this version does not know."""


class CheckpointError(BancacheError, ValueError):
    """A checkpoint is missing, not a bancache checkpoint, or does not load with weights_only=True."""


class StoreError(BancacheError, ValueError):
    """Base class of logit-store errors; the message names the store path."""


class StoreNotFoundError(StoreError, FileNotFoundError):
    """No store at the given path."""


class IncompleteStoreError(StoreError):
    """The store has no completion marker: its export was interrupted or failed validation."""


class ForeignStoreError(StoreError):
    """The store was exported from another dataset (fingerprint), class count or split size."""


class CorruptStoreError(StoreError):
    """The store's content is damaged: non-finite rows, missing or unreadable chunks."""


class DiskFullError(BancacheError, OSError):
    """No space left while writing; the previous version of the file or store is untouched."""


class NotWritableError(BancacheError, PermissionError):
    """An output directory cannot be written (read-only file system or missing permission)."""


class DivergedError(BancacheError, ArithmeticError):
    """Training produced a non-finite loss; no model was written."""
