"""``FINETUNE_OPERATOR_*`` parsing: defaults, every variable, and errors that name the variable."""

from __future__ import annotations

import inspect
from typing import Any

import pytest

from finetune_operator.api.pods import PodOverrides
from finetune_operator.api.versions import DEFAULT_TRAINER_IMAGE, RAY_VERSION
from finetune_operator.settings import OperatorSettings, SettingsError, env_name


def test_defaults() -> None:
    s = OperatorSettings.from_env({})
    assert s == OperatorSettings()
    assert (s.namespaces, s.trainer_image, s.ray_version) == ((), DEFAULT_TRAINER_IMAGE, RAY_VERSION)
    assert (s.max_workers, s.max_gpus_per_worker, s.default_ttl_seconds) == (64, 8, 3600)
    assert (s.status_throttle_seconds, s.head_cpu, s.head_memory, s.metrics_port, s.log_level) == (10, "1", "2Gi", 8080, "INFO")
    # Secure by default: the trainer image's own user, Ray token auth, a NetworkPolicy per job.
    assert (s.trainer_uid, s.trainer_gid, s.ray_auth_mode, s.job_network_policy) == (1000, 100, "token", True)
    assert (s.kuberay_namespace, s.kuberay_pod_labels) == ("", ("app.kubernetes.io/component=kuberay-operator",))
    assert (s.metrics_scraper_namespace, s.metrics_scraper_pod_labels) == ("", ())


def test_every_attribute_is_a_documented_variable() -> None:
    text = inspect.getsource(OperatorSettings)
    for name in OperatorSettings.model_fields:
        assert f"``{env_name(name)}``" in text, f"{name} is not documented with its variable"


@pytest.mark.parametrize(
    ("variable", "raw", "attribute", "expected"),
    [
        ("NAMESPACES", "ml-team, research ,ml-team", "namespaces", ("ml-team", "research")),
        ("NAMESPACES", " ", "namespaces", ()),
        ("TRAINER_IMAGE", "registry.local/trainer:2", "trainer_image", "registry.local/trainer:2"),
        ("RAY_VERSION", "2.55.1", "ray_version", "2.55.1"),
        ("MAX_WORKERS", "8", "max_workers", 8),
        ("MAX_DATA_WORKERS", "0", "max_data_workers", 0),
        ("MAX_GPUS_PER_WORKER", "0", "max_gpus_per_worker", 0),
        ("DEFAULT_TTL_SECONDS", "0", "default_ttl_seconds", 0),
        ("STATUS_THROTTLE_SECONDS", "2.5", "status_throttle_seconds", 2.5),
        ("HEAD_CPU", "500m", "head_cpu", "500m"),
        ("HEAD_CPU", "2", "head_cpu", "2"),
        ("HEAD_MEMORY", "4Gi", "head_memory", "4Gi"),
        ("METRICS_PORT", "0", "metrics_port", 0),
        ("LOG_LEVEL", "debug", "log_level", "DEBUG"),
        ("TRAINER_UID", "1000680000", "trainer_uid", 1000680000),
        ("TRAINER_GID", "0", "trainer_gid", 0),
        ("RAY_AUTH_MODE", "Disabled", "ray_auth_mode", "disabled"),
        ("JOB_NETWORK_POLICY", "False", "job_network_policy", False),
        ("JOB_NETWORK_POLICY", "true", "job_network_policy", True),
        ("KUBERAY_NAMESPACE", "kuberay-system", "kuberay_namespace", "kuberay-system"),
        (
            "KUBERAY_POD_LABELS",
            "app.kubernetes.io/name=kuberay-operator, app=kuberay,app=kuberay",
            "kuberay_pod_labels",
            ("app.kubernetes.io/name=kuberay-operator", "app=kuberay"),
        ),
        ("METRICS_SCRAPER_NAMESPACE", "monitoring", "metrics_scraper_namespace", "monitoring"),
        ("METRICS_SCRAPER_POD_LABELS", "prometheus=main,empty=", "metrics_scraper_pod_labels", ("prometheus=main", "empty=")),
        (
            "POD_DEFAULTS",
            '{"imagePullSecrets":[{"name":"regcred"}],"labels":{"team":"ml"}}',
            "pod_defaults",
            PodOverrides.model_validate({"imagePullSecrets": [{"name": "regcred"}], "labels": {"team": "ml"}}),
        ),
        ("POD_DEFAULTS", "{}", "pod_defaults", PodOverrides()),
        ("DEFAULT_PRIORITY_CLASS_NAME", "batch-low", "default_priority_class_name", "batch-low"),
    ],
)
def test_parses(variable: str, raw: str, attribute: str, expected: Any) -> None:
    settings = OperatorSettings.from_env({f"FINETUNE_OPERATOR_{variable}": raw})
    assert getattr(settings, attribute) == expected


@pytest.mark.parametrize(
    ("variable", "raw", "accepted"),
    [
        ("NAMESPACES", "ML_Team", "namespace names"),
        ("TRAINER_IMAGE", "has space:1", "container image"),
        ("RAY_VERSION", "2.60", "Ray version"),
        ("MAX_WORKERS", "many", "integer from 1 to 1024"),
        ("MAX_WORKERS", "0", "integer from 1 to 1024"),
        ("MAX_DATA_WORKERS", "257", "integer from 0 to 256"),
        ("MAX_GPUS_PER_WORKER", "-1", "integer from 0 to 16"),
        ("DEFAULT_TTL_SECONDS", "1h", "integer"),
        ("STATUS_THROTTLE_SECONDS", "-3", "seconds"),
        ("HEAD_CPU", "1 core", "CPU quantity"),
        ("HEAD_MEMORY", "2GB", "memory quantity"),
        ("METRICS_PORT", "70000", "integer from 0 to 65535"),
        ("LOG_LEVEL", "LOUD", "DEBUG, INFO"),
        ("TRAINER_UID", "0", "integer from 1"),
        ("TRAINER_GID", "-1", "integer from 0"),
        ("RAY_AUTH_MODE", "none", "one of token, disabled"),
        ("JOB_NETWORK_POLICY", "yes", "true or false"),
        ("KUBERAY_NAMESPACE", "Kuberay", "namespace name"),
        ("KUBERAY_POD_LABELS", "app", "key=value pod labels; 'app' is not one"),
        ("KUBERAY_POD_LABELS", "a=b,bad key=x", "'bad key=x' is not one"),
        ("METRICS_SCRAPER_POD_LABELS", "app=-x", "key=value pod labels"),
        ("METRICS_SCRAPER_POD_LABELS", "example.com/a/b=x", "key=value pod labels"),
        ("POD_DEFAULTS", "{imagePullSecrets: []}", "a JSON object of spec.runtime.pod fields"),
        (
            "POD_DEFAULTS",
            '{"volumes":[{"name":"h","hostPath":{"path":"/"}}]}',
            "; volumes[0].hostPath: 'hostPath' is refused: the restricted Pod Security profile",
        ),
        ("POD_DEFAULTS", '{"labels":{"ray.io/node-type":"head"}}', "; labels['ray.io/node-type']: 'head': the key is"),
        ("POD_DEFAULTS", '{"securityContext":{"privileged":true}}', "securityContext.privileged: true would loosen"),
        ("DEFAULT_PRIORITY_CLASS_NAME", "High", "a PriorityClass name"),
    ],
)
def test_bad_values_name_the_variable(variable: str, raw: str, accepted: str) -> None:
    with pytest.raises(SettingsError) as info:
        OperatorSettings.from_env({f"FINETUNE_OPERATOR_{variable}": raw})
    message = str(info.value)
    assert message.startswith(f"FINETUNE_OPERATOR_{variable}={raw!r} is not accepted")
    assert accepted in message


def test_ray_token_auth_needs_a_ray_that_has_it() -> None:
    """Each value parses, but together they would render RayJobs that KubeRay rejects: the operator does not start."""
    env = {"FINETUNE_OPERATOR_RAY_VERSION": "2.51.0"}
    with pytest.raises(SettingsError) as info:
        OperatorSettings.from_env(env)
    assert str(info.value) == (
        "FINETUNE_OPERATOR_RAY_VERSION='2.51.0' has no Ray token authentication, which "
        "FINETUNE_OPERATOR_RAY_AUTH_MODE=token needs; use Ray 2.52.0 or later"
    )
    assert OperatorSettings.from_env({**env, "FINETUNE_OPERATOR_RAY_AUTH_MODE": "disabled"}).ray_token_auth is False


def test_round_trip_through_env() -> None:
    settings = OperatorSettings(
        namespaces=("a", "b"),
        max_workers=3,
        status_throttle_seconds=1.5,
        log_level="DEBUG",
        job_network_policy=False,
        kuberay_pod_labels=("a=b", "c=d"),
        metrics_scraper_namespace="mon",
    )
    assert OperatorSettings.from_env(settings.to_env()) == settings
    assert settings.log_level_number == 10


def test_unrelated_variables_are_ignored() -> None:
    assert OperatorSettings.from_env({"FINETUNE_OPERATOR": "x", "OTHER": "1"}) == OperatorSettings()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"max_workers": 0}, "FINETUNE_OPERATOR_MAX_WORKERS='0' is not accepted; expected an integer from 1 to 1024"),
        ({"log_level": "LOUD"}, "FINETUNE_OPERATOR_LOG_LEVEL='LOUD' is not accepted; expected one of DEBUG, INFO"),
        (
            {"kuberay_pod_labels": ("app",)},
            "FINETUNE_OPERATOR_KUBERAY_POD_LABELS='app' is not accepted; expected comma-separated",
        ),
    ],
)
def test_keyword_arguments_are_validated_like_the_environment(changes: dict[str, Any], message: str) -> None:
    """Settings built in code (``replace``, tests, ``--namespace``) pass the same checks as the variables."""
    with pytest.raises(SettingsError) as info:
        OperatorSettings().replace(**changes)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_a_refusal_quotes_the_variable_as_it_was_set() -> None:
    with pytest.raises(SettingsError) as info:
        OperatorSettings.from_env({"FINETUNE_OPERATOR_LOG_LEVEL": " loud "})
    assert str(info.value).startswith("FINETUNE_OPERATOR_LOG_LEVEL='loud' is not accepted")


def test_from_env_reads_the_process_environment_and_the_constructor_does_not(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FINETUNE_OPERATOR_MAX_WORKERS", "7")
    assert OperatorSettings.from_env().max_workers == 7
    assert OperatorSettings().max_workers == 64


def test_pod_defaults_mount_only_their_own_volumes() -> None:
    with pytest.raises(SettingsError) as info:
        OperatorSettings.from_env({"FINETUNE_OPERATOR_POD_DEFAULTS": '{"volumeMounts":[{"name":"ca","mountPath":"/ca"}]}'})
    assert str(info.value) == (
        "FINETUNE_OPERATOR_POD_DEFAULTS: volumeMounts name 'ca', which is not among its volumes; "
        "expected every mount to name one of the volumes it lists"
    )


def test_pod_defaults_round_trip_through_env() -> None:
    pods = PodOverrides.model_validate(
        {"volumes": [{"name": "ca", "configMap": {"name": "ca"}}], "volumeMounts": [{"name": "ca", "mountPath": "/ca"}]}
    )
    settings = OperatorSettings().replace(pod_defaults=pods, default_priority_class_name="low")
    assert OperatorSettings.from_env(settings.to_env()) == settings
