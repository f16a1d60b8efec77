"""The admission webhook's ``FINETUNE_OPERATOR_WEBHOOK_*`` settings: defaults (those of manifests/base), accepted
values, and refusals that name the variable and say what is accepted."""

from __future__ import annotations

from typing import Any

import pytest

from finetune_operator.settings import OperatorSettings, SettingsError


def test_defaults_serve_the_webhook_with_a_certificate_of_its_own() -> None:
    s = OperatorSettings()
    assert (s.webhook_port, s.webhook_host) == (9443, "finetune-operator-webhook.finetune-system.svc")
    assert (s.webhook_configuration, s.webhook_cert_dir) == ("finetune-operator", "")


@pytest.mark.parametrize(
    ("variable", "raw", "attribute", "expected"),
    [
        ("WEBHOOK_PORT", "0", "webhook_port", 0),
        ("WEBHOOK_PORT", "10250", "webhook_port", 10250),
        ("WEBHOOK_HOST", "ft-webhook.ml.svc", "webhook_host", "ft-webhook.ml.svc"),
        ("WEBHOOK_HOST", "localhost", "webhook_host", "localhost"),
        ("WEBHOOK_CONFIGURATION", "ft-finetune-operator", "webhook_configuration", "ft-finetune-operator"),
        ("WEBHOOK_CERT_DIR", "/etc/finetune-operator/webhook", "webhook_cert_dir", "/etc/finetune-operator/webhook"),
    ],
)
def test_parses(variable: str, raw: str, attribute: str, expected: Any) -> None:
    assert getattr(OperatorSettings.from_env({f"FINETUNE_OPERATOR_{variable}": raw}), attribute) == expected


@pytest.mark.parametrize(
    ("variable", "raw", "accepted"),
    [
        ("WEBHOOK_PORT", "https", "integer from 0 to 65535"),
        ("WEBHOOK_PORT", "65536", "integer from 0 to 65535"),
        ("WEBHOOK_HOST", "Webhook.Svc", "DNS name"),
        ("WEBHOOK_HOST", "https://webhook", "DNS name"),
        ("WEBHOOK_CONFIGURATION", "Finetune_Operator", "ValidatingWebhookConfiguration"),
        ("WEBHOOK_CERT_DIR", "certs", "absolute directory path"),
    ],
)
def test_bad_values_name_the_variable(variable: str, raw: str, accepted: str) -> None:
    with pytest.raises(SettingsError) as info:
        OperatorSettings.from_env({f"FINETUNE_OPERATOR_{variable}": raw})
    assert str(info.value).startswith(f"FINETUNE_OPERATOR_{variable}={raw!r} is not accepted") and accepted in str(info.value)
