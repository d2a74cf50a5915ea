"""Training throughput of the reference generator, fp32 vs mixed precision (SPEC §10).

    python benchmarks/bench_training.py [--device cpu] [--steps 3] [--patch 64] [--threads 2]
        [--json results.json]

One optimizer step = forward, mask-weighted MAE, backward and Adam update on a batch of one
64³ patch with 11 channels (the reference setting: 5 levels, 48 filters). Reports patches per
second after one warm-up step; mixed precision is bfloat16 autocast (float16 with loss scaling
on GPUs without bfloat16).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import peak_rss_mb, print_table, run_isolated  # noqa: E402


def measure(device: str, precision: str, steps: int, patch: int, threads: int) -> dict:
    import torch

    from bids_deepanat.nn.unet import UNet3D
    from bids_deepanat.training.loop import masked_mae

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = UNet3D().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(1, 11, patch, patch, patch, device=device)
    y = torch.randn(1, 1, patch, patch, patch, device=device)
    mask = torch.ones_like(y)
    dtype = torch.bfloat16
    if device == "cuda" and not torch.cuda.is_bf16_supported():
        dtype = torch.float16
    scaler = torch.amp.GradScaler(device, enabled=precision == "mixed" and dtype == torch.float16)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=dtype, enabled=precision == "mixed"):
            loss = masked_mae(model(x), y, mask).mean()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    step()  # warm-up: allocations, kernel selection
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else peak_rss_mb()
    return {"device": device, "precision": precision, "patch": patch,
            "seconds_per_patch": seconds, "patches_per_s": 1 / seconds, "peak_mb": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--one", nargs=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(*json.loads(args.one[0]))))
        return
    rows = [run_isolated(Path(__file__), [json.dumps([args.device, precision, args.steps,
                                                      args.patch, args.threads])])
            for precision in ("fp32", "mixed")]
    print_table(rows, ["device", "precision", "patch", "seconds_per_patch", "patches_per_s",
                       "peak_mb"])
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
