"""Errors that tell the user what is wrong and where; the CLI prints them without a traceback."""
from __future__ import annotations


class ChatTSTrainError(Exception):
    """Base class: anything the user can fix from the message alone."""


def read_json_object(path: str, error: type[ChatTSTrainError], missing: str, fix: str) -> dict:
    """A JSON file holding one object, or `error`: `missing` when there is no file, else naming the file,
    what is wrong with it, and `fix` (what to do)."""
    import json
    import os

    if not os.path.isfile(path):
        raise error(missing)
    try:
        with open(path) as f:
            obj = json.load(f)
    except ValueError as e:  # invalid JSON, or bytes that are not UTF-8
        raise error(f"{path} is not valid JSON ({e}); {fix}") from None
    if not isinstance(obj, dict):
        raise error(f"{path}: expected a JSON object, found {type(obj).__name__}; {fix}")
    return obj


class CheckpointError(ChatTSTrainError):
    """A model folder that is not a complete ChatTS checkpoint, or an adapter that does not fit it."""


class DataError(ChatTSTrainError):
    """Bad training data: names the file, the line and the reason."""

    def __init__(self, message: str, problems: list[str] | None = None):
        self.problems = problems or []
        if self.problems:
            shown = "\n  ".join(self.problems[:20])
            more = f"\n  ... and {len(self.problems) - 20} more" if len(self.problems) > 20 else ""
            message = f"{message}\n  {shown}{more}"
        super().__init__(message)


class ConfigError(ChatTSTrainError):
    """Options that cannot work together or at all: every problem found, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__(problems[0] if len(problems) == 1 else
                         "the run's configuration has problems:\n  " + "\n  ".join(problems))


class TrainingError(ChatTSTrainError):
    """The run cannot go on (diverged, loss scale at its minimum, out of memory)."""


class RankError(TrainingError):
    """A failure of one rank only (say, out of memory on its longest sample). That rank prints it; the
    others only report that a peer stopped."""
