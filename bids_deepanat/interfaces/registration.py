"""Nipype interfaces: T1w -> diffusion registration and the metrics of a synthesis."""

from __future__ import annotations

import logging

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    traits,
)

LOGGER = logging.getLogger("bids_deepanat")


class _EstimateDistortionInputSpec(BaseInterfaceInputSpec):
    meanb0_file = File(exists=True, mandatory=True, desc="mean b=0 of the run, DWI grid")
    mask_file = File(exists=True, mandatory=True, desc="brain mask, DWI grid (for the report)")
    reverse_file = File(exists=True, mandatory=True,
                        desc="reversed phase-encoding DWI run or EPI, same grid")
    reverse_bval_file = File(exists=True, desc="b-values of a DWI partner (absent: EPI b=0s)")
    b0_threshold = traits.Float(50.0, usedefault=True, desc="b=0 threshold (s/mm²)")
    phase_encoding = traits.Str(mandatory=True, desc="PhaseEncodingDirection of the run")
    readout_time = traits.Either(None, traits.Float, usedefault=True)
    reverse_phase_encoding = traits.Str(mandatory=True, desc="the partner's direction")
    reverse_readout_time = traits.Either(None, traits.Float, usedefault=True)
    num_threads = traits.Int(1, usedefault=True)


class _EstimateDistortionOutputSpec(TraitedSpec):
    displacement_file = File(exists=True, desc="voxels along the PE axis, DWI grid")
    unwarped_file = File(exists=True, desc="undistorted mean b=0 of the pair, DWI grid")
    fieldmap_file = File(desc="off-resonance field (Hz), when the readout time is known")
    metadata = traits.Dict(desc="fit quality, for the sidecars")


class EstimateDistortion(SimpleInterface):
    """EPI distortion of the run from its reversed phase-encoding partner (:mod:`..sdc`)."""

    input_spec = _EstimateDistortionInputSpec
    output_spec = _EstimateDistortionOutputSpec

    def _run_interface(self, runtime):
        from pathlib import Path

        import numpy as np

        from ..errors import InvalidInputError
        from ..io import image_like, load_nifti, save_nifti_atomic
        from ..registration import mean_b0, voxel_sizes
        from ..sdc import PhaseEncoding, estimate_displacement, fieldmap_hz, readout_ratio

        b0 = load_nifti(Path(self.inputs.meanb0_file))
        name = Path(self.inputs.reverse_file).name
        hint = "; use --ignore fieldmaps to register without distortion correction"
        partner = load_nifti(Path(self.inputs.reverse_file), check_data=True)
        if partner.shape[:3] != b0.shape[:3] or not np.allclose(partner.affine, b0.affine,
                                                                atol=1e-3):
            raise InvalidInputError(f"{name}: not on the grid of the DWI run, cannot serve for "
                                    f"distortion correction{hint}")
        own = PhaseEncoding(self.inputs.phase_encoding, self.inputs.readout_time)
        other = PhaseEncoding(self.inputs.reverse_phase_encoding,
                              self.inputs.reverse_readout_time)
        if bool(own.readout_time) != bool(other.readout_time):
            LOGGER.warning("%s: only one of the pair has a readout time; both are assumed to "
                           "share it", name)
        try:
            if self.inputs.reverse_bval_file:
                bvals = np.loadtxt(self.inputs.reverse_bval_file, ndmin=1)
                reverse = mean_b0(partner, bvals, b0_threshold=self.inputs.b0_threshold)
            else:
                data = np.asarray(partner.dataobj, dtype=np.float32)
                reverse = image_like(data.mean(axis=3) if data.ndim == 4 else data, b0)
            fit = estimate_displacement(
                np.asarray(b0.dataobj), np.asarray(reverse.dataobj), axis=own.axis,
                voxel_mm=float(voxel_sizes(b0.affine)[own.axis]),
                ratio=readout_ratio(own, other), num_threads=self.inputs.num_threads)
        except ValueError as err:  # no b=0 volume, unreadable b-values, no signal
            raise InvalidInputError(f"{name}: {err}{hint}") from None
        cwd = Path(runtime.cwd)
        self._results["displacement_file"] = str(save_nifti_atomic(
            image_like(fit.displacement, b0), cwd / "displacement.nii.gz"))
        self._results["unwarped_file"] = str(save_nifti_atomic(
            image_like(fit.unwarped, b0), cwd / "unwarped_b0.nii.gz"))
        field = fieldmap_hz(fit.displacement, own)
        if field is not None:
            self._results["fieldmap_file"] = str(save_nifti_atomic(
                image_like(field, b0), cwd / "fieldmap.nii.gz"))
        step_mm = float(voxel_sizes(b0.affine)[own.axis])
        brain = np.asarray(load_nifti(Path(self.inputs.mask_file)).dataobj) > 0
        inside = fit.displacement[brain] if brain.any() else fit.displacement.ravel()
        self._results["metadata"] = {
            "Method": "reversed phase-encoding pair (least-squares fit of a smooth field, "
                      "Jacobian-modulated unwarping); the target is mapped into the distorted "
                      "DWI grid, the diffusion maps are not unwarped",
            "PhaseEncodingDirection": own.direction,
            "ReversePhaseEncodingDirection": other.direction,
            # 1st and 99th percentile in the brain: the extremes sit in noise outside it.
            "DisplacementInBrainMM": [float(np.percentile(inside, 1)) * step_mm,
                                      float(np.percentile(inside, 99)) * step_mm],
            "B0PairCorrelationBefore": fit.correlation_before,
            "B0PairCorrelationAfter": fit.correlation_after,
        }
        return runtime


class _RegisterT1wInputSpec(BaseInterfaceInputSpec):
    t1w_file = File(exists=True, mandatory=True, desc="acquired T1w")
    meanb0_file = File(exists=True, mandatory=True, desc="mean b=0 on the DWI grid")
    mask_file = File(exists=True, mandatory=True, desc="brain mask on the DWI grid")
    affine = traits.Bool(False, usedefault=True, desc="affine after rigid")
    unwarped_file = File(exists=True, desc="undistorted mean b=0 (EstimateDistortion)")
    displacement_file = File(exists=True, requires=["unwarped_file", "phase_encoding"],
                             desc="EPI displacement (EstimateDistortion): register to the "
                                  "undistorted b=0, then map the T1w into the distorted grid")
    phase_encoding = traits.Str(desc="PhaseEncodingDirection of the run")
    distortion = traits.Dict(desc="distortion fit report, copied into the metadata")


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
            resample_to_grid,
            transform_error,
            write_itk_transform,
        )
        from ..sdc import PhaseEncoding, true_positions, unwarp

        t1w = load_nifti(Path(self.inputs.t1w_file), check_data=True)
        if len(t1w.shape) != 3:
            raise InvalidInputError(f"{Path(self.inputs.t1w_file).name}: expected a 3D image, "
                                    f"got shape {t1w.shape}")
        b0 = load_nifti(Path(self.inputs.meanb0_file))
        mask = np.asarray(load_nifti(Path(self.inputs.mask_file)).dataobj) > 0
        positions = None
        if self.inputs.displacement_file:
            # The EPI is distorted along phase encoding, the T1w is not: register to the
            # undistorted b=0, then sample the T1w where each distorted voxel's tissue is.
            axis = PhaseEncoding(self.inputs.phase_encoding).axis
            displacement = np.asarray(load_nifti(Path(self.inputs.displacement_file)).dataobj)
            mask = unwarp(mask.astype(np.float32), displacement, axis, modulate=False) > 0.5
            reference = load_nifti(Path(self.inputs.unwarped_file))
            positions = true_positions(displacement, axis)
        else:
            reference = b0
        # MI restricted to the b0 brain helps only when the T1w is brain-only too; with a
        # whole-head T1w it pulls scalp into the brain region (see register_t1w_to_dwi).
        brain_only = is_brain_only(t1w, reference, mask)
        result = register_t1w_to_dwi(t1w, reference, mask=mask if brain_only else None,
                                     affine=self.inputs.affine)
        cwd = Path(runtime.cwd)
        resampled = result.resampled if positions is None else \
            resample_to_grid(t1w, result.matrix, b0, voxel_coords=positions)
        target = np.asarray(resampled.dataobj, dtype=np.float32)
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
        if self.inputs.displacement_file:
            self._results["metadata"]["DistortionCorrection"] = dict(self.inputs.distortion)
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
