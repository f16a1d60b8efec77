"""What ``FineTuneJobClient`` sends (pure: no request is made) and how ``--set`` overrides are read and validated."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import kubernetes.client
import pytest
import yaml

from finetune_operator.api.overrides import OverrideError, apply_overrides
from finetune_operator.api.v1alpha1 import FineTuneJob, FineTuneJobSpec, HyperparametersSpec
from finetune_operator.cli_cluster import duration
from finetune_operator.client import ClientError, FineTuneJobClient, Invalid, to_job
from tests.support.schemas import REPO

EXAMPLE: dict[str, Any] = yaml.safe_load((REPO / "manifests" / "examples" / "digits-cpu.yaml").read_text())


@pytest.fixture
def client() -> FineTuneJobClient:
    return FineTuneJobClient(api_client=kubernetes.client.ApiClient())  # never used to send: body() is local


def _keys(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [k for k, v in value.items() for k in [k, *_keys(v)]]
    if isinstance(value, list):
        return [k for item in value for k in _keys(item)]
    return []


def test_a_model_is_sent_in_the_wire_format_and_round_trips(client: FineTuneJobClient) -> None:
    job = FineTuneJob.model_validate({**EXAMPLE, "metadata": {"name": "wire"}})
    spec = job.spec.model_copy(update={"hyperparameters": HyperparametersSpec(learning_rate=0.02)})
    job = job.model_copy(update={"spec": spec})
    body = client.body(job)
    assert body["apiVersion"] == "finetune.dev/v1alpha1" and body["kind"] == "FineTuneJob"
    assert "status" not in body
    assert body["spec"]["hyperparameters"]["learningRate"] == 0.02
    assert [k for k in _keys(body) if "_" in k] == []  # model_dump() would give learning_rate, api_version, …
    assert FineTuneJob.model_validate(body) == job


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ({**EXAMPLE, "metadata": {"name": "dict"}}, "dict"),
        ("manifests/examples/digits-cpu.yaml", "digits-cpu"),
    ],
)
def test_dicts_and_paths_are_validated_and_sent_as_written(client: FineTuneJobClient, source: Any, expected: str) -> None:
    body = client.body(REPO / source if isinstance(source, str) else source)
    assert body["metadata"]["name"] == expected
    assert body["spec"]["dataset"]["validationSplit"] == 0.25


@pytest.mark.parametrize(
    ("change", "line"),
    [
        ({"hyperparameters": {"learning_rate": 0.1}}, "spec.hyperparameters.learning_rate:"),  # snake_case is pruned
        ({"model": {"name": "resnet5"}}, "spec.model.name: 'resnet5' is not a torchvision classification model"),
    ],
)
def test_bad_dicts_raise_invalid_with_the_validate_lines(client: FineTuneJobClient, change: dict[str, Any], line: str) -> None:
    document = {**EXAMPLE, "metadata": {"name": "bad"}, "spec": {**EXAMPLE["spec"], **change}}
    with pytest.raises(Invalid) as invalid:
        client.body(document)
    assert any(text.startswith(line) for text in invalid.value.lines), invalid.value.lines


def test_an_unreadable_path_is_invalid_not_a_traceback(client: FineTuneJobClient, tmp_path: Path) -> None:
    with pytest.raises(Invalid, match="cannot read"):
        client.body(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    ("overrides", "path", "value"),
    [
        (["spec.hyperparameters.learningRate=0.01"], ("spec", "hyperparameters", "learningRate"), 0.01),
        (["spec.hyperparameters.epochs=7"], ("spec", "hyperparameters", "epochs"), 7),
        (["spec.strategy.method=linear-probe"], ("spec", "strategy", "method"), "linear-probe"),
        (["spec.output.exports=[onnx, torchscript]"], ("spec", "output", "exports"), ["onnx", "torchscript"]),
        (["spec.runPolicy.suspend=true"], ("spec", "runPolicy", "suspend"), True),
        (["metadata.name=lr-0-01"], ("metadata", "name"), "lr-0-01"),
    ],
)
def test_overrides_set_typed_values_at_wire_paths(overrides: list[str], path: tuple[str, ...], value: Any) -> None:
    result: Any = apply_overrides(EXAMPLE, overrides)
    for key in path:
        result = result[key]
    assert result == value
    assert EXAMPLE["spec"]["hyperparameters"]["learningRate"] == 0.003  # the input is not changed


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("spec.hyperparameters.learningRate", "--set: 'spec.hyperparameters.learningRate' is not PATH=VALUE; e.g. "),
        ("status.phase=Succeeded", "--set: 'status.phase' is not a field path; use dotted camelCase names under spec or"),
        ("spec..epochs=3", "--set: 'spec..epochs' is not a field path"),
        ("spec.model.name.first=x", "--set spec.model.name.first: spec.model.name holds 'resnet18', not an object"),
        ("spec.epochs=[1", "--set spec.epochs: '[1' is not a YAML value"),
    ],
)
def test_malformed_overrides_name_the_override_and_what_is_accepted(override: str, message: str) -> None:
    with pytest.raises(OverrideError) as error:
        apply_overrides(EXAMPLE, [override, "spec.hyperparameters.epochs=2"])
    assert len(error.value.lines) == 1 and error.value.lines[0].startswith(message), error.value.lines


@pytest.mark.parametrize(
    ("override", "line"),
    [
        ("spec.hyperparameters.learningRate=-1", "spec.hyperparameters.learningRate: -1"),
        ("spec.hyperparameters.learningrate=0.1", "spec.hyperparameters.learningrate:"),
        ("spec.hyperparameters.optimizer=lion", "spec.hyperparameters.optimizer: 'lion'"),
        ("spec.resources.workers=three", "spec.resources.workers: 'three'"),
    ],
)
def test_overridden_values_are_validated_like_the_file(client: FineTuneJobClient, override: str, line: str) -> None:
    with pytest.raises(Invalid) as invalid:
        client.body({**EXAMPLE, "metadata": {"name": "sweep"}}, overrides=[override])
    assert any(text.startswith(line) for text in invalid.value.lines), invalid.value.lines


def test_server_objects_become_typed_jobs() -> None:
    obj = {
        **EXAMPLE,
        "metadata": {"name": "srv", "namespace": "ns", "resourceVersion": "7", "creationTimestamp": "2026-01-01T00:00:00Z"},
        "status": {"phase": "Succeeded", "artifacts": {"modelUri": "s3://b/m.pt"}, "dashboardURL": "h:8265"},
    }
    job = to_job(obj)
    assert isinstance(job.spec, FineTuneJobSpec) and job.metadata.namespace == "ns"
    assert job.status is not None and job.status.artifacts is not None and job.status.artifacts.model_uri == "s3://b/m.pt"
    newer = to_job({**obj, "status": {"phase": "Succeeded", "someFutureField": 1}})
    assert newer.status is not None and newer.status.phase == "Succeeded"  # a newer operator's status still reads
    unreadable = to_job({**obj, "status": {"phase": "Exploded"}})
    assert unreadable.status is None  # and one this version cannot read never breaks reading the job


@pytest.mark.parametrize(("text", "seconds"), [("90", 90.0), ("30s", 30.0), ("10m", 600.0), ("6h", 21600.0), ("1d", 86400.0)])
def test_durations(text: str, seconds: float) -> None:
    assert duration(text) == seconds


@pytest.mark.parametrize("text", ["soon", "-5", "0", "5w", ""])
def test_bad_durations_are_usage_errors(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="is not a duration; use seconds or a number with s, m, h or d"):
        duration(text)


def test_a_spec_this_client_cannot_read_is_one_line_not_a_traceback() -> None:
    spec = {**EXAMPLE["spec"], "distillation": {"teacher": "x"}}  # a field of a newer API version
    newer = {**EXAMPLE, "metadata": {"name": "new", "namespace": "ns"}, "spec": spec}
    expected = r"^FineTuneJob ns/new: this client cannot read its spec \(spec.distillation: .*upgrade"
    with pytest.raises(ClientError, match=expected):
        to_job(newer)


def test_in_a_pod_the_service_account_and_its_namespace_are_used(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import kubernetes.config

    from finetune_operator import client_auth

    def incluster(client_configuration: Any) -> None:  # what load_incluster_config does with the pod's token and CA
        client_configuration.host = "https://10.0.0.1:443"

    namespace_file = tmp_path / "namespace"
    namespace_file.write_text("ml-pipelines\n")
    monkeypatch.setattr(kubernetes.config, "load_incluster_config", incluster)
    monkeypatch.setattr(client_auth, "_SA_NAMESPACE", namespace_file)
    in_pod = FineTuneJobClient()
    assert in_pod.namespace == "ml-pipelines"
    assert in_pod.api_client.configuration.host == "https://10.0.0.1:443"
    assert FineTuneJobClient("other").namespace == "other"


# --------------------------------------------------------------------- the review's inputs (each a traceback before)
@pytest.mark.parametrize(("text", "message"), [("1" + "0" * 400, "is longer than a year"), ("366d", "is longer than a year")])
def test_a_duration_past_a_year_is_a_usage_error(text: str, message: str) -> None:
    """A 400-digit --timeout became inf, and int(inf) an OverflowError deep in the watch."""
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        duration(text)


@pytest.mark.parametrize(
    "content",
    [
        "foo\n",  # a string
        "- a\n- b\n",  # a list
        "clusters: [\n",  # broken YAML
        "apiVersion: v1\nkind: Config\ncurrent-context: c\ncontexts: [{name: c, context: {cluster: k, user: u}}]\n"
        "clusters: [{name: k, cluster: {server: 'https://x', certificate-authority-data: '!!notbase64'}}]\n"
        "users: [{name: u, user: {token: t}}]\n",  # base64 that is not
        "a: \x00\n",  # a control character: PyYAML's reader refuses it as it opens the file
    ],
    ids=["string", "list", "broken-yaml", "bad-base64", "control-character"],
)
def test_a_file_that_is_no_kubeconfig_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: str) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    path = tmp_path / "config"
    path.write_text(content)
    with pytest.raises(ClientError, match=rf"^the kubeconfig {path} cannot be used: it is not a valid kubeconfig \(") as info:
        FineTuneJobClient(config_file=str(path))
    assert "\n" not in str(info.value)


def _alias_bomb(levels: int) -> str:
    """A kubeconfig whose aliases expand to 9**levels strings (a 'billion laughs' at 9)."""
    rows = ["a0: &a0 [" + ", ".join(["lol"] * 9) + "]"]
    rows += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "\n".join(rows) + "\ncurrent-context: c\n"


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("a: " + "[" * 2000 + "]" * 2000 + "\n", "nested more than 64 levels deep at line 1"),  # a RecursionError dump
        (
            _alias_bomb(7),
            r"it holds more than 100000 values \(aliases counted in full\)",
        ),  # at 9 levels: 5.5 GB and counting
        ("# " + "x" * (4 << 20) + "\n", "it is larger than 4 MiB"),  # 100 MB: a minute and more in PyYAML's pure reader
    ],
    ids=["deep", "alias-bomb", "huge"],
)
@pytest.mark.parametrize("how", ["--kubeconfig", "KUBECONFIG"])
def test_a_kubeconfig_too_big_to_load_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: str, problem: str, how: str
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    path = tmp_path / "config"
    path.write_text(content)
    if how == "KUBECONFIG":  # a list of files, as kubectl reads it: the bad one second
        (tmp_path / "first").write_text("apiVersion: v1\nkind: Config\n")
        monkeypatch.setenv("KUBECONFIG", f"{tmp_path / 'first'}:{path}")
    with pytest.raises(ClientError, match=rf"^the kubeconfig {path} cannot be used: {problem}") as info:
        FineTuneJobClient(config_file=str(path) if how == "--kubeconfig" else None, context="c")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("body", "lines"),
    [
        ({"message": "bad", "details": "oops"}, ["bad"]),
        ({"message": "bad", "details": {"causes": ["x", {"field": "spec.a", "message": "no"}]}}, ["spec.a: no"]),
        ({"message": "bad", "details": {"causes": "x"}}, ["bad"]),
        (["not", "an", "object"], ["Unprocessable"]),
    ],
)
def test_an_error_body_of_any_shape_is_reported(body: Any, lines: list[str]) -> None:
    """A proxy's or a webhook's 4xx body with `details` not an object, or causes not objects, crashed the report."""
    import json

    from kubernetes.client.exceptions import ApiException

    from finetune_operator.client import _api_detail

    exc = ApiException(status=422, reason="Unprocessable")
    exc.body = json.dumps(body)
    assert _api_detail(exc)[1] == lines


def test_ctrl_c_in_any_verb_is_one_line_and_130(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from finetune_operator import cli

    def interrupted(args: argparse.Namespace) -> int:
        raise KeyboardInterrupt

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    monkeypatch.setattr(parser, "parse_args", lambda argv: argparse.Namespace(func=interrupted))
    assert cli.main(["validate", "-"]) == 130
    assert capsys.readouterr().err == "error: interrupted\n"


class _Broken:
    """A log response that sends one line and half of the next, then the connection breaks."""

    def stream(self, size: int) -> Any:
        import urllib3

        yield b"epoch 1\nepo"
        raise urllib3.exceptions.ProtocolError("Connection broken: IncompleteRead(7 bytes read, 25 more expected)")

    def release_conn(self) -> None:
        pass


def test_a_log_stream_cut_mid_transfer_is_one_line() -> None:
    from finetune_operator.client_errors import ApiError
    from finetune_operator.client_logs import LogSource, log_lines

    class Core:
        def read_namespaced_pod_log(self, pod: str, namespace: str, **kwargs: Any) -> _Broken:
            assert kwargs["_request_timeout"] == (5.0, 60.0)  # a read at once never waits for ever
            return _Broken()

    lines = log_lines(Core(), LogSource("ns", "p", None, "submitter"))  # type: ignore[arg-type]
    assert next(lines) == "epoch 1"
    with pytest.raises(ApiError, match=r"^read log of pod ns/p: the stream broke: .*IncompleteRead") as info:
        list(lines)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("data", [b"<html>proxy says hi</html>", b"[1, 2]"])
def test_an_apply_answered_with_something_else_than_an_object_is_one_line(
    client: FineTuneJobClient, monkeypatch: pytest.MonkeyPatch, data: bytes
) -> None:
    from types import SimpleNamespace

    from finetune_operator.client_errors import ApiError

    monkeypatch.setattr(client.custom, "patch_namespaced_custom_object", lambda *args, **kwargs: SimpleNamespace(data=data))
    with pytest.raises(ApiError, match=r"^apply FineTuneJob .*: the answer is not (JSON|an object)") as info:
        client.apply(EXAMPLE)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("extra", [[], ["--set", "spec.hyperparameters.learningRate=-1"]], ids=["manifest", "override"])
def test_submit_names_the_manifests_errors_before_any_credentials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], extra: list[str]
) -> None:
    """An invalid job is the user's to fix whatever cluster it goes to: exit 2 naming the field, not exit 4 for a
    kubeconfig that is missing (which hid the manifest's errors until credentials were found)."""
    from finetune_operator.cli import main

    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    bad = yaml.safe_load(yaml.safe_dump(EXAMPLE))
    if not extra:
        bad["spec"]["hyperparameters"]["learningRate"] = -1
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(bad))
    assert main(["submit", str(path), "--kubeconfig", str(tmp_path / "no-such-kubeconfig"), *extra]) == 2
    err = capsys.readouterr().err
    assert "learningRate" in err and "kubeconfig" not in err
