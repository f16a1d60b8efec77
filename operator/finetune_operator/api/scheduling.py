"""Kubernetes core/v1 shapes the API shares between sections: label keys and values, and tolerations.

Their own module so that ``v1alpha1`` (``spec.resources``) and ``pods`` (``spec.runtime.pod``) both use them
without importing each other.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

from pydantic import AfterValidator, Field, ValidationInfo, model_validator

from finetune_operator.api.base import WireModel
from finetune_operator.api.fields import (
    LABEL_VALUE,
    QUALIFIED_NAME,
    TAINT_KEY,
    Problems,
    check_qualified_name,
    fields_only,
    quote,
)

INT64_MAX: Final = 2**63 - 1
# Label keys and values, as Kubernetes checks them (the prefix length is checked in code: a pattern cannot count it).
LabelKey = Annotated[str, Field(min_length=1, max_length=317, pattern=QUALIFIED_NAME), AfterValidator(check_qualified_name)]
LabelValue = Annotated[str, Field(max_length=63, pattern=LABEL_VALUE)]
TaintKey = Annotated[str, Field(max_length=317, pattern=TAINT_KEY), AfterValidator(check_qualified_name)]


class Toleration(WireModel):
    """A Kubernetes toleration (core/v1 Toleration)."""

    key: TaintKey | None = None
    """Taint key, a label key such as `nvidia.com/gpu`; absent (or empty) with operator `Exists` tolerates every taint."""

    operator: Literal["Exists", "Equal"] = "Equal"
    """`Equal` matches key and value; `Exists` matches the key alone."""

    value: LabelValue | None = None
    """Taint value (with `Equal`), a label value."""

    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """Taint effect to tolerate; all effects when empty."""

    toleration_seconds: Annotated[int | None, Field(ge=0, le=INT64_MAX)] = None
    """How long a `NoExecute` taint is tolerated (effect `NoExecute` only)."""

    @model_validator(mode="after")
    def _as_kubernetes_checks(self, info: ValidationInfo) -> Toleration:
        if fields_only(info):
            return self
        problems = Problems()
        if not self.key and self.operator != "Exists":
            default = "" if "operator" in self.model_fields_set else " (the default)"
            problems.add(
                "operator", f"{self.operator!r}{default} needs a key; without a key use operator 'Exists' (tolerates every taint)"
            )
        if self.operator == "Exists" and self.value:
            problems.add("value", f"{quote(self.value)}: operator 'Exists' matches the key alone; remove the value")
        if self.toleration_seconds is not None and self.effect != "NoExecute":
            problems.add(
                "tolerationSeconds",
                f"{self.toleration_seconds}: applies to effect 'NoExecute' only (effect is {quote(self.effect)}); "
                "set effect: NoExecute or remove tolerationSeconds",
            )
        problems.raise_any(self)
        return self
