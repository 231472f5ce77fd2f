"""Flyte's cache with real `pyflyte run`s (local cache on, under this test's own HOME): data is keyed by content,
training by the run fingerprint; settings that only observe a run (trackers, workdir, the file's place) never
bust it, and a changed byte or a changed hyperparameter always does."""

from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pytest

from tests.flyte_helpers import BIN, flyte_env, run

TINY = {
    "model": {"hidden_sizes": [16]},
    "training": {"max_steps": 4, "logging_steps": 2, "eval_strategy": "no", "save_strategy": "no"},
}
OUTPUTS = re.compile(r"PipelineOutputs\(data=(\S+?), model=(\S+?), logs=\S+?, metrics=\S+?, test_metrics=(\{.*?\})\)")


def write_csv(path, rows: int = 240) -> None:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    columns = [f"p{i}" for i in range(x.shape[1])]
    with open(path, "w", encoding="utf-8") as f:
        f.write(",".join(columns + ["label"]) + "\n")
        for features, label in zip(x[:rows], y[:rows]):
            f.write(",".join(f"{v:g}" for v in features) + f",{label}\n")


def flyte_run(tmp_path, name: str, *args: str, config: dict | None = None) -> dict:
    cmd = [os.path.join(BIN, "pyflyte"), "run", "workflows/training.py", "training_workflow",
           "--config", json.dumps(config or TINY), *args]
    result = run(cmd, flyte_env(tmp_path, FLYTE_LOCAL_CACHE_ENABLED="true"), str(tmp_path / name))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    found = OUTPUTS.search(result.stdout)
    assert found, result.stdout[-3000:]
    decks = re.findall(r"^  (\w+): file://(\S+)$", result.stdout, re.M)
    return {"data": found.group(1), "model": found.group(2), "test_metrics": found.group(3),
            "decks": dict(decks), "stdout": result.stdout}


def test_cache_keys_on_data_content_and_run_fingerprint_not_on_paths_or_trackers(tmp_path):
    source = tmp_path / "a" / "digits.csv"
    source.parent.mkdir()
    write_csv(source)
    original = source.read_bytes()

    first = flyte_run(tmp_path, "first", "--data", str(source))
    assert set(first["decks"]) == {"train_model", "evaluate_model"}
    assert re.search(r"^test accuracy: \d\.\d{4}$", first["stdout"], re.M)

    # one byte of the file changed: prepare and train run again
    flipped = original.replace(b"\n0,0,5,", b"\n0,0,6,", 1)
    assert flipped != original
    source.write_bytes(flipped)
    second = flyte_run(tmp_path, "second", "--data", str(source))
    assert second["data"] != first["data"] and second["model"] != first["model"]

    # the original bytes in another place, other trackers and a workdir: every cached result is reused
    source.write_bytes(original)
    moved = tmp_path / "elsewhere" / "copy.csv"
    moved.parent.mkdir()
    shutil.copyfile(source, moved)
    observed = json.loads(json.dumps(TINY))
    observed["training"]["report_to"] = ["none"]
    third = flyte_run(tmp_path, "third", "--data", str(moved), "--workdir", str(tmp_path / "work"), config=observed)
    assert (third["data"], third["model"]) == (first["data"], first["model"])
    assert third["test_metrics"] == first["test_metrics"]
    assert set(third["decks"]) == {"evaluate_model"}  # training came from the cache: no new training deck

    # a hyperparameter changed (as dvc exp run -S takes it): same data, training runs again
    fourth = flyte_run(tmp_path, "fourth", "--data", str(moved), "--overrides", '["training.learning_rate=0.01"]')
    assert fourth["data"] == first["data"] and fourth["model"] != first["model"]
    with open(os.path.join(fourth["model"], "training_args.json")) as f:
        assert json.load(f)["learning_rate"] == pytest.approx(0.01)


def test_content_hashes_follow_bytes_not_places(tmp_path):
    from workflows.flyte_cache import content_addressed, tree_digest

    a, b = tmp_path / "a", tmp_path / "b"
    for folder in (a, b):
        (folder / "sub").mkdir(parents=True)
        np.save(folder / "sub" / "x.npy", np.arange(5))
        (folder / "meta.json").write_text("{}")
    assert tree_digest(str(a)) == tree_digest(str(b))
    (b / "meta.json").write_text("{ }")
    assert tree_digest(str(a)) != tree_digest(str(b))
    (b / "meta.json").write_text("{}")
    (b / "sub" / "x.npy").rename(b / "sub" / "y.npy")  # a renamed file is other data
    assert tree_digest(str(a)) != tree_digest(str(b))

    csv = tmp_path / "train.csv"
    csv.write_text("x,label\n1,0\n")
    assert re.fullmatch(r"sha256:[0-9a-f]{64}\.csv", content_addressed(str(csv)))
    assert content_addressed(str(csv), "s3://bucket/upload.parquet").endswith(".parquet")


def test_fingerprint_ignores_only_observation_settings():
    from workflows.config import PipelineConfig
    from workflows.flyte_cache import run_fingerprint

    base = run_fingerprint(PipelineConfig())
    assert run_fingerprint(PipelineConfig.from_dict({"training": {"report_to": ["mlflow"]}})) == base
    for changed in ({"training": {"learning_rate": 0.002}}, {"model": {"dropout": 0.1}},
                    {"data": {"split_seed": 1}}, {"training": {"seed": 1}}):
        assert run_fingerprint(PipelineConfig.from_dict(changed)) != base, changed
