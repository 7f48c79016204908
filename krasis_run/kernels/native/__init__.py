"""ctypes binding of the native CPU decode kernels (krasis_native.c): fused MoE, dense rows, attention,
and the small per-layer steps between them (RMSNorm, residual add + RMSNorm, q/k norm + rotary, router top-k,
the bf16 KV-cache write).

The library is built from source on first use if no build of these exact sources exists (see
build.py); it takes pointers into the artifact's mapping (tensor.data_ptr()), so weights are read in
place. `load()` raises NativeUnavailable with a one-line reason when it cannot be built or loaded.
Environment: KRASIS_CPU_ISA=scalar|avx2|avx512 forces an instruction path (default: the best this
CPU has); KRASIS_PIN=1/0 pins the OpenMP threads to CPUs (default: only on multi-node machines).
"""

from __future__ import annotations

import ctypes
import functools
import os

import torch

from ...codecs import q4_group
from ...format import Q4_GROUP
from . import build as _build

ISAS = ("scalar", "avx2", "avx512")
CODECS = {"bf16": 1, "q8": 2, "q4": 3, "f32": 4}
Q4_G64 = 5  # the id of q4 with a scale and zero per 64 columns (krasis_native.c)


def codec_id(codec: str, group: int = Q4_GROUP) -> int:
    """The library's id of a codec; q4 has one per grouping (columns per scale/zero: 32 or 64)."""
    if codec == "q4" and group == 64:
        return Q4_G64
    if codec == "q4" and group != Q4_GROUP:
        raise ValueError(f"no native q4 kernel for groups of {group} columns")
    return CODECS[codec]


def _rows_group(codec: str, k: int, parts) -> int:
    """Columns per scale of a q4 rows matrix (parts: q, scale, zero); the default for the other codecs."""
    return q4_group(k, parts[1].shape[-1]) if codec == "q4" else Q4_GROUP


ISA_ENV = "KRASIS_CPU_ISA"
PIN_ENV = "KRASIS_PIN"


class NativeUnavailable(RuntimeError):
    pass


_LOADED: list[ctypes.CDLL] = []  # load()'s library once it succeeded
_p = ctypes.c_void_p
_i = ctypes.c_int


@functools.cache
def load() -> ctypes.CDLL:
    try:
        path = _build.find_or_build()
    except (_build.BuildError, OSError) as e:
        raise NativeUnavailable(str(e).splitlines()[0]) from e
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise NativeUnavailable(f"cannot load {path}: {e}") from e
    lib.krs_source_hash.restype = ctypes.c_char_p
    if lib.krs_source_hash().decode() != _build.source_hash():
        raise NativeUnavailable(f"{path} was built from other sources; delete it")
    for name in ("krs_best_isa", "krs_get_isa", "krs_get_threads", "krs_pin_threads", "krs_decode_fields"):
        getattr(lib, name).restype = _i
        getattr(lib, name).argtypes = []
    lib.krs_set_isa.restype = _i
    lib.krs_set_isa.argtypes = [_i]
    lib.krs_set_threads.restype = None
    lib.krs_set_threads.argtypes = [_i]
    lib.krs_linear.restype = _i
    lib.krs_linear.argtypes = [_i, _p, _i, _i, _i, _p, _p, _p, _p]
    lib.krs_linear_multi.restype = _i
    lib.krs_linear_multi.argtypes = [_i, _p, _i, _i, _i, _p, _p, _p]
    lib.krs_moe.restype = _i
    lib.krs_moe.argtypes = [_i, _p, _i, _i, _i, _i, _i, _p, _p, _p, _p]
    lib.krs_moe_serve.restype = _i
    lib.krs_moe_serve.argtypes = [_i, _i, _i, _i, _i, _i, _p, ctypes.c_double, _p]
    lib.krs_attention.restype = _i
    lib.krs_attention.argtypes = [_p, _i, _i, _i, _i, _p, _p, _i, _p]
    lib.krs_rms_norm.restype = _i
    lib.krs_rms_norm.argtypes = [_p, _i, _i, _p, ctypes.c_float, _p]
    lib.krs_norm_rope.restype = _i
    lib.krs_norm_rope.argtypes = [_p, _i, _i, _i, _p, ctypes.c_float, _p, _p, _p]
    lib.krs_add_rms_norm.restype = _i
    lib.krs_add_rms_norm.argtypes = [_p, _p, _i, _i, _p, ctypes.c_float, _p]
    lib.krs_kv_store.restype = _i
    lib.krs_kv_store.argtypes = [_p, _p, ctypes.c_int64, _p, _p]
    lib.krs_route.restype = _i
    lib.krs_route.argtypes = [_p, _i, _i, _i, _i, _p, _p]
    lib.krs_decode_layers.restype = _i
    lib.krs_decode_layers.argtypes = [_p, _i, _p, ctypes.c_float, _i, _p, _p, _p, _p]
    lib.krs_decode_stages.restype = _i
    lib.krs_decode_stages.argtypes = [_p]
    lib.krs_read_probe.restype = ctypes.c_uint64
    lib.krs_read_probe.argtypes = [_p, ctypes.c_size_t]
    forced = os.environ.get(ISA_ENV)
    if forced:
        set_isa(forced, lib)
    _LOADED.append(lib)
    return lib


def available() -> bool:
    try:
        load()
        return True
    except NativeUnavailable:
        return False


def best_isa() -> str:
    return ISAS[load().krs_best_isa()]


def isa() -> str:
    return ISAS[load().krs_get_isa()]


def set_isa(name: str, lib: ctypes.CDLL | None = None) -> None:
    lib = lib or load()
    if name not in ISAS:
        raise ValueError(f"{ISA_ENV}={name!r}: use one of {', '.join(ISAS)}")
    if lib.krs_set_isa(ISAS.index(name)) < 0:
        raise NativeUnavailable(f"this CPU cannot run the {name} path (best: {ISAS[lib.krs_best_isa()]})")


def set_threads(n: int) -> None:
    lib = load()
    lib.krs_set_threads(int(n))
    pin = os.environ.get(PIN_ENV)
    if pin == "1" or (pin is None and os.path.exists("/sys/devices/system/node/node1")):
        lib.krs_pin_threads()


def threads() -> int:
    return load().krs_get_threads()


def _check(rc: int, what: str) -> None:
    if rc:
        raise RuntimeError(f"native {what} failed (code {rc})")


def _lib() -> ctypes.CDLL:
    # A decode step makes ~15 calls per layer; the library is looked up by attribute on each call (not
    # bound once) so a caller may swap one function (bench_decode --glue stubs the weight-reading ones).
    return _LOADED[0] if _LOADED else load()


def _out(out, shape: tuple[int, ...]):
    """A new float32 tensor of `shape`, or `out` after checking it can take the result: the kernels write
    through its pointer, so a wrong size would be memory corruption, not an exception."""
    if out is None:
        return torch.empty(shape, dtype=torch.float32)
    if out.dtype != torch.float32 or out.shape != shape or not out.is_contiguous() or out.device.type != "cpu":
        raise ValueError(f"out must be a contiguous CPU float32 tensor of shape {list(shape)}, got "
                         f"{out.dtype} {list(out.shape)}")
    return out


def linear(codec: str, x, n: int, w0, w1=None, w2=None, out=None):
    """x float32 [M, K] contiguous @ W[n, K]^T; w0..w2 are the parts (q/scale/zero or w) as tensors. `out`
    (float32 [M, n] contiguous, e.g. a pinned buffer) receives the result instead of a new tensor."""
    m, k = x.shape
    y = _out(out, (m, n))
    _check(_lib().krs_linear(codec_id(codec, _rows_group(codec, k, (w0, w1))), x.data_ptr(), m, k, n, w0.data_ptr(),
                             w1.data_ptr() if w1 is not None else None,
                             w2.data_ptr() if w2 is not None else None, y.data_ptr()), "linear")
    return y


def linear_multi(codec: str, x, matrices: list[list], out=None):
    """x float32 [M, K] contiguous against several matrices of one codec (each a list of its parts as tensors, as
    `linear` takes them): float32 [M, sum of rows], the outputs side by side; one quantization of x, one call."""
    m, k = x.shape
    ns = [w[0].shape[0] for w in matrices]
    y = _out(out, (m, sum(ns)))
    rows = (ctypes.c_int * len(ns))(*ns)
    parts = (ctypes.c_void_p * (3 * len(ns)))(*[p.data_ptr() if p is not None else None
                                               for w in matrices for p in (list(w) + [None] * 3)[:3]])
    group = _rows_group(codec, k, matrices[0])
    if any(_rows_group(codec, k, w) != group for w in matrices):
        raise ValueError("linear_multi takes matrices of one q4 grouping")
    _check(_lib().krs_linear_multi(codec_id(codec, group), x.data_ptr(), m, k, len(ns), rows, parts, y.data_ptr()),
           "linear_multi")
    return y


def moe(codec: str, x, ids, weights, ptrs, hidden: int, width: int, experts: int, out=None,
        group: int = Q4_GROUP):
    """x float32 [M, H]; ids int32 [M, k]; weights float32 [M, k]; ptrs int64 [E, 4] (see krasis_native.c)
    -> float32 [M, H], the routing-weighted sum of the selected experts. An id < 0 skips its slot: it adds
    nothing and no expert is read for it (a hybrid engine passes -1 for the experts it runs on the GPU;
    all -1 gives zeros); an id >= experts raises. `out` (float32 [M, H] contiguous, e.g. a pinned buffer)
    receives the result instead of a new tensor. `group`: q4 columns per scale/zero."""
    m, k = ids.shape
    y = _out(out, (m, hidden))
    _check(_lib().krs_moe(codec_id(codec, group), x.data_ptr(), m, hidden, width, experts, k, ids.data_ptr(),
                          weights.data_ptr(), ptrs.data_ptr(), y.data_ptr()), "moe")
    return y


def moe_serve(codec: str, hidden: int, width: int, experts: int, topk: int, table, timeout_s: float, stats,
              group: int = Q4_GROUP) -> None:
    """The CPU side of a decode step captured as one CUDA graph (krs_moe_serve in krasis_native.c): per row of
    table (int64 [L, 7]: ready flag, done flag, x, ids, weights, out, expert pointer table; every address
    pinned host memory the caller keeps alive) wait for `ready`, run that layer's experts into `out`, set
    `done`. stats (float64 [3]) accumulates seconds waiting, seconds computing, expert blocks read.
    Raises TimeoutError when a flag does not come within timeout_s (every later layer is still released)."""
    if table.dtype != torch.int64 or table.dim() != 2 or table.shape[1] != 7 or not table.is_contiguous():
        raise ValueError("table must be a contiguous int64 [L, 7] tensor")
    if stats.dtype != torch.float64 or stats.numel() != 3:
        raise ValueError("stats must be a float64 tensor of 3 values")
    rc = _lib().krs_moe_serve(codec_id(codec, group), hidden, width, experts, topk, table.shape[0], table.data_ptr(),
                              float(timeout_s), stats.data_ptr())
    if rc == -4:
        raise TimeoutError(f"the GPU did not hand over a layer within {timeout_s:g} s")
    _check(rc, "moe_serve")


def attention(q, keys, values, start_pos: int, out=None):
    """q float32 [T, H, D]; keys/values bf16 [S, KVH, D] contiguous, S = start_pos + T -> [T, H*D] (into
    `out` when given)."""
    t, nq, hd = q.shape
    y = _out(out, (t, nq * hd))
    _check(_lib().krs_attention(q.data_ptr(), t, nq, keys.shape[1], hd, keys.data_ptr(), values.data_ptr(),
                                start_pos, y.data_ptr()), "attention")
    return y


def rms_norm(x, w, eps: float, out=None):
    """x float32 [T, n] contiguous, w float32 [n] contiguous -> x * rsqrt(mean(x^2) + eps) * w (out may be x)."""
    t, n = x.shape
    y = _out(out, (t, n))
    _check(_lib().krs_rms_norm(x.data_ptr(), t, n, w.data_ptr(), eps, y.data_ptr()), "rms_norm")
    return y


def add_rms_norm(x, delta, w, eps: float, out=None):
    """x float32 [T, n] contiguous += delta (same shape, contiguous), then RMSNorm(x) * w -> float32 [T, n]
    (`out` must not be x or delta)."""
    t, n = x.shape
    y = _out(out, (t, n))
    _check(_lib().krs_add_rms_norm(x.data_ptr(), delta.data_ptr(), t, n, w.data_ptr(), eps, y.data_ptr()),
           "add_rms_norm")
    return y


def kv_store_rows(k, v, keys, values, start: int) -> bool:
    """Write k/v float32 [T, ...] contiguous as bf16 (torch's rounding) into rows start..start+T of keys/values,
    contiguous CPU bf16 [capacity, ...]; returns False, writing nothing, for any other tensors (the caller then
    assigns with torch). Checked here because the kernel writes through raw addresses."""
    f32, bf16 = torch.float32, torch.bfloat16
    t = k.shape[0]
    # is_cpu, not .device.type: a device object per check cost ~1 us of a call that is ~3 us without the checks
    if (k.dtype is not f32 or v.dtype is not f32 or keys.dtype is not bf16 or values.dtype is not bf16
            or not (k.is_cpu and v.is_cpu and keys.is_cpu and values.is_cpu)
            or not (k.is_contiguous() and v.is_contiguous() and keys.is_contiguous() and values.is_contiguous())
            or start < 0 or start + t > keys.shape[0] or k.shape[1:] != keys.shape[1:] or v.shape != k.shape
            or values.shape != keys.shape):
        return False
    n = k.numel()
    row = keys.stride(0) * 2  # bytes per cache row
    _check(_lib().krs_kv_store(k.data_ptr(), v.data_ptr(), n, keys.data_ptr() + start * row,
                               values.data_ptr() + start * row), "kv_store")
    return True


def norm_rope(x, w, eps: float, cos, sin, out=None):
    """x float32 [T, H, D] contiguous; w [D]; cos/sin float32 [T, D] contiguous -> per-head RMSNorm then
    rotate-half rotary, float32 [T, H, D] (out may be x)."""
    t, h, d = x.shape
    y = _out(out, (t, h, d))
    _check(_lib().krs_norm_rope(x.data_ptr(), t, h, d, w.data_ptr(), eps, cos.data_ptr(), sin.data_ptr(),
                                y.data_ptr()), "norm_rope")
    return y


def route(logits, k: int, renormalize: bool):
    """logits float32 [T, E] contiguous -> (ids int32 [T, k], weights float32 [T, k]): softmax, top-k, and
    optionally the k weights scaled to sum 1."""
    t, e = logits.shape
    ids = torch.empty(t, k, dtype=torch.int32)
    wts = torch.empty(t, k, dtype=torch.float32)
    _check(_lib().krs_route(logits.data_ptr(), t, e, k, int(renormalize), ids.data_ptr(), wts.data_ptr()), "route")
    return ids, wts


DECODE_STAGES = ("qkv", "rope_kv", "attention", "o_proj", "router", "moe", "norms")  # krs_decode_layers' DS_* order


def decode_stages(acc) -> None:
    """While `acc` (a float64 tensor of len(DECODE_STAGES)) is set, every krs_decode_layers call adds its stages'
    seconds to it; None stops the clock. A benchmark's view; the clock reads cost ~20 ns each."""
    lib = _lib()
    if acc is None:
        lib.krs_decode_stages(None)
        return
    if acc.dtype != torch.float64 or acc.numel() != len(DECODE_STAGES) or not acc.is_contiguous():
        raise ValueError(f"decode_stages needs a contiguous float64 tensor of {len(DECODE_STAGES)}")
    if lib.krs_decode_stages(acc.data_ptr()) != len(DECODE_STAGES):
        raise NativeUnavailable("the native library's decode stages differ from DECODE_STAGES: rebuild it")


def read_bandwidth(buffer, repeats: int = 5) -> float:
    """Best GB/s of the native threads streaming `buffer` (a tensor much larger than the caches)."""
    import time

    lib, best = load(), 0.0
    nbytes = buffer.numel() * buffer.element_size()
    for _ in range(repeats):
        start = time.perf_counter()
        lib.krs_read_probe(buffer.data_ptr(), nbytes)
        best = max(best, nbytes / (time.perf_counter() - start) / 1e9)
    return best
