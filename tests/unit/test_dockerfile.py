"""The Dockerfile, read without Docker (which cannot build here): its targets, users, pinned base images, and
that the operator image carries only the `[operator]` extra while the trainer's versions match the pins that
the RayJobs, pyproject.toml and the chart rely on."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from dataclasses import dataclass, field
from importlib import metadata

import pytest
import yaml

from finetune_operator.api import versions
from tests.support.schemas import REPO

DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)
    args: dict[str, str] = field(default_factory=dict)

    def all(self, keyword: str) -> list[str]:
        return [value for key, value in self.instructions if key == keyword]

    def text(self) -> str:
        return "\n".join(f"{key} {value}" for key, value in self.instructions)


def _substitute(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m[1] or m[2], m[0]), text)


def _instructions(source: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction: continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in source.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, rest = (pending + line).partition(" ")
        out.append((keyword.upper(), " ".join(rest.split())))
        pending = ""
    return out


def parse(source: str) -> tuple[dict[str, str], dict[str, Stage]]:
    """Global ARG defaults and the stages by name, with ARGs substituted into FROM and into each stage's ARGs."""
    global_args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for keyword, value in _instructions(source):
        if keyword == "FROM":
            match = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", value, flags=re.IGNORECASE)
            assert match, f"cannot parse FROM {value}"
            name = match[2] or str(len(stages))
            current = stages[name] = Stage(name, _substitute(match[1], global_args))
        elif keyword == "ARG":
            name, _, default = value.partition("=")
            scope = global_args if current is None else current.args
            # A stage ARG without a default inherits the global one.
            scope[name] = _substitute(default.strip('"'), global_args) if default else global_args.get(name, "")
        elif current is not None:
            current.instructions.append((keyword, _substitute(value, {**global_args, **current.args})))
    return global_args, stages


GLOBAL_ARGS, STAGES = parse(DOCKERFILE.read_text())


def _extras() -> dict[str, list[str]]:
    """pyproject.toml's extras; on Python 3.10 (no tomllib) from the installed metadata instead."""
    if sys.version_info >= (3, 11):
        import tomllib

        extras: dict[str, list[str]] = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
        return extras
    found: dict[str, list[str]] = {}
    for requirement in metadata.requires("finetune-operator") or []:
        text, _, marker = requirement.partition(";")
        match = re.search(r'extra == "([^"]+)"', marker)
        if match:
            found.setdefault(match[1], []).append(text.strip())
    return found


EXTRAS = _extras()


def _image_tag(reference: str) -> tuple[str, str]:
    image = reference.split("@", 1)[0]
    repository, _, tag = image.rpartition(":") if ":" in image.rsplit("/", 1)[-1] else (image, "", "")
    return repository, tag


def test_parser_reads_continuations_args_and_stages() -> None:
    args, stages = parse("ARG V=1.2\n# c\nFROM img:${V} AS a\nARG V\nRUN echo \\\n  $V\nFROM a AS b\nUSER 1000\n")
    assert args == {"V": "1.2"}
    assert stages["a"].base == "img:1.2" and stages["a"].all("RUN") == ["echo 1.2"]
    assert stages["b"].base == "a" and stages["b"].all("USER") == ["1000"]


def test_targets_exist() -> None:
    assert {"builder", "operator", "trainer"} <= set(STAGES)


@pytest.mark.parametrize("target", ["operator", "trainer"])
def test_runs_as_a_non_root_user(target: str) -> None:
    users = STAGES[target].all("USER")
    assert users, f"{target}: no USER instruction, the image would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"{target}: USER {users[-1]}"


def test_operator_user_is_numeric_and_matches_the_chart() -> None:
    # runAsNonRoot can only be verified by the kubelet for a numeric USER; the chart pins the same UID.
    uid, _, gid = STAGES["operator"].all("USER")[-1].partition(":")
    values = yaml.safe_load((REPO / "charts" / "finetune-operator" / "values.yaml").read_text())
    assert uid.isdigit() and int(uid) == values["securityContext"]["runAsUser"] == values["podSecurityContext"]["runAsUser"]
    assert gid.isdigit() and int(gid) == values["podSecurityContext"]["runAsGroup"]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_base_images_are_pinned(stage: str) -> None:
    base = STAGES[stage].base
    if base in STAGES:
        return  # built from an earlier stage
    assert "$" not in base, f"{stage}: unresolved ARG in FROM {base}"
    _, tag = _image_tag(base)
    assert "@sha256:" in base or (tag and tag != "latest"), f"{stage}: FROM {base} is not pinned"
    assert not re.fullmatch(r"\d+(\.\d+)?(-.*)?", tag) or "@sha256:" in base, f"{stage}: {tag} is not a full version"


def test_trainer_base_matches_the_pinned_ray() -> None:
    repository, tag = _image_tag(STAGES["trainer"].base)
    assert repository == "rayproject/ray"
    assert tag == f"{versions.RAY_VERSION}-py311-gpu"


def test_operator_and_builder_share_a_slim_python_311_base() -> None:
    # Same interpreter in both: wheels built in the builder (pydantic-core has C code) must fit the operator.
    assert STAGES["operator"].base == STAGES["builder"].base
    repository, tag = _image_tag(STAGES["operator"].base)
    assert repository == "python"
    assert re.fullmatch(r"3\.11\.\d+-slim(-\w+)?", tag), tag


def test_operator_installs_only_the_operator_extra() -> None:
    operator_side = STAGES["builder"].text() + "\n" + STAGES["operator"].text()
    assert "[operator]" in STAGES["operator"].text() and "--no-index" in STAGES["operator"].text()
    assert "[operator]" in STAGES["builder"].text()
    for forbidden in ("torch", "ray", "[trainer]", "nvidia", "cuda"):
        assert not re.search(rf"(?<![\w-]){re.escape(forbidden)}", operator_side, flags=re.IGNORECASE), forbidden
    # ... and the extra itself brings neither (the import-linter contract keeps the code honest too).
    assert not [dep for dep in EXTRAS["operator"] if re.match(r"(torch|torchvision|ray)\b", dep)]


def test_operator_entrypoint_runs_the_operators_main() -> None:
    """``handlers.main``: Kopf as ``kopf run --standalone`` runs it, and leader election when the settings ask for it."""
    (entrypoint,) = STAGES["operator"].all("ENTRYPOINT")
    command = json.loads(entrypoint)  # exec form: signals reach Kopf, which then stops gracefully
    assert command[:3] == ["python", "-m", "finetune_operator.handlers"]
    assert importlib.util.find_spec(command[2]) is not None, f"{command[2]} does not exist"
    assert "--liveness=http://0.0.0.0:8081/healthz" in command
    assert json.loads(STAGES["operator"].all("CMD")[-1]) == ["--all-namespaces"]
    assert set(STAGES["operator"].all("EXPOSE")[-1].split()) == {"8080", "8081"}


def test_liveness_port_matches_the_manifests() -> None:
    manager = yaml.safe_load((REPO / "manifests" / "base" / "manager.yaml").read_text())
    (container,) = manager["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["healthz"] == 8081 and ports["metrics"] == 8080


def test_trainer_installs_the_pinned_versions() -> None:
    run = " ".join(STAGES["trainer"].all("RUN"))
    assert f"torch=={versions.TORCH_VERSION}" in run
    assert f"torchvision=={versions.TORCHVISION_VERSION}" in run
    assert f"ray[train]=={versions.RAY_VERSION}" in run
    assert "[trainer,cloud]" in run
    for pin in (
        f"torch=={versions.TORCH_VERSION}",
        f"torchvision=={versions.TORCHVISION_VERSION}",
        f"ray[train]=={versions.RAY_VERSION}",
    ):
        assert pin in EXTRAS["trainer"], f"pyproject's trainer extra lacks {pin}"


def test_trainer_runs_as_the_ray_images_user() -> None:
    assert STAGES["trainer"].all("USER")[-1] == "ray"


def test_dockerignore_keeps_the_context_small_but_sufficient() -> None:
    lines = [line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert lines[0] == "*", "exclude everything, then re-include what the build copies"
    included = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = {
        src.rstrip("/")
        for stage in STAGES.values()
        for copy in stage.all("COPY")
        if "--from" not in copy
        for src in copy.split()[:-1]
    }
    assert copied == included, f"COPY sources {sorted(copied)} vs .dockerignore re-includes {sorted(included)}"
    assert not {".venv", ".git", "tests"} & included
