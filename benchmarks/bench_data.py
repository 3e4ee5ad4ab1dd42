"""What `--cache_images_mb` saves: reading training batches from an image folder of JPEG photos-sized files,
epoch after epoch, with and without the in-memory cache of decoded, resized images (`prepare_dataset(cache_bytes=)`).

The folder is made here: `--num_images` JPEGs of 218x178 (CelebA's aligned size) with smooth random content, read
through `datasets`' imagefolder and prepared at `--resolution` with a center crop and random flips, as the trainer
does. Each epoch fetches every row once in a shuffled order, in batches of 16; the first epoch of the cached run
fills the cache.

    python benchmarks/bench_data.py [--num_images 512] [--resolution 64] [--epochs 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from hf_ddpm.data import collate_fn, load_image_dataset, prepare_dataset, set_epoch

BATCH = 16


def write_folder(folder: Path, num_images: int) -> None:
    """JPEGs of 218x178: a random colour gradient plus noise, so that they compress like photos, not like flat fills."""
    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[0:218, 0:178] / 218.0
    for i in range(num_images):
        a, b, c = rng.uniform(0, 255, (3, 3))
        pixels = a * ys[..., None] + b * xs[..., None] + c * 0.3 + rng.normal(0, 12, (218, 178, 3))
        image = PIL.Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        image.save(folder / f"{i:05d}.jpg", quality=90)


def epoch_ms_per_batch(dataset, epoch: int) -> float:
    """Mean milliseconds to fetch and collate one batch over a shuffled epoch."""
    set_epoch(dataset, epoch)
    order = np.random.default_rng(epoch).permutation(len(dataset)).tolist()
    start = time.perf_counter()
    for i in range(0, len(order), BATCH):
        collate_fn(dataset.__getitems__(order[i : i + BATCH]))
    return 1e3 * (time.perf_counter() - start) / -(-len(order) // BATCH)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num_images", type=int, default=512, help="images in the folder (default: 512)")
    parser.add_argument("--resolution", type=int, default=64, help="training resolution (default: 64)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs read by each setting (default: 3)")
    parser.add_argument("--quick", action="store_true", help="32 images, 2 epochs: checks that it runs")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.num_images, args.epochs = 32, 2
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        write_folder(folder, args.num_images)
        raw = load_image_dataset(str(folder), cache_dir=str(Path(tmp) / "hf_cache"))
        times = {}
        for name, cache_bytes in (("no cache", 0), ("cache", 2**30)):
            prepared = prepare_dataset(raw, None, args.resolution, random_flip=True, cache_bytes=cache_bytes)
            times[name] = [epoch_ms_per_batch(prepared, epoch) for epoch in range(args.epochs)]
    print(
        f"batches of {BATCH} from {args.num_images} JPEGs of 218x178, prepared at {args.resolution}x{args.resolution}"
    )
    for name, per_epoch in times.items():
        print(f"  {name:<9} ms per batch, epoch by epoch: " + " ".join(f"{t:7.2f}" for t in per_epoch))
    later = [np.mean(t[1:]) for t in times.values()]
    print(f"  after the first epoch: {later[0] / later[1]:.1f}x faster with the cache")
    print(json.dumps({"ms_per_batch": times, "speedup_after_first_epoch": later[0] / later[1]}))


if __name__ == "__main__":
    main()
