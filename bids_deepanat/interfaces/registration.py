"""Nipype interfaces: T1w -> diffusion registration and the metrics of a synthesis."""

from __future__ import annotations

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    traits,
)


class _RegisterT1wInputSpec(BaseInterfaceInputSpec):
    t1w_file = File(exists=True, mandatory=True, desc="acquired T1w")
    meanb0_file = File(exists=True, mandatory=True, desc="mean b=0 on the DWI grid")
    mask_file = File(exists=True, mandatory=True, desc="brain mask on the DWI grid")
    affine = traits.Bool(False, usedefault=True, desc="affine after rigid")


class _RegisterT1wOutputSpec(TraitedSpec):
    target_file = File(exists=True, desc="T1w registered and resampled onto the DWI grid")
    xfm_file = File(exists=True, desc="ITK transform, DWI (reference) -> T1w (moving)")
    metadata = traits.Dict(desc="registration quality, for the sidecar")


class RegisterT1w(SimpleInterface):
    """Mutual-information registration of the T1w to the mean b=0 (DIPY), T1w on the DWI grid."""

    input_spec = _RegisterT1wInputSpec
    output_spec = _RegisterT1wOutputSpec

    def _run_interface(self, runtime):
        from pathlib import Path

        import numpy as np

        from ..errors import InvalidInputError
        from ..io import image_like, load_nifti, save_nifti_atomic
        from ..registration import (
            is_brain_only,
            mask_points,
            register_t1w_to_dwi,
            transform_error,
            write_itk_transform,
        )

        t1w = load_nifti(Path(self.inputs.t1w_file), check_data=True)
        if len(t1w.shape) != 3:
            raise InvalidInputError(f"{Path(self.inputs.t1w_file).name}: expected a 3D image, "
                                    f"got shape {t1w.shape}")
        b0 = load_nifti(Path(self.inputs.meanb0_file))
        mask = np.asarray(load_nifti(Path(self.inputs.mask_file)).dataobj) > 0
        # MI restricted to the b0 brain helps only when the T1w is brain-only too; with a
        # whole-head T1w it pulls scalp into the brain region (see register_t1w_to_dwi).
        brain_only = is_brain_only(t1w, b0, mask)
        result = register_t1w_to_dwi(t1w, b0, mask=mask if brain_only else None,
                                     affine=self.inputs.affine)
        cwd = Path(runtime.cwd)
        target = np.asarray(result.resampled.dataobj, dtype=np.float32)
        self._results["target_file"] = str(save_nifti_atomic(image_like(target, b0),
                                                             cwd / "target_T1w.nii.gz"))
        self._results["xfm_file"] = str(write_itk_transform(result.matrix, cwd / "xfm.txt"))
        max_mm, angle_deg = transform_error(result.matrix, np.eye(4),
                                            points=mask_points(mask, b0.affine))
        self._results["metadata"] = {
            "Registration": {
                "Method": "DIPY mutual information, "
                          + ("translation, rigid, affine" if self.inputs.affine else
                             "translation then rigid"),
                "MutualInformationInitial": result.initial_mutual_information,
                "MutualInformationFinal": result.mutual_information,
                "CorrectionFromHeaderMaxMM": max_mm,
                "CorrectionFromHeaderRotationDeg": angle_deg,
                "BrainMaskUsed": bool(brain_only),
            }
        }
        return runtime


class _SynthesisMetricsInputSpec(BaseInterfaceInputSpec):
    synth_file = File(exists=True, mandatory=True)
    target_file = File(exists=True, mandatory=True)
    mask_file = File(exists=True, mandatory=True)


class _SynthesisMetricsOutputSpec(TraitedSpec):
    metrics = traits.Dict(desc="metric name -> value")
    out_tsv = File(exists=True, desc="one-row TSV of the metrics")


class SynthesisMetrics(SimpleInterface):
    """Synthesized vs acquired T1w inside the mask (SPEC §9)."""

    input_spec = _SynthesisMetricsInputSpec
    output_spec = _SynthesisMetricsOutputSpec

    def _run_interface(self, runtime):
        from pathlib import Path

        import nibabel as nib
        import numpy as np

        from ..metrics import METRICS, synthesis_metrics

        def load(path):
            return np.asarray(nib.load(path).dataobj, dtype=np.float64)

        metrics = synthesis_metrics(load(self.inputs.synth_file), load(self.inputs.target_file),
                                    load(self.inputs.mask_file) > 0)
        out = Path(runtime.cwd) / "metrics.tsv"
        out.write_text("\t".join(METRICS) + "\n"
                       + "\t".join(f"{metrics[k]:.6g}" for k in METRICS) + "\n")
        self._results["metrics"] = metrics
        self._results["out_tsv"] = str(out)
        return runtime
