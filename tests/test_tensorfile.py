"""trainer_lib.tensorfile: the background writer's file images are ordinary safetensors files, bit for bit."""

from __future__ import annotations

import os
import zlib

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from trainer_lib.tensorfile import ALIGN, ImageStaging, TensorFileImage


def sample() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(33, 7, generator=g),
        "step": torch.tensor(12.0),
        "ids": torch.arange(5, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "half": torch.randn(3, 3, generator=g).half(),
        "bf": torch.randn(4, generator=g).bfloat16(),
        "bytes": torch.tensor([1, 2, 3], dtype=torch.uint8),
        "empty": torch.zeros(0, 4),
        "strided": torch.randn(6, 4, generator=g).t(),  # not contiguous
    }


# /dev/shm is tmpfs, which refuses O_DIRECT: the buffered path; tmp_path is on a disk file system
@pytest.mark.parametrize("where", ["disk", "tmpfs"])
def test_image_round_trips_through_safetensors(tmp_path, where):
    folder = tmp_path if where == "disk" else "/dev/shm"
    path = os.path.join(folder, f"image-{os.getpid()}.safetensors")
    tensors = sample()
    image = TensorFileImage(tensors, {"format": "pt"})
    image.copy_from(tensors)
    try:
        crc = image.write(path)
        raw = open(path, "rb").read()
        back = load_file(path)
        with safe_open(path, "pt") as f:
            metadata = f.metadata()
    finally:
        os.remove(path)
    assert len(raw) == image.size and crc == f"{zlib.crc32(raw):08x}"
    header_length = int.from_bytes(raw[:8], "little")
    assert (8 + header_length) % ALIGN == 0  # the data starts on a block boundary
    assert metadata == {"format": "pt"}
    assert back.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.dtype and back[name].shape == tensor.shape, name
        assert torch.equal(back[name], tensor), name


def test_staging_reuses_the_image_and_copies_the_current_values(tmp_path):
    staging = ImageStaging()
    tensors = sample()
    first = staging.stage("m.safetensors", tensors)
    tensors["w"].add_(1.0)
    second = staging.stage("m.safetensors", tensors)
    assert second is first  # same layout: the buffer is reused, no new allocation
    second.write(str(tmp_path / "m.safetensors"))
    assert torch.equal(load_file(str(tmp_path / "m.safetensors"))["w"], tensors["w"])
    tensors["extra"] = torch.ones(2)
    assert staging.stage("m.safetensors", tensors) is not first  # a new layout gets a new image


def test_a_failed_write_raises_and_names_nothing_partial(tmp_path):
    tensors = sample()
    image = TensorFileImage(tensors)
    image.copy_from(tensors)
    with pytest.raises(OSError):
        image.write(str(tmp_path / "missing-folder" / "m.safetensors"))
