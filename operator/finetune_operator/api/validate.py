"""Loads FineTuneJob manifests from YAML and validates them, one result per document.

Pure (no I/O beyond reading the text it is given): ``finetune validate``, ``finetune run`` and the
operator's create handler share it, so a bad job is reported with the same words everywhere.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import yaml
from pydantic import ValidationError

from finetune_operator.api.errors import format_errors
from finetune_operator.api.fields import quote
from finetune_operator.api.v1alpha1 import FineTuneJob, FineTuneJobSpec
from finetune_operator.api.versions import API_VERSION, KIND


@dataclass
class DocumentResult:
    """The outcome of validating one YAML document."""

    source: str
    index: int | None
    name: str | None
    job: FineTuneJob | None = None
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.job is not None and not self.errors

    @property
    def label(self) -> str:
        where = self.source if self.index is None else f"{self.source}[{self.index}]"
        return f"{where} ({KIND}/{self.name})" if self.name else where


class ManifestError(ValueError):
    """A manifest that is not a valid FineTuneJob; ``lines`` holds one message per problem."""

    def __init__(self, label: str, lines: list[str]) -> None:
        super().__init__(f"{label}: " + "; ".join(lines))
        self.label = label
        self.lines = lines


def validate_document(document: Any, source: str = "<input>", index: int | None = None) -> DocumentResult:
    """Validate one parsed document as a FineTuneJob."""
    if not isinstance(document, dict):
        return DocumentResult(source, index, None, errors=[f"(document): expected a {KIND} object, got {quote(document)}"])
    meta = document.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) and isinstance(meta.get("name"), str) else None
    result = DocumentResult(source, index, name)
    api_version, kind = document.get("apiVersion"), document.get("kind")
    if kind != KIND:
        result.errors.append(f"kind: {quote(kind)} is not accepted; expected {KIND!r}")
    if api_version != API_VERSION:
        result.errors.append(f"apiVersion: {quote(api_version)} is not accepted; expected {API_VERSION!r}")
    if result.errors:
        return result
    try:
        result.job = FineTuneJob.model_validate(document)
    except ValidationError as exc:
        result.errors = format_errors(exc, FineTuneJob)
    return result


def validate_spec(spec: Any) -> tuple[FineTuneJobSpec | None, list[str]]:
    """Validate a bare spec (the operator's view of an object), errors prefixed with ``spec.``."""
    try:
        return FineTuneJobSpec.model_validate(spec), []
    except ValidationError as exc:
        return None, format_errors(exc, FineTuneJobSpec, prefix=("spec",))


def iter_documents(text: str, source: str) -> Iterator[DocumentResult]:
    """Every non-empty YAML document of ``text``, validated; a YAML syntax error is one failed result."""
    try:
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        yield DocumentResult(source, None, None, errors=[f"(document): not valid YAML{where}: {problem}"])
        return
    if not documents:
        yield DocumentResult(source, None, None, errors=["(document): the file holds no YAML document"])
        return
    for index, document in enumerate(documents):
        yield validate_document(document, source, index if len(documents) > 1 else None)


def load_job(text: str, source: str) -> FineTuneJob:
    """The one FineTuneJob in ``text``; raises ManifestError with every problem otherwise."""
    results = list(iter_documents(text, source))
    if len(results) != 1:
        raise ManifestError(source, [f"(document): expected one {KIND}, found {len(results)} documents"])
    result = results[0]
    if not result.ok or result.job is None:
        raise ManifestError(result.label, result.errors)
    return result.job
