"""Tests for `--streaming`: training from a `datasets` IterableDataset split per process, checkpointing each
process's place in the stream, resuming bit for bit (with and without DataLoader workers), the processes' disjoint
parts, a two-process run, and the flags it refuses.

The runs use the tiny U-Net flags of helpers.py (as test_training does); the data is a saved dataset whose `label` column is
the row's index, so that the rows each process reads can be told apart.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import datasets
import pytest
import torch
from helpers import accelerate_launch, assert_identical, checkpoint_state, run_train, train_cmd, write_image_folder

from hf_ddpm.data import collate_fn, digits_dataset, load_image_dataset, prepare_dataset, set_epoch, shard_stream
from hf_ddpm.training import TrainingInputError, parse_args
from hf_ddpm.training.checkpoints import list_checkpoints, read_checkpoint_state

pytestmark = pytest.mark.usefixtures("one_thread")

NUM_ROWS = 33  # odd: two processes get parts of 17 and 16 rows (3 and 2 batches of 8)


@pytest.fixture(scope="module")
def indexed_digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """33 digits written by `save_to_disk`, with `label` = row index."""
    path = tmp_path_factory.mktemp("saved") / "digits33"
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    images = digits_dataset().select(range(NUM_ROWS))["image"]
    datasets.Dataset.from_dict({"image": images, "label": list(range(NUM_ROWS))}, features=features).save_to_disk(
        str(path)
    )
    return path


def _stream_position(checkpoint: Path, rank: int = 0) -> dict[str, int]:
    return json.loads((checkpoint / f"stream_state_rank{rank}.json").read_text())


# --- a run, its checkpoint and its pipeline --------------------------------------------------------------------------


def test_streaming_run_checkpoints_and_saves_a_pipeline(tmp_path: Path, indexed_digits: Path) -> None:
    """A saved dataset and an image folder (with a corrupt file, skipped) as streams; the evaluation batch comes from
    the stream too."""
    folder = write_image_folder(tmp_path / "images")
    runs = {
        "saved": ["--dataset_name", str(indexed_digits), "--eval_steps", "2"],
        "imagefolder": ["--train_data_dir", str(folder), "--cache_dir", str(tmp_path / "cache")],
    }
    results = {}
    for name, flags in runs.items():
        out = tmp_path / name
        results[name] = run_train(out, "--streaming", "--checkpointing_steps", "3", *flags, steps=4)
        assert results[name].metrics.global_step == 4
        assert [s for s, _ in list_checkpoints(out)] == [3, 4]
        signature = read_checkpoint_state(out / "checkpoint-4")["signature"]
        assert signature["streaming"] == {"shuffle_buffer_size": 1000, "dataloader_num_workers": 0}
        assert signature["dataset"]["num_rows"] is None
    # 33 rows in batches of 8: 5 batches an epoch, so step 4 is the 4th batch of epoch 0.
    assert _stream_position(tmp_path / "saved" / "checkpoint-4") == {"epoch": 0, "batches": 4}
    # 12 images and a corrupt one in batches of 8: 2 batches an epoch, so step 3 is the 1st batch of epoch 1.
    assert _stream_position(tmp_path / "imagefolder" / "checkpoint-3") == {"epoch": 1, "batches": 1}
    assert results["imagefolder"].metrics.skipped_images >= 1
    assert [e["step"] for e in results["saved"].metrics.eval_history] == [0, 2, 4]

    from diffusers import DiffusionPipeline

    for name in runs:
        pipe = DiffusionPipeline.from_pretrained(tmp_path / name)
        assert type(pipe).__name__ == "HFDDPMPipeline"
        assert pipe(batch_size=2, num_inference_steps=2, output_type="np").images.shape == (2, 8, 8, 1)


# --- resume ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_is_bit_exact(tmp_path: Path, indexed_digits: Path, num_workers: int) -> None:
    """8 steps straight vs. resumed from the straight run's checkpoint-3 into another folder (what a run killed
    after step 3 leaves). With 2 accumulation steps, step 3 ends in the middle of epoch 1 (batch 1 of 5) and the
    windows span epochs; with 2 workers each worker reads half the shards and their batches interleave."""
    flags = ["--streaming", "--dataset_name", str(indexed_digits), "--gradient_accumulation_steps", "2",
             "--checkpointing_steps", "3", "--checkpoints_total_limit", "0", "--learning_rate", "3e-3",
             "--random_flip", "--dataloader_num_workers", str(num_workers)]  # fmt: skip
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_train(straight, *flags, steps=8)
    position = _stream_position(straight / "checkpoint-3")
    assert position["epoch"] == 1 and position["batches"] > 0, position  # mid-epoch, after a whole epoch

    run_train(resumed, *flags, "--resume_from_checkpoint", str(straight / "checkpoint-3"), steps=8)
    assert [s for s, _ in list_checkpoints(resumed)] == [6, 8]
    assert_identical(checkpoint_state(straight, 8), checkpoint_state(resumed, 8))
    assert _stream_position(straight / "checkpoint-8") == _stream_position(resumed / "checkpoint-8")


# --- several processes -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_workers", [0, 2])
def test_processes_read_disjoint_parts_that_cover_the_data(indexed_digits: Path, num_workers: int) -> None:
    """Each epoch (a new shuffle), the parts of 2 processes (every other row: 33 shards do not divide by 2) or 3
    (11 whole shards each) are disjoint and together the whole dataset, also when DataLoader workers split a part."""
    stream = load_image_dataset(str(indexed_digits), streaming=True)
    assert isinstance(stream, datasets.IterableDataset) and stream.num_shards == NUM_ROWS
    orders = set()
    for world_size in (2, 3):
        parts = [
            prepare_dataset(shard_stream(stream, rank, world_size, seed=5, buffer_size=8), None, 8)
            for rank in range(world_size)
        ]
        for epoch in (0, 1):
            seen = []
            for part in parts:
                set_epoch(part, epoch)
                loader = torch.utils.data.DataLoader(
                    part, batch_size=4, collate_fn=collate_fn, num_workers=num_workers
                )
                seen.append([label for batch in loader for label in batch["labels"].tolist()])
            flat = [label for labels in seen for label in labels]
            assert sorted(flat) == list(range(NUM_ROWS)), seen
            assert max(map(len, seen)) - min(map(len, seen)) <= 1
            orders.add(tuple(flat))
    assert len(orders) == 4  # every epoch and split reads the rows in another order


def test_two_processes_stream_their_own_parts(tmp_path: Path, indexed_digits: Path) -> None:
    """`accelerate launch` with 2 processes on parts of 17 and 16 rows (3 and 2 batches an epoch): the processes
    reach different places in their streams, yet make the same steps and end with the same weights."""
    out = tmp_path / "ddp"
    flags = ["--streaming", "--dataset_name", str(indexed_digits), "--checkpointing_steps", "3"]
    proc = subprocess.run(accelerate_launch(2) + train_cmd(out, *flags, steps=6)[1:], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "all 2 processes hold the same weights and EMA" in log
    assert log.count("done: 6 steps") == 1
    checkpoint = out / "checkpoint-6"
    assert _stream_position(checkpoint, 0) == {"epoch": 1, "batches": 3}  # 6 batches: 3 + 3
    assert _stream_position(checkpoint, 1) == {"epoch": 2, "batches": 2}  # 6 batches: 2 + 2 + 2
    assert read_checkpoint_state(checkpoint)["signature"]["num_processes"] == 2


# --- bad input -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--num_epochs", "2"], "--streaming needs --max_train_steps"),
        (["--max_train_steps", "4", "--shuffle_buffer_size", "0"], "--shuffle_buffer_size must be >= 1, got 0"),
    ],
)
def test_bad_streaming_flags_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture, flags, message) -> None:
    argv = ["--output_dir", str(tmp_path / "out"), "--streaming", *flags]
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_map_style_and_streaming_checkpoints_are_not_mixed(tmp_path: Path, indexed_digits: Path) -> None:
    out = tmp_path / "run"
    data = ["--dataset_name", str(indexed_digits)]
    run_train(out, *data, "--checkpointing_steps", "2", steps=2)
    with pytest.raises(TrainingInputError, match=r"another config(.|\n)*streaming: checkpoint=None, now=\{"):
        run_train(out, *data, "--streaming", "--resume_from_checkpoint", "latest")
    with pytest.raises(TrainingInputError, match=r"streaming\.dataloader_num_workers: checkpoint=0, now=2"):
        run_train(tmp_path / "s", *data, "--streaming", "--checkpointing_steps", "2", steps=2)
        run_train(tmp_path / "s", *data, "--streaming", "--dataloader_num_workers", "2",
                  "--resume_from_checkpoint", "latest")  # fmt: skip


def test_a_process_with_an_empty_stream_part_stops_every_process(tmp_path: Path) -> None:
    """One row, two processes: process 1's part of the stream is empty. Every process stops before training with
    one clear message (none is left waiting for the other in a collective), and nothing is written."""
    one_row = tmp_path / "one_row"
    digits_dataset().select(range(1)).save_to_disk(str(one_row))
    out = tmp_path / "ddp"
    flags = ["--streaming", "--dataset_name", str(one_row)]
    proc = subprocess.run(accelerate_launch(2) + train_cmd(out, *flags, steps=2)[1:], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0
    message = "process 1 of 2 got an empty part of the stream"
    assert log.count(message) == 2, log[-4000:]  # each process says it, in the one-line form of train.py's errors
    assert "[rank0]: Traceback" not in log and "[rank1]: Traceback" not in log  # (the launcher's own may follow)
    assert not out.exists()
