"""The path to a Flyte cluster without a cluster: the shipped flyte.config registers (dry run) and the task image
holds every package a ``report_to`` name needs, at the version constraints.txt pins (the image itself cannot be
built here: its spec and requirements are what a cluster gets)."""

from __future__ import annotations

import os
import re
from importlib import metadata

import tomllib
from packaging.requirements import Requirement

from tests.flyte_helpers import BIN, REPO, flyte_env, run


def _project() -> dict:
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]


def _closure(requirements: list[str]) -> set[str]:
    """Canonical names of ``requirements`` and everything they need, read from the installed metadata."""
    from workflows.image import canonical

    seen: set[str] = set()
    todo = [(Requirement(r), ()) for r in requirements]
    while todo:
        requirement, extras = todo.pop()
        name = canonical(requirement.name)
        if requirement.marker and not requirement.marker.evaluate({"extra": extras[0] if extras else ""}):
            continue
        key = name + "[" + ",".join(sorted(requirement.extras)) + "]"
        if key in seen:
            continue
        seen.add(key)
        for line in metadata.requires(name) or []:
            child = Requirement(line)
            wanted = sorted(requirement.extras) or [""]
            if child.marker and not any(child.marker.evaluate({"extra": e}) for e in wanted):
                continue
            todo.append((Requirement(str(child).split(";")[0]), ()))
    return {k.split("[")[0] for k in seen}


def test_every_report_to_name_has_its_packages_in_the_image_at_the_constrained_version():
    from trainer_lib.registry import _load
    from workflows.image import EXCLUDED_TRACKERS, canonical, image_requirements, read_constraints

    project = _project()
    pins = read_constraints()
    image = dict(r.split("==") for r in image_requirements())
    assert image["torch"].endswith("+cpu") and image["torch"] == pins["torch"]

    checked, missing_from_stack = set(), set()
    # the shipped names (pyproject's entry points), not the runtime registry: other tests register their own
    for name, target in project["entry-points"]["flytrain.integrations"].items():
        extra = _load(target).pip_extra
        requirements = project["optional-dependencies"][extra]
        if any(canonical(Requirement(r).name) not in pins for r in requirements):
            missing_from_stack.add(name)
            continue
        for package in _closure(requirements + project["dependencies"]):
            assert package in image, f"report_to {name!r} needs {package}, which the image leaves out"
            assert image[package] == pins[package], f"{package}: image {image[package]} != constraints {pins[package]}"
        checked.add(name)
    assert missing_from_stack == set(EXCLUDED_TRACKERS)
    assert {"mlflow", "dagshub", "dvclive", "wandb", "tensorboard", "flyte"} <= checked
    assert "flytekitplugins-kfpytorch" in image and "dvc" in image  # the elastic task, `dvc` in a task
    assert not {"pytest", "ruff"} & set(image)  # developer tools stay out


def test_a_tracker_left_out_of_the_image_is_so_because_its_package_conflicts_with_the_pins():
    """The stated reason holds: the left-out package needs versions constraints.txt does not pin (when the pins
    change so that it fits, this fails: add the package and its dependencies to constraints.txt instead)."""
    from packaging.specifiers import SpecifierSet

    from trainer_lib.registry import _load
    from workflows.image import EXCLUDED_TRACKERS, canonical, image_requirements, read_constraints

    project, pins = _project(), read_constraints()
    image = {r.split("==")[0] for r in image_requirements()}
    for name, (package, needs) in EXCLUDED_TRACKERS.items():
        extra = project["optional-dependencies"][_load(project["entry-points"]["flytrain.integrations"][name]).pip_extra]
        assert package in {canonical(Requirement(r).name) for r in extra}, (name, extra)
        assert package not in pins and package not in image
        conflicts = {dep: pins[dep] for dep, wanted in needs.items() if pins[dep] not in SpecifierSet(wanted)}
        assert conflicts, f"{package} fits constraints.txt's pins now ({needs}): pin it and add {name!r} to the image"
    readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    assert all(f"`{name}` is not in the image" in readme for name in EXCLUDED_TRACKERS)


def test_gpu_switch_takes_the_cuda_build_of_the_same_torch():
    from workflows.image import build_image, read_constraints

    cpu, gpu = build_image(gpu=False), build_image(gpu=True)
    version = read_constraints()["torch"]
    assert f"torch=={version}" in cpu.packages and cpu.pip_extra_index_url
    assert f"torch=={version.split('+')[0]}" in gpu.packages and not gpu.pip_extra_index_url
    assert gpu.image_name() != cpu.image_name()
    for path in cpu.copy:  # flytrain itself is installed in the image (its entry points name the trackers)
        assert os.path.exists(os.path.join(REPO, path)), path


def test_shipped_flyte_config_targets_the_demo_cluster_and_registers(tmp_path):
    """`pyflyte --config flyte.config register --dry-run` serialises every entity (no cluster is contacted)."""
    from flytekit.configuration import Config

    platform = Config.auto(os.path.join(REPO, "flyte.config")).platform
    assert (platform.endpoint, platform.insecure) == ("localhost:30080", True)
    result = run([os.path.join(BIN, "pyflyte"), "--config", "flyte.config", "register", "--dry-run",
                  "--copy", "none", "--version", "dry-run", "workflows"], flyte_env(tmp_path), str(tmp_path / "log"))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    registered = set(re.findall(r"\[✔\] (Task|Workflow|Launch Plan): workflows\.training\.(\w+)", output))
    assert {("Task", "train_model"), ("Task", "evaluate_model"), ("Workflow", "training_workflow"),
            ("Launch Plan", "training_workflow")} <= registered, output[-3000:]
    assert re.search(r"Successfully registered \d+ entities", output)
