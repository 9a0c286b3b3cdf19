"""The staging buffer that carries each step's V2Drop arrays to the device (runner/staging.py).

Runs on CPU: the tests ask for a device twin that is a second CPU buffer (``copy_to_device``), so
every copy is checked byte for byte; an engine on the CPU backend uses the host buffer as its twin.
The pinned-memory test needs CUDA and is skipped without it (reported by pytest's summary).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vllm_v2drop.seams.staging import StepStaging, worst_case_bytes


def _step(staging: StepStaging, arrays):
    staging.begin()
    staged = [staging.put(a, dt) for a, dt in arrays]
    staging.flush()
    return [staging.on_device(s) for s in staged], [staging.on_host(s) for s in staged]


def test_values_shapes_dtypes_across_steps_of_different_sizes():
    rng = np.random.default_rng(0)
    staging = StepStaging("cpu", capacity=16384, pin_memory=False, copy_to_device=True)
    host_buf, dev_buf = staging.buffer.cpu, staging.buffer.gpu
    for step, n in enumerate([5, 300, 1, 0, 77, 300, 2]):
        arrays = [
            (rng.integers(0, 1 << 40, size=n), torch.int64),
            (rng.integers(-5, 1 << 20, size=n + 1).astype(np.int64), torch.int32),  # cast to int32
            (rng.integers(0, 9, size=(3, n)), torch.int32),
            (rng.integers(0, 9, size=(2, 3)), torch.int64),
        ]
        devs, hosts = _step(staging, arrays)
        for (a, dt), d, h in zip(arrays, devs, hosts):
            assert d.dtype == dt and tuple(d.shape) == a.shape and d.is_contiguous()
            assert np.array_equal(d.numpy(), a.astype(np.int32 if dt == torch.int32 else np.int64)), step
            assert np.array_equal(h.numpy(), d.numpy())
            assert d.untyped_storage().data_ptr() == dev_buf.untyped_storage().data_ptr()  # a view, no new tensor
            assert h.untyped_storage().data_ptr() == host_buf.untyped_storage().data_ptr()
        # the same buffers every step: nothing allocated per step
        assert staging.buffer.cpu is host_buf and staging.buffer.gpu is dev_buf and staging.growths == 0


def test_arrays_are_aligned_and_do_not_overlap():
    staging = StepStaging("cpu", capacity=256, pin_memory=False, copy_to_device=True)
    staging.begin()
    a = staging.put(np.arange(3), torch.int32)  # 12 bytes, padded to 16
    b = staging.put(np.arange(5), torch.int64)
    c = staging.put(np.arange(1), torch.int32)
    assert (a.offset, b.offset, c.offset) == (0, 16, 56) and staging.used == 64
    staging.flush()
    assert staging.on_device(a).tolist() == [0, 1, 2] and staging.on_device(b).tolist() == [0, 1, 2, 3, 4]


def test_growth_keeps_what_was_put_and_flushed_before_it():
    staging = StepStaging("cpu", capacity=64, pin_memory=False, copy_to_device=True)
    staging.begin()
    first = staging.put(np.arange(4))  # 32 bytes
    staging.flush()
    early = staging.on_device(first)
    big = staging.put(np.arange(100) * 3)  # 800 bytes: the buffer grows within the step
    assert staging.growths == 1 and staging.capacity >= 832
    staging.flush()  # copies everything again into the new device buffer
    assert staging.on_device(first).tolist() == [0, 1, 2, 3] and early.tolist() == [0, 1, 2, 3]
    assert staging.on_device(big).tolist() == list(range(0, 300, 3))
    grown = staging.buffer
    for n in (100, 10, 100):  # later steps of that size reuse the grown buffer
        devs, _ = _step(staging, [(np.arange(n) + 1, torch.int64)])
        assert devs[0].tolist() == list(range(1, n + 1))
    assert staging.buffer is grown and staging.growths == 1


def test_read_before_flush_is_an_error():
    staging = StepStaging("cpu", capacity=64, pin_memory=False, copy_to_device=True)
    staging.begin()
    s = staging.put(np.arange(2))
    with pytest.raises(RuntimeError, match="before it was flushed"):
        staging.on_device(s)


def test_two_flushes_in_a_step_copy_each_part_once():
    staging = StepStaging("cpu", capacity=1024, pin_memory=False, copy_to_device=True)
    staging.begin()
    a = staging.put(np.arange(4))
    staging.flush()
    staging.on_device(a).fill_(7)  # stands for a value the first copy delivered
    b = staging.put(np.arange(6) + 10)
    staging.flush()  # copies b only
    assert staging.on_device(a).tolist() == [7] * 4 and staging.on_device(b).tolist() == list(range(10, 16))
    staging.flush()  # nothing new: nothing copied
    assert staging.on_device(a).tolist() == [7] * 4


def test_worst_case_covers_the_largest_step():
    """A step at the engine's limits (every row a candidate of its own item, every stage
    compacting) fits the buffer sized by worst_case_bytes: no growth."""
    tokens, reqs, stages = 512, 7, 3
    staging = StepStaging("cpu", worst_case_bytes(tokens, reqs, stages), pin_memory=False, copy_to_device=True)
    staging.begin()
    for _ in range(stages + 1):
        staging.put(np.zeros(reqs), torch.int32)
    for _ in range(stages):
        staging.put(np.zeros(reqs + 1), torch.int32)
        staging.put(np.zeros(tokens), torch.int64)
    staging.put(np.zeros(tokens))
    staging.put(np.zeros(tokens))
    staging.put(np.zeros((stages + 1, tokens)))
    assert staging.growths == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: pinned host memory")
def test_sources_are_pinned_on_cuda():
    staging = StepStaging("cuda", capacity=1024)
    assert staging.pin_memory and staging.buffer.cpu.is_pinned() and staging.buffer.gpu.is_cuda
    for n in (10, 3, 200):  # the last one grows the buffer: pinned again
        devs, hosts = _step(staging, [(np.arange(n), torch.int64), (np.arange(3), torch.int32)])
        assert all(h.is_pinned() for h in hosts) and staging.buffer.cpu.is_pinned()
        assert devs[0].is_cuda and devs[0].cpu().tolist() == list(range(n))


def test_on_the_cpu_backend_the_device_twin_is_the_host_buffer():
    """As vLLM's CPU runner does with its own buffers: no second buffer, a flush copies nothing."""
    staging = StepStaging("cpu", capacity=64, pin_memory=False)
    assert staging.buffer.gpu is staging.buffer.cpu
    (dev,), (host,) = _step(staging, [(np.arange(5), torch.int64)])
    assert dev.data_ptr() == host.data_ptr() and dev.tolist() == [0, 1, 2, 3, 4]
    staging.put(np.arange(300), torch.int32)  # grows; the new pair is aliased too
    assert staging.growths == 1 and staging.buffer.gpu is staging.buffer.cpu
