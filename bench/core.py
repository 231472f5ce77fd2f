"""Trainer vs a hand-written PyTorch loop on identical work (digits MLP 64-256-256-10, batch 32, AdamW 1e-3,
constant LR, no clipping, no evaluation or checkpoints, logging every 50 steps)."""

from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import time

import numpy as np
import torch

from trainer_lib import Trainer, TrainingArguments, set_seed
from workflows.data import ArrayDataset
from workflows.models import MLPClassifier

BATCH, LR, LOG_EVERY = 32, 1e-3, 50


def digits_dataset() -> ArrayDataset:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return ArrayDataset((x / 16.0).astype(np.float32), y.astype(np.int64))


def new_model() -> MLPClassifier:
    set_seed(0)
    return MLPClassifier(64, 10, [256, 256], dropout=0.0)


def hand_loop(steps: int, sink) -> float:
    """The loop a careful engineer writes by hand; returns steps per second."""
    dataset = digits_dataset()
    model = new_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True, collate_fn=lambda b: b)
    start = time.perf_counter()
    step, running = 0, torch.zeros(())
    model.train()
    while step < steps:
        for batch in loader:
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


def trainer_run(steps: int, sink, **extra) -> float:
    """The Trainer on the same work; returns optimizer steps per second of its training loop."""
    dataset = digits_dataset()
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, max_steps=steps, per_device_train_batch_size=BATCH, learning_rate=LR,
            weight_decay=0.0, lr_scheduler_type="constant", max_grad_norm=0, logging_steps=LOG_EVERY,
            save_strategy="no", eval_strategy="no", disable_tqdm=True, **extra,
        )
        trainer = Trainer(new_model(), args, train_dataset=dataset)
        with contextlib.redirect_stdout(sink):
            start = time.perf_counter()
            trainer.train()
            elapsed = time.perf_counter() - start
    return steps / elapsed


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


def compare(steps: int = 2000, repeats: int = 7, **extra) -> dict[str, float]:
    """Trainer vs hand loop, alternated; steps/s medians and the median per-pair ratio."""
    with open(os.devnull, "w") as sink:
        hand_loop(200, sink)  # warm-up: first optimizer use imports torch._dynamo
        trainer_run(200, sink, **extra)
        r = paired(lambda: hand_loop(steps, sink), lambda: trainer_run(steps, sink, **extra), repeats)
    return {"hand_steps_per_s": r["a"], "trainer_steps_per_s": r["b"], "ratio": r["ratio"],
            "ratio_min": r["ratio_min"], "ratio_max": r["ratio_max"]}
