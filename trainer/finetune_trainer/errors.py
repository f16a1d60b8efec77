"""User errors of a training run, and how they reach a person as one line.

A ``TrainerError`` says what is wrong with the job's inputs (a missing dataset path, an empty class
folder, a corrupt image); a ``WeightsError`` what is wrong with its starting weights (an unknown
weights name, a weights file of another architecture); an ``ArtifactError`` what is wrong with the
artifacts being written or read back. The CLI prints ``error: <message>`` and exits 2 instead of a
traceback. Raised in a Ray Train worker, the error travels back wrapped (by the DataLoader's worker
re-raise, by Ray's task error, by Train's ``WorkerGroupError``); ``find_user_error`` digs it out again
on the driver. Imports nothing of the trainer: every other module may raise these.
"""

from __future__ import annotations

import re

__all__ = ["ArtifactError", "TrainerError", "WeightsError", "exception_line", "find_user_error", "one_line", "printable"]

# How a TrainerError (or a WeightsError) appears inside a wrapped, multi-line message: the last line
# of a traceback, "finetune_trainer.errors.TrainerError: dataset.trainUri: …".
_INNER = re.compile(r"^(?:[\w.]*\.)?(?:TrainerError|WeightsError): (.+)$", re.MULTILINE)


class TrainerError(Exception):
    """A problem with the job's inputs, stated in one line that names the path or field at fault."""


class WeightsError(ValueError):
    """Starting weights that cannot be used: an unknown weights name, or a weights file that is
    missing, unreadable, or of another architecture. The message is one line, fit for a job status."""


class ArtifactError(ValueError):
    """Artifacts that cannot be written or read as asked; the message is one line, fit for a job status."""


def printable(name: str) -> str:
    """``name`` (a path, a folder or file name from a dataset) with each character that is not printable (a newline,
    another control character, U+2028, an invisible one) written as its escape, for a one-line message: anyone who
    can write to a dataset names its files, and ``_INNER`` keeps only the first line of a message that comes back
    wrapped (a DataLoader worker's, Ray's)."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in name)


def exception_line(e: BaseException) -> str:
    """``e`` as one line, ``TypeName: first line of its message``, for wrapping a foreign error
    (fsspec backends, torch.load) into one of ours without its multi-line advice."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def one_line(message: str) -> str:
    """The innermost user-facing line of ``message``: wrapped tracebacks keep the original error last."""
    found = _INNER.findall(message)
    if found:
        return str(found[-1]).strip()
    lines = [line for line in message.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else message


def find_user_error(exc: BaseException) -> TrainerError | None:
    """The TrainerError (or WeightsError) behind ``exc``: itself, one it was raised from, or one a Ray
    Train ``WorkerGroupError`` collected from its workers; None when the failure is not the user's."""
    seen: set[int] = set()
    stack: list[BaseException] = [exc]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, TrainerError | WeightsError):
            return TrainerError(one_line(str(current)))
        failures = getattr(current, "worker_failures", None)
        if isinstance(failures, dict):
            # Rank order, so that the message is the same on every run.
            stack.extend(failures[rank] for rank in sorted(failures, reverse=True) if isinstance(failures[rank], BaseException))
        # Explicit causes only: an exception raised while a user error was being handled (a bug in an error path)
        # has that user error as its __context__, and is a bug, whose traceback is what is needed.
        for inner in (getattr(current, "cause", None), current.__cause__):
            if isinstance(inner, BaseException):
                stack.append(inner)
    return None
