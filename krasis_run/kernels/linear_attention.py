"""The gated delta rule of Gated DeltaNet layers (Qwen3-Next, Qwen3.5), per value head h with state S [dk, dv]:

    S <- exp(g_t) S;   u_t = beta_t (v_t - S^T k_t);   S <- S + k_t u_t^T;   o_t = S^T q_t

`gated_delta_recurrent` runs it token by token (the reference, and decode's single step); `gated_delta_chunked` runs
the same recurrence a chunk of tokens at a time with matrix products: within a chunk, with G the running sum of g,

    (I + A) U = B,  A[t, s] = beta_t e^(G_t - G_s) k_t.k_s (s < t),  B_t = beta_t (v_t - e^G_t S0^T k_t)
    O = e^G (Q S0) + (e^(G_t - G_s) [s <= t] * Q K^T) U,   S_end = e^G_C S0 + K^T (e^(G_C - G) U)

one triangular solve per chunk instead of a Python step per token (prefill of a long prompt). Shapes: q, k [T, H, dk]
(already l2-normed and scaled), v [T, H, dv], log_decay g and beta [T, H], state [H, dk, dv] float32; both return
(out [T, H, dv], new state).
"""

from __future__ import annotations

import torch

CHUNK = 64


def gated_delta_recurrent(q, k, v, log_decay, beta, state):
    out = torch.empty(v.shape, dtype=torch.float32)
    decay = log_decay.exp()
    for t in range(q.shape[0]):
        state = state * decay[t][:, None, None]
        delta = (v[t] - (state * k[t][:, :, None]).sum(1)) * beta[t][:, None]
        state = state + k[t][:, :, None] * delta[:, None, :]
        out[t] = (state * q[t][:, :, None]).sum(1)
    return out, state


def gated_delta_chunked(q, k, v, log_decay, beta, state, chunk: int = CHUNK):
    out = torch.empty(v.shape, dtype=torch.float32)
    for start in range(0, q.shape[0], chunk):
        end = min(start + chunk, q.shape[0])
        qc, kc, vc = (x[start:end].transpose(0, 1) for x in (q, k, v))  # [H, C, d]
        g = log_decay[start:end].transpose(0, 1).cumsum(-1)  # [H, C]
        b = beta[start:end].transpose(0, 1)
        c = end - start
        lower = torch.ones(c, c, dtype=torch.bool).tril()
        gap = (g[:, :, None] - g[:, None, :]).masked_fill(~lower, float("-inf")).exp()  # e^(G_t - G_s), s <= t
        strict = gap.masked_fill(torch.eye(c, dtype=torch.bool), 0.0)
        a = b[:, :, None] * strict * (kc @ kc.transpose(1, 2))
        rhs = b[:, :, None] * (vc - g.exp()[:, :, None] * (kc @ state))
        eye = torch.eye(c).expand_as(a)
        u = torch.linalg.solve_triangular(eye + a, rhs, upper=False, unitriangular=True)
        out[start:end] = (g.exp()[:, :, None] * (qc @ state) + (gap * (qc @ kc.transpose(1, 2))) @ u).transpose(0, 1)
        last = g[:, -1]
        state = last.exp()[:, None, None] * state + kc.transpose(1, 2) @ ((last[:, None] - g).exp()[:, :, None] * u)
    return out, state
