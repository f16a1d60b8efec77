"""The chart's ``helm test`` (``finetune_operator.smoke``): each check's verdict on what the API server answers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from finetune_operator import smoke
from finetune_operator.admission import review
from finetune_operator.settings import OperatorSettings
from tests.support.schemas import REPO, load_crd_schema, schema_errors, undeclared_fields

DENIED = 'admission webhook "validate.finetunejobs.finetune.dev" denied the request: invalid FineTuneJob (1 error):'
CEL = 'FineTuneJob.finetune.dev "x" is invalid: spec.resources.workers: Invalid value: 1024'


class FakeApi:
    """What the API server answers: ``listed`` for the LIST, ``valid`` / ``invalid`` for each dry-run create."""

    def __init__(
        self, listed: smoke.Refused | None = None, valid: smoke.Refused | None = None, invalid: smoke.Refused | None = None
    ):
        self.listed, self.valid, self.invalid = listed, valid, invalid
        self.created: list[str] = []

    def list_one(self, namespace: str) -> None:
        if self.listed:
            raise self.listed

    def dry_run_create(self, namespace: str, body: Mapping[str, Any]) -> None:
        name = body["metadata"]["name"]
        self.created.append(name)
        answer = self.valid if name == "helm-test-valid" else self.invalid
        if answer:
            raise answer


@pytest.mark.parametrize(
    ("case", "api", "webhook", "verdicts", "says"),
    [
        ("all good", FakeApi(invalid=smoke.Refused(422, DENIED)), True, [True, True, True], "webhook refuses"),
        ("no webhook wanted: two checks", FakeApi(), False, [True, True], "admitted"),
        ("CRD missing: nothing else tried", FakeApi(listed=smoke.Refused(404, "not found")), True, [False], "crds.enabled"),
        (
            "valid job refused",
            FakeApi(valid=smoke.Refused(422, "spec: bad"), invalid=smoke.Refused(422, DENIED)),
            True,
            [True, False, True],
            "a valid FineTuneJob was refused",
        ),
        ("webhook down under Ignore: invalid admitted", FakeApi(), True, [True, True, False], "did not answer"),
        (
            "refused by the schema, not the webhook",
            FakeApi(invalid=smoke.Refused(422, CEL)),
            True,
            [True, True, False],
            "not by the webhook",
        ),
        (
            "webhook unreachable under Fail: 500",
            FakeApi(invalid=smoke.Refused(500, DENIED)),
            True,
            [True, True, False],
            "not by the webhook",
        ),
    ],
)
def test_checks(case: str, api: FakeApi, webhook: bool, verdicts: list[bool], says: str) -> None:
    outcomes = smoke.check(api, "team-a", webhook=webhook)
    assert [o.ok for o in outcomes] == verdicts, case
    assert says in " ".join(o.line for o in outcomes), case


def test_main_prints_one_line_a_check_and_fails_on_any(capsys: pytest.CaptureFixture[str]) -> None:
    assert smoke.main(["--namespace", "team-a", "--webhook"], api=FakeApi()) == 1
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 2 and all(line.startswith("ok: ") for line in out.splitlines())
    assert len(err.splitlines()) == 1 and err.startswith("FAILED: ")
    assert smoke.main(["--namespace", "team-a", "--webhook"], api=FakeApi(invalid=smoke.Refused(422, DENIED))) == 0


def test_the_probe_jobs_pass_the_crd_schema_and_only_the_operator_refuses_the_invalid_one() -> None:
    """The refusal the test expects can only come from the webhook: the CRD's schema accepts both jobs."""
    schema = load_crd_schema(REPO / "manifests" / "base" / "crd.yaml", "v1alpha1")
    for job in (smoke.VALID, smoke.invalid_job()):
        assert schema_errors(job, schema) == [] and undeclared_fields(job, schema) == [], job["metadata"]["name"]
    assert review("CREATE", smoke.VALID, None, OperatorSettings()) == []
    assert review("CREATE", smoke.invalid_job(), None, OperatorSettings()) != []
    at_the_maxima = OperatorSettings(max_workers=1024, max_gpus_per_worker=16)
    assert review("CREATE", smoke.invalid_job(), None, at_the_maxima) == []  # documented: the check says so
