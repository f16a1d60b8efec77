"""The admission webhook as the API server meets it: the operator (Kopf in a thread, against the API emulator) serves
HTTPS, and the tests post AdmissionReview v1 requests shaped as the API server sends them, over TLS verified with a
CA (never ``verify=False``), then read the AdmissionReview answers.

Two certificate stories: a CA and certificate made here and mounted as cert-manager would (``tls.crt``/``tls.key`` in
``FINETUNE_OPERATOR_WEBHOOK_CERT_DIR``), and the operator's own, whose CA the client takes from the
ValidatingWebhookConfiguration's ``caBundle``, exactly where the API server takes it from.
"""

from __future__ import annotations

import base64
import copy
import http.client
import json
import socket
import ssl
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import kopf
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import finetune_operator.handlers  # noqa: F401  (importing it registers the operator's handlers with Kopf)
from finetune_operator import naming
from finetune_operator.admission import review
from finetune_operator.failures import ApiFailure
from finetune_operator.k8s import Kube
from finetune_operator.settings import OperatorSettings
from tests.support.kopf_runner import KopfRunner
from tests.support.kube_emulator import DEFAULT_RESOURCES, KubeEmulator, ResourceSpec, wait_for
from tests.support.schemas import REPO
from tests.unit.test_api_invalid import invalid_documents

pytestmark = pytest.mark.timeout(120)

HOST = "localhost"  # the name the certificates are issued for and the client verifies
EXAMPLE: dict[str, Any] = yaml.safe_load((REPO / "manifests" / "examples" / "digits-cpu.yaml").read_text())
WEBHOOK_CONFIGURATIONS = ResourceSpec(
    "admissionregistration.k8s.io", "v1", "validatingwebhookconfigurations", "ValidatingWebhookConfiguration", namespaced=False
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stored(document: dict[str, Any], namespace: str = "default") -> dict[str, Any]:
    """A document as the API server holds it when it calls the webhook: namespace and server-written metadata set."""
    body = copy.deepcopy(document)
    meta = body.setdefault("metadata", {})
    if isinstance(meta, dict):
        meta.update(namespace=namespace, uid=str(uuid.uuid4()), resourceVersion="1", generation=1)
        meta.setdefault("creationTimestamp", "2026-01-01T00:00:00Z")
    return body


def admission_review(operation: str, obj: dict[str, Any] | None, old: dict[str, Any] | None = None) -> dict[str, Any]:
    """An AdmissionReview v1 request as kube-apiserver posts it for a FineTuneJob."""
    meta = (obj or old or {}).get("metadata") or {}
    options = {"CREATE": "CreateOptions", "UPDATE": "UpdateOptions", "DELETE": "DeleteOptions"}[operation]
    kind = {"group": "finetune.dev", "version": "v1alpha1", "kind": "FineTuneJob"}
    resource = {"group": "finetune.dev", "version": "v1alpha1", "resource": "finetunejobs"}
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": str(uuid.uuid4()),
            "kind": kind,
            "resource": resource,
            "requestKind": kind,
            "requestResource": resource,
            "name": meta.get("name", ""),
            "namespace": meta.get("namespace", "default"),
            "operation": operation,
            "userInfo": {"username": "alice", "uid": "1001", "groups": ["system:authenticated"]},
            "object": obj,
            "oldObject": old,
            "dryRun": False,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": options},
        },
    }


def post(port: int, ca: bytes, request: dict[str, Any]) -> dict[str, Any]:
    """POST the review to the webhook's path over HTTPS, trusting ``ca`` only and checking the host name."""
    context = ssl.create_default_context(cadata=ca.decode())
    connection = http.client.HTTPSConnection(HOST, port, context=context, timeout=10)
    try:
        connection.request(
            "POST", f"/{naming.WEBHOOK_PATH}", body=json.dumps(request), headers={"Content-Type": "application/json"}
        )
        answer = connection.getresponse()
        assert answer.status == 200, answer.read()
        return dict(json.loads(answer.read()))
    finally:
        connection.close()


def _serving(port: int, ca: bytes) -> bool:
    try:
        post(port, ca, admission_review("DELETE", None, _stored(EXAMPLE)))
    except (OSError, ssl.SSLError):
        return False
    return True


def _lines(response: dict[str, Any]) -> list[str]:
    """The refusal's lines, from the message kubectl prints (a header line, then one indented line per mistake)."""
    header, *lines = response["status"]["message"].splitlines()
    assert header == f"invalid FineTuneJob ({len(lines)} error{'s' if len(lines) > 1 else ''}):"
    return [line.removeprefix("  ") for line in lines]


def make_ca_and_certificate(directory: Path, host: str) -> bytes:
    """A test CA and a serving certificate for ``host`` signed by it, written as a cert-manager Secret is mounted."""
    now = datetime.now(timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    validity = {"not_valid_before": now, "not_valid_after": now + timedelta(days=1)}
    ca = (
        x509.CertificateBuilder(issuer_name=ca_name, subject_name=ca_name, public_key=ca_key.public_key(), **validity)
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    leaf_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    leaf = (
        x509.CertificateBuilder(issuer_name=ca_name, subject_name=leaf_name, public_key=key.public_key(), **validity)
        .serial_number(x509.random_serial_number())
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    ca_pem = ca.public_bytes(pem)
    (directory / "ca.crt").write_bytes(ca_pem)
    (directory / "tls.crt").write_bytes(leaf.public_bytes(pem))
    (directory / "tls.key").write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return ca_pem


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, bytes, OperatorSettings]]:
    """The operator serving the webhook on a mounted certificate (cert-manager's way): (port, CA, settings)."""
    directory = tmp_path_factory.mktemp("webhook-tls")
    ca = make_ca_and_certificate(directory, HOST)
    port = _free_port()
    settings = OperatorSettings(metrics_port=0, webhook_port=port, webhook_host=HOST, webhook_cert_dir=str(directory))
    with KubeEmulator() as emu:
        memo = kopf.Memo(settings=settings, kube=Kube(emu.kubernetes_client()))
        with KopfRunner(emu, memo=memo):
            wait_for(lambda: _serving(port, ca), timeout=30, message="the webhook serving HTTPS")
            yield port, ca, settings
        assert emu.internal_errors == []


def test_a_valid_job_is_admitted(served: tuple[int, bytes, OperatorSettings]) -> None:
    port, ca, _ = served
    request = admission_review("CREATE", _stored(EXAMPLE))
    answer = post(port, ca, request)
    assert answer["apiVersion"] == "admission.k8s.io/v1" and answer["kind"] == "AdmissionReview"
    assert answer["response"] == {"uid": request["request"]["uid"], "allowed": True}


@pytest.mark.parametrize(("name", "document"), list(invalid_documents()), ids=[name for name, _ in invalid_documents()])
def test_every_invalid_document_is_refused_with_the_lines_of_validate_cluster(
    served: tuple[int, bytes, OperatorSettings], name: str, document: dict[str, Any]
) -> None:
    """The served answer carries the pure decision's lines, which test_admission_review proves equal to the CLI's."""
    port, ca, settings = served
    obj = _stored(document)
    request = admission_review("CREATE", obj)
    response = post(port, ca, request)["response"]
    assert response["uid"] == request["request"]["uid"] and response["allowed"] is False
    assert response["status"]["code"] == 422
    assert _lines(response) == review("CREATE", obj, None, settings) != []


def _updated(path: str, value: Any) -> dict[str, Any]:
    job = _stored(EXAMPLE)
    *parents, last = path.split(".")
    node = job
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return job


@pytest.mark.parametrize(
    ("path", "value", "lines"),
    [
        pytest.param("spec.runPolicy", {"suspend": True}, [], id="suspend"),
        pytest.param("metadata.labels", {"team": "vision"}, [], id="metadata-only"),
        pytest.param("status", {"phase": "Running"}, [], id="status-only"),
        pytest.param(
            "spec.resources",
            {"workers": 4, "cpusPerWorker": 1, "memoryPerWorker": "2Gi"},
            [
                "spec.resources.workers: changed from 2 to 4; only spec.runPolicy.suspend may change after creation; "
                "delete the job and create it again to change anything else"
            ],
            id="workers-changed",
        ),
    ],
)
def test_an_update_may_change_suspend_only(
    served: tuple[int, bytes, OperatorSettings], path: str, value: Any, lines: list[str]
) -> None:
    port, ca, _ = served
    old = _stored(EXAMPLE)
    new = _updated(path, value)
    new["metadata"] = {**old["metadata"], **new["metadata"], "resourceVersion": "2"}
    request = admission_review("UPDATE", new, old)
    response = post(port, ca, request)["response"]
    assert response["uid"] == request["request"]["uid"]
    assert response["allowed"] is (not lines)
    if lines:
        assert response["status"]["code"] == 422 and _lines(response) == lines


def test_a_deletion_is_never_refused(served: tuple[int, bytes, OperatorSettings]) -> None:
    """The configuration sends no DELETE; were one sent, even for a job the operator would refuse, it passes."""
    port, ca, _ = served
    invalid = _stored(next(document for _, document in invalid_documents()))
    assert post(port, ca, admission_review("DELETE", None, invalid))["response"]["allowed"] is True


def test_the_operators_own_certificate_is_trusted_through_the_configurations_ca_bundle(tmp_path: Path) -> None:
    """No cert-manager: the operator makes its CA and certificate and writes the CA into the webhook's ``caBundle``;
    a client that trusts exactly that bundle, as the API server does, reaches it; the rest of the object is untouched."""
    port = _free_port()
    settings = OperatorSettings(metrics_port=0, webhook_port=port, webhook_host=HOST, webhook_configuration="ft-webhook")
    configuration = yaml.safe_load((REPO / "manifests" / "base" / "webhook.yaml").read_text())
    configuration["metadata"] = {"name": "ft-webhook"}
    with KubeEmulator([*DEFAULT_RESOURCES, WEBHOOK_CONFIGURATIONS]) as emu:
        emu.create(configuration)
        memo = kopf.Memo(settings=settings, kube=Kube(emu.kubernetes_client()))
        with KopfRunner(emu, memo=memo) as runner:
            stored = runner.wait_for(
                lambda: (
                    (found := emu.get("validatingwebhookconfigurations", None, "ft-webhook"))
                    and found["webhooks"][0]["clientConfig"].get("caBundle")
                    and found
                ),
                timeout=30,
                message="the operator publishing its CA",
            )
            ca = base64.b64decode(stored["webhooks"][0]["clientConfig"]["caBundle"])
            wait_for(lambda: _serving(port, ca), timeout=30, message="the webhook serving HTTPS")
            assert post(port, ca, admission_review("CREATE", _stored(EXAMPLE)))["response"]["allowed"] is True
            refused = post(port, ca, admission_review("CREATE", _stored(EXAMPLE | {"spec": {"model": {"name": "resnet5"}}})))
            assert refused["response"]["allowed"] is False
            assert "spec.model.name: 'resnet5'" in refused["response"]["status"]["message"]
        expected = copy.deepcopy(configuration["webhooks"])
        expected[0]["clientConfig"]["caBundle"] = stored["webhooks"][0]["clientConfig"]["caBundle"]
        assert stored["webhooks"] == expected
        assert emu.internal_errors == []


def test_publishing_the_ca_names_what_is_missing_and_writes_only_changes() -> None:
    kube_errors: list[str] = []
    configuration = yaml.safe_load((REPO / "manifests" / "base" / "webhook.yaml").read_text())
    with KubeEmulator([*DEFAULT_RESOURCES, WEBHOOK_CONFIGURATIONS]) as emu:
        kube = Kube(emu.kubernetes_client())
        for name, webhooks in (("absent", None), ("other", [{**configuration["webhooks"][0], "name": "other.example.com"}])):
            if webhooks is not None:
                emu.create({**configuration, "metadata": {"name": name}, "webhooks": webhooks})
            with pytest.raises(ApiFailure) as info:
                kube.set_webhook_ca_bundle(name, naming.WEBHOOK_NAME, b"CA")
            assert info.value.status == 404
            kube_errors.append(str(info.value))
        assert kube_errors[1].endswith(
            f"it has no webhook named '{naming.WEBHOOK_NAME}' (it has ['other.example.com']); "
            "install the chart's or manifests/base's"
        )
        emu.create(configuration)
        kube.set_webhook_ca_bundle("finetune-operator", naming.WEBHOOK_NAME, b"CA")
        version = emu.get("validatingwebhookconfigurations", None, "finetune-operator")["metadata"]["resourceVersion"]
        kube.set_webhook_ca_bundle("finetune-operator", naming.WEBHOOK_NAME, b"CA")
        stored = emu.get("validatingwebhookconfigurations", None, "finetune-operator")
        assert stored["metadata"]["resourceVersion"] == version, "an unchanged bundle is not written again"
        assert stored["webhooks"][0]["clientConfig"]["caBundle"] == base64.b64encode(b"CA").decode()


def _raw(port: int, ca: bytes, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    connection = http.client.HTTPSConnection(HOST, port, context=ssl.create_default_context(cadata=ca.decode()), timeout=20)
    try:
        connection.request("POST", f"/{naming.WEBHOOK_PATH}", body=json.dumps(body), headers={"Content-Type": "application/json"})
        answer = connection.getresponse()
        text = answer.read()
        # aiohttp's own refusals (413) are plain text: shown as such, not as a JSON error of the test's.
        is_json = answer.getheader("Content-Type", "").startswith("application/json")
        return answer.status, json.loads(text) if is_json else {"text": text.decode()}
    finally:
        connection.close()


def _malformed(case: str) -> dict[str, Any]:
    review = admission_review("CREATE", _stored(EXAMPLE))
    if case == "object-is-a-list":
        review["request"]["object"] = ["not", "an", "object"]
    elif case == "no-request":
        del review["request"]
    elif case == "no-object":
        review["request"]["object"] = None
    elif case == "metadata-is-a-string":
        review["request"]["object"]["metadata"] = "x"
    return review


@pytest.mark.parametrize("case", ["object-is-a-list", "no-request", "no-object", "metadata-is-a-string"])
def test_a_malformed_review_gets_an_admission_review_refusal(served: tuple[int, bytes, OperatorSettings], case: str) -> None:
    """The review's requests: Kopf answered HTTP 500 (a traceback in the operator's log) or 400 with no review."""
    port, ca, _ = served
    review = _malformed(case)
    status, answer = _raw(port, ca, review)
    assert status == 200 and answer["kind"] == "AdmissionReview", answer
    response = answer["response"]
    assert response["allowed"] is False and response["status"]["message"].startswith("malformed AdmissionReview: ")
    assert response["uid"] == ("" if case == "no-request" else review["request"]["uid"])


def _labelled(size: int) -> dict[str, Any]:
    """The example job grown to about ``size`` bytes of JSON with labels: the API server caps each label, not their
    number, so only etcd's request limit (1.5 MiB by default) bounds a job's size."""
    job = _stored(EXAMPLE)
    base = len(json.dumps(job))
    label = ("example.com/label-000000", "v" * 40)
    each = len(json.dumps(dict([label]))) - 1  # '"key": "value", ' in the whole
    job["metadata"]["labels"] = {f"example.com/label-{i:06d}": "v" * 40 for i in range(max(0, size - base) // each)}
    return job


MiB = 1024 * 1024


@pytest.mark.parametrize(
    ("operation", "size"),
    [("CREATE", int(1.2 * MiB)), ("UPDATE", int(1.5 * MiB))],
    ids=["create-1.2MiB", "update-2x1.5MiB"],  # an UPDATE carries the object and its old self: twice what etcd stores
)
def test_a_job_as_large_as_etcd_stores_gets_an_admission_review_answer(
    served: tuple[int, bytes, OperatorSettings], operation: str, size: int
) -> None:
    """aiohttp's default 1 MiB body limit answered HTTP 413, a failed webhook call that refused a legitimate job."""
    port, ca, _ = served
    old = _labelled(size) if operation == "UPDATE" else None
    new = _labelled(size)
    if old is not None:
        new["metadata"] = {**old["metadata"], "labels": {**old["metadata"]["labels"], "team": "vision"}, "resourceVersion": "2"}
    request = admission_review(operation, new, old)
    assert len(json.dumps(request)) > (2 * size if old else size) > MiB
    status, answer = _raw(port, ca, request)
    assert status == 200 and answer["kind"] == "AdmissionReview", (status, answer)
    assert answer["response"] == {"uid": request["request"]["uid"], "allowed": True}


def test_a_spec_of_more_than_a_mebibyte_gets_its_refusal_not_413(served: tuple[int, bytes, OperatorSettings]) -> None:
    """What the operator says of a spec too big to render reaches kubectl: before, aiohttp answered 413 first."""
    port, ca, settings = served
    job = _stored(EXAMPLE)
    job["spec"]["model"]["name"] = "x" * int(1.2 * MiB)
    status, answer = _raw(port, ca, admission_review("CREATE", job))
    assert status == 200 and answer["response"]["allowed"] is False, (status, answer)
    assert answer["response"]["status"]["code"] == 422
    assert _lines(answer["response"]) == review("CREATE", job, None, settings) != []


def test_a_body_far_above_the_limit_is_refused_without_reading_it_all(served: tuple[int, bytes, OperatorSettings]) -> None:
    """The server answers 413 once the body passes its limit, without waiting for the 64 MiB announced (a client that
    sends only 5 MiB of them gets its answer, not a timeout) and without holding them; then serves on."""
    port, ca, _ = served
    connection = http.client.HTTPSConnection(HOST, port, context=ssl.create_default_context(cadata=ca.decode()), timeout=20)
    try:
        connection.putrequest("POST", f"/{naming.WEBHOOK_PATH}")
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Content-Length", str(64 * MiB))
        connection.endheaders()
        try:
            for _ in range(5):
                connection.send(b" " * MiB)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            pass  # the server stopped reading: what is asked
        assert connection.getresponse().status == 413
    finally:
        connection.close()
    assert _serving(port, ca)
