"""The task image for a Flyte cluster, derived from the project: every pin of constraints.txt (the versions the test
suite ran against) except the developer tools, plus flytrain itself installed from the copied sources.

Why every pin and not only the extras' names: an unpinned transitive dependency lets the image resolve other
versions than the ones tested together. ``FLYTRAIN_IMAGE_GPU=1`` swaps the CPU torch wheel for the CUDA build of
the same version; ``FLYTRAIN_REGISTRY`` names the registry (default: the demo cluster's ``localhost:30000``).
"""

from __future__ import annotations

import os
import re

from flytekit import ImageSpec

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONSTRAINTS = os.path.join(REPO, "constraints.txt")
#: pinned in constraints.txt for `make test`/`make lint` only; a task never imports them
DEV_ONLY = frozenset({"pytest", "pytest-timeout", "ruff", "pluggy", "iniconfig"})
#: ``report_to`` names left out of the image: ``name -> (package, {pinned package: the versions it would need})``.
#: azureml-core 1.61.0.post4 (the newest; pip, Python 3.11) needs pathspec<1.0.0, packaging<26.0 and, through
#: pyopenssl<=26.0.0, cryptography<47; constraints.txt pins pathspec 1.1.1, packaging 26.4 and cryptography 50.0.2
#: (asyncssh 2.24.1, from dvc's scmrepo, needs >=48.0.1): `pip install -c constraints.txt azureml-core` is
#: ResolutionImpossible. Fitting it means re-freezing the stack with older pins (and ~27 new packages) and testing
#: it again. tests/test_flyte_cluster.py checks that the pins still conflict, so the day they no longer do the test
#: says azure_ml can join the image.
EXCLUDED_TRACKERS = {
    "azure_ml": ("azureml-core", {"pathspec": "<1.0.0", "packaging": "<26.0", "cryptography": "<47"}),
}
#: the CPU wheels of torch (constraints.txt pins torch==X+cpu, which only this index serves)
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
PYTHON_VERSION = "3.11"


def canonical(name: str) -> str:
    """A distribution name as pip compares them (PEP 503: case, '-', '_' and '.' do not matter)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_constraints(path: str = CONSTRAINTS) -> dict[str, str]:
    """``canonical name -> exact version`` of every ``name==version`` line of a constraints file."""
    pins: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            name, sep, version = line.partition("==")
            if not sep:
                raise ValueError(f"{path}: {line!r} is not an exact pin (name==version)")
            pins[canonical(name)] = version.strip()
    return pins


def image_requirements(gpu: bool = False, path: str = CONSTRAINTS) -> list[str]:
    """The image's packages: every non-dev pin of ``path``; torch as the CPU wheel unless ``gpu``."""
    packages = []
    for name, version in sorted(read_constraints(path).items()):
        if name in DEV_ONLY:
            continue
        if name == "torch" and gpu:
            version = version.split("+", 1)[0]  # the default (CUDA) build of the same release
        packages.append(f"{name}=={version}")
    return packages


def gpu_requested() -> bool:
    return os.environ.get("FLYTRAIN_IMAGE_GPU", "").strip().lower() in ("1", "true", "yes", "on")


def build_image(gpu: bool | None = None) -> ImageSpec:
    """The ImageSpec of every task (built by ``pyflyte run --remote`` / ``register`` when missing)."""
    gpu = gpu_requested() if gpu is None else gpu
    return ImageSpec(
        name="flytrain-gpu" if gpu else "flytrain",
        python_version=PYTHON_VERSION,
        packages=image_requirements(gpu),
        pip_extra_index_url=None if gpu else [CPU_INDEX],
        # flytrain itself, installed: report_to names resolve through its entry points (fast registration ships
        # the code but no package metadata). Paths are relative to the repository root, where pyflyte is run.
        copy=["pyproject.toml", "README.md", "trainer_lib", "callbacks", "workflows"],
        commands=["uv pip install --no-deps /root"],
        registry=os.environ.get("FLYTRAIN_REGISTRY", "localhost:30000"),
    )
