"""R4: bad inputs, each must give a one-line error naming the field, exit non-zero and change no existing output."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from unittest import mock

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: (case, params.yaml content or None, extra CLI stage args, the words the error must contain)
CLI_CASES: list[tuple[str, object, str]] = [
    ("misspelt training key", {"training": {"learnig_rate": 0.01}}, "training.learnig_rate"),
    ("misspelt section", {"trainig": {}}, "trainig"),
    ("unknown model key", {"model": {"layers": 3}}, "model.layers"),
    ("string for an integer", {"training": {"per_device_train_batch_size": "32"}}, "per_device_train_batch_size"),
    ("zero batch size", {"training": {"per_device_train_batch_size": 0}}, "per_device_train_batch_size"),
    ("negative learning rate", {"training": {"learning_rate": -0.1}}, "learning_rate"),
    ("zero epochs", {"training": {"num_train_epochs": 0}}, "num_train_epochs"),
    ("float max_steps", {"training": {"max_steps": 2.5}}, "max_steps"),
    ("zero gradient accumulation", {"training": {"gradient_accumulation_steps": 0}}, "gradient_accumulation_steps"),
    ("negative warmup", {"training": {"warmup_steps": -1}}, "warmup_steps"),
    ("unknown scheduler", {"training": {"lr_scheduler_type": "cosinus"}}, "lr_scheduler_type"),
    ("unknown eval strategy", {"training": {"eval_strategy": "sometimes"}}, "eval_strategy"),
    ("report_to typo", {"training": {"report_to": ["mlfow"]}}, "mlfow"),
    ("report_to not a list", {"training": {"report_to": "mlflow"}}, "training.report_to"),
    ("metric no evaluation produces", {"training": {"metric_for_best_model": "f1"}}, "metric_for_best_model"),
    ("early stopping without evaluation", {"training": {"early_stopping_patience": 2, "eval_strategy": "no"}},
     "early_stopping_patience"),
    ("best checkpoints without a metric", {"training": {"save_strategy": "best", "metric_for_best_model": None}},
     "save_strategy"),
    ("dropout out of range", {"model": {"dropout": 1.5}}, "model.dropout"),
    ("empty hidden sizes", {"model": {"hidden_sizes": []}}, "model.hidden_sizes"),
    ("test fraction too large", {"data": {"test_fraction": 0.9}}, "data.test_fraction"),
    ("missing data file", {"data": {"source": "no/such/file.csv"}}, "no/such/file.csv"),
    ("CSV without the label column", {"data": {"source": "@nolabel.csv", "label_column": "target"}}, "label_column"),
    ("empty CSV", {"data": {"source": "@empty.csv"}}, "empty.csv"),
    ("unsupported data format", {"data": {"source": "@data.xlsx"}}, ".csv or .parquet"),
    ("infinite warmup", {"training": {"warmup_steps": float("inf")}}, "training.warmup_steps: expected a finite"),
    ("infinite epochs", {"training": {"num_train_epochs": float("inf")}}, "training.num_train_epochs"),
    ("NaN learning rate", {"training": {"learning_rate": float("nan")}}, "training.learning_rate"),
    ("integer beyond float range for a float", {"model": {"dropout": 10**400}}, "model.dropout"),
    ("huge seed", {"training": {"seed": 10**20}}, "training.seed"),
    ("negative seed", {"training": {"seed": -1}}, "training.seed"),
    ("huge split_seed", {"data": {"split_seed": 2**32}}, "data.split_seed"),
    ("CSV with a text feature column", {"data": {"source": "@text.csv"}},
     "feature column 'b' is not numeric ('abc' at row 25 (line 26))"),
    ("CSV with a missing label", {"data": {"source": "@nolabels.csv"}}, "label column 'label' is empty or NaN at row 25"),
    ("CSV with a missing feature value", {"data": {"source": "@nanfeature.csv"}},
     "feature column 'a' is missing or not finite at row 25"),
    ("zero-byte CSV", {"data": {"source": "@zero.csv"}}, "zero.csv' is empty"),
    ("Parquet without the label column", {"data": {"source": "@nolabel.parquet", "label_column": "y"}},
     "data.label_column: 'y'"),
    ("params file is a list", ["not", "a", "mapping"], "mapping"),
    ("params file is not YAML", "training: [unclosed", "YAML"),
    ("missing params file", None, "does not exist"),
]


def _tree_digest(path: str) -> str:
    h = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            h.update(full.encode())
            with open(full, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def _existing_run(work: str) -> dict[str, str]:
    """A finished small run whose folders must not change when a bad input is rejected."""
    from workflows import pipeline
    from workflows.config import PipelineConfig

    cfg = PipelineConfig.from_dict({"training": {"max_steps": 6, "save_steps": 3, "save_strategy": "steps",
                                                 "eval_strategy": "no", "logging_steps": 3}})
    dirs = {"data": os.path.join(work, "data"), "ckpt": os.path.join(work, "checkpoints"),
            "model": os.path.join(work, "model"), "metrics": os.path.join(work, "metrics")}
    with contextlib.redirect_stdout(io.StringIO()):
        pipeline.prepare(cfg, dirs["data"])
        pipeline.train(cfg, dirs["data"], dirs["ckpt"], dirs["model"])
        pipeline.evaluate(cfg, dirs["data"], dirs["model"], dirs["metrics"])
    return dirs


def _materialise(work: str, value):
    """Write the case's params.yaml; "@name" data sources become real bad files."""
    if isinstance(value, dict) and isinstance(value.get("data", {}).get("source"), str):
        source = value["data"]["source"]
        if source.startswith("@"):
            path = os.path.join(work, source[1:])
            good = "1,2,x\n3,4,y\n" * 12  # 24 good rows, then the bad one (data row 25, line 26)
            if source == "@nolabel.parquet":
                import pandas as pd

                pd.DataFrame({"a": [1.0, 2.0] * 12, "label": ["x", "y"] * 12}).to_parquet(path)
            else:
                with open(path, "w") as f:
                    f.write({"@nolabel.csv": "a,b,label\n1,2,x\n3,4,y\n" * 20, "@empty.csv": "a,b,label\n",
                             "@text.csv": "a,b,label\n" + good + "5,abc,x\n" + good,
                             "@nolabels.csv": "a,b,label\n" + good + "5,6,\n" + good,
                             "@nanfeature.csv": "a,b,label\n" + good + ",6,x\n" + good,
                             "@zero.csv": ""}.get(source, "junk"))
            value = {**value, "data": {**value["data"], "source": path}}
    params = os.path.join(work, "params.yaml")
    if value is None:
        return os.path.join(work, "missing.yaml")
    with open(params, "w") as f:
        f.write(value if isinstance(value, str) else yaml.safe_dump(value))
    return params


#: 340 bytes of YAML whose aliases expand to 9**9 strings under a key the schema checks (data.source): before
#: loading was bounded, formatting that value for the error message took minutes
ALIAS_BOMB = "data:\n source:\n" + "".join(
    f"  {name}: &{name} [{','.join(['x' if i == 0 else '*' + chr(ord(name) - 1)] * 9)}]\n"
    for i, name in enumerate("abcdefghi"))


def _stage_process(argv: list[str], env: dict[str, str] | None = None, timeout: float = 120,
                   prefix: tuple[str, ...] = ()) -> tuple[int, str]:
    """``python -m workflows ARGV`` as DVC runs it (after ``prefix``, e.g. a user switch): (exit status, stderr)."""
    proc = subprocess.run([*prefix, sys.executable, "-m", "workflows", *argv], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": ROOT, **(env or {})}, cwd=ROOT)
    return proc.returncode, proc.stderr


def alias_bomb_trial() -> tuple[str, bool, str]:
    """The bomb through a real ``python -m workflows`` process: refused with one line, not after minutes.

    The acceptance bound is 2 s; the check is the process finishing within a generous 30 s with the bounded-loading
    error (a regression formats the expanded value and runs into the timeout)."""
    with tempfile.TemporaryDirectory() as work:
        params = os.path.join(work, "params.yaml")
        with open(params, "w") as f:
            f.write(ALIAS_BOMB)
        try:
            code, err = _stage_process(["--params", params, "prepare", "--data-dir", os.path.join(work, "d")],
                                       timeout=30)
        except subprocess.TimeoutExpired:
            return (f"YAML alias bomb ({len(ALIAS_BOMB)} bytes)", False, "still running after 30 s")
    lines = err.strip().splitlines()
    held = code == 2 and len(lines) == 1 and "alias" in lines[0] and len(lines[0]) < 300
    return (f"YAML alias bomb ({len(ALIAS_BOMB)} bytes)", held, f"rc={code}: {err.strip()[-300:]!r}")


@contextlib.contextmanager
def _tmpfs(path: str, options: str) -> Iterator[bool]:
    """A small tmpfs mounted at ``path`` (True), or False where mounting is not permitted."""
    os.makedirs(path, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", path], capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", path], capture_output=True)


def _unprivileged() -> tuple[str, ...] | None:
    """A command prefix that runs as a non-root user: none needed when we are not root; as root ``setpriv`` to
    nobody, keeping only CAP_DAC_READ_SEARCH (it reads and searches, never writes: the interpreter may live under
    a 0700 /root), else ``runuser -u nobody``; None when neither exists."""
    if os.geteuid() != 0:
        return ()
    if shutil.which("setpriv"):
        caps = "-all,+dac_read_search"
        return ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", f"--inh-caps={caps}",
                f"--ambient-caps={caps}", f"--bounding-set={caps}")
    if shutil.which("runuser"):
        return ("runuser", "-u", "nobody", "--")
    return None


def _forbidden_output_trial(work: str) -> tuple[str, int, str, str] | None:
    """``python -m workflows run`` as a non-root user into a folder it may not write (EACCES), real process:
    (case, exit status, stderr, the path the line must name); None where no user switch exists."""
    prefix = _unprivileged()
    if prefix is None:
        return None
    os.chmod(work, 0o755)  # the other user walks into the temporary folder ...
    home, locked = os.path.join(work, "home"), os.path.join(work, "locked")
    os.makedirs(home)
    os.chmod(home, 0o777)  # ... and keeps its HOME (flytekit's config, caches) and temporary files there
    os.makedirs(locked, mode=0o555)
    os.chmod(locked, 0o555)
    out = os.path.join(locked, "out")
    code, err = _stage_process(["run", "--workdir", out], {"HOME": home, "TMPDIR": home}, prefix=prefix)
    os.chmod(locked, 0o755)  # the cleanup may remove it again
    return "unwritable output folder as a non-root user (EACCES), real process", code, err, out


def runtime_error_trials() -> list[tuple[str, bool, str]]:
    """Runtime errors of the stage CLI: exit 1 with one line naming the path and the errno; no traceback unless
    FLYTRAIN_DEBUG=1. The read-only and full-disk cases need ``mount`` (root); where it is refused they are left out;
    the forbidden-folder case runs as a non-root user (left out only where no user switch exists).
    """
    from workflows.__main__ import main

    def in_process(argv: list[str], debug: bool = False) -> tuple[int, str]:
        err = io.StringIO()
        with mock.patch.dict(os.environ, {"FLYTRAIN_DEBUG": "1" if debug else ""}), \
                contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(argv)
        return code, err.getvalue()

    def verdict(case: str, code: int, err: str, needles: tuple[str, ...]) -> tuple[str, bool, str]:
        lines = err.strip().splitlines()
        held = (code == 1 and len(lines) == 1 and lines[0].startswith("error: ")
                and all(n in lines[0] for n in needles))
        return (case, held, lines[0][:200] if held else f"rc={code}: {err.strip()[-400:]!r}")

    results = []
    with tempfile.TemporaryDirectory() as work:
        a_file = os.path.join(work, "a-file")
        open(a_file, "w").close()
        target = os.path.join(a_file, "data")
        code, err = _stage_process(["prepare", "--data-dir", target])
        # ENOTDIR, or EEXIST where the stage creates the parent folder first: either names the file in the way
        results.append(verdict("output folder under a regular file (ENOTDIR), real process", code, err,
                               (a_file, "File exists [EEXIST]" if "[EEXIST]" in err else "[ENOTDIR]")))
        code, err = in_process(["prepare", "--data-dir", target], debug=True)
        shows = code == 1 and "Traceback" in err and err.strip().splitlines()[-1].startswith("error: ")
        results.append(("FLYTRAIN_DEBUG=1 adds the traceback", shows, f"rc={code}, {len(err.splitlines())} lines"))
        import trainer_lib

        if hasattr(trainer_lib, "NonFiniteLossError"):  # training stops on a non-finite loss (issue 12)
            data, params = os.path.join(work, "data"), os.path.join(work, "diverge.yaml")
            with open(params, "w") as f:
                yaml.safe_dump({"training": {"max_steps": 6, "learning_rate": 1e30, "eval_strategy": "no",
                                             "save_strategy": "no", "logging_steps": 1}}, f)
            code, err = in_process(["--params", params, "prepare", "--data-dir", data])
            code, err = in_process(["--params", params, "train", "--data-dir", data, "--checkpoint-dir",
                                    os.path.join(work, "ck"), "--model-dir", os.path.join(work, "model")])
            results.append(verdict("training that diverges (learning_rate 1e30)", code, err, ("step",)))
        forbidden = _forbidden_output_trial(work)
        if forbidden is not None:
            case, code, err, out = forbidden
            row = verdict(case, code, err, (out, "Permission denied [EACCES]"))
            results.append(row if not os.path.exists(out) else (case, False, f"{out} was created"))
        with _tmpfs(os.path.join(work, "ro"), "ro,size=64k") as mounted:
            if mounted:
                code, err = in_process(["prepare", "--data-dir", os.path.join(work, "ro", "data")])
                results.append(verdict("read-only output file system (EROFS)", code, err,
                                       (os.path.join(work, "ro"), "[EROFS]")))
        with _tmpfs(os.path.join(work, "full"), "size=64k") as mounted:
            if mounted:
                data = os.path.join(work, "full", "data")
                code, err = in_process(["prepare", "--data-dir", data])
                results.append(verdict("full disk (ENOSPC, 64 KiB tmpfs)", code, err, (data, "[ENOSPC]")))
    return results


def cli_trials(run_cli: Callable[[list[str]], tuple[int, str]] | None = None) -> list[tuple[str, bool, str]]:
    """Each case through ``python -m workflows`` stages (in-process by default) against an existing run."""
    from workflows.__main__ import main

    def in_process(argv: list[str]) -> tuple[int, str]:
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(argv)
        return code, err.getvalue()

    run_cli = run_cli or in_process
    results = []
    with tempfile.TemporaryDirectory() as work:
        dirs = _existing_run(work)
        before = {k: _tree_digest(v) for k, v in dirs.items()}
        for case, value, needle in CLI_CASES:
            params = _materialise(work, value)
            stage = "prepare" if isinstance(value, dict) and "data" in value else "train"
            argv = ["--params", params, stage, "--data-dir", dirs["data"]]
            if stage == "train":
                argv += ["--checkpoint-dir", dirs["ckpt"], "--model-dir", dirs["model"]]
            code, err = run_cli(argv)
            lines = err.strip().splitlines()
            changed = [k for k, v in dirs.items() if _tree_digest(v) != before[k]]
            problems = []
            if code == 0:
                problems.append("exit code 0")
            if len(lines) != 1 or needle not in lines[0]:
                problems.append(f"error does not name {needle!r}: {err.strip()[-300:]!r}")
            if changed:
                problems.append(f"changed existing output {changed}")
            results.append((case, not problems, "; ".join(problems) or lines[0][:160]))
    return results


def api_trials() -> list[tuple[str, bool, str]]:
    """Bad inputs through the Python API: a ValueError (or KeyError) naming the field, before any output."""
    from tests.helpers import accuracy, digits, make_model
    from trainer_lib import EarlyStoppingCallback, Trainer, TrainingArguments

    train, evaluation = digits(64, 16)
    results = []
    with tempfile.TemporaryDirectory() as work:
        a_file = os.path.join(work, "file")
        open(a_file, "w").close()
        cases: list[tuple[str, Callable[[], object], str]] = [
            ("output_dir is a file", lambda: TrainingArguments(output_dir=a_file), "output_dir"),
            ("eval strategy without eval data",
             lambda: Trainer(make_model(), TrainingArguments(output_dir=work, eval_strategy="epoch"),
                             train_dataset=train).train(), "eval_dataset"),
            ("metric no evaluation produces",
             lambda: Trainer(make_model(), TrainingArguments(output_dir=os.path.join(work, "m"), max_steps=2,
                                                             eval_strategy="steps", eval_steps=1,
                                                             metric_for_best_model="f1", disable_tqdm=True),
                             train_dataset=train, eval_dataset=evaluation, compute_metrics=accuracy).train(),
             "metric_for_best_model"),
            ("early stopping without metric",
             lambda: Trainer(make_model(), TrainingArguments(output_dir=work, eval_strategy="epoch"),
                             train_dataset=train, eval_dataset=evaluation,
                             callbacks=[EarlyStoppingCallback()]).train(), "metric_for_best_model"),
            ("report_to typo", lambda: TrainingArguments(output_dir=work, report_to="tensorbord") and
             Trainer(make_model(), TrainingArguments(output_dir=work, report_to="tensorbord")), "tensorbord"),
            ("resume without checkpoints",
             lambda: Trainer(make_model(), TrainingArguments(output_dir=os.path.join(work, "none"), max_steps=2),
                             train_dataset=train).train(resume_from_checkpoint=True), "no valid checkpoint"),
            ("resume from a missing path",
             lambda: Trainer(make_model(), TrainingArguments(output_dir=work, max_steps=2),
                             train_dataset=train).train(resume_from_checkpoint=os.path.join(work, "nope")), "nope"),
        ]
        for case, call, needle in cases:
            try:
                call()
            except (ValueError, KeyError) as error:
                message = str(error)
                held = needle in message and "\n" not in message.strip()
                results.append((case, held, message[:160]))
            else:
                results.append((case, False, "no error"))
    return results
