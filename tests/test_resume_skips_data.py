"""A resumed run skips the batches it already trained at the sampler: their samples are never loaded again."""

from __future__ import annotations

import shutil

from tests.helpers import DictDataset, digits, make_model
from trainer_lib import Trainer, TrainerCallback, TrainingArguments


class CountingDataset(DictDataset):
    """Counts every sample the loader reads, per index."""

    def __init__(self, base: DictDataset):
        super().__init__(base.features, base.labels)
        self.reads: list[int] = []

    def __getitem__(self, i):
        self.reads.append(int(i))
        return super().__getitem__(i)


class StepCounter(TrainerCallback):
    def __init__(self) -> None:
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


def make_trainer(out, dataset, callbacks=()) -> Trainer:
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=10, num_train_epochs=2,
                             learning_rate=1e-3, save_steps=7, logging_steps=5, disable_tqdm=True)
    return Trainer(make_model(), args, train_dataset=dataset, callbacks=list(callbacks))


def test_resume_reads_only_the_samples_of_the_steps_left(tmp_path):
    base, _ = digits(100, 1)  # 10 batches per epoch, 20 steps; checkpoint-14 is mid epoch 2
    full_data = CountingDataset(base)
    make_trainer(tmp_path / "full", full_data).train()
    assert len(full_data.reads) == 200

    shutil.copytree(tmp_path / "full" / "checkpoint-14", tmp_path / "part" / "checkpoint-14")
    resumed_data, counter = CountingDataset(base), StepCounter()
    trainer = make_trainer(tmp_path / "part", resumed_data, [counter])
    trainer.train(resume_from_checkpoint=True)
    assert counter.steps == 6  # the resumed process ran steps 15..20 only
    # exactly the samples of batches 5..9 of epoch 2, in the order the uninterrupted run read them
    assert resumed_data.reads == full_data.reads[140:]
