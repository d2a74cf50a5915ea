"""The participant-level workflow: one sub-workflow per DWI run, wired, nothing more."""

from __future__ import annotations

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from ..bids import DwiRun
from ..config import Settings
from .dwi import init_dwi_maps_wf
from .outputs import init_ds_dwi_maps_wf


def init_run_wf(*, run: DwiRun, settings: Settings, name: str | None = None) -> pe.Workflow:
    """Maps and derivatives of one DWI run (synthesis plugs in after the maps)."""
    workflow = pe.Workflow(name=name or f"run_{run.node_name}_wf")
    automatic_mask = settings.mask == "auto"
    inputnode = pe.Node(
        niu.IdentityInterface(fields=["dwi_file", "bval_file", "bvec_file", "mask_file"]),
        name="inputnode",
    )
    inputnode.inputs.dwi_file = str(run.dwi)
    inputnode.inputs.bval_file = str(run.bval)
    inputnode.inputs.bvec_file = str(run.bvec)
    if not automatic_mask:
        inputnode.inputs.mask_file = settings.mask

    maps_wf = init_dwi_maps_wf(b0_threshold=settings.b0_threshold,
                               dti_max_bval=settings.dti_max_bval)
    ds_wf = init_ds_dwi_maps_wf(run=run, bids_dir=settings.bids_dir,
                                output_dir=settings.output_dir, save_maps=settings.save_maps,
                                automatic_mask=automatic_mask)
    workflow.connect([
        (inputnode, maps_wf, [("dwi_file", "inputnode.dwi_file"),
                              ("bval_file", "inputnode.bval_file"),
                              ("bvec_file", "inputnode.bvec_file"),
                              ("mask_file", "inputnode.mask_file")]),
        (maps_wf, ds_wf, [("outputnode.map_files", "inputnode.map_files"),
                          ("outputnode.mask_file", "inputnode.mask_file"),
                          ("outputnode.warnings", "inputnode.warnings")]),
    ])
    return workflow


def init_deepanat_wf(
    *, runs: list[DwiRun], settings: Settings, name: str = "deepanat_wf"
) -> pe.Workflow:
    """All selected runs, side by side; Nipype runs them in parallel."""
    workflow = pe.Workflow(name=name, base_dir=str(settings.work_dir))
    workflow.add_nodes([init_run_wf(run=run, settings=settings) for run in runs])
    return workflow
