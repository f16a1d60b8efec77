"""What a run's train/validation split depends on, recorded once per run so that a retried attempt cannot re-split.

Each attempt lists the training folder anew and splits it by position (``data._choose``); an image added or removed
between attempts would move images the restored model trained on into validation, and change the steps per epoch
under a restored scheduler. An attempt writes the listing's size and sha256 to ``<run dir>/dataset-listing.json``; a
later one that resumes a checkpoint and lists something else stops with one line. An attempt with no checkpoint to
resume records its own listing instead: nothing trained on the old split carries into it, and an attempt that failed
before its first checkpoint (a folder that changed while its workers listed it, say) must not block every retry.
Hashed while iterating the listing: no second copy of a million-file list.

The workers of one attempt must list the same files too: ``agree_with_rank_zero`` compares each worker's listing
digest with rank 0's where every worker lists for itself (the map-style path, from each node's copy).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from typing import Final

from finetune_operator.api.contract import TrainerConfig
from finetune_trainer import storage
from finetune_trainer.errors import TrainerError

RECORD_FILE: Final = "dataset-listing.json"


def listing_digest(samples: Iterable[tuple[str, int]], root: str) -> tuple[int, str]:
    """(files, sha256) of ``samples`` in their listing order: each path relative to ``root`` (so a node's cache or
    mount directory does not matter) and its label."""
    prefix = root.rstrip("/") + "/"
    digest, count = hashlib.sha256(), 0
    for path, label in samples:
        name = path[len(prefix) :] if path.startswith(prefix) else path
        # surrogateescape: os.walk gives a file name that is not UTF-8 as surrogate escapes (SampleTable's encoding).
        digest.update(f"{label}\t{name}\n".encode("utf-8", "surrogateescape"))
        count += 1
    return count, digest.hexdigest()


Agree = Callable[[tuple[int, str]], tuple[int, str]]
"""Rank 0's listing digest for this worker's (``rank_zero``)."""


_NOUNS: Final = {"trainUri": "training", "validationUri": "validation"}


def agree_with_rank_zero(field: str, samples: Iterable[tuple[str, int]], root: str, agree: Agree | None) -> tuple[int, str]:
    """(files, sha256) of this worker's listing of ``dataset.<field>``; TrainerError (one line) when it is not rank 0's
    (``agree``; None: one worker). A worker that listed other files than rank 0 (a folder changed while the workers of
    one attempt scanned it) would split other images, evaluate others, or run another number of steps than the rest."""
    files, sha256 = listing_digest(samples, root)
    first_files, first_sha256 = (files, sha256) if agree is None else agree((files, sha256))
    if (first_files, first_sha256) != (files, sha256):
        same = " (other names or labels)" if first_files == files else ""
        raise TrainerError(
            f"dataset: this worker listed {files} {_NOUNS.get(field, field)} files, rank 0 {first_files}{same}: the dataset "
            f"changed while the job's workers listed it; keep dataset.{field} unchanged while a job starts"
        )
    return files, sha256


def check_listing(
    cfg: TrainerConfig, samples: Iterable[tuple[str, int]], root: str, agree: Agree | None = None, *, resuming: bool = True
) -> None:
    """Record the training listing; TrainerError (one line) when an attempt that is ``resuming`` a checkpoint of the
    same spec lists different files. Every rank calls it, with ``agree`` where each lists for itself
    (``agree_with_rank_zero``). ``resuming``: whether the attempt restores a checkpoint (True, the careful default,
    for a caller that does not know)."""
    files, sha256 = agree_with_rank_zero("trainUri", samples, root, agree)
    uri = storage.join(cfg.run_dir, RECORD_FILE)
    fingerprint = cfg.spec_fingerprint()
    try:
        recorded = json.loads(storage.read_text(uri))
    except FileNotFoundError:
        recorded = None
    except ValueError:
        if not resuming:  # nothing restored depends on it: this attempt's record replaces it
            recorded = None
        else:
            raise TrainerError(
                f"{uri}: is not the JSON this trainer writes; delete it (or the run's folder) to start over"
            ) from None
    # Another spec's record belongs to another run in this folder, whose checkpoints are refused anyway.
    if isinstance(recorded, dict) and recorded.get("spec") == fingerprint:
        if (recorded.get("files"), recorded.get("sha256")) == (files, sha256):
            return
        if resuming:
            same = " (other names or labels)" if recorded.get("files") == files else ""
            raise TrainerError(
                f"dataset: the training listing changed since the run started ({recorded.get('files')} -> {files} "
                f"files{same}); a new split would validate on images the checkpoints trained on: restore "
                f"dataset.trainUri as it was, or delete the run's folder ({cfg.run_dir}) to start over"
            )
    storage.write_text(uri, json.dumps({"spec": fingerprint, "files": files, "sha256": sha256}, sort_keys=True) + "\n")
