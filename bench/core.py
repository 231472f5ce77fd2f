"""Trainer vs a hand-written PyTorch loop on identical work (digits MLP 64-256-256-10, batch 32, AdamW 1e-3,
constant LR, no clipping, no evaluation or checkpoints, logging every 50 steps, the same batches in the same order:
epoch ``e`` is the permutation seeded with ``SEED + e``, as the Trainer draws it).

Every side is timed the same way: from the start of its first epoch, before its first batch is loaded (data set,
model and optimizer already built: setup excluded) to the end of training (after the last log and every callback's ``on_train_end``).
"""

from __future__ import annotations

import ast
import contextlib
import fcntl
import io
import os
import pty
import statistics
import struct
import tempfile
import termios
import threading
import time

import numpy as np
import torch

from trainer_lib import Trainer, TrainerCallback, TrainingArguments, set_seed
from workflows.data import ArrayDataset
from workflows.models import MLPClassifier

BATCH, LR, LOG_EVERY, SEED = 32, 1e-3, 50, 42


def epoch_batches(size: int, epoch: int) -> list[list[int]]:
    """The batches of one epoch as a hand-written loop would draw them, in the Trainer's order. Identical work
    needs the same order: with another one the two sides follow other trajectories, and AdamW's step cost differed
    by ~2 % between them (how many of its moments are subnormal numbers), which is not the Trainer's overhead."""
    generator = torch.Generator()
    generator.manual_seed(SEED + epoch)
    order = torch.randperm(size, generator=generator).tolist()
    return [order[i : i + BATCH] for i in range(0, size, BATCH)]


def digits_dataset() -> ArrayDataset:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return ArrayDataset((x / 16.0).astype(np.float32), y.astype(np.int64))


def new_model() -> MLPClassifier:
    set_seed(0)
    return MLPClassifier(64, 10, [256, 256], dropout=0.0)


class TrainClock(TrainerCallback):
    """From the first epoch's start (before its first batch is loaded) to ``on_train_end`` (after the callbacks
    before it: integrations end there). Not a per-step listener: a clock called at every step would charge its own
    dispatch to the Trainer."""

    def __init__(self) -> None:
        self.start: float | None = None
        self.end: float | None = None

    def on_epoch_begin(self, args, state, control, **kwargs):
        if self.start is None:
            self.start = time.perf_counter()

    def on_train_end(self, args, state, control, **kwargs):
        self.end = time.perf_counter()

    @property
    def seconds(self) -> float:
        return self.end - self.start


@contextlib.contextmanager
def console(terminal: bool):
    """stdout and stderr as a user has them: a 120-column pseudo-terminal (a reader thread plays the terminal
    emulator), or /dev/null, which like a pipe or a log file is not a terminal. Yields the stream."""
    if not terminal:
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            yield sink
        return
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    stream = os.fdopen(slave, "w", buffering=1)

    def drain() -> None:
        while True:
            try:
                if not os.read(master, 65536):
                    break
            except OSError:  # EIO once the slave end is closed
                break

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        with contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
            yield stream
    finally:
        stream.close()
        reader.join()
        os.close(master)


def hand_loop(steps: int, sink) -> float:
    """The loop a careful engineer writes by hand; returns steps per second (from the start of its first epoch)."""
    dataset = digits_dataset()
    model = new_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    step, epoch, running = 0, 0, torch.zeros(())
    model.train()
    start = time.perf_counter()  # as the Trainer's clock: before the first epoch's first batch is loaded
    while step < steps:
        batches = epoch_batches(len(dataset), epoch)
        epoch += 1
        for batch in torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=lambda b: b):
            loss = model(**batch)["loss"]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            running += loss.detach()
            step += 1
            if step % LOG_EVERY == 0:
                print({"loss": running.item() / LOG_EVERY, "step": step}, file=sink)
                running.zero_()
            if step >= steps:
                break
    return steps / (time.perf_counter() - start)


def trainer_run(steps: int, history: list | None = None, **extra) -> float:
    """The Trainer on the same work with its default callbacks (the progress display included, as a user gets it
    on whatever stdout/stderr are now); returns optimizer steps per second (``history`` receives its log history)."""
    dataset = digits_dataset()
    clock = TrainClock()
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, max_steps=steps, per_device_train_batch_size=BATCH, learning_rate=LR,
            weight_decay=0.0, lr_scheduler_type="constant", max_grad_norm=0, logging_steps=LOG_EVERY,
            save_strategy="no", eval_strategy="no", seed=SEED, **extra,
        )
        trainer = Trainer(new_model(), args, train_dataset=dataset, callbacks=[clock])
        trainer.train()
    if history is not None:
        history.extend(trainer.state.log_history)
    return steps / clock.seconds


def warm_up_and_check(stream, **extra) -> None:
    """Warm both sides up (the first optimizer use imports torch._dynamo) and check that they do identical work:
    after 200 steps both logged the same mean loss, bit for bit; otherwise the comparison would mean nothing."""
    lines = io.StringIO()
    hand_loop(200, lines)
    history: list[dict] = []
    trainer_run(200, history, **extra)
    hand = ast.literal_eval(lines.getvalue().splitlines()[-1])["loss"]
    trainer = [h["loss"] for h in history if "loss" in h][-1]
    if hand != trainer:
        raise RuntimeError(f"the hand loop and the Trainer did different work: loss {hand!r} vs {trainer!r} at step 200")


def paired(run_a, run_b, repeats: int) -> dict[str, float]:
    """Alternate two measurements ``repeats`` times (the order flipping from pair to pair); the median of the
    per-pair ratios b/a is robust to the slow drifts of a shared machine, and the spread shows how noisy it was."""
    a_values, b_values, ratios = [], [], []
    for i in range(repeats):
        # counterbalanced: A first in even pairs, B first in odd ones, so a drift within a pair (the second run
        # inheriting the first one's heap, caches or clock state) favours neither side
        if i % 2 == 0:
            a, b = run_a(), run_b()
        else:
            b, a = run_b(), run_a()
        a_values.append(a)
        b_values.append(b)
        ratios.append(b / a)
    ratios.sort()
    return {"a": statistics.median(a_values), "b": statistics.median(b_values), "ratio": statistics.median(ratios),
            "ratio_min": ratios[0], "ratio_max": ratios[-1]}


def compare(steps: int = 2000, repeats: int = 7, terminal: bool = False, **extra) -> dict[str, float]:
    """Trainer vs hand loop, alternated, both printing to a terminal or not; steps/s medians and the median
    per-pair ratio. ``FLYTRAIN_PROGRESS`` must be unset (it would override the terminal detection)."""
    with console(terminal) as stream:
        warm_up_and_check(stream, **extra)
        r = paired(lambda: hand_loop(steps, stream), lambda: trainer_run(steps, **extra), repeats)
    return {"hand_steps_per_s": r["a"], "trainer_steps_per_s": r["b"], "ratio": r["ratio"],
            "ratio_min": r["ratio_min"], "ratio_max": r["ratio_max"]}
