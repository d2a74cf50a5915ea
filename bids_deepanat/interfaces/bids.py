"""Writing derivatives: copy node outputs into the output dataset, atomically, with sidecars."""

from __future__ import annotations

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    Directory,
    File,
    InputMultiObject,
    OutputMultiObject,
    SimpleInterface,
    TraitedSpec,
    traits,
)


class _DerivativesSinkInputSpec(BaseInterfaceInputSpec):
    in_files = InputMultiObject(File(exists=True), mandatory=True, desc="files to write")
    out_paths = traits.List(traits.Str, mandatory=True, desc="paths relative to base_directory")
    metadata = traits.List(traits.Dict, desc="sidecar content per file (none: no sidecar)")
    warnings = traits.List(traits.Str, desc="added to every sidecar as 'Warnings'")
    base_directory = Directory(mandatory=True, desc="the output dataset")


class _DerivativesSinkOutputSpec(TraitedSpec):
    out_files = OutputMultiObject(File(exists=True))


class DerivativesSink(SimpleInterface):
    """Write each input file to its derivative path; sidecar JSON beside it, both atomic."""

    input_spec = _DerivativesSinkInputSpec
    output_spec = _DerivativesSinkOutputSpec

    def _run_interface(self, runtime):
        import shutil
        from pathlib import Path

        from ..io import atomic_write, write_json_atomic

        base = Path(self.inputs.base_directory).resolve()
        in_files, out_paths = list(self.inputs.in_files), list(self.inputs.out_paths)
        metadata = list(self.inputs.metadata) if self.inputs.metadata else [None] * len(in_files)
        if not len(in_files) == len(out_paths) == len(metadata):
            raise ValueError("in_files, out_paths and metadata differ in length")
        written = []
        for src, rel, meta in zip(in_files, out_paths, metadata):
            dest = (base / rel).resolve()
            if base not in dest.parents:
                raise ValueError(f"{rel}: refusing to write outside {base}")
            if meta is not None:
                meta = dict(meta)
                if self.inputs.warnings:
                    meta["Warnings"] = list(self.inputs.warnings)
                # a run counts as complete only when both image and sidecar exist
                write_json_atomic(meta, dest.with_name(dest.name.split(".")[0] + ".json"))
            written.append(str(atomic_write(dest, lambda tmp, s=src: shutil.copyfile(s, tmp))))
        self._results["out_files"] = written
        return runtime
