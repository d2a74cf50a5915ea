"""Nipype interface around :func:`bids_deepanat.dmri.compute_maps`."""

from __future__ import annotations

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    OutputMultiObject,
    SimpleInterface,
    TraitedSpec,
    traits,
)


class _DiffusionMapsInputSpec(BaseInterfaceInputSpec):
    dwi_file = File(exists=True, mandatory=True, desc="4D diffusion image")
    bval_file = File(exists=True, mandatory=True, desc="FSL/BIDS b-values")
    bvec_file = File(exists=True, mandatory=True, desc="FSL/BIDS b-vectors")
    mask_file = File(exists=True, desc="brain mask on the DWI grid (default: automatic)")
    b0_threshold = traits.Float(50.0, usedefault=True, desc="b=0 threshold, s/mm²")
    dti_max_bval = traits.Float(1500.0, usedefault=True, desc="highest DTI b-value, s/mm²")


class _DiffusionMapsOutputSpec(TraitedSpec):
    map_files = OutputMultiObject(File(exists=True), desc="one 3D image per channel, in order")
    channels = traits.List(traits.Str, desc="channel names of map_files")
    meanb0_file = File(exists=True, desc="the meanb0 channel (reference for registration)")
    mask_file = File(exists=True, desc="brain mask on the DWI grid")
    warnings = traits.List(traits.Str, desc="what the user should know about this run")


class DiffusionMaps(SimpleInterface):
    """The 11 DeepAnat input maps and the brain mask of one DWI run, on the DWI grid."""

    input_spec = _DiffusionMapsInputSpec
    output_spec = _DiffusionMapsOutputSpec

    def _run_interface(self, runtime):
        from pathlib import Path

        import numpy as np

        from ..dmri import compute_maps
        from ..errors import InvalidInputError
        from ..io import image_like, load_gradients, load_nifti, save_nifti_atomic

        dwi_path = Path(self.inputs.dwi_file)
        img = load_nifti(dwi_path, ndim=4)
        bvals, bvecs = load_gradients(dwi_path, Path(self.inputs.bval_file),
                                      Path(self.inputs.bvec_file), img.shape[3],
                                      b0_threshold=self.inputs.b0_threshold)
        mask = None
        if self.inputs.mask_file:
            mask_img = load_nifti(Path(self.inputs.mask_file), ndim=3)
            if mask_img.shape != img.shape[:3] or not np.allclose(mask_img.affine, img.affine,
                                                                  atol=1e-3):
                raise InvalidInputError(
                    f"{Path(self.inputs.mask_file).name}: mask is not on the grid of "
                    f"{dwi_path.name}"
                )
            mask = np.asanyarray(mask_img.dataobj) > 0
        try:
            maps = compute_maps(
                np.asanyarray(img.dataobj), img.affine, bvals, bvecs, mask=mask,
                b0_threshold=self.inputs.b0_threshold, dti_max_bval=self.inputs.dti_max_bval,
            )
        except InvalidInputError as err:
            raise InvalidInputError(f"{dwi_path.name}: {err}") from None

        cwd = Path(runtime.cwd)
        self._results["map_files"] = [
            str(save_nifti_atomic(image_like(maps.channel(c), img), cwd / f"{c}.nii.gz"))
            for c in maps.channels
        ]
        self._results["channels"] = list(maps.channels)
        self._results["meanb0_file"] = self._results["map_files"][maps.channels.index("meanb0")]
        self._results["mask_file"] = str(save_nifti_atomic(
            image_like(maps.mask, img, dtype=np.uint8), cwd / "mask.nii.gz"))
        self._results["warnings"] = [f"{dwi_path.name}: {w}" for w in maps.warnings]
        return runtime
