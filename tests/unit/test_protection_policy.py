"""Issue 15, the platform's side: one settings flag makes admission refuse jobs that are not encrypted client-side
or not signed, the trusted public key (a public one only) reaches every trainer (and makes it refuse unsigned
models), the trainer's keys are never inlined in the spec, and the spec's protection fields validate in one line
naming field, value and what is accepted."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from finetune_operator.admission import AdmissionError, admit
from finetune_operator.api.validate import validate_document
from finetune_operator.rayjob import build_children
from finetune_operator.settings import OperatorSettings, SettingsError

PUBLIC = "O2onvM62pC1io6jQKm8Nc2UyFXcd4kOmOsBIoYtZ2ik="
KEY = base64.b64encode(bytes(range(32))).decode()
REQUIRED = OperatorSettings(require_protected_artifacts=True, verify_keys=PUBLIC)


def job(output: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "j", "namespace": "team", "uid": "u-1", "generation": 1},
        "spec": {
            "model": {"name": "resnet18"},
            "dataset": {"format": "digits"},
            "output": {"uri": "s3://bucket/runs", **output},
            "runtime": {"envFrom": [{"secretRef": {"name": "model-keys"}}]},
        },
    }


def refusal(body: dict[str, Any], settings: OperatorSettings) -> list[str]:
    with pytest.raises(AdmissionError) as info:
        admit(body, settings)
    return info.value.lines


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        (
            {},
            [
                "spec.output.encryption: not set, but this operator requires protected models",
                "spec.output.sign: false, but this operator requires protected models",
            ],
        ),
        ({"sign": True}, ["spec.output.encryption: not set"]),
        # The store's encryption alone is not enough: checkpoints then carry an unsigned sha256 only, and model.pt is
        # read back from the bucket's best checkpoint before the card is signed (a bucket writer's weights get signed).
        (
            {"sign": True, "encryption": {"serverSide": {"kmsKey": "alias/m"}}},
            ["spec.output.encryption: {'clientSide': False, 'serverSide': {'kmsKey': 'alias/m'}} has no clientSide"],
        ),
        ({"encryption": {"clientSide": True}}, ["spec.output.sign: false"]),
    ],
)
def test_required_protection_refuses_unprotected_jobs(output: dict[str, Any], expected: list[str]) -> None:
    lines = refusal(job(output), REQUIRED)
    assert len(lines) == len(expected)
    for line, start in zip(lines, expected, strict=True):
        assert line.startswith(start) and "FINETUNE_OPERATOR_REQUIRE_PROTECTED_ARTIFACTS=true" in line


@pytest.mark.parametrize(
    "output",
    [
        {"encryption": {"clientSide": True}, "sign": True},
        {"encryption": {"clientSide": True, "serverSide": {"kmsKey": "alias/models"}}, "sign": True},
    ],
)
def test_protected_jobs_are_admitted_and_their_trainers_trust_the_platform_key(output: dict[str, Any]) -> None:
    children = build_children(admit(job(output), REQUIRED), REQUIRED)
    cluster = children.rayjob["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]["spec"], *(g["template"]["spec"] for g in cluster["workerGroupSpecs"])]
    for pod in pods:
        env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
        assert env["FINETUNE_VERIFY_KEYS"] == PUBLIC
        assert env["FINETUNE_REQUIRE_SIGNED"] == "true"
        # The user's variables come first: theirs cannot turn the platform's requirement off.
        names = [e["name"] for e in pod["containers"][0]["env"]]
        assert names.index("FINETUNE_REQUIRE_SIGNED") == len(names) - 1


def test_without_the_flag_nothing_is_required_or_injected() -> None:
    settings = OperatorSettings()
    children = build_children(admit(job({}), settings), settings)
    env = children.rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    assert not {"FINETUNE_VERIFY_KEYS", "FINETUNE_REQUIRE_SIGNED"} & {e["name"] for e in env}


def test_settings_from_env_and_the_key_the_flag_needs() -> None:
    env = {"FINETUNE_OPERATOR_REQUIRE_PROTECTED_ARTIFACTS": "true", "FINETUNE_OPERATOR_VERIFY_KEYS": PUBLIC}
    assert OperatorSettings.from_env(env) == REQUIRED
    with pytest.raises(
        SettingsError, match=r"^FINETUNE_OPERATOR_VERIFY_KEYS is empty, which FINETUNE_OPERATOR_REQUIRE_PROTECTED_ARTIFACTS"
    ):
        OperatorSettings.from_env({"FINETUNE_OPERATOR_REQUIRE_PROTECTED_ARTIFACTS": "true"})
    with pytest.raises(SettingsError, match=r"^FINETUNE_OPERATOR_VERIFY_KEYS="):
        OperatorSettings.from_env({"FINETUNE_OPERATOR_VERIFY_KEYS": "not a key!"})


@pytest.mark.parametrize(
    ("output", "message"),
    [
        (
            {"uri": "pvc://claim/runs", "encryption": {"serverSide": {"kmsKey": "k"}}},
            "spec.output.encryption.serverSide: {'kmsKey': 'k'} needs an object store, but uri 'pvc://claim/runs' is not one",
        ),
        ({"uri": "s3://b/r", "encryption": {"serverSide": {"kmsKey": ""}}}, "spec.output.encryption.serverSide.kmsKey: "),
        ({"uri": "s3://b/r", "encryption": {"clientSide": "yes please"}}, "spec.output.encryption.clientSide: "),
        ({"uri": "s3://b/r", "sign": "maybe"}, "spec.output.sign: "),
        # Encrypts nothing, yet reads as "encrypted" to whoever skims the spec, with or without the platform's flag.
        ({"uri": "s3://b/r", "encryption": {}}, "spec.output.encryption: {'clientSide': False} encrypts nothing"),
        (
            {"uri": "s3://b/r", "encryption": {"clientSide": False}},
            "spec.output.encryption: {'clientSide': False} encrypts nothing",
        ),
    ],
)
def test_bad_protection_fields_are_one_line(output: dict[str, Any], message: str) -> None:
    body = job({})
    body["spec"]["output"] = output
    result = validate_document(body, "job.yaml")
    assert len(result.errors) == 1 and result.errors[0].startswith(message), result.errors


@pytest.mark.parametrize("name", ["FINETUNE_ENCRYPTION_KEY", "FINETUNE_SIGNING_KEY", "FINETUNE_BACKUP_KEYRING"])
def test_trainer_keys_written_inline_in_runtime_env_are_refused(name: str) -> None:
    """Inline, a key would sit in the FineTuneJob, the RayJob, the trainer's ConfigMap and model.json's spec."""
    body = job({"encryption": {"clientSide": True}, "sign": True})
    body["spec"]["runtime"]["env"] = [{"name": name, "value": KEY}]
    result = validate_document(body, "job.yaml")
    assert len(result.errors) == 1, result.errors
    assert result.errors[0].startswith(f"spec.runtime.env[0].value: {name} looks like a credential")
    assert "runtime.envFrom" in result.errors[0] and KEY not in result.errors[0]


def test_settings_refuse_a_private_key_as_the_trusted_verify_key() -> None:
    """signing.pem for verify.pem is an easy mix-up; the private key would be copied into every RayJob's env."""
    private = (
        Ed25519PrivateKey.generate()
        .private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        .decode()
    )
    env = {"FINETUNE_OPERATOR_REQUIRE_PROTECTED_ARTIFACTS": "true", "FINETUNE_OPERATOR_VERIFY_KEYS": private}
    with pytest.raises(SettingsError) as info:
        OperatorSettings.from_env(env)
    assert str(info.value) == (
        "FINETUNE_OPERATOR_VERIFY_KEYS is not accepted: PEM block 1 is a private key; expected Ed25519 public keys only "
        "(PEM PUBLIC KEY blocks or base64 raw keys, comma-separated)"
    )


@pytest.mark.parametrize(
    ("protection", "line"),
    [
        (None, None),
        (
            {"encrypted": True, "encryptionKeyId": "k1", "signed": True, "signingKeyId": "5c1f"},
            "encrypted (key k1), signed (key 5c1f)",
        ),
        ({"encrypted": False, "signed": False}, "not encrypted, unsigned"),
        (
            {"serverSideEncryption": "aws:kms", "serverSideKey": "alias/m", "signed": False},
            "not encrypted, store-encrypted (aws:kms, alias/m), unsigned",
        ),
    ],
)
def test_describe_says_how_the_artifacts_are_protected(protection: dict[str, Any] | None, line: str | None) -> None:
    from finetune_operator.cli_cluster import protection_line

    assert protection_line(protection) == line
