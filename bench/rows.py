"""Benchmark rows beyond the core loop: checkpoint stall, resume cost, import cost, evaluation throughput."""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from trainer_lib import Trainer, TrainerCallback, TrainingArguments, set_seed

from .core import BATCH, digits_dataset, new_model, paired


class _Wide(torch.nn.Module):
    """About 25M parameters: big enough that writing a checkpoint takes real time."""

    def __init__(self):
        super().__init__()
        self.config = {"kind": "wide"}
        self.net = torch.nn.Sequential(
            torch.nn.Linear(64, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 4096), torch.nn.ReLU(),
            torch.nn.Linear(4096, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 2048), torch.nn.ReLU(),
            torch.nn.Linear(2048, 10),
        )

    def forward(self, x, labels=None):
        logits = self.net(x)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = torch.nn.functional.cross_entropy(logits, labels)
        return out


class _StepClock(TrainerCallback):
    """Wall time of every training step, the save that follows it included."""

    def __init__(self):
        self.marks: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.marks.append(time.perf_counter())

    def on_train_end(self, args, state, control, **kwargs):
        self.marks.append(time.perf_counter())

    def durations(self) -> list[float]:
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def _wide_run(steps: int, save_every: int | None, asynchronous: bool) -> list[float]:
    set_seed(0)
    clock = _StepClock()
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as out:
        args = TrainingArguments(
            output_dir=out, max_steps=steps, per_device_train_batch_size=BATCH, learning_rate=1e-4,
            lr_scheduler_type="constant", logging_steps=10_000, eval_strategy="no", disable_tqdm=True,
            save_strategy="steps" if save_every else "no", save_steps=save_every or 500, save_total_limit=2,
            async_checkpointing=asynchronous,
        )
        trainer = Trainer(_Wide(), args, train_dataset=digits_dataset(), callbacks=[clock])
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
            trainer.train()
    return clock.durations()


def _excess(durations: list[float]) -> float:
    """Seconds spent above the run's own median step time (slow steps: saves, and noise)."""
    median = statistics.median(durations)
    return sum(max(0.0, d - median) for d in durations)


def checkpoint_stall(steps: int = 200, save_every: int = 50, repeats: int = 5) -> dict[str, float]:
    """Training time lost per checkpoint: the time steps spend above their median in a run with checkpoints,
    minus the same in an adjacent run without (the noise floor); background writer vs synchronous save.

    The three runs of a repeat go in a rotating order (each run type goes first, second and third equally often),
    so a drift within a repeat favours none. Losses are reported as measured: a negative one means the checkpoint
    cost less than the run-to-run noise, and it is not clipped on either side.
    """
    n = steps // save_every
    _wide_run(20, None, False)  # warm-up
    runs = {
        "floor": lambda: _excess(_wide_run(steps, None, False)),
        "sync": lambda: _excess(_wide_run(steps, save_every, False)),
        "async": lambda: _excess(_wide_run(steps, save_every, True)),
    }
    order = list(runs)
    lost_sync, lost_async = [], []
    for i in range(repeats):
        rotated = order[i % 3:] + order[: i % 3]
        if (i // 3) % 2:
            rotated.reverse()  # after three rotations, the reverse ones: every pair of run types swaps places too
        excess = {name: runs[name]() for name in rotated}
        lost_sync.append((excess["sync"] - excess["floor"]) / n)
        lost_async.append((excess["async"] - excess["floor"]) / n)
    ls, la = statistics.median(lost_sync), statistics.median(lost_async)
    params = sum(p.numel() for p in _Wide().parameters())
    return {"params": params, "lost_sync_s": ls, "lost_async_s": la, "ratio": la / ls if ls > 0 else float("nan")}


_FIRST_STEP = r"""
import os, sys, time
from bench.core import BATCH, digits_dataset, new_model
from trainer_lib import Trainer, TrainerCallback, TrainingArguments

class FirstStep(TrainerCallback):
    def on_optimizer_step(self, args, state, control, **kwargs):
        print("first-step", time.time() - float(os.environ["BENCH_T0"]), flush=True)
        control.should_training_stop = True

args = TrainingArguments(output_dir=sys.argv[1], num_train_epochs=3, per_device_train_batch_size=BATCH,
                         learning_rate=1e-3, save_strategy="no", logging_steps=10_000, disable_tqdm=True)
trainer = Trainer(new_model(), args, train_dataset=digits_dataset(), callbacks=[FirstStep()])
trainer.train(resume_from_checkpoint=sys.argv[2] if len(sys.argv) > 2 else None)
"""


def _time_to_first_step(out: str, resume: str | None) -> float:
    """Seconds from launching a training process to its first optimizer step (what a restarted job waits)."""
    env = dict(os.environ, BENCH_T0=repr(time.time()))
    argv = [sys.executable, "-c", _FIRST_STEP, out] + ([resume] if resume else [])
    done = subprocess.run(argv, capture_output=True, text=True, check=True, env=env,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return float(next(line for line in done.stdout.splitlines() if line.startswith("first-step")).split()[1])


def resume_cost(repeats: int = 5) -> dict[str, float]:
    """Launch-to-first-optimizer-step resuming mid-epoch (step 70; 57 steps per epoch) against a fresh start."""
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, max_steps=70, per_device_train_batch_size=BATCH, save_steps=70,
                                 learning_rate=1e-3, logging_steps=10_000, disable_tqdm=True)
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
            Trainer(new_model(), args, train_dataset=digits_dataset()).train()
        ckpt = os.path.join(out, "checkpoint-70")
        with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
            r = paired(lambda: _time_to_first_step(a, None), lambda: _time_to_first_step(b, ckpt), repeats)
    return {"fresh_s": r["a"], "resume_s": r["b"], "ratio": r["ratio"]}


def import_cost(repeats: int = 7) -> dict[str, float]:
    """Seconds that ``from trainer_lib import Trainer`` and ``import callbacks`` add after ``import torch`` (fresh
    interpreters; trainer_lib's names load on first use, so the Trainer is what a user's import costs)."""
    code = ("import time, torch; t = time.perf_counter(); from trainer_lib import Trainer; import callbacks; "
            "print(time.perf_counter() - t)")
    times = [float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
             for _ in range(repeats)]
    return {"seconds": statistics.median(times)}


def eval_throughput(repeats: int = 9, passes: int = 100) -> dict[str, float]:
    """Trainer.evaluate against a hand-written torch.inference_mode() loop over the same batches."""
    dataset = digits_dataset()
    model = new_model()
    model.eval()
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_eval_batch_size=256, disable_tqdm=True)
        trainer = Trainer(model, args, eval_dataset=dataset,
                          compute_metrics=lambda p: {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())})
        trainer.pop_callback(trainer.callback_handler.callbacks[-1])  # no printing in a timing loop
        loader = torch.utils.data.DataLoader(dataset, batch_size=256, collate_fn=lambda b: b)

        def hand() -> float:
            start = time.perf_counter()
            for _ in range(passes):
                logits, labels, loss_sum = [], [], 0.0
                with torch.inference_mode():
                    for batch in loader:
                        out_ = model(**batch)
                        loss_sum += out_["loss"].item() * len(batch["labels"])
                        logits.append(out_["logits"])
                        labels.append(batch["labels"])
                preds = torch.cat(logits).numpy()
                _ = float((preds.argmax(-1) == torch.cat(labels).numpy()).mean())
            return passes * len(dataset) / (time.perf_counter() - start)

        def ours() -> float:
            start = time.perf_counter()
            for _ in range(passes):
                trainer.evaluate()
            return passes * len(dataset) / (time.perf_counter() - start)

        hand(), ours()
        r = paired(hand, ours, repeats)
    return {"hand_samples_per_s": r["a"], "trainer_samples_per_s": r["b"], "ratio": r["ratio"]}
