"""The gated delta rule of Gated DeltaNet layers (Qwen3-Next, Qwen3.5), per value head h with state S [dk, dv]:

    S <- exp(g_t) S;   u_t = beta_t (v_t - S^T k_t);   S <- S + k_t u_t^T;   o_t = S^T q_t

`gated_delta_recurrent` runs it token by token (the reference, and decode's single step); `gated_delta_chunked` runs
the same recurrence a chunk of tokens at a time with matrix products: within a chunk, with G the running sum of g,

    (I + A) U = B,  A[t, s] = beta_t e^(G_t - G_s) k_t.k_s (s < t),  B_t = beta_t (v_t - e^G_t S0^T k_t)
    O = e^G (Q S0) + (e^(G_t - G_s) [s <= t] * Q K^T) U,   S_end = e^G_C S0 + K^T (e^(G_C - G) U)

one triangular solve per chunk instead of a Python step per token (prefill of a long prompt). Shapes: q, k [T, H, dk]
(already l2-normed and scaled), v [T, H, dv], log_decay g and beta [T, H], state [H, dk, dv] float32; both return
(out [T, H, dv], new state).

Only the state's passage from chunk to chunk is sequential. On CUDA one Triton program per (head, block of value
columns) carries the state in registers through every chunk (`delta_chunks`); the torch loop beside it (a few small
kernels per chunk, ~30x slower at 8K tokens on the H200) is the reference and the CPU path.
"""

from __future__ import annotations

import functools

import torch

CHUNK = 64
BLOCK_V = 64  # value columns of the state per Triton program


@functools.cache
def _triton_chunks():
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def chunks_kernel(u_ptr, w_ptr, qd_ptr, p_ptr, kd_ptr, decay_ptr, state_ptr, out_ptr, n_chunks,
                      C: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr):
        h = tl.program_id(0)
        rc = tl.arange(0, C)
        rk = tl.arange(0, DK)
        rv = tl.program_id(1) * BV + tl.arange(0, BV)
        s_offsets = h.to(tl.int64) * DK * DV + rk[:, None] * DV + rv[None, :]
        state = tl.load(state_ptr + s_offsets)  # [DK, BV] float32, carried through the chunks in registers
        for c in range(n_chunks):
            base = h.to(tl.int64) * n_chunks + c
            w = tl.load(w_ptr + base * C * DK + rc[:, None] * DK + rk[None, :])
            u = tl.load(u_ptr + base * C * DV + rc[:, None] * DV + rv[None, :]) - tl.dot(w, state)
            qd = tl.load(qd_ptr + base * C * DK + rc[:, None] * DK + rk[None, :])
            p = tl.load(p_ptr + base * C * C + rc[:, None] * C + rc[None, :])
            out = tl.dot(qd, state) + tl.dot(p, u)
            tl.store(out_ptr + base * C * DV + rc[:, None] * DV + rv[None, :], out)
            kd = tl.load(kd_ptr + base * C * DK + rc[None, :] * DK + rk[:, None])  # [DK, C]: k_decayed transposed
            state = tl.load(decay_ptr + base) * state + tl.dot(kd, u)
        tl.store(state_ptr + s_offsets, state)

    def run(u_v, w, q_decayed, p, k_decayed, decay_last, state, out):
        heads, n, c, dk = w.shape
        dv = u_v.shape[-1]
        block_v = min(BLOCK_V, dv)
        chunks_kernel[(heads, dv // block_v)](u_v, w, q_decayed, p, k_decayed, decay_last, state, out, n, C=c, DK=dk,
                                              DV=dv, BV=block_v, num_warps=4,
                                              num_stages=1)  # no load pipelining: 96 KB of shared memory, not 416

    return run


def _chunks_torch(u_v, w, q_decayed, p, k_decayed, decay_last, state, out):
    """The sequential part in torch: per chunk u = u_v - w S, out = q_decayed S + p u, S <- decay S + k_decayed^T u."""
    s = state
    for c in range(w.shape[1]):
        u = u_v[:, c] - w[:, c] @ s
        out[:, c] = q_decayed[:, c] @ s + p[:, c] @ u
        s = decay_last[:, c, None, None] * s + k_decayed[:, c].transpose(-1, -2) @ u
    state.copy_(s)


def delta_chunks(u_v, w, q_decayed, p, k_decayed, decay_last, state, out, use_triton: bool | None = None) -> None:
    """Carry `state` [H, dk, dv] (updated in place) through the chunks: u_v [H, N, C, dv], w and q_decayed
    [H, N, C, dk], p [H, N, C, C], k_decayed [H, N, C, dk], decay_last [H, N], all float32; out [H, N, C, dv]."""
    dk, dv, c = w.shape[-1], u_v.shape[-1], w.shape[2]
    fits = all(d >= 16 and d & (d - 1) == 0 for d in (dk, dv, c))  # tl.dot wants powers of two of 16 or more
    kernel = _triton_chunks() if (state.is_cuda if use_triton is None else use_triton) and fits else None
    if kernel is None:
        return _chunks_torch(u_v, w, q_decayed, p, k_decayed, decay_last, state, out)
    if not (state.is_contiguous() and out.is_contiguous()):
        raise ValueError("delta_chunks writes state and out in place: both must be contiguous")
    tensors = [t.contiguous() for t in (u_v, w, q_decayed, p, k_decayed, decay_last)]
    kernel(*tensors, state, out)


def gated_delta_recurrent(q, k, v, log_decay, beta, state):
    out = torch.empty(v.shape, dtype=torch.float32, device=v.device)
    decay = log_decay.exp()
    for t in range(q.shape[0]):
        state = state * decay[t][:, None, None]
        delta = (v[t] - (state * k[t][:, :, None]).sum(1)) * beta[t][:, None]
        state = state + k[t][:, :, None] * delta[:, None, :]
        out[t] = (state * q[t][:, :, None]).sum(1)
    return out, state


def gated_delta_chunked(q, k, v, log_decay, beta, state, chunk: int = CHUNK, use_triton: bool | None = None):
    """Everything that does not depend on the state is computed for all chunks at once (the triangular solves
    included: U = (I + A)^-1 B splits into (I + A)^-1 beta v minus (I + A)^-1 beta e^G K times S0); what is left per
    chunk is four small matrix products, so a long prompt costs a few kernels per chunk, not per token."""
    t_len, heads, dk = q.shape
    dv = v.shape[-1]
    pad = -t_len % chunk
    n = (t_len + pad) // chunk

    def chunks(x: torch.Tensor) -> torch.Tensor:  # [T, H, ...] -> [H, N, C, ...], zero-padded (g 0, beta 0)
        x = torch.nn.functional.pad(x.float(), (0, 0) * (x.dim() - 2) + (0, 0, 0, pad))
        return x.view(n, chunk, heads, *x.shape[2:]).transpose(0, 2).transpose(1, 2)

    qc, kc, vc = (chunks(x).contiguous() for x in (q, k, v))  # [H, N, C, d], each product reads them as they lie
    g = chunks(log_decay).cumsum(-1)  # [H, N, C]: G, the running log decay inside each chunk
    b = chunks(beta)
    lower = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    gap = (g[..., :, None] - g[..., None, :]).masked_fill(~lower, float("-inf")).exp()  # e^(G_t - G_s), s <= t
    strict = gap.masked_fill(torch.eye(chunk, dtype=torch.bool, device=q.device), 0.0)
    a = b[..., None] * strict * (kc @ kc.transpose(-1, -2))
    eye = torch.eye(chunk, device=q.device)
    # (I + A)^-1 once (a triangular solve against the identity: a quarter of the columns of solving against
    # [beta v | beta e^G K] directly), then two batched products
    inverse = torch.linalg.solve_triangular(eye + a, eye.expand_as(a), upper=False, unitriangular=True)
    u_v = inverse @ (b[..., None] * vc)  # U = u_v - w @ S0
    w = inverse @ ((b * g.exp())[..., None] * kc)
    p = gap * (qc @ kc.transpose(-1, -2))  # [H, N, C, C]
    q_decayed = g.exp()[..., None] * qc
    last = g[..., -1]  # [H, N]
    k_decayed = (last[..., None] - g).exp()[..., None] * kc  # [H, N, C, dk]
    out = torch.empty(heads, n, chunk, dv, dtype=torch.float32, device=q.device)
    state = state.float().clone()
    delta_chunks(u_v, w, q_decayed, p, k_decayed, last.exp(), state, out, use_triton)
    return out.permute(1, 2, 0, 3).reshape(n * chunk, heads, dv)[:t_len], state
