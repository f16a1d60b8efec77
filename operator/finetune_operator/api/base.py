"""The base model every wire object derives from: camelCase on the wire, snake_case in Python.

Unknown fields are rejected (``extra="forbid"``) so that a typo such as ``learningrate`` is an error,
not a silently ignored setting — the same behaviour the CRD's structural schema gives at admission.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel


class WireModel(BaseModel):
    """A Kubernetes-style object: camelCase aliases, names accepted too, unknown keys rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_default=True,
        use_attribute_docstrings=True,
    )

    def to_wire(self) -> dict[str, object]:
        """The object as it is written to the API server: camelCase keys, unset optionals left out."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")
