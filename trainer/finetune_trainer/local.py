"""``finetune run JOB.yaml``: one FineTuneJob on this machine, on an embedded local Ray.

The same YAML and the same trainer as on a cluster; what differs is only here: the manifest is read
from a file and validated (with ``--workers``/``--output`` applied), relative paths are taken from the
current directory, ``pvc://`` is refused (there is no volume to mount), and Ray is started in-process,
sized to the job and the machine, or a running Ray is joined when the user asks (``local_ray``).
Exit status: 0 done, 1 invalid manifest, 2 a user error (``error: <one line>``), anything else a bug
with its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from finetune_operator.api.contract import TrainerConfig, resolve_uri
from finetune_operator.api.fields import quote, uri_scheme
from finetune_operator.api.v1alpha1 import FineTuneJob
from finetune_operator.api.validate import ManifestError, decode_manifest, load_job, read_manifest, validate_document
from finetune_trainer.errors import TrainerError
from finetune_trainer.gate import check_accuracy_gate
from finetune_trainer.local_ray import ray_address, start_ray

__all__ = ["local_job", "run_command", "start_ray", "status_path", "working_directory"]

# Spec fields holding a path or URI, as (section, field) of spec, by their wire names.
_URI_FIELDS = (
    ("model", "weightsUri"),
    ("dataset", "trainUri"),
    ("dataset", "validationUri"),
    ("dataset", "cacheDir"),
    ("output", "uri"),
)


def working_directory() -> Path:
    """The current directory, against which the manifest's and the flags' relative paths are taken (and which
    ``ray.init`` reads for the driver's ``sys.path``); a TrainerError when it was deleted under the shell, where
    ``os.getcwd`` raises FileNotFoundError (a traceback). The one place ``finetune run`` asks for it."""
    try:
        return Path.cwd()
    except FileNotFoundError:
        raise TrainerError(
            "the working directory no longer exists (deleted while this shell was in it); cd to a folder that exists"
        ) from None


def _print_manifest_error(e: ManifestError) -> None:
    print(f"{e.label}: invalid ({len(e.lines)} error{'s' if len(e.lines) > 1 else ''})", file=sys.stderr)
    for line in e.lines:
        print(f"  {line}", file=sys.stderr)


def local_job(
    text: str, source: str, *, workers: int | None = None, output: str | None = None, cwd: Path | None = None
) -> FineTuneJob:
    """The job in ``text`` with the command-line overrides applied and validated again (batch size
    must still divide by the workers), local relative paths made absolute against ``cwd``; raises
    ManifestError (invalid) or TrainerError (valid but not runnable here)."""
    job = load_job(text, source)
    doc: dict[str, Any] = job.model_dump(by_alias=True, mode="json", exclude_none=True)
    spec = doc["spec"]
    if workers is not None:
        spec.setdefault("resources", {})["workers"] = workers
    if output is not None:
        spec["output"]["uri"] = output
    base = cwd or working_directory()
    for section, field in _URI_FIELDS:
        value = spec.get(section, {}).get(field)
        if value is None:
            continue
        if uri_scheme(value) == "pvc":
            hint = " (pass --output DIR)" if section == "output" else ""
            raise TrainerError(
                f"spec.{section}.{field}: {quote(value, 200)}: pvc:// volumes exist only in a cluster; use a local path{hint}"
            )
        if uri_scheme(value) in (None, "file"):
            spec[section][field] = str(_local_path(resolve_uri(value), base, f"spec.{section}.{field}: {quote(value, 200)}"))
    result = validate_document(doc, source)
    if not result.ok or result.job is None:
        raise ManifestError(result.label, result.errors)
    return result.job


def _local_path(path: str, base: Path, shown: str) -> Path:
    """``path`` as the absolute path the OS reaches: a leading ``~`` or ``~user`` expanded (joined to ``base`` first,
    it was a folder named '~'), then joined to ``base``, its links followed; a TrainerError starting with ``shown``
    (the field and its value) when there is no such home or the links loop."""
    try:
        expanded = Path(path).expanduser()
    except RuntimeError:  # pathlib's "Could not determine home directory."
        user = Path(path).parts[0]
        raise TrainerError(f"{shown}: {quote(user)} names no user of this machine (no home folder); write the path out") from None
    try:
        return (base / expanded).resolve()
    except (RuntimeError, OSError):  # "Symlink loop from ..." (RuntimeError up to Python 3.12): a traceback
        raise TrainerError(
            f"{shown}: goes through a loop of symbolic links; accepted: a path whose links lead somewhere"
        ) from None


def status_path(flag: str | None) -> str | None:
    """``--json-status`` as the absolute path the file sink will write, or None without the flag; TrainerError
    when it cannot be written as the sink writes it (``storage.atomic_path``: the missing folders made, a
    temporary file beside the target renamed over it): a directory, a device or pipe (which the rename would
    replace), or a place where this user cannot create files. Checks only: creates nothing."""
    if flag is None:
        return None
    path = _local_path(flag, working_directory(), f"--json-status: {quote(flag, 200)}")
    try:
        problem = _unwritable(path, flag) if flag else "empty"
    except OSError as e:  # a folder on the way this user may not look into
        problem = f"cannot be checked: {e.strerror or e}"
    if problem:
        raise TrainerError(f"--json-status: {quote(flag, 200)}: {problem}; accepted: a file path in a writable directory")
    return str(path)


def _unwritable(path: Path, flag: str) -> str | None:
    """Why the sink could not write ``path``, or None; the paths in it quoted, as they hold the user's text."""
    if path.is_dir():
        return f"is a directory; give a file in it, e.g. {quote(flag.rstrip('/') + '/status.json', 200)}"
    if path.exists() and not path.is_file():
        return "not a regular file (each write replaces it)"
    folder = path.parent
    while not folder.exists():  # the sink makes the missing folders, in the nearest one that exists
        folder = folder.parent
    if not folder.is_dir():
        return f"{quote(str(folder), 200)} is not a directory"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"cannot create files in {quote(str(folder), 200)}"
    return None


def _preflight(cfg: TrainerConfig) -> None:
    """Checks that take a second here rather than a Ray start-up there; the workers repeat them."""
    from finetune_trainer.protect import check_keys

    if cfg.spec.dataset.format == "imagefolder":
        # Only then: `data` imports torchvision, seconds of start-up that digits/fake jobs do not need here.
        from finetune_trainer.data import check_dataset

        check_dataset(cfg)
    check_keys(cfg)  # spec.output.encryption / sign without their key: one line now, not after Ray starts
    uri = cfg.spec.model.weights_uri
    if uri is not None and uri_scheme(uri) in (None, "file") and not Path(resolve_uri(uri)).is_file():
        raise TrainerError(f"model.weightsUri: {uri}: no such file")
    gpus = cfg.spec.resources.workers * cfg.spec.resources.gpus_per_worker
    if gpus:
        import torch

        if torch.cuda.device_count() < gpus:
            raise TrainerError(
                f"resources.gpusPerWorker: the job needs {gpus} GPU(s), this machine has {torch.cuda.device_count()}; "
                "set gpusPerWorker: 0"
            )


def _summary(result: Any) -> str:
    """The run's last line: first the model that ships (model.pt's epoch, as the card records it), then the
    last epoch, which is not the shipped one whenever a later epoch validated worse."""

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.2f}%"

    if result.shipped is not None:
        lead = f"model.pt holds epoch {result.shipped.epoch}: val accuracy {pct(result.shipped.val_accuracy)}"
    else:  # a card without metrics.shipped: the best epoch, which is what the trainer ships
        lead = f"best epoch {result.best_epoch}: val accuracy {pct(result.best_val_accuracy)}"
    last = f"last epoch {result.last_epoch}: {pct(result.val_accuracy)}"
    return f"{result.job_name}: {lead}; {last}; artifacts in {result.run_dir}"


def run_command(args: argparse.Namespace) -> int:
    """``finetune run``: exit 0 done, 1 invalid manifest, 2 user error."""
    try:
        working_directory()  # first: every relative path needs it, and so does ray.init (a missing one: a traceback)
        # The flags first: a second here, where Ray would find them wrong only once started (or after a timeout).
        status_file = status_path(args.json_status)
        address = ray_address(getattr(args, "address", None))
    except TrainerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        data = read_manifest(args.job)
    except OSError as e:
        print(f"error: {args.job}: cannot read: {e.strerror or e}", file=sys.stderr)
        return 2
    try:
        job = local_job(decode_manifest(data, args.job), args.job, workers=args.workers, output=args.output)
        cfg = TrainerConfig.from_job(job, sinks=["console", "file"] if status_file else ["console"], status_file=status_file)
        _preflight(cfg)
    except ManifestError as e:
        _print_manifest_error(e)
        return 1
    except TrainerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return _train(cfg, address)


def _train(cfg: TrainerConfig, address: str | None) -> int:
    import ray

    try:
        started = start_ray(cfg, address)
    except TrainerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    error: TrainerError | None = None
    try:
        # Only now: `driver` imports Ray Train's TorchTrainer, and with it torch (2-3 s of CPU). After ray.init,
        # a Ray that cannot start says so before that import, and the import no longer competes with the raylet
        # for its start-up deadline; what it overlaps of the agents' start is small (bench/README.md, "Start-up").
        from finetune_trainer import driver

        result = driver.run(cfg, local=True)
        check_accuracy_gate(cfg.spec, result.best_val_accuracy, result.best_epoch, result.run_dir, result.shipped_accuracy)
    except TrainerError as e:
        error = e
    finally:
        if started:
            # Before the last line is printed: Ray's log thread copies the workers' output to this stderr
            # asynchronously and shutdown joins it, so no worker line can land after "error: ...".
            ray.shutdown()
    if error is not None:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(_summary(result))
    return 0
