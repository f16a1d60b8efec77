"""``finetune run``'s ``--address`` (and ``FINETUNE_RAY_ADDRESS``) and ``--json-status``: a value that cannot work
is refused in one line before Ray is imported or started, not seconds later (or after a connect timeout), and
every value Ray accepts is let through. ``run_command`` runs with Ray unimportable and the training replaced.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from finetune_operator.api.fields import quote
from finetune_trainer import local
from finetune_trainer.errors import TrainerError
from finetune_trainer.local_ray import ADDRESS_ENV, ray_address
from tests.support.schemas import REPO

DIGITS = REPO / "manifests" / "examples" / "digits-cpu.yaml"
ACCEPTED = "accepted: auto, local, HOST:PORT ([IPv6]:PORT) or ray://HOST[:PORT]"

# Every form Ray 2.60 reads as an address (ray.init: "auto"/"local", `ray://` for Ray Client, else
# services.canonicalize_bootstrap_address: parse_address's HOST:PORT, an IPv6 host in brackets).
GOOD_ADDRESSES = [
    "auto",
    "127.0.0.1:6379",
    "localhost:6379",
    "head-0.ray.svc.cluster.local:6379",
    "ray_head:6379",  # a container name
    "[::1]:6379",
    "[fe80::1%eth0]:6379",
    "ray://head:10001",
    "ray://head",  # the client's default port
    "ray://[::1]:10001",
]
BAD_ADDRESSES = [
    "garbage",
    "a b",
    "Auto",
    "host:",
    ":6379",
    "host:abc",
    "host:0",
    "host:70000",
    "host:6379/x",
    "::1:6379",  # IPv6 without brackets: Ray cannot tell the port from the address
    "[::1]",
    "[nope]:6379",
    "ray://",
    "ray://head:port",
    "ray://a b:1",
    "http://127.0.0.1:8265",  # the dashboard's address, not Ray's
    "no_such_module_anywhere://head:1",
]


@pytest.fixture(autouse=True)
def _no_address_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ADDRESS_ENV, raising=False)


@pytest.mark.parametrize("address", GOOD_ADDRESSES)
def test_every_address_ray_reads_is_accepted(address: str) -> None:
    assert ray_address(address) == address
    assert ray_address(f" {address} ") == address


def test_the_plain_addresses_accepted_are_ones_ray_parses() -> None:
    # Ray's own parser (compiled; imported here only, never by the code under test).
    network_utils = pytest.importorskip("ray._common.network_utils")
    for address in GOOD_ADDRESSES:
        if address != "auto" and "://" not in address:
            assert network_utils.parse_address(address) is not None, address


@pytest.mark.parametrize("address", BAD_ADDRESSES)
def test_a_bad_address_is_refused_in_one_line(address: str) -> None:
    with pytest.raises(TrainerError) as caught:
        ray_address(address)
    assert str(caught.value).startswith(f"--address: {address!r}: ")
    assert str(caught.value).endswith(ACCEPTED)
    assert "\n" not in str(caught.value)


def test_a_bad_address_in_the_environment_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ADDRESS_ENV, "garbage")
    with pytest.raises(TrainerError, match=rf"^{ADDRESS_ENV}: 'garbage': not a Ray address; "):
        ray_address(None)


def test_a_very_long_address_is_shortened() -> None:
    with pytest.raises(TrainerError) as caught:
        ray_address("x" * 5000)
    assert len(str(caught.value)) < 300


def test_an_address_naming_a_module_loaded_without_a_spec_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """find_spec raised ValueError('__main__.__spec__ is None') for `__main__://head:1` under the `finetune` script
    (a traceback); such a module holds no Ray ClientBuilder."""
    monkeypatch.setattr(sys.modules["__main__"], "__spec__", None)  # as under a console script
    with pytest.raises(TrainerError) as caught:
        ray_address("__main__://head:1")
    assert str(caught.value) == f"--address: '__main__://head:1': not a Ray address; {ACCEPTED}"


# ------------------------------------------------------------------------------------ run_command
class Trained:
    """Stands in for ``local._train``: what it was called with, if it was (and whether the job's own checks ran)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str | None, str | None]] = []
        self.code: int | None = None  # run_command's exit status
        self.preflight = False

    def __call__(self, cfg: local.TrainerConfig, address: str | None) -> int:
        self.calls.append((cfg.status_file, address))
        return 0


def run(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    *,
    json_status: str | None = None,
    address: str | None = None,
    output: str | None = None,
    job: str | None = None,
) -> Trained:
    trained = Trained()
    monkeypatch.setattr(local, "_train", trained)
    real_preflight = local._preflight

    def preflight(cfg: local.TrainerConfig) -> None:
        trained.preflight = True  # the job's checks: an imagefolder job's import torchvision, seconds
        real_preflight(cfg)

    monkeypatch.setattr(local, "_preflight", preflight)
    monkeypatch.setitem(sys.modules, "ray", None)  # any `import ray` raises ImportError
    args = argparse.Namespace(
        job=job or str(DIGITS),
        workers=None,
        output=output or str(tmp_path / "out"),
        json_status=json_status,
        address=address,
    )
    trained.code = local.run_command(args)
    return trained


def writable_except(denied: Path) -> object:
    """``os.access`` as on a read-only mount at ``denied`` (root passes a chmod, so a chmod cannot test this)."""
    real = os.access

    def access(path: object, mode: int, **kwargs: object) -> bool:
        return False if Path(str(path)) == denied and mode & os.W_OK else real(path, mode, **kwargs)  # type: ignore[arg-type]

    return access


@pytest.mark.parametrize(
    ("given", "problem"),
    [
        ("{tmp}", "is a directory; give a file in it, e.g. '{tmp}/status.json'"),
        ("{tmp}/job.yaml/status.json", "'{tmp}/job.yaml' is not a directory"),
        ("{tmp}/ro/status.json", "cannot create files in '{tmp}/ro'"),
        ("{tmp}/ro/new/deeper/status.json", "cannot create files in '{tmp}/ro'"),  # the folders the writer would make
        ("/dev/null", "not a regular file (each write replaces it)"),
        ("", "empty"),
    ],
    ids=["directory", "under-a-file", "read-only-folder", "missing-folders-under-read-only", "device", "empty"],
)
def test_a_json_status_that_cannot_be_written_is_refused_before_ray(
    given: str, problem: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "job.yaml").write_text("x")
    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(os, "access", writable_except(tmp_path / "ro"))
    value = given.format(tmp=tmp_path)
    trained = run(monkeypatch, tmp_path, json_status=value)
    err = capsys.readouterr().err
    assert (trained.code, trained.calls, trained.preflight) == (2, [], False)
    assert err == (
        f"error: --json-status: {value!r}: {problem.format(tmp=tmp_path)}; accepted: a file path in a writable directory\n"
    )


@pytest.mark.parametrize(
    "given", ["status.json", "new/deeper/status.json", "job.yaml"], ids=["new-file", "missing-folders", "existing-file"]
)
def test_a_json_status_that_can_be_written_is_passed_on_and_nothing_is_created(
    given: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "job.yaml").write_text("x")
    monkeypatch.chdir(tmp_path)
    trained = run(monkeypatch, tmp_path, json_status=given)
    assert (trained.code, trained.calls) == (0, [(str(tmp_path / given), None)])
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["job.yaml"]  # the writer makes the folders, not the check


def test_a_bad_address_is_refused_before_ray(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    trained = run(monkeypatch, tmp_path, address="garbage")
    assert (trained.code, trained.calls, trained.preflight) == (2, [], False)
    assert capsys.readouterr().err == f"error: --address: 'garbage': not a Ray address; {ACCEPTED}\n"


def test_a_good_address_is_passed_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert run(monkeypatch, tmp_path, address="[::1]:6379").calls == [(None, "[::1]:6379")]


def test_a_json_status_under_home_is_expanded_as_the_shell_would(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Quoted ('~/status.json') or from a script, the shell leaves the ~: it names the home folder, not a folder called ~.
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert run(monkeypatch, tmp_path, json_status="~/status.json").calls == [(str(tmp_path / "status.json"), None)]


def test_a_json_status_under_an_unknown_users_home_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    trained = run(monkeypatch, tmp_path, json_status="~nosuchuser0/status.json")
    assert (trained.code, trained.calls) == (2, [])
    assert capsys.readouterr().err == (
        "error: --json-status: '~nosuchuser0/status.json': '~nosuchuser0' names no user of this machine (no home folder); "
        "write the path out\n"
    )


def test_a_very_long_json_status_is_shortened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    trained = run(monkeypatch, tmp_path, json_status=str(tmp_path) + "/" + "d" * 5000)
    assert trained.code == 2
    assert len(capsys.readouterr().err) < 400


@pytest.mark.parametrize(("flag", "field"), [("json_status", "--json-status"), ("output", "spec.output.uri")])
def test_a_path_through_a_loop_of_symbolic_links_is_one_line(
    flag: str, field: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """pathlib's resolve raised RuntimeError('Symlink loop from ...'): a traceback."""
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    value = str(tmp_path / "a" / "x")
    trained = run(monkeypatch, tmp_path, **{flag: value})  # type: ignore[arg-type]
    assert (trained.code, trained.calls) == (2, [])
    assert capsys.readouterr().err == (
        f"error: {field}: {value!r}: goes through a loop of symbolic links; accepted: a path whose links lead somewhere\n"
    )


@pytest.mark.parametrize(
    ("flag", "given"),
    [
        ("json_status", "{tmp}/dir\nx"),  # is a directory: the suggested file was echoed as written
        ("json_status", "{tmp}/file\x1b[2J/status.json"),  # under a file: the folder was echoed as written
        ("json_status", "~" + "u" * 100_000 + "/status.json"),  # the user was echoed whole
        ("output", "~nosuchuser0\x1b[2J\n/runs"),
        ("output", "~" + "u" * 100_000),
        ("output", "pvc://claim\n\x1b[2J/runs"),
    ],
    ids=["directory", "under-a-file", "long-user", "output-unknown-user", "output-long-user", "output-pvc"],
)
def test_echoed_paths_are_escaped_and_shortened(
    flag: str, given: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A newline or an escape sequence in a path reached the terminal as written, and a 100,000-character user name
    was echoed whole: every echo of the value, or of a path made from it, goes through fields.quote."""
    (tmp_path / "dir\nx").mkdir()
    (tmp_path / "file\x1b[2J").write_text("x")
    value = given.format(tmp=tmp_path)
    trained = run(monkeypatch, tmp_path, **{flag: value})  # type: ignore[arg-type]
    err = capsys.readouterr().err
    field = "--json-status" if flag == "json_status" else "spec.output.uri"
    assert (trained.code, trained.calls) == (2, [])
    assert err.startswith(f"error: {field}: {quote(value, 200)}: ")
    assert err.count("\n") == 1 and err.endswith("\n") and err.isascii() and err[:-1].isprintable(), err
    assert len(err) < 500


# ------------------------------------------------------------------------------ a deleted working directory
GONE = "error: the working directory no longer exists (deleted while this shell was in it); cd to a folder that exists\n"


@pytest.fixture
def gone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory deleted under the process (``rm -rf`` of the folder a shell is in): os.getcwd raises."""
    folder = tmp_path / "gone"
    folder.mkdir()
    monkeypatch.chdir(folder)
    folder.rmdir()
    return folder


@pytest.mark.parametrize(
    "flags",
    [
        {"json_status": "status.json"},  # status_path: a relative path taken from the working directory
        {"json_status": "/tmp/status.json"},
        {"output": "runs"},  # local_job: the manifest's and the flags' relative paths
        {},  # every path absolute: Ray's ray.init still reads the working directory (the driver's sys.path)
        {"job": "job.yaml"},  # a relative manifest: 'cannot read: No such file or directory' hid why
    ],
    ids=["json-status-relative", "json-status-absolute", "output-relative", "all-absolute", "job-relative"],
)
def test_a_deleted_working_directory_is_one_line_before_ray(
    flags: dict[str, str], gone: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Path.cwd() raised FileNotFoundError out of status_path and local_job: a traceback."""
    trained = run(monkeypatch, tmp_path, **flags)  # type: ignore[arg-type]
    assert (trained.code, trained.calls, trained.preflight) == (2, [], False)
    assert capsys.readouterr().err == GONE


@pytest.mark.parametrize(
    "call",
    [
        lambda: local.status_path("status.json"),
        lambda: local.local_job(DIGITS.read_text(), str(DIGITS), output="runs"),
    ],
    ids=["status_path", "local_job"],
)
def test_the_commands_parts_say_so_too(call: Any, gone: Path) -> None:
    with pytest.raises(TrainerError) as caught:
        call()
    assert f"error: {caught.value}\n" == GONE
