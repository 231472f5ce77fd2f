"""Hostile checkpoints and faults: tampered content with an agreeing manifest, callback-state injection, non-finite
training, tied weights, background-write errors. Each returns a list of (case, held, detail) like checks.py; the
tests assert on them and ``python -m tests.reliability.report`` prints them as rows."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable
from typing import Any

import torch

from tests.helpers import digits, make_model
from trainer_lib import CheckpointError, Trainer, TrainerCallback, TrainingArguments

Trial = tuple[str, bool, str]


class StepCounter(TrainerCallback):
    """Counts the optimizer steps this process made: a resume from step k of n makes exactly n - k."""

    def __init__(self) -> None:
        self.steps = 0

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.steps += 1


class LogRecords(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> LogRecords:
        logging.getLogger("trainer_lib").addHandler(self)
        logging.getLogger("trainer_lib").setLevel(logging.DEBUG)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger("trainer_lib").removeHandler(self)


def small_trainer(out: str, callbacks: list | None = None, **overrides) -> Trainer:
    train, _ = digits(64, 8)
    values = dict(output_dir=out, per_device_train_batch_size=16, max_steps=8, save_steps=4, disable_tqdm=True,
                  weight_decay=0.01, learning_rate=1e-2)
    values.update(overrides)
    return Trainer(make_model(), TrainingArguments(**values), train_dataset=train, callbacks=callbacks)


def rewrite_manifest(ck: str, name: str) -> None:
    """Make the manifest agree with a tampered file, as an attacker would."""
    path = os.path.join(ck, "manifest.json")
    manifest = json.load(open(path))
    blob = open(os.path.join(ck, name), "rb").read()
    manifest["files"][name] = {"size": len(blob), "crc32": f"{zlib.crc32(blob):08x}"}
    json.dump(manifest, open(path, "w"))


# -- tampered content ------------------------------------------------------------------------------------------
def _json_edit(name: str, edit: Callable[[Any], Any]) -> Callable[[str], None]:
    def apply(ck: str) -> None:
        path = os.path.join(ck, name)
        data = json.load(open(path))
        result = edit(data)
        data = result if isinstance(result, list) else data  # an edit may replace the whole document
        open(path, "w").write(json.dumps(data))
        rewrite_manifest(ck, name)
    return apply


def _tensors_edit(name: str, edit: Callable[[dict], None]) -> Callable[[str], None]:
    def apply(ck: str) -> None:
        from safetensors.torch import load_file, save_file

        path = os.path.join(ck, name)
        tensors = dict(load_file(path))
        edit(tensors)
        save_file(tensors, path, metadata={"format": "pt"})
        rewrite_manifest(ck, name)
    return apply


def _pt_edit(name: str, edit: Callable[[dict], None]) -> Callable[[str], None]:
    def apply(ck: str) -> None:
        path = os.path.join(ck, name)
        data = torch.load(path, weights_only=True)
        edit(data)
        torch.save(data, path)
        rewrite_manifest(ck, name)
    return apply


def _set(key: str, value: Any) -> Callable[[dict], None]:
    return lambda d: d.__setitem__(key, value)


def _first_key(d: dict, prefix: str = "") -> str:
    return sorted(k for k in d if k.startswith(prefix))[0]


def _group(edit: Callable[[dict], None]) -> Callable[[dict], None]:
    return lambda d: edit(d["param_groups"][0])


STATE, LOOP, WEIGHTS = "trainer_state.json", "loop_state.json", "model.safetensors"
OPT, OPT_T, SCHED, RNG = "optimizer.json", "optimizer.safetensors", "scheduler.pt", "rng_state.pt"

#: (case, file, damage, a word the error must contain besides the file name)
TAMPERED: list[tuple[str, str, Callable[[str], None], str]] = [
    ("global_step 10^12", STATE, _json_edit(STATE, _set("global_step", 10**12)), "global_step"),
    ("global_step -5", STATE, _json_edit(STATE, _set("global_step", -5)), "global_step"),
    ("global_step a string", STATE, _json_edit(STATE, _set("global_step", "8")), "global_step"),
    ("global_step of another checkpoint", STATE, _json_edit(STATE, _set("global_step", 6)), "global_step"),
    ("epoch out of range", STATE, _json_edit(STATE, _set("epoch", 1e9)), "epoch"),
    ("log_history not a list", STATE, _json_edit(STATE, _set("log_history", "x")), "log_history"),
    ("log_history nested value", STATE, _json_edit(STATE, _set("log_history", [{"loss": {"a": 1}}])), "log_history"),
    ("best_model_checkpoint elsewhere", STATE, _json_edit(STATE, lambda d: d.update(
        best_global_step=4, best_model_checkpoint="/tmp/elsewhere")), "best_model_checkpoint"),
    ("stateful_callbacks a list", STATE, _json_edit(STATE, _set("stateful_callbacks", [])), "stateful_callbacks"),
    ("callback args not an object", STATE, _json_edit(STATE, _set("stateful_callbacks",
                                                                  {"TrainerControl": {"args": 5}})), "args"),
    ("total_flos NaN", STATE, _json_edit(STATE, _set("total_flos", float("nan"))), "total_flos"),
    ("state not an object", STATE, _json_edit(STATE, lambda d: [d]), "JSON object"),
    ("tr_loss Infinity", LOOP, _json_edit(LOOP, _set("tr_loss", float("inf"))), "tr_loss"),
    ("globalstep_last_logged ahead", LOOP, _json_edit(LOOP, _set("globalstep_last_logged", 99)),
     "globalstep_last_logged"),
    ("tr_loss_dtype unknown", LOOP, _json_edit(LOOP, _set("tr_loss_dtype", "complex128")), "tr_loss_dtype"),
    ("loop key missing", LOOP, _json_edit(LOOP, lambda d: d.pop("tr_loss")), "tr_loss"),
    ("weight reshaped", WEIGHTS, _tensors_edit(WEIGHTS, lambda t: t.__setitem__("net.0.weight",
                                                                                 t["net.0.weight"].reshape(-1))),
     "net.0.weight"),
    ("weight missing", WEIGHTS, _tensors_edit(WEIGHTS, lambda t: t.pop("net.0.bias")), "missing"),
    ("weight extra", WEIGHTS, _tensors_edit(WEIGHTS, lambda t: t.__setitem__("evil", torch.zeros(1))), "unexpected"),
    ("weight dtype", WEIGHTS, _tensors_edit(WEIGHTS, lambda t: t.__setitem__("net.0.bias", t["net.0.bias"].double())),
     "float64"),
    ("weight NaN", WEIGHTS, _tensors_edit(WEIGHTS, lambda t: t["net.3.bias"].fill_(float("nan"))), "non-finite"),
    ("param group removed", OPT, _json_edit(OPT, lambda d: d["param_groups"].pop()), "param_groups"),
    ("param group shortened", OPT, _json_edit(OPT, _group(lambda g: g["params"].pop())), "params"),
    ("lr a string", OPT, _json_edit(OPT, _group(_set("lr", "abc"))), "lr"),
    ("lr Infinity", OPT, _json_edit(OPT, _group(_set("lr", float("inf")))), "lr"),
    ("betas of three", OPT, _json_edit(OPT, _group(_set("betas", {"__tuple__": [0.9, 0.9, 0.9]}))), "betas"),
    ("state of an unknown parameter", OPT, _json_edit(OPT, lambda d: d["state"].__setitem__(
        "99", d["state"]["0"])), "99"),
    ("moment reshaped", OPT_T, _tensors_edit(OPT_T, lambda t: t.__setitem__(
        _first_key(t, "0.exp_avg"), t[_first_key(t, "0.exp_avg")].reshape(-1)[:3].clone())), "shape"),
    ("moment NaN", OPT_T, _tensors_edit(OPT_T, lambda t: t[_first_key(t, "0.exp_avg_sq")].fill_(float("nan"))),
     "non-finite"),
    ("scheduler step mismatch", SCHED, _pt_edit(SCHED, _set("last_epoch", 3)), "last_epoch"),
    ("scheduler base_lrs short", SCHED, _pt_edit(SCHED, lambda d: d.__setitem__("base_lrs", d["base_lrs"][:1])),
     "base_lrs"),
    ("scheduler extra key", SCHED, _pt_edit(SCHED, _set("evil", 1)), "scheduler keys"),
    ("python RNG truncated", RNG, _pt_edit(RNG, lambda d: d["python"].__setitem__("state",
                                                                                  d["python"]["state"][:10])), "RNG"),
    ("torch RNG garbage", RNG, _pt_edit(RNG, _set("cpu", torch.zeros(7, dtype=torch.uint8))), "RNG"),
    ("numpy RNG out of range", RNG, _pt_edit(RNG, lambda d: d["numpy"]["keys"].fill_(2**40)), "RNG"),
]


def _source(work: str) -> str:
    """A finished run with checkpoint-4 and checkpoint-8 (two optimizer groups: weight decay)."""
    src = os.path.join(work, "source")
    small_trainer(src).train()
    return src


def tampered_content_trials(fallback: bool = True, cases: list | None = None) -> list[Trial]:
    """Each tampered file (manifest agreeing): an explicit resume is refused with a CheckpointError naming the file
    and field and changes nothing; resume=True warns naming the file and resumes from checkpoint-4 (4 steps)."""
    results = []
    with tempfile.TemporaryDirectory() as work:
        src = _source(work)
        for index, (case, name, damage, field) in enumerate(cases or TAMPERED):
            out = os.path.join(work, f"case{index}")
            shutil.copytree(src, out, ignore=shutil.ignore_patterns("runs"))
            ck = os.path.join(out, "checkpoint-8")
            damage(ck)
            problems = []
            trainer = small_trainer(os.path.join(work, f"other{index}"), max_steps=12)
            before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
            try:
                trainer.train(resume_from_checkpoint=ck)
                problems.append("explicit resume was accepted")
            except CheckpointError as error:
                message = str(error)
                if name not in message or field not in message:
                    problems.append(f"error does not name {name} and {field!r}: {message}")
            except Exception as error:  # noqa: BLE001 - any other type is what this trial looks for
                problems.append(f"{type(error).__name__} instead of CheckpointError: {error}")
            if any(not torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items()):
                problems.append("weights were changed by a refused checkpoint")
            if trainer.optimizer is not None and trainer.optimizer.state:
                problems.append("optimizer state was changed by a refused checkpoint")
            if fallback:
                counter = StepCounter()
                with LogRecords() as logs:
                    resumed = small_trainer(out, callbacks=[counter], max_steps=8)
                    try:
                        resumed.train(resume_from_checkpoint=True)
                    except Exception as error:  # noqa: BLE001
                        problems.append(f"resume=True raised {type(error).__name__}: {error}")
                warned = any("checkpoint-8" in m and name in m for m in logs.messages)
                announced = any("Resuming from" in m and m.split()[2].endswith("checkpoint-4") for m in logs.messages)
                if not warned:
                    problems.append("no warning named the damaged file")
                if not announced or counter.steps != 4:
                    problems.append(f"did not resume from checkpoint-4 (ran {counter.steps} steps)")
            results.append((f"{name}: {case}", not problems, "; ".join(problems) or "refused" + (", fell back to checkpoint-4" if fallback else "")))
    return results


# -- callback-state injection --------------------------------------------------------------------------------------
def _inject(ck: str, entries: dict[str, Any]) -> None:
    path = os.path.join(ck, STATE)
    data = json.load(open(path))
    data["stateful_callbacks"].update(entries)
    open(path, "w").write(json.dumps(data))
    rewrite_manifest(ck, STATE)


def _files_under(folder: str) -> dict[str, bytes]:
    found = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            found[os.path.relpath(path, folder)] = open(path, "rb").read()
    return found


def injection_trials() -> list[Trial]:
    """A checkpoint whose callback states point DVCLive's ``_dir`` and TensorBoard's ``log_dir`` at another folder
    (holding another run's files) and try undeclared attributes: the resume writes nothing outside output_dir and
    sets no undeclared attribute."""
    from callbacks.dvclive import DVCLiveCallback
    from callbacks.tensorboard import TensorBoardCallback
    from trainer_lib import EarlyStoppingCallback

    results = []
    with tempfile.TemporaryDirectory() as work:
        victim = os.path.join(work, "victim")
        os.makedirs(os.path.join(victim, "plots", "metrics", "train"))
        open(os.path.join(victim, "metrics.json"), "w").write('{"theirs": 1}')
        open(os.path.join(victim, "plots", "metrics", "train", "loss.tsv"), "w").write("step\tloss\n0\t1\n")
        before = _files_under(victim)
        out = os.path.join(work, "run")

        def callbacks():
            return [DVCLiveCallback(), TensorBoardCallback(),
                    EarlyStoppingCallback(early_stopping_patience=100)]

        train, evaluation = digits(64, 16)
        args = dict(output_dir=out, per_device_train_batch_size=16, max_steps=8, save_steps=4, disable_tqdm=True,
                    eval_strategy="steps", eval_steps=4, metric_for_best_model="loss")
        Trainer(make_model(), TrainingArguments(**args), train_dataset=train, eval_dataset=evaluation,
                callbacks=callbacks()).train()
        ck = os.path.join(out, "checkpoint-4")
        _inject(ck, {
            "DVCLiveCallback": {"args": {"dir": victim}, "attributes": {"_dir": victim}},
            "TensorBoardCallback": {"args": {}, "attributes": {"log_dir": victim, "tb_writer": "x",
                                                               "_owns_writer": False}},
            "EarlyStoppingCallback": {"args": {"early_stopping_patience": "1"},
                                      "attributes": {"early_stopping_patience_counter": "7", "log_dir": victim,
                                                     "on_evaluate": None, "__class__": "object"}},
            "TrainerControl": {"args": {"should_training_stop": "yes", "_new_step": None}, "attributes": {}},
        })
        fresh = callbacks()
        declared_before = {type(cb).__name__: dict(vars(cb)) for cb in fresh}
        trainer = Trainer(make_model(), TrainingArguments(**args), train_dataset=train, eval_dataset=evaluation,
                          callbacks=fresh)
        with LogRecords() as logs:
            trainer.checkpointer.apply(trainer.checkpointer.load(ck, _target(trainer, 8)))
        dvc, tb, es = fresh
        changed = []
        for cb in fresh:
            for name, value in vars(cb).items():
                old = declared_before[type(cb).__name__].get(name, "<absent>")
                if value is not old and value != old:
                    changed.append(f"{type(cb).__name__}.{name}")
        allowed = {"TensorBoardCallback.log_dir"}  # declared; checked against the run's folders at setup
        results.append(("undeclared or mistyped attributes are not set", not set(changed) - allowed,
                        f"changed: {changed}"))
        results.append(("refused state is named in a warning", any("ignoring state" in m for m in logs.messages),
                        "; ".join(logs.messages)[-300:]))
        results.append(("methods and class stay", type(es) is EarlyStoppingCallback and callable(es.on_evaluate),
                        "EarlyStoppingCallback intact"))
        # the real resume: nothing may be written into the victim folder
        trainer = Trainer(make_model(), TrainingArguments(**{**args, "max_steps": 12}), train_dataset=train,
                          eval_dataset=evaluation, callbacks=callbacks())
        trainer.train(resume_from_checkpoint=ck)
        after = _files_under(victim)
        results.append(("resume writes nothing outside output_dir (DVCLive _dir, TensorBoard log_dir)",
                        after == before, f"victim folder now holds {sorted(after)}"))
        wrote_inside = os.path.isfile(os.path.join(out, "dvclive", "metrics.json")) and any(
            n.startswith("events.") for _, _, names in os.walk(os.path.join(out, "runs")) for n in names)
        results.append(("the trackers wrote into the run's own folders", wrote_inside, "dvclive/ and runs/"))
    return results


def _target(trainer: Trainer, max_steps: int):
    """The Target a train() of ``max_steps`` would check against (optimizer and scheduler created for it)."""
    from trainer_lib.resume import Target

    trainer.create_optimizer_and_scheduler(max_steps)
    updates = len(trainer.get_train_dataloader().batch_sampler)
    return Target(trainer.model, trainer.optimizer, trainer.lr_scheduler, max_steps, -(-max_steps // updates),
                  updates, trainer.args.output_dir)


def tracker_state_round_trip() -> list[Trial]:
    """The trackers' declared state (the run ids they continue) survives save and restore into fresh instances."""
    from callbacks.comet import CometCallback
    from callbacks.mlflow import MLflowCallback
    from callbacks.tensorboard import TensorBoardCallback
    from callbacks.wandb import WandbCallback
    from trainer_lib.callback_state import collect_callback_states, restore_callback_states

    values = {MLflowCallback: {"_resume_run_id": "run123", "_resume_experiment_id": "7"},
              TensorBoardCallback: {"log_dir": "/out/runs/x"}, WandbCallback: {"run_id": "abc"},
              CometCallback: {"experiment_key": "k" * 32}}
    results = []
    for cls, attributes in values.items():
        old = cls()
        for name, value in attributes.items():
            setattr(old, name, value)
        stored = json.loads(json.dumps(collect_callback_states([old])))
        new = cls()
        restore_callback_states([new], stored, "test")
        got = {name: getattr(new, name) for name in attributes}
        results.append((f"{cls.__name__} keeps {sorted(attributes)}", got == attributes, f"restored {got}"))
    return results


# -- non-finite training ---------------------------------------------------------------------------------------------
class _Poison(TrainerCallback):
    """Makes step ``at`` diverge: its loss (``what="loss"``, via an infinite weight) or only its gradients."""

    def __init__(self, at: int, what: str) -> None:
        self.at, self.what, self.handle = at, what, None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 != self.at:
            return
        weight = model.net[0].weight
        if self.what == "loss":
            with torch.no_grad():
                weight[0, 0] = float("nan")
        else:
            self.handle = weight.register_hook(lambda g: g * float("inf"))

    def on_step_end(self, args, state, control, **kwargs):
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


def _finite_checkpoints(out: str) -> tuple[list[int], bool]:
    from trainer_lib.checkpoint import checkpoint_step, list_checkpoints, load_weights

    steps, finite = [], True
    for path in list_checkpoints(out):
        steps.append(checkpoint_step(path))
        finite &= all(bool(torch.isfinite(t).all()) for t in load_weights(path).values())
    return steps, finite


def nonfinite_trials() -> list[Trial]:
    """A loss or gradient norm that becomes non-finite at step 6 (checkpoints every 2): training stops with a
    NonFiniteLossError naming the step, keeps checkpoint-4 as the last, writes no NaN weights; skip mode finishes
    with finite weights; infinite settings are refused at construction."""
    from trainer_lib import NonFiniteLossError

    results = []
    with tempfile.TemporaryDirectory() as work:
        for what, clip in (("loss", 1.0), ("gradient", 1.0), ("loss", 0.0)):
            out = os.path.join(work, f"{what}-{clip}")
            step_named = "step 6"
            trainer = small_trainer(out, callbacks=[_Poison(6, what)], save_steps=2, max_steps=10, logging_steps=2,
                                    max_grad_norm=clip)
            what = what if clip else f"{what} (no clipping)"
            try:
                trainer.train()
                results.append((f"non-finite {what} at step 6 stops training", False, "trained to the end"))
                continue
            except NonFiniteLossError as error:
                message = str(error)
            steps, finite = _finite_checkpoints(out)
            held = step_named in message and "\n" not in message and steps == [2, 4] and finite
            results.append((f"non-finite {what} at step 6 stops training", held,
                            f"{message}; checkpoints {steps}, finite: {finite}"))
        out = os.path.join(work, "skip")
        with LogRecords() as logs:
            trainer = small_trainer(out, callbacks=[_Poison(6, "gradient")], save_steps=2, max_steps=10,
                                    skip_nonfinite_steps=True)
            trainer.train()
        steps, finite = _finite_checkpoints(out)
        skips = [m for m in logs.messages if "skipped the update" in m]
        results.append(("skip_nonfinite_steps skips and logs the step", finite and len(skips) == 1
                        and "step 6" in skips[0] and steps[-1] == 10, f"skips {skips}; checkpoints {steps}"))
        # an evaluation that returns NaN is never the best model
        from trainer_lib.trainer import Trainer as _T

        trainer = small_trainer(os.path.join(work, "best"), metric_for_best_model="loss")
        trainer.state.best_metric = None
        picked = _T._determine_best_metric(trainer, {"eval_loss": float("nan")})
        results.append(("a NaN evaluation is never the best model", not picked and trainer.state.best_metric is None,
                        f"picked={picked}"))
    for name in ("learning_rate", "weight_decay", "num_train_epochs", "warmup_steps", "max_grad_norm", "adam_beta2",
                 "adam_epsilon"):
        for value in (float("inf"), float("nan")):
            try:
                TrainingArguments(output_dir="unused", **{name: value})
                results.append((f"{name}={value} refused", False, "accepted"))
            except ValueError as error:
                results.append((f"{name}={value} refused", name in str(error) and "finite" in str(error), str(error)))
    return results


# -- tied weights ------------------------------------------------------------------------------------------------------
class TiedModel(torch.nn.Module):
    """A tiny language-model shape: the output layer shares the embedding matrix."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(17, 8)
        self.hidden = torch.nn.Linear(64 * 8 // 8, 8)
        self.lm_head = torch.nn.Linear(8, 17, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, x, labels=None):
        tokens = (x * 16).long().clamp(0, 16)
        h = self.hidden(self.embed(tokens).mean(1).repeat(1, 8))
        logits = self.lm_head(h)[:, :10]
        return {"logits": logits, "loss": torch.nn.functional.cross_entropy(logits, labels)}


def _tied_trainer(out: str, asynchronous: bool, callbacks=None) -> Trainer:
    train, _ = digits(64, 8)
    torch.manual_seed(0)
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=16, max_steps=8, save_steps=4,
                             disable_tqdm=True, async_checkpointing=asynchronous, learning_rate=1e-2)
    return Trainer(TiedModel(), args, train_dataset=train, callbacks=callbacks)


def tied_weights_trials() -> list[Trial]:
    """A model with a tied embedding/output matrix checkpoints, resumes bit-exactly with the tie intact and saves
    with save_model, in sync and async modes."""
    from trainer_lib.checkpoint import load_weights

    results = []
    with tempfile.TemporaryDirectory() as work:
        for mode in ("sync", "async"):
            full = _tied_trainer(os.path.join(work, f"full-{mode}"), mode == "async")
            full.train()
            part = os.path.join(work, f"part-{mode}")
            shutil.copytree(os.path.join(work, f"full-{mode}", "checkpoint-4"), os.path.join(part, "checkpoint-4"))
            counter = StepCounter()
            resumed = _tied_trainer(part, mode == "async", callbacks=[counter])
            resumed.train(resume_from_checkpoint=os.path.join(part, "checkpoint-4"))
            same = all(torch.equal(v, resumed.model.state_dict()[k]) for k, v in full.model.state_dict().items())
            tied = resumed.model.lm_head.weight is resumed.model.embed.weight
            results.append((f"tied weights resume bit-exactly ({mode})", same and tied and counter.steps == 4,
                            f"same={same} tied={tied} steps={counter.steps}"))
            folder = resumed.save_model(os.path.join(work, f"model-{mode}"))
            weights = load_weights(folder)
            fresh = TiedModel()
            fresh.load_state_dict(weights)
            ok = torch.equal(fresh.embed.weight, resumed.model.embed.weight) and fresh.lm_head.weight is \
                fresh.embed.weight and weights["lm_head.weight"] is weights["embed.weight"]
            results.append((f"tied weights save_model and load back ({mode})", ok, folder))
    return results


# -- background-write errors -------------------------------------------------------------------------------------------
def async_error_trials() -> list[Trial]:
    """A failing background write raises in the training thread; a training error waits for the write in flight;
    a cleanup never removes a temporary folder whose writer is alive."""
    import errno
    import subprocess
    import sys
    import threading

    from trainer_lib import checkpoint as ckpt
    from trainer_lib import writer

    results = []
    original = writer.write_checkpoint
    with tempfile.TemporaryDirectory() as work:
        def failing(payload, output_dir):
            if payload.step == 4:
                raise OSError(errno.ENOSPC, "No space left on device", output_dir)
            return original(payload, output_dir)

        writer.write_checkpoint = failing
        try:
            small_trainer(os.path.join(work, "enospc"), async_checkpointing=True).train()
            results.append(("a failing background write raises in training", False, "training finished"))
        except OSError as error:
            results.append(("a failing background write raises in training", error.errno == errno.ENOSPC, str(error)))
        finally:
            writer.write_checkpoint = original

        release, started = threading.Event(), threading.Event()

        def slow(payload, output_dir):
            started.set()
            release.wait(60)
            return original(payload, output_dir)

        class Fail(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == 5:
                    threading.Timer(0.2, release.set).start()  # the write completes only after the error
                    raise RuntimeError("boom")

        writer.write_checkpoint = slow
        out = os.path.join(work, "inflight")
        try:
            small_trainer(out, callbacks=[Fail()], async_checkpointing=True).train()
        except RuntimeError:
            pass
        finally:
            writer.write_checkpoint = original
        alive = [t for t in threading.enumerate() if t.name == "flytrain-checkpoint-writer"]
        complete = os.path.isfile(os.path.join(out, "checkpoint-4", "manifest.json"))
        results.append(("a training error waits for the write in flight", not alive and complete,
                        f"writer alive: {bool(alive)}, checkpoint-4 complete: {complete}"))

        # temporary folders: a live writer's stays, a dead process's goes, another host's stays
        out = os.path.join(work, "temps")
        os.makedirs(out)
        hold = threading.Event()
        names: list[str] = []
        live = threading.Thread(target=lambda: (names.append(ckpt._temporary_name("9")), hold.wait(60)))
        live.start()
        while not names:
            pass
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout.strip()
        dead_name = ckpt._temporary_name("8").rsplit("@", 2)[0] + f"@{dead}@1"
        other_host = f"{ckpt._TEMPORARY}7@another-host@1@1"
        for name in (names[0], dead_name, other_host):
            os.makedirs(os.path.join(out, name))
        ckpt.clean_stale_temporaries(out)
        left = set(os.listdir(out))
        hold.set()
        live.join()
        results.append(("a live writer's temporary folder is never removed", names[0] in left, str(sorted(left))))
        results.append(("a dead writer's temporary folder is removed", dead_name not in left, str(sorted(left))))
        results.append(("another host's temporary folder is left alone", other_host in left, str(sorted(left))))
        ckpt.clean_stale_temporaries(out)
        results.append(("a finished thread's temporary folder is removed", names[0] not in os.listdir(out),
                        str(sorted(os.listdir(out)))))
    return results
