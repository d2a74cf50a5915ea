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
    extra_metadata = traits.Dict(desc="added to every sidecar (e.g. what a node reported)")
    warnings = traits.List(traits.Str, desc="added to every sidecar as 'Warnings'")
    base_directory = Directory(mandatory=True, desc="the output dataset")


class _DerivativesSinkOutputSpec(TraitedSpec):
    out_files = OutputMultiObject(File(exists=True))


class DerivativesSink(SimpleInterface):
    """Write each input file to its derivative path; sidecar JSON beside it, both atomic.

    It always runs (a user may have deleted outputs while Nipype's cache stayed) but leaves a
    file alone when the same content is already there.
    """

    input_spec = _DerivativesSinkInputSpec
    output_spec = _DerivativesSinkOutputSpec
    _always_run = True

    def _run_interface(self, runtime):
        import filecmp
        import json
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
                meta = {**meta, **(self.inputs.extra_metadata or {})}
                if self.inputs.warnings:
                    meta["Warnings"] = list(self.inputs.warnings)
                sidecar = dest.with_name(dest.name.split(".")[0] + ".json")
                if not sidecar.exists() or _read_json(sidecar) != json.loads(json.dumps(meta)):
                    write_json_atomic(meta, sidecar)
            if not dest.exists() or not filecmp.cmp(src, dest, shallow=False):
                atomic_write(dest, lambda tmp, s=src: shutil.copyfile(s, tmp))
            written.append(str(dest))
        self._results["out_files"] = written
        return runtime


def _read_json(path):
    import json

    try:
        return json.loads(path.read_text())
    except ValueError:
        return None
