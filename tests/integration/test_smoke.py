"""The `helm test` check (``finetune_operator.smoke``) over real HTTP, through the kubernetes client, against the API
emulator. The emulator has no admission webhook and ignores ``dryRun`` (it stores the "dry-run" job): so here the
valid job is admitted, and the webhook check must fail, as it would on a cluster whose webhook does not answer."""

from __future__ import annotations

import pytest

import finetune_operator.handlers  # noqa: F401  (the integration tier's rule: the operator's handlers registered)
from finetune_operator import smoke
from finetune_operator.api.versions import PLURAL
from tests.support.kube_emulator import KubeEmulator

pytestmark = pytest.mark.timeout(60)


def test_the_api_is_served_and_a_valid_job_admitted(emu: KubeEmulator, capsys: pytest.CaptureFixture[str]) -> None:
    api = smoke.KubeJobsApi(emu.kubernetes_client())
    assert smoke.main(["--namespace", "default"], api=api) == 0
    out = capsys.readouterr().out
    assert out.count("ok: ") == 2 and "is served in default" in out
    # The create reached the API (the emulator ignores dryRun and stores it; an API server would not).
    assert emu.find(PLURAL, "default", "helm-test-valid") is not None


def test_a_webhook_that_does_not_answer_fails_the_test(emu: KubeEmulator, capsys: pytest.CaptureFixture[str]) -> None:
    api = smoke.KubeJobsApi(emu.kubernetes_client())
    assert smoke.main(["--namespace", "default", "--webhook"], api=api) == 1
    assert "FAILED: an invalid FineTuneJob (1024 workers of 16 GPUs) was admitted" in capsys.readouterr().err
