"""Diffusion-map stage time per subject (SPEC §10), on digital-phantom subjects.

    python benchmarks/bench_maps.py [--voxel-size 2.0] [--json results.json]

Writes a phantom subject, then times ``dmri.compute_maps`` (tensor fit, synthetic DWIs, mask) on
it in a fresh process and reports wall time and peak memory.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import peak_rss_mb, print_table, run_isolated  # noqa: E402


def measure(dwi: Path) -> dict:
    import nibabel as nib
    import numpy as np

    from bids_deepanat.dmri import compute_maps, read_gradients

    img = nib.load(dwi)
    data = np.asarray(img.dataobj, dtype=np.float32)
    stem = str(dwi).removesuffix(".nii.gz")
    bvals, bvecs = read_gradients(Path(stem + ".bval").read_text(),
                                  Path(stem + ".bvec").read_text())
    start = time.perf_counter()
    maps = compute_maps(data, img.affine, bvals, bvecs)
    seconds = time.perf_counter() - start
    return {"shape": "x".join(map(str, data.shape)), "mask_voxels": int(maps.mask.sum()),
            "seconds": seconds, "peak_mb": peak_rss_mb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--voxel-size", type=float, nargs="+", default=[2.0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--one", nargs=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(Path(args.one[0]))))
        return

    from bids_deepanat.phantom import make_phantom_dataset

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.voxel_size:
            root = make_phantom_dataset(Path(tmp) / f"vs{size}", n_subjects=1,
                                        voxel_size_mm=size, seed=0)
            dwi = root / "sub-01" / "dwi" / "sub-01_dwi.nii.gz"
            rows.append({"voxel_mm": size, **run_isolated(Path(__file__), [str(dwi)])})
    print_table(rows, ["voxel_mm", "shape", "mask_voxels", "seconds", "peak_mb"])
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
