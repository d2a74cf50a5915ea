"""Stage B: the synthesized T1w of one run (SPEC §4)."""

from __future__ import annotations

from pathlib import Path

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from ..dmri import CHANNELS
from ..interfaces.synthesis import SynthesizeT1w


def init_synthesis_wf(
    *, model_file: Path, device: str, tiling: str, omp_nthreads: int,
    name: str = "synthesis_wf",
) -> pe.Workflow:
    """Normalize the maps, run the generator, map back to intensities.

    Inputs: ``map_files`` (in :data:`~bids_deepanat.dmri.CHANNELS` order), ``mask_file``.
    Outputs: ``synth_file`` (on the DWI grid), ``metadata`` (model, scale, tiling).
    """
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["map_files", "mask_file"]),
                        name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=["synth_file", "metadata"]),
                         name="outputnode")
    synthesize = pe.Node(
        SynthesizeT1w(model_file=str(model_file), channels=list(CHANNELS), device=device,
                      tiling=tiling, num_threads=omp_nthreads),
        name="synthesize", n_procs=omp_nthreads, mem_gb=4.0,
    )
    workflow.connect([
        (inputnode, synthesize, [("map_files", "map_files"), ("mask_file", "mask_file")]),
        (synthesize, outputnode, [("out_file", "synth_file"), ("metadata", "metadata")]),
    ])
    return workflow
