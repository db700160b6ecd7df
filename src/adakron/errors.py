"""Bad user input, as every adakron command reports it: one line on stderr and exit code 2."""

from __future__ import annotations

import argparse


class UsageError(Exception):
    """Bad input from the user: the CLI prints the message on one line and exits with code 2."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (libraries often add pages of detail), or its type's name."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def positive_int(text: str) -> int:
    """An argparse ``type`` for counts (steps, rows, threads): a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def positive_float(text: str) -> float:
    """An argparse ``type`` for ratios and scales: a finite number above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number above 0")
    return value


class Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (no usage dump), exit code 2."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
