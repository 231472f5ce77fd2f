"""Data for the pipeline: load the source (digits, CSV or Parquet), split it, store and read the splits.

A source folder holds the shards of one table (as pandas/Spark/Dask write it: ``part-0000.parquet``, …): every
``.csv`` or ``.parquet`` file directly inside it, all of one format and with the same columns, read in sorted name
order and concatenated; the pipeline then splits the whole as it splits one file. Names starting with ``.`` or ``_``
(``_SUCCESS``, ``.part-0000.crc``) are skipped; any other entry (a subfolder, a README) is an error naming it.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import torch

from .config import ConfigError, DataConfig

SPLITS = ("train", "val", "test")
META = "meta.json"


def load_source(config: DataConfig) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Features (float32), integer labels and the class names."""
    if config.source == "digits":
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        return (x / 16.0).astype(np.float32), y.astype(np.int64), [str(i) for i in range(10)]
    path = config.source
    if not os.path.exists(path):
        raise ConfigError(f"data.source: {path!r} does not exist (expected 'digits', a .csv/.parquet file or a "
                          "folder of them)")
    import pandas as pd

    frame, where = _read_source(path)
    if config.label_column not in frame.columns:
        columns = [str(c)[:40] for c in frame.columns[:10]] + (["..."] if len(frame.columns) > 10 else [])
        raise ConfigError(
            f"data.label_column: {config.label_column!r} is not a column of {path!r}; columns are {columns}"
        )
    if frame.empty:
        raise ConfigError(f"data.source: {path!r} holds no rows")
    labels_raw = frame.pop(config.label_column)
    missing = labels_raw.isna().to_numpy()
    if missing.any():
        raise ConfigError(f"data.source: {path!r}: label column {config.label_column!r} is empty or NaN at "
                          f"{where(int(missing.argmax()))}")
    if frame.shape[1] == 0:
        raise ConfigError(f"data.source: {path!r} has no feature columns besides {config.label_column!r}")
    for column in frame.columns:
        values = frame[column]
        if not pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
            numeric = pd.to_numeric(values, errors="coerce")
            bad = (numeric.isna() & values.notna()).to_numpy()
            first = int(bad.argmax()) if bad.any() else 0
            raise ConfigError(f"data.source: {path!r}: feature column {str(column)[:40]!r} is not numeric "
                              f"({str(values.iloc[first])[:40]!r} at {where(first)})")
        finite = np.isfinite(values.to_numpy(dtype=np.float64))
        if not finite.all():
            raise ConfigError(f"data.source: {path!r}: feature column {str(column)[:40]!r} is missing or not finite "
                              f"at {where(int((~finite).argmax()))}")
    classes = sorted(labels_raw.astype(str).unique())
    index = {c: i for i, c in enumerate(classes)}
    labels = labels_raw.astype(str).map(index).to_numpy(dtype=np.int64)
    features = frame.to_numpy(dtype=np.float32)
    if not np.isfinite(features).all():  # a float64 value beyond float32's range
        column, row = next((c, i) for c in range(features.shape[1]) for i in range(features.shape[0])
                           if not np.isfinite(features[i, c]))
        raise ConfigError(f"data.source: {path!r}: feature column {str(frame.columns[column])[:40]!r} is out of "
                          f"float32 range at {where(row)}")
    return features, labels, classes


def _read_table(path: str):
    """The CSV/Parquet file as a DataFrame; an unreadable file is a one-line ConfigError naming it."""
    import pandas as pd

    try:
        if path.endswith(".csv"):
            return pd.read_csv(path)
        if path.endswith(".parquet"):
            return pd.read_parquet(path)
    except pd.errors.EmptyDataError:
        raise ConfigError(f"data.source: {path!r} is empty (no header line)") from None
    except (ValueError, OSError, ImportError) as error:  # a parse error, a damaged Parquet file, no pyarrow
        detail = " ".join(str(error).split())[:200]
        raise ConfigError(f"data.source: {path!r} cannot be read: {detail}") from None
    raise ConfigError(f"data.source: {path!r} must end in .csv or .parquet")


def _row_in(path: str, index: int) -> str:
    """Where a 0-based data row is, for a person opening the file (a CSV's line counts its header)."""
    return f"row {index + 1} (line {index + 2})" if path.endswith(".csv") else f"row {index + 1}"


def source_files(path: str) -> list[str]:
    """The files a source stands for: the file itself, or a folder's shards in the order they are read."""
    if not os.path.isdir(path):
        return [path]
    shards, suffixes = [], set()
    for name in sorted(os.listdir(path)):
        if name.startswith((".", "_")):
            continue
        full = os.path.join(path, name)
        suffix = os.path.splitext(name)[1].lower()
        if not os.path.isfile(full) or suffix not in (".csv", ".parquet"):
            raise ConfigError(f"data.source: folder {path!r} holds {name!r}; expected only .csv or .parquet shards "
                              "(names starting with '.' or '_' are skipped)")
        shards.append(full)
        suffixes.add(suffix)
    if not shards:
        raise ConfigError(f"data.source: folder {path!r} holds no .csv or .parquet file")
    if len(suffixes) > 1:
        raise ConfigError(f"data.source: folder {path!r} mixes .csv and .parquet shards; expected one format")
    return shards


def _read_source(path: str):
    """The source as one DataFrame, and a function naming where its 0-based row ``i`` is (shard, row, line)."""
    shards = source_files(path)
    if len(shards) == 1 and shards[0] == path:
        return _read_table(path), lambda i: _row_in(path, i)
    import pandas as pd

    frames, starts = [], []
    for shard in shards:
        frame = _read_table(shard)
        if frames and list(frame.columns) != list(frames[0].columns):
            raise ConfigError(f"data.source: shard {os.path.basename(shard)!r} has columns "
                              f"{[str(c)[:40] for c in frame.columns[:10]]}, expected those of "
                              f"{os.path.basename(shards[0])!r}: {[str(c)[:40] for c in frames[0].columns[:10]]}")
        starts.append(sum(len(f) for f in frames))
        frames.append(frame)

    def locate(index: int) -> str:
        n = max(k for k, start in enumerate(starts) if start <= index)
        return f"{os.path.basename(shards[n])} {_row_in(shards[n], index - starts[n])}"

    return pd.concat(frames, ignore_index=True), locate


def split(features: np.ndarray, labels: np.ndarray, config: DataConfig) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A stratified train / val / test split with a fixed seed."""
    from sklearn.model_selection import train_test_split

    n = len(labels)
    n_classes = len(np.unique(labels))
    min_needed = max(10, 3 * n_classes)
    if n < min_needed:
        raise ConfigError(f"data.source: {n} examples are too few to split (need at least {min_needed})")
    stratify = labels if np.bincount(labels).min() >= 3 else None
    rest_x, test_x, rest_y, test_y = train_test_split(
        features, labels, test_size=config.test_fraction, random_state=config.split_seed, stratify=stratify
    )
    val_share = config.val_fraction / (1 - config.test_fraction)
    stratify_rest = rest_y if stratify is not None else None
    train_x, val_x, train_y, val_y = train_test_split(
        rest_x, rest_y, test_size=val_share, random_state=config.split_seed, stratify=stratify_rest
    )
    return {"train": (train_x, train_y), "val": (val_x, val_y), "test": (test_x, test_y)}


def write_splits(splits: dict[str, tuple[np.ndarray, np.ndarray]], classes: list[str], out_dir: str) -> None:
    """Write ``<split>.npz`` files and meta.json into ``out_dir`` (replaced as a whole, never half-written)."""
    tmp = out_dir.rstrip("/") + ".tmp"
    if os.path.exists(tmp):
        import shutil

        shutil.rmtree(tmp)
    os.makedirs(tmp)
    train_x = splits["train"][0]
    mean = train_x.mean(axis=0)
    std = train_x.std(axis=0)
    std[std == 0] = 1.0
    for name, (x, y) in splits.items():
        np.savez(os.path.join(tmp, f"{name}.npz"), x=((x - mean) / std).astype(np.float32), y=y.astype(np.int64))
    meta = {
        "n_features": int(train_x.shape[1]),
        "n_classes": len(classes),
        "classes": classes,
        "sizes": {k: int(len(v[1])) for k, v in splits.items()},
    }
    meta["split_hashes"] = split_hashes(tmp)
    with open(os.path.join(tmp, META), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    _replace_dir(tmp, out_dir)


def array_hash(x: np.ndarray, y: np.ndarray) -> str:
    """``sha256:`` of a split's content: the features as float32 then the labels as int64, both C-order bytes.

    The content, not the .npz file: numpy stamps the archive members with the time they were written.
    """
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(x, dtype=np.float32).tobytes())
    digest.update(np.ascontiguousarray(y, dtype=np.int64).tobytes())
    return "sha256:" + digest.hexdigest()


def split_hashes(data_dir: str) -> dict[str, str]:
    """The content hash of each split in ``data_dir`` (computed once, at prepare, and kept in meta.json)."""
    hashes = {}
    for name in SPLITS:
        with np.load(os.path.join(data_dir, f"{name}.npz"), allow_pickle=False) as data:
            hashes[name] = array_hash(data["x"], data["y"])
    return hashes


def _replace_dir(tmp: str, final: str) -> None:
    import shutil

    if os.path.exists(final):
        old = final.rstrip("/") + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.makedirs(os.path.dirname(os.path.abspath(final)), exist_ok=True)
        os.rename(tmp, final)


def read_meta(data_dir: str) -> dict:
    path = os.path.join(data_dir, META)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: run the prepare stage first")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class ArrayDataset(torch.utils.data.Dataset):
    """Dict samples ``{"x", "labels"}`` over in-memory tensors; ``__getitems__`` fetches a batch at once."""

    def __init__(self, x: np.ndarray, y: np.ndarray):
        self.x = torch.from_numpy(np.ascontiguousarray(x))
        self.y = torch.from_numpy(np.ascontiguousarray(y))

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        index = torch.as_tensor(indices)
        return {"x": self.x[index], "labels": self.y[index]}


def load_split(data_dir: str, name: str) -> ArrayDataset:
    path = os.path.join(data_dir, f"{name}.npz")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: run the prepare stage first")
    with np.load(path, allow_pickle=False) as data:
        return ArrayDataset(data["x"], data["y"])
