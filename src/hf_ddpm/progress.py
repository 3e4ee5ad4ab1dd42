"""Progress bars that stay readable in logs: the usual tqdm bar on a terminal (or a notebook widget), one line per
update when the output is a file or a pipe.

tqdm redraws its bar in place by writing a carriage return before each update. On a terminal that is what a user
wants; in a benchmark log or a CI job the updates pile up on one ever-growing line that editors and log viewers show
as a single line of thousands of characters. `progress_bar` (training, evaluation, calibration) and
`pipeline_progress_bar` (`HFDDPMPipeline.progress_bar`) therefore write to a stream that is not a terminal through
`LogLines`, which turns each redraw into a line of its own, and refresh at most every `LOG_INTERVAL_S` seconds there
unless the caller asks for another `mininterval`.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import IO, Any

import tqdm.auto
import tqdm.autonotebook
import tqdm.std

__all__ = ["LOG_INTERVAL_S", "LogLines", "pipeline_progress_bar", "progress_bar", "writes_lines"]

# Off a terminal: at most one line per this many seconds (tqdm's own 0.1 s would flood a log).
LOG_INTERVAL_S = 5.0
# Cursor-up, which tqdm writes to move between nested bars: meaningless in a log.
_CURSOR_UP = "\x1b[A"


class LogLines:
    """A text stream for tqdm that writes each redraw of a bar as one line of `stream`.

    tqdm redraws with `"\\r" + text + padding`, moves between nested bars with newlines and cursor-up codes, and ends
    a bar with a newline; here the text of a redraw becomes `text + "\\n"` (flushed, so that a log shows it at
    once) and writes without text are dropped.
    """

    def __init__(self, stream: IO[str]):
        self.stream = stream

    @property
    def encoding(self) -> str | None:
        """The wrapped stream's encoding: tqdm draws its bar in ASCII when this cannot encode block characters."""
        return getattr(self.stream, "encoding", None)

    def write(self, text: str) -> int:
        line = text.replace(_CURSOR_UP, "").replace("\r", "").strip("\n").rstrip()
        if line:
            self.stream.write(line + "\n")
            self.flush()
        return len(text)

    def flush(self) -> None:
        getattr(self.stream, "flush", lambda: None)()


def writes_lines(stream: IO[str] | None = None) -> bool:
    """Whether a bar on `stream` (default: `sys.stderr`) is written as lines: the stream is not a terminal, and the
    bar is not a notebook widget (`tqdm.auto` picks one in Jupyter, where no stream is involved)."""
    if tqdm.autonotebook.tqdm is not tqdm.std.tqdm:  # tqdm.auto's bar is a notebook widget
        return False
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    try:
        return not (callable(isatty) and isatty())
    except ValueError:  # a closed stream
        return True


def progress_bar(iterable: Iterable | None = None, **kwargs: Any) -> tqdm.std.tqdm:
    """`tqdm.auto.tqdm(iterable, **kwargs)`, but off a terminal one line per update, at most every `LOG_INTERVAL_S`
    seconds unless `mininterval` is given (see the module docstring). Takes and returns what tqdm does."""
    stream = kwargs.get("file")
    if writes_lines(stream):
        kwargs["file"] = LogLines(sys.stderr if stream is None else stream)
        kwargs.setdefault("mininterval", LOG_INTERVAL_S)
    return tqdm.auto.tqdm(iterable, **kwargs)


def pipeline_progress_bar(pipeline: Any, iterable: Iterable | None = None, total: int | None = None) -> tqdm.std.tqdm:
    """What diffusers' `DiffusionPipeline.progress_bar` builds, through `progress_bar`: the options of
    `pipeline.set_progress_bar_config(...)`, and disabled on every process but rank 0 unless they say otherwise.

    Raises:
        ValueError: neither `iterable` nor `total` given, or a progress bar config that is not a dict.
    """
    from diffusers.utils.distributed_utils import is_torch_dist_rank_zero

    config = getattr(pipeline, "_progress_bar_config", {})
    if not isinstance(config, dict):
        raise ValueError(f"`self._progress_bar_config` should be of type `dict`, but is {type(config)}.")
    if iterable is None and total is None:
        raise ValueError("Either `total` or `iterable` has to be defined.")
    config = {"disable": not is_torch_dist_rank_zero(), **config}
    return progress_bar(iterable, **config) if iterable is not None else progress_bar(total=total, **config)
