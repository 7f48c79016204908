"""Flags in pinned host memory that a CUDA stream sets and waits on: the driver's stream memory operations
(cuStreamWriteValue32 / cuStreamWaitValue32), which stream capture records into a CUDA graph as memory-op
nodes.

They let one graph hold a whole hybrid decode step: where a layer's experts are on the CPU the graph sets
that layer's `ready` flag after copying the hidden state out, and waits for `done` (set by the CPU, which
spins on `ready`) before reading the CPU's sum back. Without them each such layer splits the step into
two graph launches around an event the host waits on, which costs tens of microseconds a layer.
`available()` checks that this driver and device support them, captured in a graph, before an engine uses
them; otherwise the engine keeps the event path.
"""

from __future__ import annotations

import ctypes
import functools

import torch

WAIT_EQ = 0x1  # CU_STREAM_WAIT_VALUE_EQ
LINE = 16  # int32 per flag: one 64-byte cache line each, so CPU and GPU writes never share a line


@functools.cache
def _driver() -> tuple | None:
    """(write, wait) entry points of libcuda, or None where there is no CUDA driver."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    fns = []
    for name in ("cuStreamWriteValue32", "cuStreamWaitValue32"):
        fn = getattr(lib, name + "_v2", None) or getattr(lib, name, None)
        if fn is None:
            return None
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
        fns.append(fn)
    return tuple(fns)


class StreamFlags:
    """`count` int32 flags (zero at start) in pinned host memory; the GPU addresses them at their host
    address (unified addressing)."""

    def __init__(self, count: int):
        if _driver() is None:
            raise RuntimeError("no CUDA driver stream memory operations")
        self.flags = torch.zeros(count * LINE, dtype=torch.int32, pin_memory=True)
        self.count = count

    def address(self, i: int) -> int:
        if not 0 <= i < self.count:
            raise IndexError(f"flag {i} of {self.count}")
        return self.flags.data_ptr() + 4 * LINE * i

    def value(self, i: int) -> int:
        return int(self.flags[LINE * i])

    def set(self, stream: torch.cuda.Stream, i: int, value: int) -> None:
        """Enqueue: flag i = value, after everything before it on the stream (memory barrier included)."""
        _call(_driver()[0], stream, self.address(i), value, 0, "write")

    def wait(self, stream: torch.cuda.Stream, i: int, value: int) -> None:
        """Enqueue: the stream waits until flag i == value."""
        _call(_driver()[1], stream, self.address(i), value, WAIT_EQ, "wait")

    def release(self, i: int) -> None:
        """Set flag i to 1 from the host (what the CPU side does when a layer is done)."""
        self.flags[LINE * i] = 1

    def reset(self) -> None:
        self.flags.zero_()


def _call(fn, stream: torch.cuda.Stream, address: int, value: int, flags: int, what: str) -> None:
    rc = fn(ctypes.c_void_p(stream.cuda_stream), address, value, flags)
    if rc:
        raise RuntimeError(f"cuStream{what.capitalize()}Value32 failed (CUresult {rc})")


@functools.cache
def available(device: torch.device) -> bool:
    """Whether the flags work here, captured in a graph: a replay sets one flag, waits on one the host set,
    and clears it, around a kernel."""
    if device.type != "cuda" or _driver() is None:
        return False
    stream = torch.cuda.Stream(device)
    try:
        flags = StreamFlags(2)
        x = torch.zeros(1, device=device)
        stream.wait_stream(torch.cuda.current_stream(device))  # x is zeroed on the current stream
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream):
            graph.capture_begin()
            try:
                x.add_(1)
                flags.set(stream, 0, 1)
                flags.wait(stream, 1, 1)
                flags.set(stream, 1, 0)
            finally:
                graph.capture_end()
        flags.flags[LINE] = 1  # the host's answer before the replay: the wait passes at once
        with torch.cuda.stream(stream):
            graph.replay()
        stream.synchronize()
        return flags.value(0) == 1 and flags.value(1) == 0 and float(x) == 1.0
    except RuntimeError:
        return False
