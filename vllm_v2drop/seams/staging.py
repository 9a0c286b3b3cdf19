"""A step's host arrays reach the device in one copy, from one persistent host buffer.

The V2Drop plan of a step lives in NumPy arrays (per-stage sequence lengths, query offsets,
compact KV positions; the drop loop's segment and token indices and keep counts). A
``non_blocking`` copy of a fresh NumPy array is synchronous in disguise: CUDA stages pageable
memory through its own buffer and the host waits (vLLM's ``VLLM_GPU_SYNC_CHECK`` flags it). So,
as vLLM does for its own inputs, V2Drop writes them into one buffer allocated once, pinned where
the platform supports it (vLLM's ``CpuGpuBuffer`` and ``is_pin_memory_available``), and copies the
used bytes to the buffer's device twin with one ``non_blocking`` copy per flush. The next step
rewrites the host buffer only after an event says the last copy has left it: with async
scheduling the host prepares step N+1 while step N's copy may still be queued.

Where the device is the host (vLLM's CPU backend), the device twin is the host buffer itself, as
vLLM's CPU model runner does with its own ``CpuGpuBuffer`` pairs, and a flush copies nothing.

The buffer is sized once for the worst step the engine can schedule
(:func:`worst_case_bytes`); a larger step (never planned by vLLM's limits) grows it, logged once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

logger = logging.getLogger("vllm.v2drop")

_ALIGN = 8  # every array starts 8-byte aligned, so any integer dtype views the bytes in place

_NP = {torch.int32: np.int32, torch.int64: np.int64}


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


def worst_case_bytes(max_tokens: int, max_reqs: int, num_stages: int, held_rows: int = 0) -> int:
    """Bytes the largest step stages: per stage its sequence lengths and query offsets (int32) and
    compact KV positions (int64, at most every row); the rows' segments and token indices (int64),
    and the segments' counts per stage (int64, at most one segment per row). ``held_rows``
    (``chunked_items``): rows held at the first drop layer that may come back in one step, which
    the later stages and the arrays placing them (int64) then also hold."""
    s, t, r, h = num_stages, max_tokens, max_reqs, held_rows
    metadata = (s + 1) * _aligned(4 * r) + s * (_aligned(4 * (r + 1)) + 8 * (t + h))
    drop = 2 * 8 * t + (s + 1) * 8 * t + (4 * 8 * (t + h) if h else 0)
    return metadata + drop + _ALIGN * (4 * s + 8)


class _Buffer:
    """vLLM's ``CpuGpuBuffer`` as V2Drop uses it, where vLLM is not installed."""

    def __init__(self, size: int, *, dtype: torch.dtype, device: torch.device, pin_memory: bool) -> None:
        self.cpu = torch.zeros(size, dtype=dtype, pin_memory=pin_memory)
        self.gpu = torch.zeros_like(self.cpu, device=device)
        self.np = self.cpu.numpy()


@dataclass(frozen=True)
class Staged:
    """Where one staged array lies in the buffer."""

    offset: int
    nbytes: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def end(self) -> int:
        return self.offset + self.nbytes


class StepStaging:
    """One persistent host buffer and its device twin; :meth:`put` arrays, :meth:`flush` them.

    Per step: :meth:`begin`, then any number of :meth:`put` and :meth:`flush`; :meth:`on_device` gives
    an array's device tensor once flushed (a view of the device buffer, valid until the next
    step's flush overwrites it: later in the device's stream, after this step's kernels read it),
    :meth:`on_host` its host tensor right away.
    """

    def __init__(self, device: torch.device | str, capacity: int, pin_memory: bool | None = None,
                 copy_to_device: bool | None = None) -> None:
        try:
            from vllm.utils.platform_utils import is_pin_memory_available
            from vllm.v1.utils import CpuGpuBuffer
        except ImportError:  # the drop loop without vLLM (benchmarks/gpu_prefill.py on a bare GPU)
            CpuGpuBuffer, is_pin_memory_available = _Buffer, torch.cuda.is_available

        self.device = torch.device(device)
        self.pin_memory = is_pin_memory_available() if pin_memory is None else pin_memory
        # the device twin is the host buffer itself (default where the device is the host)
        self._aliased = self.device.type == "cpu" if copy_to_device is None else not copy_to_device
        self._new_buffer = lambda size: self._twinned(CpuGpuBuffer(size, dtype=torch.uint8, device=self.device,
                                                                     pin_memory=self.pin_memory))
        self.buffer = self._new_buffer(_aligned(max(capacity, _ALIGN)))
        # the host waits on it before rewriting the buffer; none where the device is the host
        self._copied = None if self.device.type == "cpu" else torch.Event(self.device, blocking=True)
        self.used = 0  # bytes put in this step
        self.flushed = 0  # of them, bytes copied to the device
        self.growths = 0

    def _twinned(self, buffer):
        if self._aliased:
            buffer.gpu = buffer.cpu
        return buffer

    @property
    def aliased(self) -> bool:
        """The device twin is the host buffer (the device is the host): nothing is ever copied."""
        return self._aliased

    @property
    def capacity(self) -> int:
        return self.buffer.cpu.shape[0]

    def begin(self) -> None:
        """Start a step: wait until the last step's copy has read the host buffer."""
        if self._copied is not None and self.flushed:
            self._copied.synchronize()
        self.used = self.flushed = 0

    def put(self, array, dtype: torch.dtype = torch.int64) -> Staged:
        """Write ``array`` (any shape, cast to ``dtype``: int32 or int64) into the host buffer."""
        a = np.asarray(array)
        nbytes = a.size * dtype.itemsize
        staged = Staged(self.used, nbytes, tuple(a.shape), dtype)
        end = self.used + _aligned(nbytes)
        if end > self.capacity:
            self._grow(end)
        if nbytes:
            self.buffer.np[staged.offset : staged.end].view(_NP[dtype]).reshape(a.shape)[...] = a
        self.used = end
        return staged

    def flush(self) -> None:
        """Copy what was put since the last flush to the device, without waiting for it."""
        if self.used == self.flushed:
            return
        lo, hi = self.flushed, self.used
        if not self._aliased:
            self.buffer.gpu[lo:hi].copy_(self.buffer.cpu[lo:hi], non_blocking=True)
        if self._copied is not None:
            self._copied.record()
        self.flushed = hi

    def on_host(self, staged: Staged) -> torch.Tensor:
        return self._view(self.buffer.cpu, staged)

    def on_device(self, staged: Staged) -> torch.Tensor:
        if staged.end > self.flushed:
            raise RuntimeError("V2Drop staging: an array's device copy was read before it was flushed")
        return self._view(self.buffer.gpu, staged)

    @staticmethod
    def _view(buf: torch.Tensor, staged: Staged) -> torch.Tensor:
        return buf[staged.offset : staged.end].view(staged.dtype).view(staged.shape)

    def _grow(self, need: int) -> None:
        """A larger buffer pair holding what this step put so far; flushed again from the start.
        Tensors handed out before keep the old buffers alive with their values."""
        old = self.buffer
        self.buffer = self._new_buffer(_aligned(max(need, 2 * self.capacity)))
        self.buffer.cpu[: self.used].copy_(old.cpu[: self.used])
        self.flushed = 0
        self.growths += 1
        if self.growths == 1:
            logger.warning("V2Drop: a step staged %d bytes, more than the %d its buffer was sized for; "
                           "the buffer grows", need, old.cpu.shape[0])
