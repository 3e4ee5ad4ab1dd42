"""Progress bars (hf_ddpm.progress): one line per update off a terminal, the usual in-place bar on one, and the
pipeline's bar built as diffusers builds it."""

from __future__ import annotations

import io

import pytest
import torch
from helpers import tiny_unet

from hf_ddpm import DDPMPosteriorScheduler, HFDDPMPipeline
from hf_ddpm.progress import LOG_INTERVAL_S, LogLines, pipeline_progress_bar, progress_bar, writes_lines


class TerminalLike(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def _run(stream: io.StringIO, steps: int = 5, **kwargs) -> str:
    for _ in progress_bar(range(steps), file=stream, desc="work", **kwargs):
        pass
    return stream.getvalue()


def test_off_a_terminal_every_update_is_a_line_of_its_own() -> None:
    out = _run(io.StringIO(), mininterval=0)
    assert "\r" not in out and out.endswith("\n")
    lines = out.splitlines()
    assert all(line.startswith("work: ") for line in lines)
    shown = [line.split("|")[2].split()[0] for line in lines]  # "0/5", "1/5", ...
    assert shown[:6] == [f"{i}/5" for i in range(6)] and shown[-1] == "5/5"  # close repeats the final state


def test_off_a_terminal_lines_are_rate_limited_by_default() -> None:
    stream = io.StringIO()
    bar = progress_bar(total=1000, file=stream, desc="work")
    assert bar.mininterval == LOG_INTERVAL_S
    for _ in range(1000):
        bar.update(1)
    bar.close()
    lines = stream.getvalue().splitlines()
    # The start and the end; a stalled machine may add a line per LOG_INTERVAL_S, never one per update.
    assert lines[0].split("|")[2].split()[0] == "0/1000" and lines[-1].split("|")[2].split()[0] == "1000/1000"
    assert len(lines) < 20
    assert progress_bar(total=3, file=io.StringIO(), mininterval=0.5).mininterval == 0.5  # the caller's choice


def test_on_a_terminal_the_bar_redraws_in_place() -> None:
    out = _run(TerminalLike(), mininterval=0)
    assert out.startswith("\r") and out.count("\r") >= 6 and out.count("\n") == 1 and out.endswith("\n")
    assert progress_bar(total=3, file=TerminalLike()).mininterval == 0.1  # tqdm's own default
    assert not writes_lines(TerminalLike()) and writes_lines(io.StringIO())


def test_nested_bars_write_no_cursor_moves_and_no_blank_lines() -> None:
    stream = io.StringIO()
    with progress_bar(total=2, file=stream, mininterval=0, desc="outer") as outer:
        for _ in range(2):
            for _ in progress_bar(range(2), file=stream, mininterval=0, desc="inner", position=1, leave=False):
                pass
            outer.update()
    out = stream.getvalue()
    assert "\x1b[" not in out and "\r" not in out
    lines = out.splitlines()
    assert lines and all(line.startswith(("outer: ", "inner: ")) for line in lines)
    assert sum(line.startswith("inner: ") for line in lines) == 6  # 0/2, 1/2, 2/2 of each inner run


def test_log_lines_keeps_text_and_drops_cursor_control() -> None:
    stream = io.StringIO()
    lines = LogLines(stream)
    for text in ("\rwork: 1/2   ", "", "\n", "\n\n\x1b[A\x1b[A", "\r          \x1b[A", "\rwork: 2/2"):
        assert lines.write(text) == len(text)
    assert stream.getvalue() == "work: 1/2\nwork: 2/2\n"


class _LinePipeline(HFDDPMPipeline):
    """HFDDPMPipeline with the progress_bar override that hf_ddpm.progress proposes for it."""

    def progress_bar(self, iterable=None, total=None):
        return pipeline_progress_bar(self, iterable, total)


@pytest.fixture
def tiny_pipeline() -> _LinePipeline:
    return _LinePipeline(unet=tiny_unet(), scheduler=DDPMPosteriorScheduler(num_train_timesteps=10))


def test_pipeline_bar_follows_its_config_and_writes_lines(tiny_pipeline: _LinePipeline) -> None:
    stream = io.StringIO()
    tiny_pipeline.set_progress_bar_config(file=stream, mininterval=0)
    images = tiny_pipeline(batch_size=1, num_inference_steps=3, output_type="pt", generator=torch.manual_seed(0))
    assert images.images.shape == (1, 1, 8, 8)
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and lines[0].split("|")[2].split()[0] == "0/3"
    assert lines[-1].split("|")[2].split()[0] == "3/3"

    tiny_pipeline.set_progress_bar_config(file=stream, disable=True)
    before = stream.getvalue()
    tiny_pipeline(batch_size=1, num_inference_steps=3, output_type="pt")
    assert stream.getvalue() == before


def test_pipeline_bar_refuses_what_diffusers_refuses(tiny_pipeline: _LinePipeline) -> None:
    with pytest.raises(ValueError, match="Either `total` or `iterable` has to be defined"):
        pipeline_progress_bar(tiny_pipeline)
    tiny_pipeline._progress_bar_config = [("disable", True)]
    with pytest.raises(ValueError, match="should be of type `dict`"):
        pipeline_progress_bar(tiny_pipeline, total=3)
