"""The gated delta rule of Gated DeltaNet layers (Qwen3-Next, Qwen3.5), per value head h with state S [dk, dv]:

    S <- exp(g_t) S;   u_t = beta_t (v_t - S^T k_t);   S <- S + k_t u_t^T;   o_t = S^T q_t

`gated_delta_recurrent` runs it token by token (the reference, and decode's single step); `gated_delta_chunked` runs
the same recurrence a chunk of tokens at a time with matrix products: within a chunk, with G the running sum of g,

    (I + A) U = B,  A[t, s] = beta_t e^(G_t - G_s) k_t.k_s (s < t),  B_t = beta_t (v_t - e^G_t S0^T k_t)
    O = e^G (Q S0) + (e^(G_t - G_s) [s <= t] * Q K^T) U,   S_end = e^G_C S0 + K^T (e^(G_C - G) U)

one triangular solve per chunk instead of a Python step per token (prefill of a long prompt). Shapes: q, k [T, H, dk]
(already l2-normed and scaled), v [T, H, dv], log_decay g and beta [T, H], state [H, dk, dv] float32; both return
(out [T, H, dv], new state).

Only the state's passage from chunk to chunk is sequential (`delta_chunks`, a torch loop over the chunks).

`gated_delta_layer` is a whole layer from its input projections to the gated norm that out_proj reads (causal conv,
silu, l2 norms, decay and beta, the rule, the norm). On CUDA it is four Triton kernels (`_triton_layer`): prep (conv
and norms, reading the projections in place), intra (the state-free terms of each chunk), states (the sequential
carry, storing the state each chunk starts from) and output (each chunk's outputs from that state, normed and gated),
so nothing of the [T, channels] float32 glue between them is materialized in torch: at 32K tokens that glue took
~60% of a linear-attention layer. `_layer_torch` is the same layer in torch: the reference, the CPU path and decode's
single step.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

CHUNK = 64
BLOCK_V = 32  # value columns of the state a Triton program: 4 programs a value head (64 columns: 6% slower at 32K)
PREP_WARPS = 8  # a [64, 128] float32 tile is 32 registers a thread at 8 warps
STATES_WARPS = 8  # the carry holds a chunk's inputs twice (this one's and the next one's); 4: 8% slower
OUTPUT_WARPS = 4  # 8 warps: 12% slower a layer at 32K


def delta_chunks(u_v, w, q_decayed, p, k_decayed, decay_last, state, out) -> None:
    """Carry `state` [H, dk, dv] (updated in place) through the chunks: per chunk u = u_v - w S, out = q_decayed S +
    p u, S <- decay S + k_decayed^T u. u_v [H, N, C, dv], w, q_decayed and k_decayed [H, N, C, dk], p [H, N, C, C],
    decay_last [H, N], all float32; out [H, N, C, dv]."""
    s = state
    for c in range(w.shape[1]):
        u = u_v[:, c] - w[:, c] @ s
        out[:, c] = q_decayed[:, c] @ s + p[:, c] @ u
        s = decay_last[:, c, None, None] * s + k_decayed[:, c].transpose(-1, -2) @ u
    state.copy_(s)


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
    delta_chunks(u_v, w, q_decayed, p, k_decayed, last.exp(), state, out)
    return out.permute(1, 2, 0, 3).reshape(n * chunk, heads, dv)[:t_len], state


def _layer_torch(q, k, v, z, b, a, taps, conv_state, a_log, dt_bias, norm_weight, state, eps, l2_eps):
    t, nk, dk = q.shape
    r, dv = v.shape[2], v.shape[3]
    nv, kernel = nk * r, taps.shape[0]
    mixed = torch.cat([q.reshape(t, -1), k.reshape(t, -1), v.reshape(t, -1)], dim=-1).float()
    seq = torch.cat([conv_state.float(), mixed], dim=0)  # [kernel - 1 + T, conv_dim]: causal depthwise conv
    conv = seq[:t] * taps[0]  # as shifted multiply-adds: cuDNN's depthwise conv1d took 4x longer
    for j in range(1, kernel):
        conv.addcmul_(seq[j:j + t], taps[j])
    q, k, v = F.silu(conv).split([nk * dk, nk * dk, nv * dv], dim=-1)
    q, k = q.reshape(t, nk, dk), k.reshape(t, nk, dk)  # l2-normed per key head, then shared by its value heads
    q = (q * torch.rsqrt((q * q).sum(-1, keepdim=True) + l2_eps) / dk**0.5).repeat_interleave(r, dim=1)
    k = (k * torch.rsqrt((k * k).sum(-1, keepdim=True) + l2_eps)).repeat_interleave(r, dim=1)
    beta = torch.sigmoid(b.reshape(t, nv).float())
    log_decay = -a_log.exp() * F.softplus(a.reshape(t, nv).float() + dt_bias)
    rule = gated_delta_recurrent if t == 1 else gated_delta_chunked  # decode: one step; prefill: chunks
    out, state = rule(q, k, v.reshape(t, nv, dv), log_decay, beta, state)
    normed = out * torch.rsqrt(out.square().mean(-1, keepdim=True) + eps) * norm_weight
    gated = normed * F.silu(z.reshape(t, nv, dv).float())
    return gated.reshape(t, nv * dv), seq[-(kernel - 1):], state


@functools.cache
def _triton_layer():
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def _conv(x_ptr, row_stride, channel0, rows, cols, T, taps_ptr, held_ptr, conv_dim,
              KERNEL: tl.constexpr, C: tl.constexpr, D: tl.constexpr, HELD: tl.constexpr):
        """The causal conv at token `rows` of the D channels from channel0; with HELD (the first chunk), inputs
        before the first token come from the held conv state [KERNEL - 1, conv_dim]."""
        acc = tl.full([C, D], 0.0, tl.float32)  # not tl.zeros: the interpreter runs a helper's library calls unpatched
        for j in tl.static_range(KERNEL):
            src = rows - (KERNEL - 1) + j
            x = tl.load(x_ptr + src[:, None].to(tl.int64) * row_stride + cols[None, :],
                        mask=((src >= 0) & (src < T))[:, None], other=0.0).to(tl.float32)
            if HELD:
                x += tl.load(held_ptr + (src + KERNEL - 1)[:, None] * conv_dim + channel0 + cols[None, :],
                             mask=(src < 0)[:, None], other=0.0)
            acc += x * tl.load(taps_ptr + j * conv_dim + channel0 + cols)[None, :]
        return acc

    @triton.jit
    def prep_kernel(q_ptr, k_ptr, v_ptr, b_ptr, a_ptr, sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sv_r, sb_t, sb_h, sb_r,
                    sa_t, sa_h, sa_r, taps_ptr, held_ptr, a_log_ptr, dt_bias_ptr, qn_ptr, kn_ptr, vn_ptr, g_ptr,
                    beta_ptr, T, TP, conv_dim, q_scale, l2_eps, first_chunk, KERNEL: tl.constexpr, C: tl.constexpr,
                    DK: tl.constexpr, DV: tl.constexpr, R: tl.constexpr, NK: tl.constexpr, HELD: tl.constexpr):
        """One chunk of tokens of one part of one key head (part 0: q, 1: k, 2 + j: its value head j's v, decay
        (running sum within the chunk) and beta): conv + silu (+ l2 norm for q and k); padding past T gets zeros.
        One part a program keeps one [C, D] tile live (the first version, all parts in one program, ran 10x slower)."""
        c, hk, part = tl.program_id(0) + first_chunk, tl.program_id(1), tl.program_id(2)
        rows = c * C + tl.arange(0, C)
        valid = rows < T
        rk, rv = tl.arange(0, DK), tl.arange(0, DV)
        key_rows = (hk * TP + rows)[:, None].to(tl.int64) * DK + rk[None, :]
        if part == 0:
            q = _conv(q_ptr + hk * sq_h, sq_t, hk * DK, rows, rk, T, taps_ptr, held_ptr, conv_dim, KERNEL, C, DK,
                      HELD)
            q = q * tl.sigmoid(q)
            q = q * (tl.rsqrt(tl.sum(q * q, 1) + l2_eps) * q_scale)[:, None]
            tl.store(qn_ptr + key_rows, tl.where(valid[:, None], q, 0.0))
        elif part == 1:
            k = _conv(k_ptr + hk * sk_h, sk_t, (NK + hk) * DK, rows, rk, T, taps_ptr, held_ptr, conv_dim, KERNEL, C,
                      DK, HELD)
            k = k * tl.sigmoid(k)
            k = k * tl.rsqrt(tl.sum(k * k, 1) + l2_eps)[:, None]
            tl.store(kn_ptr + key_rows, tl.where(valid[:, None], k, 0.0))
        else:
            j = part - 2
            hv = hk * R + j
            v = _conv(v_ptr + hk * sv_h + j * sv_r, sv_t, 2 * NK * DK + hv * DV, rows, rv, T, taps_ptr, held_ptr,
                      conv_dim, KERNEL, C, DV, HELD)
            v = v * tl.sigmoid(v)
            value_rows = (hv * TP + rows)[:, None].to(tl.int64) * DV + rv[None, :]
            tl.store(vn_ptr + value_rows, tl.where(valid[:, None], v, 0.0))
            b = tl.load(b_ptr + rows * sb_t + hk * sb_h + j * sb_r, mask=valid, other=0.0).to(tl.float32)
            a = tl.load(a_ptr + rows * sa_t + hk * sa_h + j * sa_r, mask=valid, other=0.0).to(tl.float32)
            a = a + tl.load(dt_bias_ptr + hv)
            softplus = tl.where(a > 20.0, a, tl.log(1.0 + tl.exp(tl.minimum(a, 20.0))))  # torch's threshold
            g = tl.where(valid, -tl.exp(tl.load(a_log_ptr + hv)) * softplus, 0.0)
            tl.store(g_ptr + hv * TP + rows, tl.cumsum(g, 0))
            tl.store(beta_ptr + hv * TP + rows, tl.where(valid, tl.sigmoid(b), 0.0))

    @triton.jit
    def intra_kernel(kn_ptr, vn_ptr, g_ptr, beta_ptr, uv_ptr, w_ptr, kd_ptr, a_ptr, last_ptr, TP, N,
                     R: tl.constexpr, C: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr):
        """What the carry of one chunk of one value head reads, free of the state: (I + A)^-1 by forward
        substitution, u_v = (I + A)^-1 beta v, w = (I + A)^-1 beta e^G k, the decayed k and the chunk's decay."""
        c, hv = tl.program_id(0), tl.program_id(1)
        hk = hv // R
        rc, rk, rv = tl.arange(0, C), tl.arange(0, DK), tl.arange(0, DV)
        tok = c * C + rc
        k = tl.load(kn_ptr + (hk * TP + tok)[:, None].to(tl.int64) * DK + rk[None, :])
        g = tl.load(g_ptr + hv * TP + tok)
        beta = tl.load(beta_ptr + hv * TP + tok)
        base = (hv * N + c).to(tl.int64) * C
        square = a_ptr + (base + rc[:, None]) * C + rc[None, :]  # this chunk's [C, C] scratch
        # A[i, j] = beta_i e^(G_i - G_j) k_i.k_j (j < i), read back a row a step
        before = rc[:, None] > rc[None, :]
        tl.store(square, tl.where(before, beta[:, None] * tl.exp(tl.where(before, g[:, None] - g[None, :], 0.0)) *
                                  tl.dot(k, tl.trans(k)), 0.0))
        tl.debug_barrier()
        # (I + A)^-1 transposed, a column at a time: column i = e_i - sum_j<i A[i, j] column j. Summing along rows
        # keeps each step within a warp (the first version, a row at a time, synchronized all warps twice a step
        # and took 5x longer). Started from the loaded A (times 0), the tile takes the load's layout: rows spread
        # over warps, each row within one warp (the default layout split rows over two warps: a barrier a step).
        inverse_t = tl.where(rc[:, None] == rc[None, :], 1.0, 0.0 * tl.load(square))
        for i in range(1, C):
            a_row = tl.load(a_ptr + (base + i) * C + rc)
            inverse_t = tl.where(rc[None, :] == i, inverse_t - tl.sum(inverse_t * a_row[None, :], 1)[:, None],
                                 inverse_t)
        inverse = tl.trans(inverse_t)
        v = tl.load(vn_ptr + (hv * TP + tok)[:, None].to(tl.int64) * DV + rv[None, :])
        tl.store(uv_ptr + (base + rc[:, None]) * DV + rv[None, :], tl.dot(inverse, beta[:, None] * v))
        tl.store(w_ptr + (base + rc[:, None]) * DK + rk[None, :], tl.dot(inverse, (beta * tl.exp(g))[:, None] * k))
        g_last = tl.load(g_ptr + hv * TP + c * C + C - 1)
        tl.store(kd_ptr + (base + rc[:, None]) * DK + rk[None, :], tl.exp(g_last - g)[:, None] * k)
        tl.store(last_ptr + hv * N + c, tl.exp(g_last))

    @triton.jit
    def states_kernel(uv_ptr, w_ptr, kd_ptr, decay_ptr, state_ptr, h_ptr, vnew_ptr, n_chunks, C: tl.constexpr,
                      DK: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr):
        """The sequential part, for one value head's block of BV state columns: per chunk, store the state it
        starts from and its corrected values v_new = u_v - w S, then S <- decay S + kd^T v_new. The outputs, which
        read those, are left to a parallel kernel: two products a step instead of four."""
        hv = tl.program_id(0)
        rc, rk = tl.arange(0, C), tl.arange(0, DK)
        rv = tl.program_id(1) * BV + tl.arange(0, BV)
        square = rk[:, None] * DV + rv[None, :]
        state = tl.load(state_ptr + hv.to(tl.int64) * DK * DV + square)  # [DK, BV] float32, in registers
        first = hv.to(tl.int64) * n_chunks
        w_rows, u_rows = rc[:, None] * DK + rk[None, :], rc[:, None] * DV + rv[None, :]
        kd_cols = rc[None, :] * DK + rk[:, None]  # [DK, C]: kd transposed
        # each chunk's inputs are loaded one chunk ahead: their latency (one program an SM, reading ~70 KB a
        # chunk) then overlaps the products of the chunk before, instead of stalling every step
        w_next = tl.load(w_ptr + first * C * DK + w_rows)
        u_next = tl.load(uv_ptr + first * C * DV + u_rows)
        kd_next = tl.load(kd_ptr + first * C * DK + kd_cols)
        for c in range(n_chunks):
            base = first + c
            w, u_v, kd = w_next, u_next, kd_next
            ahead = first + tl.minimum(c + 1, n_chunks - 1)  # the last chunk loads itself again
            w_next = tl.load(w_ptr + ahead * C * DK + w_rows)
            u_next = tl.load(uv_ptr + ahead * C * DV + u_rows)
            kd_next = tl.load(kd_ptr + ahead * C * DK + kd_cols)
            tl.store(h_ptr + base * DK * DV + square, state)
            u = u_v - tl.dot(w, state)
            tl.store(vnew_ptr + base * C * DV + u_rows, u)
            state = tl.load(decay_ptr + base) * state + tl.dot(kd, u)
        tl.store(state_ptr + hv.to(tl.int64) * DK * DV + square, state)

    @triton.jit
    def output_kernel(qn_ptr, kn_ptr, g_ptr, h_ptr, vnew_ptr, z_ptr, sz_t, sz_h, sz_r, w_ptr, y_ptr, T, TP, N, eps,
                      R: tl.constexpr, C: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, NV: tl.constexpr):
        """One chunk of one value head: o = e^G q S_c + (e^(G_t - G_s) [s <= t] q k^T) v_new, then its rms norm
        times the norm weight and silu(z), into y [T, NV * DV]."""
        c, hv = tl.program_id(0), tl.program_id(1)
        hk = hv // R
        rc, rk, rv = tl.arange(0, C), tl.arange(0, DK), tl.arange(0, DV)
        tok = c * C + rc
        key_rows = (hk * TP + tok)[:, None].to(tl.int64) * DK + rk[None, :]
        q = tl.load(qn_ptr + key_rows)
        k = tl.load(kn_ptr + key_rows)
        g = tl.load(g_ptr + hv * TP + tok)
        base = hv.to(tl.int64) * N + c
        upto = rc[:, None] >= rc[None, :]
        p = tl.where(upto, tl.exp(tl.where(upto, g[:, None] - g[None, :], 0.0)), 0.0) * tl.dot(q, tl.trans(k))
        v_new = tl.load(vnew_ptr + (base * C + rc[:, None]) * DV + rv[None, :])
        state = tl.load(h_ptr + base * DK * DV + rk[:, None] * DV + rv[None, :])
        o = tl.dot(tl.exp(g)[:, None] * q, state) + tl.dot(p, v_new)
        o = o * tl.rsqrt(tl.sum(o * o, 1) / DV + eps)[:, None] * tl.load(w_ptr + rv)[None, :]
        valid = tok < T
        z = tl.load(z_ptr + tok[:, None].to(tl.int64) * sz_t + hk * sz_h + (hv % R) * sz_r + rv[None, :],
                    mask=valid[:, None], other=0.0).to(tl.float32)
        tl.store(y_ptr + tok[:, None].to(tl.int64) * (NV * DV) + hv * DV + rv[None, :], o * z * tl.sigmoid(z),
                 mask=valid[:, None])

    globals().update(_conv=_conv)  # the interpreter runs a kernel in its module's globals, not the closure

    def run(q, k, v, z, b, a, taps, held, a_log, dt_bias, norm_weight, state, eps, l2_eps, chunk):
        t, nk, dk = q.shape
        r, dv = v.shape[2], v.shape[3]
        nv, n = nk * r, triton.cdiv(t, chunk)
        tp, f32, dev = n * chunk, torch.float32, q.device
        qn, kn = (torch.empty(nk, tp, dk, dtype=f32, device=dev) for _ in range(2))
        vn = torch.empty(nv, tp, dv, dtype=f32, device=dev)
        g, beta = (torch.empty(nv, tp, dtype=f32, device=dev) for _ in range(2))
        if taps.shape[0] - 1 > chunk:
            raise ValueError("the conv's held inputs must fit the first chunk")
        for first, chunks in ((0, 1), (1, n - 1)):  # the first chunk reads the held conv state, the others not
            if chunks:
                prep_kernel[(chunks, nk, 2 + r)](
                    q, k, v, b, a, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                    v.stride(2), b.stride(0), b.stride(1), b.stride(2), a.stride(0), a.stride(1), a.stride(2), taps,
                    held, a_log, dt_bias, qn, kn, vn, g, beta, t, tp, taps.shape[1], dk**-0.5, l2_eps, first,
                    KERNEL=taps.shape[0], C=chunk, DK=dk, DV=dv, R=r, NK=nk, HELD=first == 0, num_warps=PREP_WARPS)
        u_v, v_new = (torch.empty(nv, n, chunk, dv, dtype=f32, device=dev) for _ in range(2))
        w, k_decayed = (torch.empty(nv, n, chunk, dk, dtype=f32, device=dev) for _ in range(2))
        scratch = torch.empty(nv, n, chunk, chunk, dtype=f32, device=dev)
        decay_last = torch.empty(nv, n, dtype=f32, device=dev)
        intra_kernel[(n, nv)](kn, vn, g, beta, u_v, w, k_decayed, scratch, decay_last, tp, n, R=r, C=chunk, DK=dk,
                              DV=dv, num_warps=8)
        state = state.float().contiguous().clone()
        starts = torch.empty(nv, n, dk, dv, dtype=f32, device=dev)  # the state each chunk starts from
        block_v = min(BLOCK_V, dv)
        states_kernel[(nv, dv // block_v)](u_v, w, k_decayed, decay_last, state, starts, v_new, n, C=chunk, DK=dk,
                                           DV=dv, BV=block_v, num_warps=STATES_WARPS, num_stages=1)
        y = torch.empty(t, nv * dv, dtype=f32 if z.dtype == f32 else torch.bfloat16, device=dev)
        output_kernel[(n, nv)](qn, kn, g, starts, v_new, z, z.stride(0), z.stride(1), z.stride(2), norm_weight, y, t,
                               tp, n, eps, R=r, C=chunk, DK=dk, DV=dv, NV=nv, num_warps=OUTPUT_WARPS, num_stages=1)
        return y, state

    return run


def gated_delta_layer(q, k, v, z, b, a, taps, conv_state, a_log, dt_bias, norm_weight, state, eps: float,
                      l2_eps: float, chunk: int = CHUNK, use_triton: bool | None = None):
    """One Gated DeltaNet layer after its input projections: causal conv over q|k|v with the taps [kernel,
    conv_dim] and the conv state [kernel - 1, conv_dim] (the inputs before these tokens, channels in q|k|v order),
    silu, l2-normed q (scaled by 1/sqrt(dk)) and k shared by the r value heads of their key head, beta = sigmoid(b),
    log decay -e^a_log softplus(a + dt_bias), the gated delta rule from `state` [nv, dk, dv], then per value head
    rms norm (eps) x norm_weight x silu(z).

    q, k [T, nk, dk]; v, z [T, nk, r, dv]; b, a [T, nk, r]: views of the projections (any float dtype, last stride
    1), value head nv = hk * r + j. Returns (y [T, nv * dv], conv state after, state after)."""
    t, kernel = q.shape[0], taps.shape[0]
    dk, dv = q.shape[-1], v.shape[-1]
    fits = all(d >= 16 and d & (d - 1) == 0 for d in (dk, dv, chunk)) and t > 1  # tl.dot's shapes; decode in torch
    run = _triton_layer() if (q.is_cuda if use_triton is None else use_triton) and fits else None
    if run is None:
        return _layer_torch(q, k, v, z, b, a, taps, conv_state, a_log, dt_bias, norm_weight, state, eps, l2_eps)
    if any(x.stride(-1) != 1 for x in (q, k, v, z, b, a)):
        raise ValueError("gated_delta_layer reads the projections in place: their last dimension must be contiguous")
    held = conv_state.float().contiguous()
    y, state = run(q, k, v, z, b, a, taps.float().contiguous(), held, a_log.float().contiguous(),
                   dt_bias.float().contiguous(), norm_weight.float().contiguous(), state, eps, l2_eps, chunk)
    tail = min(t, kernel - 1)  # the conv state after: the last kernel - 1 inputs, older ones from before
    recent = torch.cat([x[-tail:].reshape(tail, -1) for x in (q, k, v)], dim=-1).float()
    return y, torch.cat([held, recent])[-(kernel - 1):], state
