"""Loads FineTuneJob manifests from YAML and validates them, one result per document.

Pure but for ``read_manifest`` (the bounded read of a file or stdin): ``finetune validate``, ``finetune run``,
``finetune render`` and the operator's create handler share it, so a bad job is reported with the same words everywhere.

A manifest is untrusted input, so whatever it holds, the answer is one line per problem in bounded time
and memory, never a traceback: the text is decoded strictly (UTF-8), bounded in size, then walked as a
stream of YAML events (no recursion, nothing built) that refuses anchors and aliases (an alias bomb is a
few lines), nesting deeper than any FineTuneJob, too many nodes and duplicate keys (YAML keeps the last
silently) before the document is built. Scalars are read, and the document is written as JSON, as kubectl does it
(``api.kubectl_yaml``): what is validated is what the API server would get.
"""

from __future__ import annotations

import errno
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import yaml
from pydantic import ValidationError

from finetune_operator.api.errors import format_errors
from finetune_operator.api.fields import quote, shorten
from finetune_operator.api.kubectl_yaml import LOADER, as_sent, json_default
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
    document: Any = None
    """The parsed document (None when the file could not be parsed), for checks beyond the API's own."""

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
    result = DocumentResult(source, index, name, document=document)
    api_version, kind = document.get("apiVersion"), document.get("kind")
    if kind != KIND:
        result.errors.append(f"kind: {quote(kind)} is not accepted; expected {KIND!r}")
    if api_version != API_VERSION:
        result.errors.append(f"apiVersion: {quote(api_version)} is not accepted; expected {API_VERSION!r}")
    if kind != KIND:
        return result  # another kind of object: its fields are not a FineTuneJob's mistakes
    unsendable: list[tuple[tuple[str | int, ...], str]] = []
    try:
        wire = json.dumps(as_sent(document, unsendable), default=json_default)
    except (TypeError, ValueError) as exc:  # a dict built in Python holding objects no manifest can (a Path, a set)
        result.errors.append(f"(document): not JSON data ({exc}); a {KIND} holds strings, numbers, booleans, lists, maps")
        return result
    except RecursionError:  # a dict built in Python, nested beyond any manifest
        result.errors.append(f"(document): nested more than {MAX_DEPTH} levels deep; a FineTuneJob nests six")
        return result
    judged: set[tuple[str | int, ...]] = set()
    try:
        # As JSON, strictly: what the API server gets from kubectl. A quoted number ("10") is a string there, which its
        # schema refuses for a number field; converting it here would call valid a manifest the cluster refuses.
        result.job = FineTuneJob.model_validate_json(wire, strict=True)
    except ValidationError as exc:
        # With the apiVersion line above (pydantic's own words for it are dropped): every mistake in one pass.
        result.errors += [line for line in format_errors(exc, FineTuneJob) if not line.startswith("apiVersion: ")]
        judged = {tuple(error["loc"]) for error in exc.errors(include_url=False)}
    # What kubectl cannot send at all, unless the models said already what is wrong there (NaN for learningRate).
    result.errors += [line for loc, line in unsendable if loc not in judged]
    if unsendable:
        result.job = None
    return result


def validate_spec(spec: Any) -> tuple[FineTuneJobSpec | None, list[str]]:
    """Validate a bare spec (the operator's view of an object), errors prefixed with ``spec.``."""
    try:
        return FineTuneJobSpec.model_validate(spec), []
    except ValidationError as exc:
        return None, format_errors(exc, FineTuneJobSpec, prefix=("spec",))


MAX_MANIFEST_BYTES: Final = 1 << 20
"""Largest manifest file read (1 MiB): a FineTuneJob is a few KiB, and the API server stores objects of 1.5 MiB at most."""
MAX_DEPTH: Final = 32
"""Deepest nesting of mappings and lists accepted; a FineTuneJob nests six levels."""
MAX_NODES: Final = 20_000
"""Most YAML nodes (scalars, mappings, lists) in one file: a complete FineTuneJob has a few hundred."""
_LOADER: type[yaml.SafeLoader] = LOADER


def read_manifest(path: str) -> bytes:
    """A manifest file's bytes ('-': stdin), at most one more than MAX_MANIFEST_BYTES: a huge file or an endless stdin
    costs nothing. The one read of this module, shared by the ``finetune`` commands; OSError passes through."""
    if path == "-":
        return sys.stdin.buffer.read(MAX_MANIFEST_BYTES + 1)
    if not path:  # Path("") is the working directory: "Is a directory" would name neither the value nor the fault
        raise FileNotFoundError(errno.ENOENT, "'' (an empty path) names no file; give a manifest's path, or - for stdin")
    with Path(path).open("rb") as stream:
        return stream.read(MAX_MANIFEST_BYTES + 1)


def decode_manifest(data: bytes, source: str) -> str:
    """The text of a manifest file's bytes; ManifestError when it is too big or not UTF-8."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(
            source,
            [f"(document): the file is larger than {MAX_MANIFEST_BYTES // 1024} KiB; a FineTuneJob manifest is a few KiB"],
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ManifestError(
            source,
            [f"(document): not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); save the file as UTF-8"],
        ) from None


class _Frame:
    """One open mapping or list while the event stream is walked: where we are in it, for paths."""

    __slots__ = ("index", "key", "keys", "mapping", "want_key")

    def __init__(self, mapping: bool) -> None:
        self.mapping = mapping
        self.want_key = True
        self.key: str | None = None
        self.keys: dict[str, int] = {}
        self.index = -1

    def step(self) -> str:
        return f"[{self.index}]" if not self.mapping else f".{self.key}"


def _where(event: yaml.Event) -> str:
    mark = event.start_mark
    return f"line {mark.line + 1}" if mark is not None else "an unknown line"


# kubectl (apimachinery's YAMLReader) cuts a file into documents at every line that starts with '---', and refuses the
# file when anything but spaces or a comment follows on that line; PyYAML reads '--- {a: 1}' as a document.
_SEPARATOR = re.compile(r"^---[^\S\n]*([^\s#].*)$", re.MULTILINE)


def _stream_problem(text: str) -> str | None:
    """The first thing that makes ``text`` unsafe or ambiguous to build, walking its events; None when it is fine."""
    if len(text) > MAX_MANIFEST_BYTES:
        return f"(document): the text is larger than {MAX_MANIFEST_BYTES // 1024} KiB; a FineTuneJob manifest is a few KiB"
    separator = _SEPARATOR.search(text)
    if separator:
        line = text.count("\n", 0, separator.start()) + 1
        return (
            f"(document): the document separator at line {line} has {quote(separator.group(1).strip(), 60)} after '---', "
            "which kubectl refuses (invalid Yaml document separator); start the document on the next line"
        )
    loader = _LOADER(text)
    stack: list[_Frame] = []
    nodes = 0
    try:
        while loader.check_event():
            event = loader.get_event()  # type: ignore[no-untyped-call]  # types-PyYAML leaves it untyped
            if isinstance(event, yaml.CollectionEndEvent):
                stack.pop()
                continue
            if isinstance(event, yaml.AliasEvent):
                return f"(document): the alias *{event.anchor} at {_where(event)} is not accepted; write the value out"
            if not isinstance(event, yaml.NodeEvent):
                continue  # stream and document boundaries
            if event.anchor is not None:
                return f"(document): the anchor &{event.anchor} at {_where(event)} is not accepted; write the value out"
            nodes += 1
            if nodes > MAX_NODES:
                return f"(document): more than {MAX_NODES} values; a FineTuneJob has a few hundred"
            if stack:
                problem = _child(stack, event)
                if problem:
                    return problem
            if isinstance(event, yaml.CollectionStartEvent):
                if len(stack) >= MAX_DEPTH:
                    return f"(document): nested more than {MAX_DEPTH} levels deep at {_where(event)}; a FineTuneJob nests six"
                stack.append(_Frame(mapping=isinstance(event, yaml.MappingStartEvent)))
    finally:
        loader.dispose()
    return None


def _child(stack: list[_Frame], event: yaml.NodeEvent) -> str | None:
    """Account for a node inside the innermost open collection; a repeated mapping key is a problem."""
    parent = stack[-1]
    if not parent.mapping:
        parent.index += 1
        return None
    is_key, parent.want_key = parent.want_key, not parent.want_key
    if is_key:
        key = event.value if isinstance(event, yaml.ScalarEvent) else None
        line = event.start_mark.line + 1 if event.start_mark is not None else 0
        if key is not None and key in parent.keys:
            outer = "".join(frame.step() for frame in stack[:-1]).lstrip(".")
            path = f"{outer}.{key}" if outer else key
            return (
                f"{shorten(path, 120)}: the key {quote(key)} is repeated at line {line} (first at line {parent.keys[key]}); "
                "YAML would keep only the last: write each key once"
            )
        if key is not None:
            parent.keys[key] = line
        parent.key = key if key is not None else "(complex key)"
    return None


def _yaml_error(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    if isinstance(exc, yaml.reader.ReaderError):  # its str() spans lines
        shown = f"#x{exc.character:04x}" if isinstance(exc.character, int) else quote(exc.character)
        where, problem = f" at character {exc.position + 1}", f"{exc.reason} ({shown})"
    else:
        problem = getattr(exc, "problem", None) or str(exc)
    return f"(document): not valid YAML{where}: {' '.join(str(problem).split())}"


def iter_documents(text: str | bytes, source: str) -> Iterator[DocumentResult]:
    """Every non-empty YAML document of ``text``, validated; unreadable or unsafe input is one failed result."""
    try:
        if isinstance(text, bytes):
            text = decode_manifest(text, source)
        problem = _stream_problem(text)
        documents = [] if problem else [d for d in yaml.load_all(text, Loader=_LOADER) if d is not None]
    except ManifestError as exc:
        problem = exc.lines[0]
    except yaml.YAMLError as exc:
        problem = _yaml_error(exc)
    if problem:
        yield DocumentResult(source, None, None, errors=[problem])
        return
    if not documents:
        yield DocumentResult(source, None, None, errors=["(document): the file holds no YAML document"])
        return
    for index, document in enumerate(documents):
        yield validate_document(document, source, index if len(documents) > 1 else None)


def load_job(text: str | bytes, source: str) -> FineTuneJob:
    """The one FineTuneJob in ``text``; raises ManifestError with every problem otherwise."""
    results = list(iter_documents(text, source))
    if len(results) != 1:
        raise ManifestError(source, [f"(document): expected one {KIND}, found {len(results)} documents"])
    result = results[0]
    if not result.ok or result.job is None:
        raise ManifestError(result.label, result.errors)
    return result.job
