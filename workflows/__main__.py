"""Command line: ``python -m workflows {prepare,train,evaluate,run}`` — the DVC stages and the default job.

Every failure is one line on stderr, ``error: …``: exit status 2 for a config or data error (the input must change),
1 for a runtime error (a full disk, a read-only or forbidden output path, training that diverged, anything else).
``FLYTRAIN_DEBUG=1`` also prints the traceback.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import shutil
import sys
import time
import traceback
from typing import TYPE_CHECKING

from .config import ConfigError, PipelineConfig

if TYPE_CHECKING:
    from .interrupts import Interrupted, StepWatch

#: most characters of an error message shown (a message may quote a long value)
MAX_ERROR_CHARS = 500


def _config(args: argparse.Namespace) -> PipelineConfig:
    if args.params:
        return PipelineConfig.load(args.params)
    return PipelineConfig()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workflows", description=__doc__)
    parser.add_argument("--params", help="params.yaml (the whole config); defaults to the embedded digits job")
    sub = parser.add_subparsers(dest="stage", required=True)
    p = sub.add_parser("prepare", help="load and split the data")
    p.add_argument("--data-dir", default="data/prepared")
    t = sub.add_parser("train", help="train (resuming from the newest checkpoint of the same config)")
    t.add_argument("--data-dir", default="data/prepared")
    t.add_argument("--checkpoint-dir", default="checkpoints")
    t.add_argument("--model-dir", default="models/model")
    t.add_argument("--metrics-file", help="also copy the train summary (train_metrics.json) here, e.g. a DVC metric")
    t.add_argument("--dvclive-dir", help="also log with DVCLive into this folder (the DVC stage's declared output)")
    t.add_argument("--resume-from", metavar="CHECKPOINT",
                   help="start from this checkpoint folder (refused when it belongs to another run)")
    t.add_argument("--ignore-fingerprint", action="store_true",
                   help="with --resume-from: fine-tune from another run's checkpoint (the config's settings win)")
    e = sub.add_parser("evaluate", help="test-set metrics, confusion matrix and curves")
    e.add_argument("--data-dir", default="data/prepared")
    e.add_argument("--model-dir", default="models/model")
    e.add_argument("--out-dir", default="metrics")
    r = sub.add_parser("run", help="the whole pipeline in one folder")
    r.add_argument("--workdir", default="outputs")
    q = sub.add_parser("queue-search", help="queue one `dvc exp run --queue -S ...` per trial of params.yaml's search")
    q.add_argument("--dry-run", action="store_true", help="print the dvc commands without running them")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = _config(args)  # before importing torch (interrupts, pipeline): a bad params.yaml fails at once
    except Exception as error:
        return _fail(error, args)
    from .interrupts import Interrupted, StepWatch, raise_on_interrupt_signals

    restore_signals = raise_on_interrupt_signals()
    watch = StepWatch()
    try:
        if args.stage == "queue-search":
            return _queue_search(args)
        from . import pipeline

        started = time.time()
        if args.stage == "prepare":
            meta = pipeline.prepare(config, args.data_dir)
            print(json.dumps(meta["sizes"]))
        elif args.stage == "train":
            if args.ignore_fingerprint and not args.resume_from:
                raise ConfigError("--ignore-fingerprint needs --resume-from CHECKPOINT")
            live, overrides = _dvclive(config, args.dvclive_dir)
            result = pipeline.train(config, args.data_dir, args.checkpoint_dir, args.model_dir,
                                    resume=args.resume_from or True, ignore_fingerprint=args.ignore_fingerprint,
                                    callbacks=[watch, *live], **overrides)
            if args.metrics_file:
                os.makedirs(os.path.dirname(os.path.abspath(args.metrics_file)), exist_ok=True)
                shutil.copyfile(os.path.join(args.model_dir, "train_metrics.json"), args.metrics_file)
            print(json.dumps(result))
        elif args.stage == "evaluate":
            metrics = pipeline.evaluate(config, args.data_dir, args.model_dir, args.out_dir)
            print(json.dumps(metrics))
        else:
            metrics = pipeline.run(config, args.workdir, callbacks=[watch])
            print(f"test accuracy: {metrics['test_accuracy']:.4f} ({time.time() - started:.1f} s)")
    except Interrupted as stop:
        return _report_interruption(stop, args, watch)
    except Exception as error:
        return _fail(error, args)
    finally:
        restore_signals()
    return 0


def _fail(error: Exception, args: argparse.Namespace) -> int:
    """Print the one ``error:`` line (and the traceback with FLYTRAIN_DEBUG=1); the exit status."""
    status, message = describe_error(error, _outputs(args))
    if os.environ.get("FLYTRAIN_DEBUG", "").strip().lower() in ("1", "true", "yes", "on"):
        traceback.print_exc()
    print(f"error: {message}", file=sys.stderr)
    return status


def _dvclive(config: PipelineConfig, live_dir: str | None) -> tuple[list, dict]:
    if not live_dir:
        return [], {}
    from .dvc_stage import dvclive_setup

    return dvclive_setup(config, live_dir)


def _report_interruption(stop: Interrupted, args: argparse.Namespace, watch: StepWatch) -> int:
    """A Ctrl-C or SIGTERM: one line saying where training stopped and what was kept; exit status 128 + signal."""
    from .interrupts import interrupted_notice

    checkpoint_dir = {"train": getattr(args, "checkpoint_dir", None),
                      "run": os.path.join(getattr(args, "workdir", ""), "checkpoints")}.get(args.stage)
    if args.stage in ("train", "run"):
        message = interrupted_notice(watch, checkpoint_dir)
    else:
        message = f"interrupted during {args.stage}; run the same command to start it again"
    print(message, file=sys.stderr, flush=True)
    return stop.exit_status


def _queue_search(args: argparse.Namespace) -> int:
    """Materialise the search space as a DVC experiment queue (`dvc queue start` runs it)."""
    import shlex
    import subprocess
    import tempfile

    from . import search as study_file
    from .config import SearchConfig

    search = SearchConfig.load(args.params) if args.params else SearchConfig()
    with tempfile.TemporaryDirectory() as tmp:
        commands = study_file.dvc_queue_commands(search, os.path.join(tmp, "study.log"))
    for command in commands:
        print(shlex.join(command))
        if not args.dry_run:
            done = subprocess.run(command, stdout=subprocess.DEVNULL)
            if done.returncode != 0:
                print(f"error: {shlex.join(command)} exited {done.returncode}", file=sys.stderr)
                return 1
    if not args.dry_run:
        order = "desc" if search.direction == "maximize" else "asc"
        print(f"queued {len(commands)} experiments: run them with `dvc queue start -j 1`, then "
              f"`dvc exp show --sort-by metrics/train.json:{search.metric} --sort-order {order}`")
    return 0


def _outputs(args: argparse.Namespace) -> list[str]:
    """The folders and files this stage writes, named when an OS error does not say which path failed."""
    names = ("data_dir", "checkpoint_dir", "model_dir", "out_dir", "metrics_file", "workdir")
    written = {"prepare": {"data_dir"}, "train": {"checkpoint_dir", "model_dir", "metrics_file"},
               "evaluate": {"out_dir"}, "run": {"workdir"}}.get(args.stage, set())
    return [getattr(args, n) for n in names if n in written and getattr(args, n, None)]


def _non_finite_loss_error() -> type | None:
    """trainer_lib's error for a loss or gradient norm that became NaN/Inf, where this version has one."""
    import trainer_lib

    error_type = getattr(trainer_lib, "NonFiniteLossError", None)
    return error_type if isinstance(error_type, type) else None


def describe_error(error: BaseException, outputs: list[str]) -> tuple[int, str]:
    """(exit status, one-line message) for an error of a stage; secrets in the message are masked."""
    diverged = _non_finite_loss_error() if "trainer_lib" in sys.modules else None
    locked = getattr(sys.modules.get("trainer_lib.identity"), "RunLockedError", None)
    if isinstance(locked, type) and isinstance(error, locked):  # another training holds the folder: untouched
        status, message = 3, str(error)
    elif diverged is not None and isinstance(error, diverged):
        status, message = 1, str(error)
    elif isinstance(error, FileNotFoundError):  # an input that is not there: the command must change
        status, message = 2, str(error) if error.filename is None else f"{error.filename}: {error.strerror}"
    elif isinstance(error, OSError) and error.errno is not None:
        code = errno.errorcode.get(error.errno, str(error.errno))
        paths = [p for p in (error.filename, error.filename2) if p]
        where = " -> ".join(map(str, paths)) if paths else f"writing {', '.join(outputs) or 'the outputs'}"
        status, message = 1, f"{where}: {error.strerror or error} [{code}]"
    elif isinstance(error, (ConfigError, ValueError)):
        status, message = 2, str(error)
    else:
        status, message = 1, f"{type(error).__name__}: {error}"
    # importing trainer_lib loads torch (seconds): a config error, reported before that, is masked only when it can
    # hold a secret at all (a URL); any later error is also checked for secret environment values
    if "trainer_lib" in sys.modules or "://" in message:
        from trainer_lib.redaction import redact_text

        message = redact_text(message)
    message = " ".join(message.split()) or type(error).__name__
    if len(message) > MAX_ERROR_CHARS:
        message = message[: MAX_ERROR_CHARS - 3] + "..."
    return status, message


if __name__ == "__main__":
    sys.exit(main())
