"""Fault-injection checks. Each returns a list of (case, held, detail): the tests assert on small samples, and
``python -m tests.reliability.report`` runs the full counts and prints the figures as tried / held."""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Callable

import torch

from trainer_lib.checkpoint import checkpoint_step, list_checkpoints

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMING = ("_runtime", "_per_second")

# A small real training; FLYTRAIN_KILL="<phase>:<step>" makes the process SIGKILL itself at that moment.
TRAIN_SCRIPT = r"""
import logging, os, signal, sys
sys.path.insert(0, {root!r})
logging.basicConfig(level=logging.INFO)  # the resumed process announces the checkpoint it continues from
from tests.helpers import accuracy, digits, make_model
from trainer_lib import Trainer, TrainerCallback, TrainingArguments
import trainer_lib.checkpoint as ckpt

out, resume, asynchronous = sys.argv[1], sys.argv[2] == "resume", sys.argv[3] == "async"
phase, _, at = os.environ.get("FLYTRAIN_KILL", ":").partition(":")
at = int(at or 0)

def die():
    os.kill(os.getpid(), signal.SIGKILL)

class Killer(TrainerCallback):
    steps = 0

    def on_optimizer_step(self, args, state, control, **kw):
        Killer.steps += 1  # this process's own optimizer steps: a resume from step k makes MAX_STEPS - k

for event in ("on_step_begin", "on_substep_end", "on_pre_optimizer_step", "on_optimizer_step", "on_step_end",
              "on_log", "on_evaluate", "on_save", "on_epoch_end"):
    if phase == event:
        def hook(self, args, state, control, _e=event, **kw):
            if state.global_step >= at:
                die()
        setattr(Killer, event, hook)

if phase in ("mid_write", "before_rename"):
    # inside a checkpoint write: after the weights file, or with every file written but before the rename
    original_save, original_rename = ckpt.torch.save, os.rename
    def killing_save(obj, path, *a, **k):
        original_save(obj, path, *a, **k)
        if phase == "mid_write" and f"-{{at}}-" in str(path):
            die()
    def killing_rename(src, dst):
        if phase == "before_rename" and dst.endswith(f"checkpoint-{{at}}"):
            die()
        return original_rename(src, dst)
    ckpt.torch.save = killing_save
    ckpt.os.rename = killing_rename

train, evaluation = digits(200, 40)
args = TrainingArguments(output_dir=out, per_device_train_batch_size=16, num_train_epochs=3, learning_rate=3e-3,
                         logging_steps=4, save_steps=3, eval_strategy="steps", eval_steps=5, disable_tqdm=True,
                         gradient_accumulation_steps=2, warmup_steps=2, weight_decay=0.01,
                         async_checkpointing=asynchronous, report_to=os.environ.get("FLYTRAIN_REPORT_TO", "none"))
model = make_model(dropout=0.3)
trainer = Trainer(model, args, train_dataset=train, eval_dataset=evaluation, compute_metrics=accuracy,
                  callbacks=[Killer()])
trainer.train(resume_from_checkpoint=True if resume else None)
trainer.save_model(os.path.join(out, "final"))
print("OPTIMIZER_STEPS", Killer.steps)
"""

PHASES = ("on_step_begin", "on_substep_end", "on_pre_optimizer_step", "on_optimizer_step", "on_step_end", "on_log",
          "on_evaluate", "on_save", "on_epoch_end", "mid_write", "before_rename")
MAX_STEPS = 21  # 200 samples / 16 = 13 micro-batches, gas 2 → 7 updates per epoch, 3 epochs


def _script(workdir: str) -> str:
    path = os.path.join(workdir, "train_kill.py")
    with open(path, "w") as f:
        f.write(TRAIN_SCRIPT.format(root=ROOT))
    return path


def _run(script: str, out: str, resume: bool, mode: str, kill: str | None, extra_env: dict | None = None):
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("FLYTRAIN_KILL", None)
    if kill:
        env["FLYTRAIN_KILL"] = kill
    env.update(extra_env or {})
    return subprocess.run([sys.executable, script, out, "resume" if resume else "fresh", mode], env=env,
                          capture_output=True, text=True, timeout=300)


def _final_state(out: str) -> tuple[dict, list]:
    from trainer_lib.checkpoint import load_weights

    weights = load_weights(os.path.join(out, "final"))
    state = json.load(open(os.path.join(out, f"checkpoint-{MAX_STEPS}", "trainer_state.json")))
    history = [{k: v for k, v in e.items() if not k.endswith(TIMING)} for e in state["log_history"]]
    return weights, history


def kill_nine_trials(n: int, seed: int = 0, mode: str = "sync", extra_env: dict | None = None,
                     after_trial: Callable[[str, str], str | None] | None = None,
                     redraws: int = 3) -> list[tuple[str, bool, str]]:
    """R1: SIGKILL a training at ``n`` random (phase, step) moments; each must resume to the uninterrupted result.

    A trial counts only when it tests a resume: the kill (signal 9) came after the first checkpoint and before the
    last one; one that did not is drawn again (up to ``redraws`` times) and named in the detail. The resumed
    process must announce the newest checkpoint present at the kill and make exactly the steps after it."""
    rng = random.Random(seed)
    results = []
    with tempfile.TemporaryDirectory() as work:
        script = _script(work)
        ref_dir = os.path.join(work, "reference")
        proc = _run(script, ref_dir, False, mode, None, extra_env)
        if proc.returncode != 0:
            raise RuntimeError(f"reference training failed: {proc.stderr[-2000:]}")
        ref_weights, ref_history = _final_state(ref_dir)
        for i in range(n):
            phase = PHASES[i % len(PHASES)] if i < len(PHASES) else rng.choice(PHASES)
            outside: list[str] = []
            for attempt in range(redraws + 1):
                if attempt:
                    phase = rng.choice(PHASES)
                step = rng.randint(1, MAX_STEPS - 1)
                if phase in ("on_save", "mid_write", "before_rename"):
                    step = rng.choice(range(3, MAX_STEPS, 3))
                if phase == "on_evaluate":
                    step = rng.choice(range(5, MAX_STEPS, 5))
                case = f"{phase}@{step}"
                out = os.path.join(work, f"trial{i}-{attempt}")
                killed = _run(script, out, False, mode, f"{phase}:{step}", extra_env)
                at_kill = [checkpoint_step(p) for p in list_checkpoints(out)]
                if killed.returncode == -9 and at_kill and MAX_STEPS not in at_kill:
                    break
                outside.append(f"{case} (rc={killed.returncode}, checkpoints {at_kill})")
            if killed.returncode != -9:
                results.append((case, False, f"was not killed (rc={killed.returncode}): {killed.stderr[-500:]}"))
                continue
            if not at_kill or MAX_STEPS in at_kill:
                results.append((case, False, f"no draw fell between the first and the last checkpoint: {outside}"))
                continue
            k = at_kill[-1]
            resumed = _run(script, out, True, mode, None, extra_env)
            if resumed.returncode != 0:
                results.append((case, False, f"resume failed: {resumed.stderr[-800:]}"))
                continue
            weights, history = _final_state(out)
            same_weights = weights.keys() == ref_weights.keys() and all(
                torch.equal(weights[k], ref_weights[k]) for k in weights)
            steps = [e["step"] for e in history if "loss" in e]
            problems = []
            if f"Resuming from {os.path.join(out, f'checkpoint-{k}')} at global step {k}" not in resumed.stderr:
                problems.append(f"the resumed process did not announce checkpoint-{k}")
            if f"OPTIMIZER_STEPS {MAX_STEPS - k}" not in resumed.stdout:
                problems.append(f"the resumed process did not make exactly {MAX_STEPS - k} steps: "
                                f"{resumed.stdout.strip().splitlines()[-1:]}")
            if not same_weights:
                problems.append("final weights differ")
            if history != ref_history:
                problems.append("log_history differs")
            if steps != sorted(set(steps)):
                problems.append(f"logged steps repeat: {steps}")
            if after_trial is not None:
                extra = after_trial(case, out)
                if extra:
                    problems.append(extra)
            redrawn = f" (redrawn after {outside})" if outside else ""
            results.append((f"{case} from checkpoint-{k}", not problems,
                            ("; ".join(problems) or "resumed bit-exactly") + redrawn))
    return results


def _make_checkpoint(work: str) -> str:
    sys.path.insert(0, ROOT)
    from tests.helpers import digits, make_model
    from trainer_lib import Trainer, TrainingArguments

    train, _ = digits(64, 8)
    args = TrainingArguments(output_dir=work, per_device_train_batch_size=16, max_steps=8, save_steps=4,
                             disable_tqdm=True)
    Trainer(make_model(), args, train_dataset=train).train()
    return os.path.join(work, "checkpoint-8")


def _rewrite_manifest(ck: str, name: str) -> None:
    manifest = json.load(open(os.path.join(ck, "manifest.json")))
    blob = open(os.path.join(ck, name), "rb").read()
    manifest["files"][name] = {"size": len(blob), "crc32": f"{zlib.crc32(blob):08x}"}
    json.dump(manifest, open(os.path.join(ck, "manifest.json"), "w"))


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.path.join(tempfile.gettempdir(), 'flytrain-pwned')}",))


#: damage → (what it does, the file the warning must name)
DAMAGES: dict[str, tuple[Callable[[str], None], str]] = {
    "truncated weights": (lambda ck: open(os.path.join(ck, "model.safetensors"), "r+b").truncate(64),
                          "model.safetensors"),
    "deleted optimizer": (lambda ck: os.remove(os.path.join(ck, "optimizer.safetensors")), "optimizer.safetensors"),
    "flipped bytes in weights": (lambda ck: _flip(os.path.join(ck, "model.safetensors")), "model.safetensors"),
    "flipped bytes in optimizer": (lambda ck: _flip(os.path.join(ck, "optimizer.safetensors")),
                                   "optimizer.safetensors"),
    "missing trainer_state.json": (lambda ck: os.remove(os.path.join(ck, "trainer_state.json")),
                                   "trainer_state.json"),
    "missing manifest (partial)": (lambda ck: os.remove(os.path.join(ck, "manifest.json")), "manifest.json"),
    "empty rng state": (lambda ck: open(os.path.join(ck, "rng_state.pt"), "w").close(), "rng_state.pt"),
    "garbage trainer_state.json (manifest rewritten)": (lambda ck: (
        open(os.path.join(ck, "trainer_state.json"), "w").write("{not json"),
        _rewrite_manifest(ck, "trainer_state.json")), "trainer_state.json"),
}


def _flip(path: str) -> None:
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))


def damaged_checkpoint_trials() -> list[tuple[str, bool, str]]:
    """R2: each damage to checkpoint-8 → an explicit path is refused naming it; resume=True warns naming the damaged
    file, announces checkpoint-4 and makes exactly the 4 steps after it."""
    from tests.helpers import digits, make_model
    from tests.reliability.hostile import LogRecords, StepCounter
    from trainer_lib import CheckpointError, Trainer, TrainingArguments

    results = []
    for name, (damage, damaged_file) in DAMAGES.items():
        with tempfile.TemporaryDirectory() as work:
            ck = _make_checkpoint(work)
            damage(ck)
            problems = []
            train, _ = digits(64, 8)
            args = TrainingArguments(output_dir=work, per_device_train_batch_size=16, max_steps=8, save_steps=4,
                                     disable_tqdm=True)
            try:
                Trainer(make_model(), args, train_dataset=train).train(resume_from_checkpoint=ck)
                problems.append("the explicit path was accepted")
            except CheckpointError as error:
                if "checkpoint-8" not in str(error):
                    problems.append(f"the error does not name checkpoint-8: {error}")
            counter = StepCounter()
            with LogRecords() as logs:
                trainer = Trainer(make_model(), args, train_dataset=train, callbacks=[counter])
                try:
                    trainer.train(resume_from_checkpoint=True)
                except CheckpointError as error:
                    problems.append(f"resume=True raised: {error}")
            if not any("checkpoint-8" in m and damaged_file in m for m in logs.messages):
                problems.append(f"no warning named {damaged_file} of checkpoint-8")
            if f"Resuming from {os.path.join(work, 'checkpoint-4')} at global step 4" not in logs.messages:
                problems.append("did not announce checkpoint-4")
            if counter.steps != 4:
                problems.append(f"made {counter.steps} steps, not the 4 after checkpoint-4")
            results.append((name, not problems, "; ".join(problems)[-400:] or
                            f"refused by path; resume=True named {damaged_file} and resumed from checkpoint-4"))
    return results


def malicious_pickle_trials() -> list[tuple[str, bool, str]]:
    """R5: a pickle payload in each torch-saved file of a checkpoint (manifest made to agree) never runs."""
    from tests.helpers import digits, make_model
    from trainer_lib import CheckpointError, Trainer, TrainingArguments

    marker = os.path.join(tempfile.gettempdir(), "flytrain-pwned")
    results = []
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pt"):
        if os.path.exists(marker):
            os.remove(marker)
        with tempfile.TemporaryDirectory() as work:
            ck = _make_checkpoint(work)
            if name == "optimizer.pt":  # the pickle fallback for optimizers: replace the tensor form with it
                for other in ("optimizer.safetensors", "optimizer.json"):
                    os.remove(os.path.join(ck, other))
                manifest = json.load(open(os.path.join(ck, "manifest.json")))
                for other in ("optimizer.safetensors", "optimizer.json"):
                    manifest["files"].pop(other)
                json.dump(manifest, open(os.path.join(ck, "manifest.json"), "w"))
            with open(os.path.join(ck, name), "wb") as f:
                pickle.dump({"payload": _Payload()}, f)
            _rewrite_manifest(ck, name)
            train, _ = digits(64, 8)
            args = TrainingArguments(output_dir=os.path.join(work, "other"), max_steps=9, disable_tqdm=True)
            refused = False
            try:
                Trainer(make_model(), args, train_dataset=train).train(resume_from_checkpoint=ck)
            except CheckpointError:
                refused = True
            executed = os.path.exists(marker)
            results.append((f"payload in {name}", refused and not executed,
                            "refused, not executed" if not executed else "PAYLOAD EXECUTED"))
    shutil.rmtree(marker, ignore_errors=True)
    return results
