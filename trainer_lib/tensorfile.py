"""Safetensors files laid out once in an aligned, reusable memory image, written with direct I/O.

A background checkpoint must not slow the training it runs beside. Writing a 250 MB file through the page cache
costs the CPU about as much as the copy itself (page allocation, copy, writeback), and on a machine whose cores are
all training, that CPU time comes out of training. So the background writer keeps, per checkpoint file, one image
of the whole file (header and tensor data) in a page-aligned buffer allocated once and reused: the training thread
copies the live tensors into their places in it (the only per-checkpoint work it does), and the writer streams it to
disk with ``O_DIRECT`` (the device copies from memory; almost no CPU) and takes its CRC-32 from memory. Where
direct I/O is not available (tmpfs, some network file systems, macOS) the same image is written normally.

The files are ordinary safetensors files: an 8-byte little-endian header length, a JSON header padded with spaces
(which the format allows) so that the data starts on a 4 KiB boundary, then every tensor back to back.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import zlib
from collections.abc import Mapping

import torch

ALIGN = 4096
_CHUNK = 64 << 20

_CODES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _round_up(n: int, to: int = ALIGN) -> int:
    return (n + to - 1) // to * to


def layout_of(tensors: Mapping[str, torch.Tensor]) -> tuple:
    """What an image depends on: every tensor's name, dtype and shape."""
    return tuple((name, t.dtype, tuple(t.shape)) for name, t in tensors.items())


def supports(tensors: Mapping[str, torch.Tensor]) -> bool:
    return all(isinstance(t, torch.Tensor) and t.dtype in _CODES for t in tensors.values())


class TensorFileImage:
    """The bytes of one safetensors file for a fixed layout; ``copy_from`` then ``write`` for each checkpoint."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
                 pin_memory: bool = False) -> None:
        self.layout = layout_of(tensors)
        self.metadata = dict(metadata or {})
        # Widest elements first: every tensor then starts at a multiple of its element size.
        order = sorted(self.layout, key=lambda item: (-item[1].itemsize, item[0]))
        header: dict = {"__metadata__": self.metadata} if self.metadata else {}
        spans, offset = {}, 0
        for name, dtype, shape in order:
            nbytes = dtype.itemsize * int(torch.Size(shape).numel())
            header[name] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            spans[name] = (offset, offset + nbytes, dtype, shape)
            offset += nbytes
        text = json.dumps(header, separators=(",", ":")).encode("utf-8")
        data_start = _round_up(8 + len(text))
        text += b" " * (data_start - 8 - len(text))
        self.size = data_start + offset
        capacity = _round_up(self.size)
        raw = torch.empty(capacity + ALIGN, dtype=torch.uint8, pin_memory=pin_memory)
        shift = (-raw.data_ptr()) % ALIGN
        self._buffer = raw[shift : shift + capacity]
        self._buffer[: data_start].copy_(torch.frombuffer(bytearray(struct.pack("<Q", len(text)) + text),
                                                         dtype=torch.uint8))
        self._buffer[self.size :].zero_()
        self.views = {
            name: self._buffer[data_start + begin : data_start + end].view(dtype).view(shape)
            for name, (begin, end, dtype, shape) in spans.items()
        }

    def copy_from(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy ``tensors`` (the same layout) into the image; non-blocking from a GPU into pinned memory."""
        for name, tensor in tensors.items():
            view = self.views[name]
            view.copy_(tensor.detach(), non_blocking=tensor.is_cuda and view.is_pinned())

    def write(self, path: str) -> str:
        """Write the image to ``path`` (fsynced); returns the file's CRC-32 as 8 hex digits."""
        data = memoryview(self._buffer.numpy())
        crc = zlib.crc32(data[: self.size])
        try:
            self._write_direct(path, data)
        except OSError as error:
            if error.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
                raise
            self._write_buffered(path, data)  # this file system refuses direct I/O
        return f"{crc:08x}"

    def _write_direct(self, path: str, data: memoryview) -> None:
        flag = getattr(os, "O_DIRECT", None)
        if flag is None:
            raise OSError(errno.EOPNOTSUPP, "no O_DIRECT on this platform")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flag, 0o644)
        try:
            _write_all(fd, data, len(data))  # whole aligned blocks ...
            os.ftruncate(fd, self.size)  # ... then cut the zero tail
            os.fsync(fd)
        finally:
            os.close(fd)

    def _write_buffered(self, path: str, data: memoryview) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, data, self.size)
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_all(fd: int, data: memoryview, length: int) -> None:
    pos = 0
    while pos < length:
        written = os.pwrite(fd, data[pos : min(length, pos + _CHUNK)], pos)
        if written <= 0:
            raise OSError(errno.EIO, "short write")
        pos += written


class ImageStaging:
    """One reusable image per checkpoint file, rebuilt only when the tensors' layout changes."""

    def __init__(self) -> None:
        self._images: dict[str, TensorFileImage] = {}

    def stage(self, name: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
              ) -> TensorFileImage:
        image = self._images.get(name)
        if image is None or image.layout != layout_of(tensors) or image.metadata != dict(metadata or {}):
            pin = any(t.is_cuda for t in tensors.values()) and torch.cuda.is_available()
            image = self._images[name] = TensorFileImage(tensors, metadata, pin_memory=pin)
        image.copy_from(tensors)
        return image
