"""``bids-deepanat`` entry point: command line -> settings -> participant | group."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

from ..errors import (
    DeepAnatError,
    InvalidInputError,
    MissingInputError,
    OutputNotWritableError,
    UnknownAnalysisLevelError,
    UsageError,
)

LOGGER = logging.getLogger("bids_deepanat")


def main(argv: list[str] | None = None) -> int:
    # Nipype asks a web service for updates on import; a cluster node may have no network.
    os.environ.setdefault("NIPYPE_NO_ET", "1")
    from .parser import ANALYSIS_LEVELS, build_parser

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help/--version exit 0, usage errors exit 2
        return 64 if exc.code == 2 else int(exc.code or 0)
    setup_logging(getattr(args, "verbose", 0))
    try:
        settings = settings_from_args(args)
        if settings.analysis_level not in ANALYSIS_LEVELS:
            raise UnknownAnalysisLevelError(
                f"unknown analysis level {settings.analysis_level!r}; choose from "
                f"{', '.join(ANALYSIS_LEVELS)}"
            )
        return run(settings)
    except DeepAnatError as err:
        LOGGER.error("%s", err)
        return err.exit_code


def setup_logging(verbose: int) -> None:
    # Not forced: a host application (or pytest) that already configured logging keeps it.
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
    )
    LOGGER.setLevel(logging.DEBUG if verbose >= 2 else logging.INFO)
    for name in ("nipype.workflow", "nipype.interface", "nipype.utils", "bids"):
        logging.getLogger(name).setLevel(logging.INFO if verbose >= 2 else logging.WARNING)


def settings_from_args(args: argparse.Namespace):
    from ..config import Settings, read_config_file

    values = read_config_file(args.config) if getattr(args, "config", None) else {}
    values.update({k: v for k, v in vars(args).items() if k != "config"})
    values["verbose"] = values.get("verbose") or 0
    return Settings(**values)


def check_locations(settings) -> None:
    """Outputs never go into the input dataset, and must be writable (SPEC §12)."""
    bids_dir = settings.bids_dir.resolve()
    for label, folder in (("output", settings.output_dir), ("work", settings.work_dir)):
        resolved = folder.resolve()
        if resolved == bids_dir or bids_dir in resolved.parents:
            raise UsageError(
                f"the {label} folder {folder} is inside the input dataset {settings.bids_dir}; "
                "choose a folder outside it (the input is never written to)"
            )
        try:
            resolved.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=resolved):
                pass
        except OSError as err:
            raise OutputNotWritableError(
                f"the {label} folder {folder} cannot be written ({err.strerror or err})"
            ) from None


def run(settings) -> int:
    from .. import bids

    if not settings.bids_dir.exists():
        raise MissingInputError(f"{settings.bids_dir}: input dataset not found")
    check_locations(settings)
    bids.validate_dataset(settings.bids_dir, skip_validator=settings.skip_bids_validation)
    filters = read_filters(settings.bids_filter_file)
    layout = bids.load_layout(settings.bids_dir, settings.bids_database_dir)
    runs = bids.collect_runs(layout, participant_labels=settings.participant_label,
                             session_labels=settings.session_label, filters=filters,
                             ignore_fieldmaps="fieldmaps" in settings.ignore)
    LOGGER.info("%d DWI run(s) selected: %s", len(runs), ", ".join(r.name for r in runs))
    if settings.analysis_level == "group":
        from ..group import is_main_process, run_group

        if is_main_process():
            settings.write(settings.output_dir / "logs")
        return run_group(settings, runs)
    return run_participant(settings, runs)


def read_filters(path: Path | None) -> dict:
    if path is None:
        return {}
    try:
        filters = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise UsageError(f"{path}: not a readable JSON filter file ({err})") from None
    if not isinstance(filters, dict):
        raise UsageError(f"{path}: expected a JSON object such as {{\"dwi\": {{...}}}}")
    return filters


def run_participant(settings, runs) -> int:
    from .. import bids
    from ..io import check_dwi_run
    from ..workflows.base import processing_settings
    from ..workflows.outputs import is_complete

    if settings.mask != "auto" and not Path(settings.mask).is_file():
        raise MissingInputError(f"{settings.mask}: mask file not found")
    model_info = check_model(settings)  # before any subject: a bad model fails fast
    logs = settings.output_dir / "logs"
    bids.write_dataset_description(settings.output_dir, settings.bids_dir)
    bids.write_citation(settings.output_dir)
    settings.write(logs)

    failures: dict[str, DeepAnatError] = {}
    ready = []
    for dwi_run in runs:
        if is_complete(dwi_run, settings.output_dir, save_maps=settings.save_maps,
                       synthesize=model_info is not None,
                       model_sha256=model_info.weights_sha256 if model_info else None,
                       processing=processing_settings(settings)):
            LOGGER.info("%s: outputs complete for this model and settings, skipped", dwi_run.name)
            continue
        try:
            check_dwi_run(dwi_run.dwi, dwi_run.bval, dwi_run.bvec,
                          b0_threshold=settings.b0_threshold)
        except DeepAnatError as err:
            failures[dwi_run.name] = err
            LOGGER.error("%s: %s", dwi_run.name, err)
        else:
            ready.append(dwi_run)
    if ready:
        failures.update(execute_workflow(settings, ready))
    return report_failures(failures, n_runs=len(runs))


def check_model(settings):
    """Resolve the model (default: the shipped one) and verify it fully; None: maps only."""
    from ..dmri import CHANNELS
    from ..nn.checkpoint import check_model_inputs, load_model
    from ..synthesis import default_model_path

    if settings.model is None:
        settings.model = default_model_path()
        if settings.model is None:
            LOGGER.warning("no model given and none shipped: only the diffusion maps are made")
            return None
    _, info = load_model(settings.model, device="cpu")
    check_model_inputs(info, CHANNELS)
    LOGGER.info("model %s (%s, sha256 %s...)", info.name, settings.model.name,
                info.weights_sha256[:12])
    return info


def execute_workflow(settings, runs) -> dict[str, DeepAnatError]:
    """Run the Nipype workflow; returns the runs whose outputs are missing, with the reason."""
    import yaml
    from nipype import config as nipype_config
    from nipype import logging as nipype_logging

    from ..workflows.base import init_deepanat_wf
    from ..workflows.outputs import expected_outputs

    crash_dir = settings.output_dir / "logs" / "crash"
    level = "INFO" if settings.verbose >= 2 else "WARNING"
    options = {
        "execution": {"crashdump_dir": str(crash_dir), "crashfile_format": "txt",
                      "stop_on_first_crash": "false", "check_version": "false"},
        "monitoring": {"enabled": "false"},
        "logging": {key: level for key in ("workflow_level", "interface_level", "utils_level")},
    }
    # Worker processes read Nipype's settings from a file, not from this process.
    config_dir = settings.work_dir / "nipype-config"
    config_dir.mkdir(parents=True, exist_ok=True)
    (config_dir / "nipype.cfg").write_text("".join(
        f"[{section}]\n" + "".join(f"{k} = {v}\n" for k, v in values.items())
        for section, values in options.items()))
    os.environ["NIPYPE_CONFIG_DIR"] = str(config_dir)
    nipype_config.update_config(options)
    nipype_logging.update_logging(nipype_config)
    for name in ("nipype.workflow", "nipype.interface", "nipype.utils"):
        logging.getLogger(name).propagate = False  # Nipype has its own handler
    workflow = init_deepanat_wf(runs=runs, settings=settings)
    # torch and OpenMP thread pools do not survive fork(): workers start from a clean server.
    plugin_args = {"n_procs": settings.nprocs, "raise_insufficient": False,
                   "mp_context": "forkserver"}
    if settings.mem_gb:
        plugin_args["memory_gb"] = settings.mem_gb
    if settings.plugin_args:
        plugin_args.update(yaml.safe_load(settings.plugin_args.read_text()) or {})
    if settings.nipype_plugin != "MultiProc":
        for key in ("n_procs", "raise_insufficient", "mp_context"):
            plugin_args.pop(key)
    before = set(crash_dir.glob("crash-*")) if crash_dir.exists() else set()
    try:
        workflow.run(plugin=settings.nipype_plugin, plugin_args=plugin_args)
    except RuntimeError as err:
        LOGGER.debug("Nipype: %s", err)
    crashes = sorted(set(crash_dir.glob("crash-*")) - before) if crash_dir.exists() else []

    failures: dict[str, DeepAnatError] = {}
    for dwi_run in runs:
        missing = [p for p in expected_outputs(dwi_run, save_maps=settings.save_maps,
                                               synthesize=settings.model is not None)
                   if not (settings.output_dir / p).exists()]
        if missing:
            failures[dwi_run.name] = crash_reason(dwi_run, crashes) or DeepAnatError(
                f"outputs missing: {', '.join(p.name for p in missing)}")
            LOGGER.error("%s: %s", dwi_run.name, failures[dwi_run.name])
    return failures


def crash_reason(dwi_run, crashes: list[Path]) -> DeepAnatError | None:
    """The error a node of this run raised, read back from its Nipype crash file."""
    kinds = {cls.__name__: cls for cls in (InvalidInputError, MissingInputError)}
    for crash in crashes:
        text = crash.read_text(errors="replace")
        if f"run_{dwi_run.node_name}_wf" not in text:
            continue
        for line in reversed(text.splitlines()):
            for name, cls in kinds.items():
                marker = f"{name}: "
                if marker in line:
                    return cls(line.split(marker, 1)[1].strip())
        return DeepAnatError(f"a processing step failed, see {crash}")
    return None


def report_failures(failures: dict[str, DeepAnatError], *, n_runs: int) -> int:
    if not failures:
        LOGGER.info("all %d run(s) finished", n_runs)
        return 0
    LOGGER.error("%d of %d run(s) failed: %s", len(failures), n_runs,
                 "; ".join(f"{name}: {err}" for name, err in failures.items()))
    codes = {err.exit_code for err in failures.values()}
    return codes.pop() if len(codes) == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
