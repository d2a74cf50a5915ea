"""Whole-subject synthesis time and peak memory, our tiling vs the reference scheme (SPEC §10).

    python benchmarks/bench_synthesis.py [--device cpu] [--grids 2mm 1.25mm]
        [--reference-blocks 12] [--threads 2] [--json results.json]

The reference architecture (5 levels, 48 filters, 53 M parameters, random weights) runs over an
ellipsoidal brain mask filling a 2 mm (96x114x96) or 1.25 mm (145x174x145) grid. Each
measurement runs in a fresh process. The reference block scheme (64³ blocks, 5 extra per axis)
needs hundreds of blocks; with ``--reference-blocks N`` only N blocks are timed and the total is
extrapolated from the measured time per block (marked ``extrapolated``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import peak_rss_mb, print_table, run_isolated  # noqa: E402

GRIDS = {"2mm": (96, 114, 96), "1.25mm": (145, 174, 145)}


def brain(shape: tuple[int, int, int]):
    import numpy as np
    from scipy import ndimage

    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"), -1)
    mask = (np.linalg.norm(grid / [0.8, 0.85, 0.8], axis=-1) < 1)
    maps = ndimage.gaussian_filter(rng.normal(size=(11, *shape)), (0, 3, 3, 3)).astype("float32")
    return maps * mask, mask


def measure(grid: str, device: str, tiling: str, reference_blocks: int, threads: int) -> dict:
    import numpy as np
    import torch

    from bids_deepanat.nn import inference
    from bids_deepanat.nn.unet import UNet3D

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = UNet3D()
    inputs, mask = brain(GRIDS[grid])
    result = {"grid": grid, "device": device, "tiling": tiling}
    if tiling == "deepanat":
        lo = [int(np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != ax)))[0])
              for ax in range(3)]
        hi = [int(np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != ax)))[-1])
              for ax in range(3)]
        starts = [sorted(set(inference.deepanat_block_starts(lo[a], hi[a]))) for a in range(3)]
        n_blocks = int(np.prod([len(s) for s in starts]))
        model.to(device).eval()
        block = torch.from_numpy(np.ascontiguousarray(inputs[:, :64, :64, :64]))[None].to(device)
        with torch.inference_mode():
            model(block)  # warm-up
            start = time.perf_counter()
            for _ in range(reference_blocks):
                model(block)
            if device == "cuda":
                torch.cuda.synchronize()
        per_block = (time.perf_counter() - start) / reference_blocks
        result.update(seconds=per_block * n_blocks, blocks=n_blocks,
                      note=f"extrapolated from {reference_blocks} blocks")
    else:
        start = time.perf_counter()
        inference.predict_volume(model, inputs, mask, device=device, tiling="gaussian")
        if device == "cuda":
            torch.cuda.synchronize()
        result.update(seconds=time.perf_counter() - start,
                      tile=inference.choose_tile_size(model, device), note="measured")
    result["peak_mb"] = (torch.cuda.max_memory_allocated() / 2**20 if device == "cuda"
                         else peak_rss_mb())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--grids", nargs="+", default=["2mm", "1.25mm"], choices=list(GRIDS))
    parser.add_argument("--reference-blocks", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--one", nargs=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        grid, device, tiling, blocks, threads = json.loads(args.one[0])
        print(json.dumps(measure(grid, device, tiling, blocks, threads)))
        return
    rows = []
    for grid in args.grids:
        for tiling in ("gaussian", "deepanat"):
            spec = json.dumps([grid, args.device, tiling, args.reference_blocks, args.threads])
            rows.append(run_isolated(Path(__file__), [spec]))
    print_table(rows, ["grid", "device", "tiling", "seconds", "peak_mb", "tile", "blocks", "note"])
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
