"""Stage A: the diffusion maps of one DWI run (SPEC §3)."""

from __future__ import annotations

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from ..interfaces.dmri import DiffusionMaps


def init_dwi_maps_wf(
    *, b0_threshold: float, dti_max_bval: float, name: str = "dwi_maps_wf"
) -> pe.Workflow:
    """Derive the 11 input maps and the brain mask from one DWI run.

    Inputs: ``dwi_file``, ``bval_file``, ``bvec_file``, ``mask_file`` (optional).
    Outputs: ``map_files`` (11 images in :data:`bids_deepanat.dmri.CHANNELS` order),
    ``meanb0_file``, ``mask_file``, ``warnings``.
    """
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(
        niu.IdentityInterface(fields=["dwi_file", "bval_file", "bvec_file", "mask_file"]),
        name="inputnode",
    )
    outputnode = pe.Node(
        niu.IdentityInterface(fields=["map_files", "meanb0_file", "mask_file", "warnings"]),
        name="outputnode",
    )
    maps = pe.Node(
        DiffusionMaps(b0_threshold=b0_threshold, dti_max_bval=dti_max_bval), name="maps",
        mem_gb=2.0,
    )
    workflow.connect([
        (inputnode, maps, [("dwi_file", "dwi_file"), ("bval_file", "bval_file"),
                           ("bvec_file", "bvec_file"), ("mask_file", "mask_file")]),
        (maps, outputnode, [("map_files", "map_files"), ("meanb0_file", "meanb0_file"),
                            ("mask_file", "mask_file"), ("warnings", "warnings")]),
    ])
    return workflow
