"""Nipype interface around :func:`bids_deepanat.synthesis.synthesize_t1w`."""

from __future__ import annotations

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    InputMultiObject,
    SimpleInterface,
    TraitedSpec,
    traits,
)


class _SynthesizeT1wInputSpec(BaseInterfaceInputSpec):
    map_files = InputMultiObject(File(exists=True), mandatory=True, desc="maps, channel order")
    channels = traits.List(traits.Str, mandatory=True, desc="channel names of map_files")
    mask_file = File(exists=True, mandatory=True, desc="brain mask on the DWI grid")
    model_file = File(exists=True, mandatory=True, desc="bids-deepanat model file")
    device = traits.Enum("auto", "cpu", "cuda", usedefault=True)
    tiling = traits.Enum("gaussian", "deepanat", usedefault=True)
    num_threads = traits.Int(1, usedefault=True, desc="torch CPU threads")


class _SynthesizeT1wOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="synthesized T1w on the DWI grid")
    metadata = traits.Dict(desc="model and intensity scale, for the sidecar")


class SynthesizeT1w(SimpleInterface):
    """Run the generator over the brain and write the synthesized T1w."""

    input_spec = _SynthesizeT1wInputSpec
    output_spec = _SynthesizeT1wOutputSpec

    def _run_interface(self, runtime):
        from pathlib import Path

        import nibabel as nib
        import numpy as np

        from ..io import image_like, save_nifti_atomic
        from ..synthesis import synthesize_t1w

        images = [nib.load(f) for f in self.inputs.map_files]
        maps = np.stack([np.asarray(img.dataobj, dtype=np.float32) for img in images], axis=-1)
        mask_img = nib.load(self.inputs.mask_file)
        image, used = synthesize_t1w(
            maps, np.asarray(mask_img.dataobj) > 0, mask_img.affine, Path(self.inputs.model_file),
            channels=tuple(self.inputs.channels), device=self.inputs.device,
            tiling=self.inputs.tiling, threads=self.inputs.num_threads,
        )
        out = Path(runtime.cwd) / "synth_T1w.nii.gz"
        self._results["out_file"] = str(save_nifti_atomic(image_like(image, images[0]), out))
        self._results["metadata"] = used
        return runtime
