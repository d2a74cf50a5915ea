"""Distortion fit from a reversed phase-encoding pair (SPEC §5, §10), on the real xa30 pair.

    python benchmarks/bench_sdc.py [--json results.json]

Times ``sdc.estimate_displacement`` in a fresh process on the xa30 AP/PA b=0 pair at its native
3 mm and upsampled to 1.5 mm (a stand-in for high-resolution data; the fit's finest level is
the native grid, subsampled by floor(2.5 mm / voxel) for voxels of 1.25 mm or finer), and
reports wall time, peak memory and the b=0 pair correlation before and after.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import peak_rss_mb, print_table, run_isolated  # noqa: E402

XA30 = Path(__file__).resolve().parents[1] / "data" / "xa30" / "sub-01" / "dwi"


def measure(voxel_mm: float) -> dict:
    import nibabel as nib
    import numpy as np
    from scipy import ndimage

    from bids_deepanat.sdc import estimate_displacement

    pair = [np.asarray(nib.load(XA30 / f"sub-01_dir-{d}_dwi.nii.gz").dataobj,
                       dtype=np.float32)[..., 0] for d in ("AP", "PA")]
    if voxel_mm != 3.0:
        pair = [ndimage.zoom(b0, 3.0 / voxel_mm, order=1) for b0 in pair]
    start = time.perf_counter()
    fit = estimate_displacement(pair[0], pair[1], axis=1, voxel_mm=voxel_mm)
    seconds = time.perf_counter() - start
    return {"voxel_mm": voxel_mm, "shape": "x".join(map(str, pair[0].shape)),
            "seconds": seconds, "peak_mb": peak_rss_mb(),
            "r_before": fit.correlation_before, "r_after": fit.correlation_after}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(measure(args.one)))
        return
    rows = [run_isolated(Path(__file__), [str(v)]) for v in (3.0, 1.5)]
    print_table(rows, ["voxel_mm", "shape", "seconds", "peak_mb", "r_before", "r_after"])
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
