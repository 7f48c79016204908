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
    out = torch.empty(v.shape, dtype=torch.float32, device=v.device)
    decay = log_decay.exp()
    for t in range(q.shape[0]):
        state = state * decay[t][:, None, None]
        delta = (v[t] - (state * k[t][:, :, None]).sum(1)) * beta[t][:, None]
        state = state + k[t][:, :, None] * delta[:, None, :]
        out[t] = (state * q[t][:, :, None]).sum(1)
    return out, state


def gated_delta_chunked(q, k, v, log_decay, beta, state, chunk: int = CHUNK):
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

    qc, kc, vc = chunks(q), chunks(k), chunks(v)  # [H, N, C, d]
    g = chunks(log_decay).cumsum(-1)  # [H, N, C]: G, the running log decay inside each chunk
    b = chunks(beta)
    lower = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    gap = (g[..., :, None] - g[..., None, :]).masked_fill(~lower, float("-inf")).exp()  # e^(G_t - G_s), s <= t
    strict = gap.masked_fill(torch.eye(chunk, dtype=torch.bool, device=q.device), 0.0)
    a = b[..., None] * strict * (kc @ kc.transpose(-1, -2))
    eye = torch.eye(chunk, device=q.device).expand_as(a)
    rhs = torch.cat([b[..., None] * vc, (b * g.exp())[..., None] * kc], dim=-1)
    solved = torch.linalg.solve_triangular(eye + a, rhs, upper=False, unitriangular=True)
    u_v, w = solved.split([dv, dk], dim=-1)  # U = u_v - w @ S0
    p = gap * (qc @ kc.transpose(-1, -2))  # [H, N, C, C]
    q_decayed = g.exp()[..., None] * qc
    last = g[..., -1]  # [H, N]
    k_decayed = ((last[..., None] - g).exp()[..., None] * kc).transpose(-1, -2)  # [H, N, dk, C]
    decay_last = last.exp()[..., None, None]
    out = torch.empty(heads, n, chunk, dv, dtype=torch.float32, device=q.device)
    state = state.float()
    for c in range(n):
        u = u_v[:, c] - w[:, c] @ state
        out[:, c] = q_decayed[:, c] @ state + p[:, c] @ u
        state = decay_last[:, c] * state + k_decayed[:, c] @ u
    return out.permute(1, 2, 0, 3).reshape(n * chunk, heads, dv)[:t_len], state
