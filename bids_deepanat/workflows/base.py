"""The participant-level workflow: one sub-workflow per DWI run, wired, nothing more."""

from __future__ import annotations

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from ..bids import DwiRun
from ..config import Settings
from ..interfaces.registration import SynthesisMetrics
from .dwi import init_dwi_maps_wf
from .outputs import init_ds_dwi_maps_wf, init_ds_synth_wf, init_ds_target_wf, saves_maps
from .registration import init_t1w_target_wf
from .synthesis import init_synthesis_wf


def add_metrics(metadata: dict, metrics: dict) -> dict:
    """The synthesis sidecar's extra fields, with the quality metrics when there are some."""
    return {**metadata, "QualityMetrics": metrics} if metrics else metadata


def processing_settings(settings: Settings) -> dict:
    """The settings a synthesized T1w depends on (besides the model), kept in its sidecar."""
    from .. import __version__

    return {"Version": __version__, "B0Threshold": settings.b0_threshold,
            "DTIMaxBval": settings.dti_max_bval, "Mask": settings.mask,
            "Tiling": settings.tiling}


def init_run_wf(*, run: DwiRun, settings: Settings, name: str | None = None) -> pe.Workflow:
    """Maps, synthesis (when a model is set) and the derivatives of one DWI run."""
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
                                output_dir=settings.output_dir,
                                save_maps=saves_maps(run, settings.save_maps),
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
    synthesize, has_target = settings.model is not None, run.t1w is not None
    if has_target:
        target_wf = init_t1w_target_wf(affine=settings.t1w_registration == "affine", run=run,
                                       b0_threshold=settings.b0_threshold,
                                       omp_nthreads=settings.omp_nthreads)
        target_wf.inputs.inputnode.t1w_file = str(run.t1w)
        ds_target_wf = init_ds_target_wf(run=run, bids_dir=settings.bids_dir,
                                         output_dir=settings.output_dir, with_metrics=synthesize)
        workflow.connect([
            (maps_wf, target_wf, [("outputnode.meanb0_file", "inputnode.meanb0_file"),
                                  ("outputnode.mask_file", "inputnode.mask_file")]),
            (target_wf, ds_target_wf, [("outputnode.target_file", "inputnode.target_file"),
                                       ("outputnode.xfm_file", "inputnode.xfm_file"),
                                       ("outputnode.metadata", "inputnode.registration"),
                                       ("outputnode.fieldmap_file", "inputnode.fieldmap_file"),
                                       ("outputnode.magnitude_file",
                                        "inputnode.magnitude_file")]),
        ])
    if not synthesize:
        return workflow
    synthesis_wf = init_synthesis_wf(model_file=settings.model, device=settings.device,
                                     tiling=settings.tiling, omp_nthreads=settings.omp_nthreads)
    ds_synth_wf = init_ds_synth_wf(run=run, bids_dir=settings.bids_dir,
                                   output_dir=settings.output_dir,
                                   processing=processing_settings(settings))
    sidecar = pe.Node(niu.Function(function=add_metrics, input_names=["metadata", "metrics"],
                                   output_names=["metadata"]), name="synth_sidecar")
    sidecar.inputs.metrics = {}
    workflow.connect([
        (maps_wf, synthesis_wf, [("outputnode.map_files", "inputnode.map_files"),
                                 ("outputnode.mask_file", "inputnode.mask_file")]),
        (synthesis_wf, sidecar, [("outputnode.metadata", "metadata")]),
        (synthesis_wf, ds_synth_wf, [("outputnode.synth_file", "inputnode.synth_file")]),
        (sidecar, ds_synth_wf, [("metadata", "inputnode.metadata")]),
        (maps_wf, ds_synth_wf, [("outputnode.warnings", "inputnode.warnings")]),
    ])
    if has_target:
        metrics = pe.Node(SynthesisMetrics(), name="metrics")
        workflow.connect([
            (synthesis_wf, metrics, [("outputnode.synth_file", "synth_file")]),
            (target_wf, metrics, [("outputnode.target_file", "target_file")]),
            (maps_wf, metrics, [("outputnode.mask_file", "mask_file")]),
            (metrics, sidecar, [("metrics", "metrics")]),
            (metrics, ds_target_wf, [("out_tsv", "inputnode.metrics_file")]),
        ])
    return workflow


def init_deepanat_wf(
    *, runs: list[DwiRun], settings: Settings, name: str = "deepanat_wf"
) -> pe.Workflow:
    """All selected runs, side by side; Nipype runs them in parallel."""
    workflow = pe.Workflow(name=name, base_dir=str(settings.work_dir))
    workflow.add_nodes([init_run_wf(run=run, settings=settings) for run in runs])
    return workflow
