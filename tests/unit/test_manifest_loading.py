"""Hostile and malformed manifest files: one line each, no traceback, bounded time and memory.

The loader (``api.validate``) is shared by ``finetune validate``, ``run`` and ``render``; it is checked
with both YAML parsers it may run on (libyaml's when PyYAML has it, the pure-Python one otherwise),
and ``finetune validate`` is run on each file as a user would, with a timeout.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from finetune_operator.api import kubectl_yaml, validate
from finetune_operator.api.validate import MAX_MANIFEST_BYTES, ManifestError, iter_documents, load_job
from tests.support.schemas import REPO

BASE = (REPO / "manifests/examples/digits-cpu.yaml").read_text()

# (id, file content, a fragment of the one error line)
HOSTILE: list[tuple[str, str | bytes, str]] = [
    ("not-utf8", "metadata:\n  name: caf\xe9\n".encode("latin-1"), "not UTF-8 text (byte 0xe9 at offset 21)"),
    ("utf16", BASE.encode("utf-16"), "not UTF-8 text (byte 0xff at offset 0)"),
    ("nested-lists", "[" * 10_000 + "]" * 10_000, "nest"),
    ("nested-mappings", "".join(" " * i + "a:\n" for i in range(100)) + " " * 100 + "1\n", "nested more than 32 levels"),
    (
        "billion-laughs",
        "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
        + "".join(f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True)),
        "the anchor &a at line 1 is not accepted",
    ),
    ("alias-only", BASE.replace("  model:\n", "  model: *m\n  x:\n", 1), "the alias *m at line"),
    ("enormous", "a: " + "x" * (MAX_MANIFEST_BYTES + 10), "larger than 1024 KiB"),
    ("many-values", "[" + "1, " * 50_000 + "1]", "more than 20000 values"),
    ("many-documents", "---\na: 1\n" * 30_000, "more than 20000 values"),
    (
        "duplicate-key",
        BASE.replace("    epochs: 4\n", "    epochs: 4\n    epochs: 40\n", 1),
        "spec.hyperparameters.epochs: the key 'epochs' is repeated at line 22 (first at line 21)",
    ),
    ("duplicate-section", BASE + "spec: {}\n", "spec: the key 'spec' is repeated at line 33 (first at line 8)"),
    (
        "duplicate-in-list",
        BASE.replace("  model:\n", "  runtime:\n    env:\n    - {name: A, name: B}\n  model:\n", 1),
        "spec.runtime.env[0].name: the key 'name' is repeated",
    ),
    ("python-tag", "!!python/object/apply:os.system ['echo owned']\n", "could not determine a constructor"),
    ("nul", "a: \x00\n", "not valid YAML at character 4"),
    ("unhashable-key", "? [a, b]\n: c\n", "not valid YAML"),
    # kubectl splits a file on lines starting with '---' and refuses one with more than a comment after it (PyYAML
    # reads '--- {a: 1}' as a document): 'error parsing job.yaml: invalid Yaml document separator: {a: 1}'.
    ("flow-on-separator", "--- {a: 1}\n", "the document separator at line 1 has '{a: 1}' after '---'"),
    ("flow-on-second-separator", BASE + "--- {a: 1}\n", "the document separator at line 33 has '{a: 1}' after '---'"),
    ("tag-on-separator", "--- !!map\n" + BASE, "line 1 has '!!map' after '---'"),
    ("four-dashes", BASE + "----\n" + BASE, "line 33 has '-' after '---'"),
]


@pytest.fixture(params=["libyaml", "python"])
def parser(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "libyaml":
        if not hasattr(yaml, "CSafeLoader"):
            pytest.skip("PyYAML built without libyaml")
        monkeypatch.setattr(validate, "_LOADER", kubectl_yaml.LOADER)
    else:
        monkeypatch.setattr(validate, "_LOADER", kubectl_yaml.PURE_LOADER)
    return request.param


@pytest.mark.timeout(20)
@pytest.mark.parametrize(("content", "fragment"), [c[1:] for c in HOSTILE], ids=[c[0] for c in HOSTILE])
def test_hostile_input_is_one_line(parser: str, content: str | bytes, fragment: str) -> None:
    results = list(iter_documents(content, "job.yaml"))
    assert len(results) == 1 and not results[0].ok
    (line,) = results[0].errors
    assert fragment in line, line
    assert "\n" not in line and len(line) < 400


@pytest.mark.parametrize(("content", "fragment"), [c[1:] for c in HOSTILE[:3]], ids=[c[0] for c in HOSTILE[:3]])
def test_load_job_raises_the_same_line(content: str | bytes, fragment: str) -> None:
    with pytest.raises(ManifestError) as info:
        load_job(content, "job.yaml")
    assert len(info.value.lines) == 1 and fragment in info.value.lines[0]


@pytest.mark.parametrize(
    "content",
    [
        BASE,
        BASE.encode(),
        b"\xef\xbb\xbf" + BASE.encode(),
        BASE.replace("\n", "\r\n"),
        "--- # the job\n" + BASE + "---\n",
        ("---  \n" + BASE).replace("\n", "\r\n"),
    ],
    ids=["str", "bytes", "bom", "crlf", "separators-with-a-comment", "separator-with-spaces-crlf"],
)
def test_ordinary_manifests_still_load(content: str | bytes) -> None:
    assert load_job(content, "job.yaml").metadata.name == "digits-cpu"


def test_same_key_in_sibling_mappings_is_no_duplicate() -> None:
    text = BASE.replace(
        "  model:\n", "  runtime:\n    env:\n    - {name: A, value: '1'}\n    - {name: B, value: '2'}\n  model:\n", 1
    )
    assert load_job(text, "job.yaml").spec.runtime.env[1].name == "B"


@pytest.mark.parametrize(("content", "fragment"), [c[1:] for c in HOSTILE], ids=[c[0] for c in HOSTILE])
def test_finetune_validate_prints_one_line_and_exits_one(tmp_path: Path, content: str | bytes, fragment: str) -> None:
    path = tmp_path / "job.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    out = subprocess.run(
        [sys.executable, "-m", "finetune_operator.cli", "validate", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1
    assert "Traceback" not in out.stdout + out.stderr and out.stderr == ""
    lines = out.stdout.splitlines()
    assert len(lines) == 2 and lines[0] == f"{path}: invalid (1 error)"
    assert lines[1].startswith("  ") and fragment in lines[1]


def test_finetune_validate_reads_a_bounded_stdin() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "finetune_operator.cli", "validate", "-"],
        cwd=REPO,
        input=b"a: " + b"x" * (4 * MAX_MANIFEST_BYTES),
        capture_output=True,
        timeout=60,
    )
    assert out.returncode == 1 and b"larger than 1024 KiB" in out.stdout and b"Traceback" not in out.stderr


@pytest.mark.parametrize(
    ("command", "case"),
    [("render", "utf16"), ("render", "billion-laughs"), ("render", "duplicate-key"), ("run", "utf16"), ("run", "nested-lists")],
)
def test_render_and_run_share_the_loader(tmp_path: Path, command: str, case: str) -> None:
    """`finetune render` and `finetune run` read through the same loader: the same one line, on stderr, exit 1."""
    content, fragment = next((c[1], c[2]) for c in HOSTILE if c[0] == case)
    path = tmp_path / "job.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    out = subprocess.run(
        [sys.executable, "-m", "finetune_operator.cli", command, str(path)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.splitlines()[0] == f"{path}: invalid (1 error)" and fragment in out.stderr


@pytest.mark.parametrize(
    ("key", "sent"),
    [
        # sigs.k8s.io/yaml names a float map key strconv.FormatFloat(key, 'g', -1, 32): %g, float32's shortest digits
        ("1e3", "1000"),
        ("10.0", "10"),
        ("0.1", "0.1"),
        ("1.5e-7", "1.5e-07"),
        ("123456789.0", "1.2345679e+08"),
        ("3.14159265358979", "3.1415927"),
        ("-0.0", "-0"),
        ("1e300", ".inf"),
        (".inf", ".inf"),
        ("-.inf", "-.inf"),
        (".nan", ".nan"),
        ("0x1F", "31"),  # an integer key: its decimal digits
    ],
)
def test_a_number_as_a_map_key_is_named_as_kubectl_sends_it(key: str, sent: str) -> None:
    document = yaml.load(f"labels: {{{key}: x}}", Loader=kubectl_yaml.LOADER)
    problems: list[tuple[tuple[str | int, ...], str]] = []
    assert kubectl_yaml.as_sent(document, problems) == {"labels": {sent: "x"}} and problems == []
