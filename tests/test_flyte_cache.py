"""Flyte's cache with real `pyflyte run`s (local cache on, under this test's own HOME): data is keyed by content,
training by the run fingerprint; settings that only observe a run (trackers, workdir, the file's place) never
bust it, and a changed byte or a changed hyperparameter always does."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil

import numpy as np
import pytest

from tests.flyte_helpers import BIN, flyte_env, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = {
    "model": {"hidden_sizes": [16]},
    "training": {"max_steps": 4, "logging_steps": 2, "eval_strategy": "no", "save_strategy": "no"},
}
OUTPUTS = re.compile(r"PipelineOutputs\(data=(\S+?), model=(\S+?), logs=\S+?, metrics=(\S+?), test_metrics=(\{.*?\})\)")


def write_csv(path, rows: int = 240, start: int = 0) -> None:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    columns = [f"p{i}" for i in range(x.shape[1])]
    with open(path, "w", encoding="utf-8") as f:
        f.write(",".join(columns + ["label"]) + "\n")
        for features, label in zip(x[start:start + rows], y[start:start + rows]):
            f.write(",".join(f"{v:g}" for v in features) + f",{label}\n")


def split_hashes(data_uri: str) -> dict:
    with open(os.path.join(data_uri, "meta.json"), encoding="utf-8") as f:
        return json.load(f)["split_hashes"]


def flyte_run(tmp_path, name: str, *args: str, config: dict | None = None) -> dict:
    cmd = [os.path.join(BIN, "pyflyte"), "run", "workflows/training.py", "training_workflow",
           "--config", json.dumps(config or TINY), *args]
    result = run(cmd, flyte_env(tmp_path, FLYTE_LOCAL_CACHE_ENABLED="true"), str(tmp_path / name))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    found = OUTPUTS.search(result.stdout)
    assert found, result.stdout[-3000:]
    decks = re.findall(r"^  (\w+): file://(\S+)$", result.stdout, re.M)
    return {"data": found.group(1), "model": found.group(2), "metrics": found.group(3), "test_metrics": ast.literal_eval(found.group(4)),
            "decks": dict(decks), "stdout": result.stdout, "evaluation_cached": CACHED_EVALUATION in result.stdout}


CACHED_EVALUATION = "evaluate_model: from Flyte's cache"


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
    # the evaluation reports to the trackers: another report_to evaluates (and reports) again
    assert not first["evaluation_cached"] and not third["evaluation_cached"] and third["metrics"] != first["metrics"]

    # a hyperparameter changed (as dvc exp run -S takes it): same data, training runs again
    fourth = flyte_run(tmp_path, "fourth", "--data", str(moved), "--overrides", '["training.learning_rate=0.01"]')
    assert fourth["data"] == first["data"] and fourth["model"] != first["model"]
    with open(os.path.join(fourth["model"], "training_args.json")) as f:
        assert json.load(f)["learning_rate"] == pytest.approx(0.01)


def test_a_folder_of_shards_is_one_table_keyed_by_its_content(tmp_path):
    shards = tmp_path / "a" / "digits"
    shards.mkdir(parents=True)
    # written out of name order: the folder is read in sorted name order, so it is the 240-row file below
    write_csv(shards / "part-1.csv", rows=120, start=120)
    write_csv(shards / "part-0.csv", rows=120)
    whole = tmp_path / "whole.csv"
    write_csv(whole)

    first = flyte_run(tmp_path, "first", "--data_dir", str(shards))
    single = flyte_run(tmp_path, "single", "--data", str(whole))
    assert single["data"] != first["data"]  # another source, so another cache entry ...
    assert split_hashes(single["data"]) == split_hashes(first["data"])  # ... holding the same splits

    # one byte of one shard changed: prepare and train run again
    shard = shards / "part-1.csv"
    original = shard.read_bytes()
    shard.write_bytes(original.replace(b"\n0,0,", b"\n0,1,", 1))
    assert shard.read_bytes() != original
    second = flyte_run(tmp_path, "second", "--data_dir", str(shards))
    assert second["data"] != first["data"] and second["model"] != first["model"]
    assert split_hashes(second["data"]) != split_hashes(first["data"])

    # the same shards in another folder (with a Spark-style marker file the loader skips): every result is reused
    shard.write_bytes(original)
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(shards, copy)
    (copy / "_SUCCESS").write_text("")
    third = flyte_run(tmp_path, "third", "--data_dir", str(copy))
    assert (third["data"], third["model"]) == (first["data"], first["model"])
    # an identical run: the evaluation came from the cache too, and the run still says its results and where the
    # evaluation deck is (the copy in the cached metrics folder)
    assert third["evaluation_cached"] and third["metrics"] == first["metrics"]
    assert third["test_metrics"] == first["test_metrics"]
    assert re.search(r"^test accuracy: \d\.\d{4}$", third["stdout"], re.M)
    assert third["decks"] == {"evaluate_model": os.path.join(first["metrics"], "evaluation.html")}
    with open(third["decks"]["evaluate_model"], encoding="utf-8") as f:
        assert "flytrain-heatmap" in f.read()


def test_the_flyte_entry_point_imports_no_torch():
    """An identical rerun of training_workflow runs no task body that needs torch (every result is cached): the
    module pyflyte loads must not import torch (about 3 s) or the Elastic plugin (which imports it) itself."""
    import subprocess
    import sys

    code = ("import sys, workflows.training; "
            "print(sorted(m for m in ('torch', 'flytekitplugins.kfpytorch') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]", done.stdout


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


def test_folder_hash_covers_the_shards_read_and_only_them(tmp_path):
    from workflows.config import ConfigError
    from workflows.flyte_cache import folder_addressed

    a, b = tmp_path / "a", tmp_path / "b"
    for folder in (a, b):
        folder.mkdir()
        (folder / "part-0.csv").write_text("x,label\n1,0\n")
        (folder / "part-1.csv").write_text("x,label\n2,1\n")
    (b / "_SUCCESS").write_text("")
    (b / ".part-0.csv.crc").write_text("checksum")
    key = folder_addressed(str(a))
    assert re.fullmatch(r"sha256:[0-9a-f]{64}/", key) and folder_addressed(str(b)) == key
    (b / "part-1.csv").write_text("x,label\n3,1\n")
    assert folder_addressed(str(b)) != key
    (b / "part-1.csv").write_text("x,label\n2,1\n")
    (b / "part-1.csv").rename(b / "part-2.csv")  # a renamed shard may be read in another order: other data
    assert folder_addressed(str(b)) != key

    (b / "notes.txt").write_text("")
    with pytest.raises(ConfigError, match="holds 'notes.txt'; expected only .csv or .parquet shards"):
        folder_addressed(str(b))
    (b / "notes.txt").unlink()
    (b / "part-3.parquet").write_bytes(b"")
    with pytest.raises(ConfigError, match="mixes .csv and .parquet"):
        folder_addressed(str(b))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no .csv or .parquet file"):
        folder_addressed(str(tmp_path / "empty"))


def test_a_bad_row_of_a_shard_is_named_by_shard_and_line(tmp_path):
    from workflows.config import ConfigError, DataConfig
    from workflows.data import load_source

    folder = tmp_path / "shards"
    folder.mkdir()
    (folder / "part-0.csv").write_text("x,label\n1,0\n2,1\n")
    (folder / "part-1.csv").write_text("x,label\n3,0\nfour,1\n")
    with pytest.raises(ConfigError, match=r"'four' at part-1\.csv row 2 \(line 3\)"):
        load_source(DataConfig(source=str(folder)))
    (folder / "part-1.csv").write_text("y,label\n3,0\n")
    with pytest.raises(ConfigError, match=r"shard 'part-1.csv' has columns \['y', 'label'\], expected those of "):
        load_source(DataConfig(source=str(folder)))
    (folder / "part-1.csv").write_text("x,label\n3,0\n4,1\n")
    x, y, classes = load_source(DataConfig(source=str(folder)))
    assert x[:, 0].tolist() == [1, 2, 3, 4] and y.tolist() == [0, 1, 0, 1] and classes == ["0", "1"]


def test_fingerprint_ignores_only_observation_settings():
    from workflows.config import PipelineConfig
    from workflows.flyte_cache import run_fingerprint

    base = run_fingerprint(PipelineConfig())
    assert run_fingerprint(PipelineConfig.from_dict({"training": {"report_to": ["mlflow"]}})) == base
    for changed in ({"training": {"learning_rate": 0.002}}, {"model": {"dropout": 0.1}},
                    {"data": {"split_seed": 1}}, {"training": {"seed": 1}}):
        assert run_fingerprint(PipelineConfig.from_dict(changed)) != base, changed
