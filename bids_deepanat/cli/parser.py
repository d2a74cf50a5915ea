"""The BIDS App command line (SPEC §2): three positionals, grouped options, defaults shown."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import __version__
from ..config import Settings

ANALYSIS_LEVELS = ("participant", "group")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def _existing_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text}: file not found")
    return path


def build_parser() -> argparse.ArgumentParser:
    defaults = Settings(bids_dir=Path("."), output_dir=Path("."), analysis_level="participant")
    parser = argparse.ArgumentParser(
        prog="bids-deepanat",
        description="Synthesize T1-weighted images from diffusion MRI (DeepAnat) for a BIDS "
                    "dataset.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        # Options may come from --config too: argparse must not fill in its own defaults there.
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("bids_dir", type=Path, help="the input BIDS dataset (read only)")
    parser.add_argument("output_dir", type=Path, help="the derivatives folder to write")
    parser.add_argument("analysis_level", metavar="{participant,group}",
                        help="participant: maps and synthesis per run; group: training")
    parser.add_argument("--version", action="version", version=f"bids-deepanat {__version__}")

    g = parser.add_argument_group("selecting data")
    g.add_argument("--participant-label", "--participant_label", nargs="+", metavar="LABEL",
                   help="subjects to process, with or without 'sub-' (default: all)")
    g.add_argument("--session-label", nargs="+", metavar="LABEL",
                   help="sessions to process, with or without 'ses-' (default: all)")
    g.add_argument("--bids-filter-file", type=_existing_file, metavar="FILE",
                   help='JSON PyBIDS filters, e.g. {"dwi": {"acquisition": "multishell"}}')
    g.add_argument("--skip-bids-validation", "--skip_bids_validation", action="store_true",
                   help="do not run the BIDS validator on the input")
    g.add_argument("--bids-database-dir", type=Path, metavar="DIR",
                   help="PyBIDS database folder, kept between runs to index large datasets once")

    g = parser.add_argument_group("diffusion maps")
    g.add_argument("--save-maps", action="store_true",
                   help="also write the 11 diffusion input maps as derivatives")
    g.add_argument("--b0-threshold", type=float, metavar="S_PER_MM2",
                   help=f"b-values at or below are b=0 (default {defaults.b0_threshold:g})")
    g.add_argument("--dti-max-bval", type=float, metavar="S_PER_MM2",
                   help=f"highest b-value in the tensor fit (default {defaults.dti_max_bval:g}; "
                        "falls back to the lowest shell)")
    g.add_argument("--mask", metavar="auto|PATH",
                   help="brain mask: 'auto' from the mean b=0, or a NIfTI on the DWI grid "
                        "(default auto)")

    g = parser.add_argument_group("synthesis")
    g.add_argument("--model", type=Path, metavar="PATH",
                   help="model file (.safetensors) for synthesis (default: the shipped model)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"),
                   help="where the network runs; auto uses CUDA when available (default auto)")
    g.add_argument("--tiling", choices=("gaussian", "deepanat"),
                   help="whole-brain inference: overlapping tiles with Gaussian blending, or the "
                        "reference DeepAnat block scheme (default gaussian)")

    g = parser.add_argument_group("training targets")
    g.add_argument("--t1w-registration", choices=("rigid", "affine"),
                   help="registration of an acquired T1w to the mean b=0, which makes it a "
                        "training target (default rigid)")
    g.add_argument("--ignore", nargs="+", choices=("fieldmaps",), metavar="fieldmaps",
                   help="fieldmaps: do not correct EPI distortion with a reversed phase-encoding "
                        "pair (DWI run or fmap EPI) before registering the T1w")

    g = parser.add_argument_group("training (group level)")
    g.add_argument("--architecture", choices=("unet", "gan"),
                   help="U-Net with masked MAE, or GAN with the 2D discriminator (default unet)")
    g.add_argument("--init-model", type=Path, metavar="PATH",
                   help="fine-tune this model file (shipped, trained or imported)")
    g.add_argument("--epochs", type=_positive_int, help="epochs (default 30)")
    g.add_argument("--batch-size", type=_positive_int,
                   help="global batch size, over all processes under torchrun (default 1)")
    g.add_argument("--patch-size", type=_positive_int, help="training patch edge (default 64)")
    g.add_argument("--patches-per-run", type=_positive_int,
                   help="random patches per run and epoch (default 16)")
    g.add_argument("--lr", type=float, help="Adam learning rate of the generator (default 1e-4)")
    g.add_argument("--gan-weight", type=float, help="weight of the adversarial loss (default 1e-3)")
    g.add_argument("--validation-fraction", type=float,
                   help="fraction of subjects held out for validation (default 0.2)")
    g.add_argument("--unet-depth", type=_positive_int, help="U-Net levels of a new model (5)")
    g.add_argument("--unet-filters", type=_positive_int,
                   help="base filters of a new model (48)")
    g.add_argument("--model-name", help="name of the trained model (default deepanat-<arch>)")
    g.add_argument("--resume", action="store_true",
                   help="continue from the last checkpoint in OUTPUT_DIR/group")
    g.add_argument("--evaluate-only", action="store_true",
                   help="aggregate the participant-level metrics, no training")

    g = parser.add_argument_group("performance and execution")
    g.add_argument("-w", "--work-dir", type=Path, metavar="DIR",
                   help="Nipype working directory (default OUTPUT_DIR/work)")
    g.add_argument("--nprocs", "--nthreads", "--n-cpus", type=_positive_int, metavar="N",
                   help="maximum parallel processes (default: all CPUs)")
    g.add_argument("--omp-nthreads", type=_positive_int, metavar="N",
                   help="threads per process (default 1)")
    g.add_argument("--mem", "--mem-gb", dest="mem_gb", type=float, metavar="GB",
                   help="memory limit for the scheduler in GB (default: none)")
    g.add_argument("--nipype-plugin", metavar="NAME",
                   help="Nipype plugin: MultiProc, Linear, SLURM, SGE, PBS... (default MultiProc)")
    g.add_argument("--plugin-args", type=_existing_file, metavar="FILE",
                   help="YAML file of Nipype plugin arguments")

    g = parser.add_argument_group("other")
    g.add_argument("--config", type=_existing_file, metavar="FILE.yaml",
                   help="YAML file of settings (option names as keys); the command line wins")
    g.add_argument("--seed", type=int, help="random seed (default 0)")
    g.add_argument("-v", "--verbose", action="count", help="more log output (-vv for debug)")
    return parser
