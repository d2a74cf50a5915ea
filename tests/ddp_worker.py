"""Worker for the DDP test: ``torchrun ... ddp_worker.py SPEC.json``.

SPEC.json holds ``runs`` (subject, name, map_files, mask_file, target_file), ``config``
(TrainConfig fields), ``output_dir`` and ``record_dir``. Every rank records the destinations of
all files it renamed into place (every file the training writes goes through ``os.replace``)
in ``record_dir/rank<RANK>.json``, so the test can check that only rank 0 wrote anything.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from bids_deepanat.training.data import TrainingRun
from bids_deepanat.training.loop import TrainConfig, train


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(1)
    runs = [
        TrainingRun(r["subject"], r["name"], tuple(Path(p) for p in r["map_files"]),
                    Path(r["mask_file"]), Path(r["target_file"]))
        for r in spec["runs"]
    ]
    written: list[str] = []
    real_replace = os.replace

    def recording_replace(src, dst, *args, **kwargs):
        written.append(str(dst))
        return real_replace(src, dst, *args, **kwargs)

    os.replace = recording_replace
    try:
        final = train(runs, TrainConfig(**spec["config"]), Path(spec["output_dir"]))
    finally:
        os.replace = real_replace
    record = Path(spec["record_dir"]) / f"rank{os.environ.get('RANK', '0')}.json"
    record.write_text(json.dumps({"written": written, "final": str(final),
                                  "world_size": os.environ.get("WORLD_SIZE")}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
