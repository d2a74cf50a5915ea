"""Stage C, participant side: the acquired T1w as a training target in diffusion space (SPEC §5)."""

from __future__ import annotations

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from ..bids import DwiRun
from ..interfaces.registration import EstimateDistortion, RegisterT1w


def init_t1w_target_wf(
    *, affine: bool, run: DwiRun | None = None, b0_threshold: float = 50.0,
    omp_nthreads: int = 1, name: str = "t1w_target_wf",
) -> pe.Workflow:
    """Register the T1w to the mean b=0 and resample it onto the DWI grid.

    Where ``run`` has a reversed phase-encoding partner, the EPI distortion is estimated from
    the pair first: the T1w is registered to the undistorted b=0 and mapped into the distorted
    DWI grid, so that it matches the diffusion maps voxel for voxel.

    Inputs: ``t1w_file``, ``meanb0_file``, ``mask_file``.
    Outputs: ``target_file``, ``xfm_file`` (ITK, DWI -> T1w), ``metadata`` (registration
    quality), and with a partner ``fieldmap_file`` (Hz, when the readout time is known) and
    ``magnitude_file`` (the undistorted mean b=0).
    """
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["t1w_file", "meanb0_file", "mask_file"]),
                        name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(
        fields=["target_file", "xfm_file", "metadata", "fieldmap_file", "magnitude_file"]),
        name="outputnode")
    register = pe.Node(RegisterT1w(affine=affine), name="register", mem_gb=2.0)
    workflow.connect([
        (inputnode, register, [("t1w_file", "t1w_file"), ("meanb0_file", "meanb0_file"),
                               ("mask_file", "mask_file")]),
        (register, outputnode, [("target_file", "target_file"), ("xfm_file", "xfm_file"),
                                ("metadata", "metadata")]),
    ])
    partner = run.reverse_pe if run is not None else None
    if partner is None:
        return workflow
    distortion = pe.Node(EstimateDistortion(
        reverse_file=str(partner.image), b0_threshold=b0_threshold,
        phase_encoding=run.phase_encoding, readout_time=run.readout_time,
        reverse_phase_encoding=partner.phase_encoding,
        reverse_readout_time=partner.readout_time, num_threads=omp_nthreads,
    ), name="distortion", mem_gb=1.0, n_procs=omp_nthreads)
    if partner.bval is not None:
        distortion.inputs.reverse_bval_file = str(partner.bval)
    register.inputs.phase_encoding = run.phase_encoding
    workflow.connect([
        (inputnode, distortion, [("meanb0_file", "meanb0_file"), ("mask_file", "mask_file")]),
        (distortion, register, [("displacement_file", "displacement_file"),
                                ("unwarped_file", "unwarped_file"),
                                ("metadata", "distortion")]),
    ])
    if run.readout_time:
        workflow.connect([(distortion, outputnode, [("fieldmap_file", "fieldmap_file"),
                                                    ("unwarped_file", "magnitude_file")])])
    return workflow
