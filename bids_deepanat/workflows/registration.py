"""Stage C, participant side: the acquired T1w as a training target in diffusion space (SPEC §5)."""

from __future__ import annotations

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from ..interfaces.registration import RegisterT1w


def init_t1w_target_wf(*, affine: bool, name: str = "t1w_target_wf") -> pe.Workflow:
    """Register the T1w to the mean b=0 and resample it onto the DWI grid.

    Inputs: ``t1w_file``, ``meanb0_file``, ``mask_file``.
    Outputs: ``target_file``, ``xfm_file`` (ITK, DWI -> T1w), ``metadata`` (registration quality).
    """
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["t1w_file", "meanb0_file", "mask_file"]),
                        name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=["target_file", "xfm_file", "metadata"]),
                         name="outputnode")
    register = pe.Node(RegisterT1w(affine=affine), name="register", mem_gb=2.0)
    workflow.connect([
        (inputnode, register, [("t1w_file", "t1w_file"), ("meanb0_file", "meanb0_file"),
                               ("mask_file", "mask_file")]),
        (register, outputnode, [("target_file", "target_file"), ("xfm_file", "xfm_file"),
                                ("metadata", "metadata")]),
    ])
    return workflow
