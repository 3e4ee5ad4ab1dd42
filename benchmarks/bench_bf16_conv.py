"""Why bf16 autocast does not speed up the U-Net on this CPU: one 3x3 convolution of each resolution level of the
`ddpm-cifar10` U-Net (batch 16), in float32 and in bfloat16, in both memory formats.

oneDNN runs bfloat16 convolutions through its `avx512_core_bf16` kernels where the CPU has AVX512-BF16; whether
they beat float32 depends on the chip (AMX tiles, or the BF16 dot-product throughput). Set ONEDNN_VERBOSE=1 to see
the kernel each call uses.

    python benchmarks/bench_bf16_conv.py [--threads N] [--repeats 10] [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

# (channels, height = width) of the 3x3 convolutions at each level of the ddpm-cifar10 U-Net.
LEVELS = ((128, 32), (256, 16), (256, 8), (256, 4))


def median_ms(conv: torch.nn.Conv2d, x: torch.Tensor, repeats: int) -> float:
    """Median wall time of `conv(x)` in milliseconds, after two warm-up calls."""
    times = []
    with torch.no_grad():
        for i in range(repeats + 2):
            start = time.perf_counter()
            conv(x)
            if i >= 2:
                times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per case, median kept (default: 10)")
    parser.add_argument("--quick", action="store_true", help="the smallest level, 2 calls: checks that it runs")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    levels, repeats = (LEVELS[-1:], 2) if args.quick else (LEVELS, args.repeats)
    torch.manual_seed(0)
    print(
        f"3x3 convolution, batch 16, {torch.get_num_threads()} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}"
    )
    print(f"{'channels':>8} {'size':>5} {'format':>6} {'fp32 ms':>8} {'bf16 ms':>8} {'bf16 speedup':>12}")
    rows = []
    for channels, size in levels:
        for name, fmt in (("NCHW", torch.contiguous_format), ("NHWC", torch.channels_last)):
            conv = torch.nn.Conv2d(channels, channels, 3, padding=1).to(memory_format=fmt)
            x = torch.randn(16, channels, size, size).to(memory_format=fmt)
            fp32 = median_ms(conv, x, repeats)
            bf16 = median_ms(conv.to(torch.bfloat16), x.to(torch.bfloat16), repeats)
            rows.append({"channels": channels, "size": size, "format": name, "fp32_ms": fp32, "bf16_ms": bf16})
            print(f"{channels:>8} {size:>5} {name:>6} {fp32:>8.2f} {bf16:>8.2f} {fp32 / bf16:>11.2f}x")
    print(json.dumps({"rows": rows, "mean_bf16_speedup": statistics.mean(r["fp32_ms"] / r["bf16_ms"] for r in rows)}))


if __name__ == "__main__":
    main()
