"""Triton kernels of the calibrated prompt loss (TCPT): math only; launchers in fastcal.ops.

Notation (``fastcal.ops.reference`` has the loss): f (B, D) image, t (C, D) tuned text, t0 (C, D) frozen
text, rows L2-normalized; G = f t^T the cosines (a GEMM outside these kernels); z = s G the logits.
Every kernel computes in the element type of its float output buffer (float32, or float64 for float64
problems); half-precision inputs are converted right after their load.

Per row i of G, with p = softmax(z_i), q = (1 - eps) e_y + eps / C, lse = log sum_c exp z_ic:

    CE_i = lse - (1 - eps) z_iy - eps mean_c z_ic
    m_i  = z_iy - z_ir,   r = argmax_{c != y} z_ic (the first on ties)
    d(sum_i g_i v_i)/dG_i = g_i J_i (+ a coupling term through mean(m), zero for uniform g), where
    J_i  = s [(p - q) + a_i (e_y - e_r)],   a_i = -alpha + 2 beta (m_i - mean m)
    h_i  = sum_c (p - q)_c G_ic + a_i (G_iy - G_ir)    (row i's share of dL/ds for unit weight)

``ce_margin_rows_kernel`` makes one pass over each row (online log-sum-exp, target, runner-up and its
index, the row's CE) and, when the gradient is wanted, writes s (p - q) over the row in the same
program. The a_i terms need mean(m) over all rows: ``margin_finalize_kernel`` is the second stage of
that reduction (one program), which also adds them to J and assembles the loss, all on device.
Python float arguments (label smoothing, alpha, beta, the moment weight) reach compiled kernels as
float32 scalars; the interpreter keeps them in double precision.
"""

import triton
import triton.language as tl


@triton.jit
def normalize_rows_kernel(
    x_ptr,
    out_ptr,
    rnorm_ptr,
    n_rows,
    n_cols,
    stride_x,
    stride_out,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    """out = x / ||x|| row-wise and rnorm = 1 / ||x||, for a tile of BLOCK_ROWS rows."""
    acc_ty = out_ptr.dtype.element_ty
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < n_rows
    ssq = tl.zeros([BLOCK_ROWS], dtype=acc_ty)
    for start in range(0, n_cols, BLOCK_COLS):
        cols = start + tl.arange(0, BLOCK_COLS)
        ok = row_ok[:, None] & (cols < n_cols)[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=ok, other=0.0).to(acc_ty)
        ssq += tl.sum(x * x, axis=1)
    rnorm = 1.0 / tl.sqrt(tl.where(row_ok, ssq, 1.0))
    tl.store(rnorm_ptr + rows, rnorm, mask=row_ok)
    for start in range(0, n_cols, BLOCK_COLS):
        cols = start + tl.arange(0, BLOCK_COLS)
        ok = row_ok[:, None] & (cols < n_cols)[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=ok, other=0.0).to(acc_ty)
        tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], x * rnorm[:, None], mask=ok)


@triton.jit
def normalize_rows_backward_kernel(
    grad_ptr,
    xhat_ptr,
    rnorm_ptr,
    scale_ptr,
    out_ptr,
    scale_mult,
    n_rows,
    n_cols,
    stride_grad,
    stride_xhat,
    stride_out,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    """Through x_hat = x / ||x||: out = k / ||x|| (g - x_hat <x_hat, g>), k = scale_mult * scale[0].

    The scale is read from device memory (no host sync); out is written in its own dtype.
    """
    acc_ty = xhat_ptr.dtype.element_ty
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < n_rows
    dot = tl.zeros([BLOCK_ROWS], dtype=acc_ty)
    for start in range(0, n_cols, BLOCK_COLS):
        cols = start + tl.arange(0, BLOCK_COLS)
        ok = row_ok[:, None] & (cols < n_cols)[None, :]
        g = tl.load(grad_ptr + rows[:, None] * stride_grad + cols[None, :], mask=ok, other=0.0).to(acc_ty)
        xh = tl.load(xhat_ptr + rows[:, None] * stride_xhat + cols[None, :], mask=ok, other=0.0)
        dot += tl.sum(g * xh, axis=1)
    k = tl.load(scale_ptr).to(acc_ty)
    factor = scale_mult * k * tl.load(rnorm_ptr + rows, mask=row_ok, other=0.0)
    for start in range(0, n_cols, BLOCK_COLS):
        cols = start + tl.arange(0, BLOCK_COLS)
        ok = row_ok[:, None] & (cols < n_cols)[None, :]
        g = tl.load(grad_ptr + rows[:, None] * stride_grad + cols[None, :], mask=ok, other=0.0).to(acc_ty)
        xh = tl.load(xhat_ptr + rows[:, None] * stride_xhat + cols[None, :], mask=ok, other=0.0)
        out = factor[:, None] * (g - xh * dot[:, None])
        tl.store(
            out_ptr + rows[:, None] * stride_out + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=ok
        )


@triton.jit
def ce_margin_rows_kernel(
    cos_ptr,
    labels_ptr,
    scale_ptr,
    ce_ptr,
    g_target_ptr,
    g_runner_ptr,
    runner_ptr,
    h_ptr,
    n_cols,
    stride_cos,
    label_smoothing,
    COMPUTE_GRAD: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One row of cosines: CE, target and runner-up cosines, runner-up index; with COMPUTE_GRAD the
    row is overwritten by s (p - q) and h = sum_c (p - q)_c G_c is stored."""
    acc_ty = cos_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    base = cos_ptr + row * stride_cos
    y = tl.load(labels_ptr + row)
    s = tl.load(scale_ptr).to(acc_ty)
    eps = label_smoothing + tl.zeros([], dtype=acc_ty)
    # An out-of-range label (value checks off upstream) must not address memory: its row's CE is NaN.
    g_y = tl.load(base + y, mask=(y >= 0) & (y < n_cols), other=float("nan"))

    # Online log-sum-exp (running max, rescaled sum), runner-up over c != y, sum of cosines.
    run_max = tl.full([], float("-inf"), acc_ty)
    run_sum = tl.zeros([], dtype=acc_ty)
    best = tl.full([], float("-inf"), acc_ty)
    best_idx = tl.zeros([], dtype=tl.int32)
    sum_g = tl.zeros([], dtype=acc_ty)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        valid = cols < n_cols
        g = tl.load(base + cols, mask=valid, other=float("-inf"))
        z = g * s
        new_max = tl.maximum(run_max, tl.max(z, axis=0))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(z - new_max), axis=0)
        run_max = new_max
        others = tl.where(cols == y, float("-inf"), g)
        block_best, block_idx = tl.max(
            others, axis=0, return_indices=True, return_indices_tie_break_left=True
        )
        take = block_best > best
        best_idx = tl.where(take, start + block_idx, best_idx)
        best = tl.where(take, block_best, best)
        if HAS_SMOOTHING:
            sum_g += tl.sum(tl.where(valid, g, 0.0), axis=0)
    lse = run_max + tl.log(run_sum)
    mean_g = sum_g / n_cols
    ce = lse - (1.0 - eps) * s * g_y - eps * s * mean_g
    tl.store(ce_ptr + row, ce)
    tl.store(g_target_ptr + row, g_y)
    tl.store(g_runner_ptr + row, best)
    tl.store(runner_ptr + row, best_idx.to(tl.int64))

    if COMPUTE_GRAD:
        # dL/dG for unit row weight, CE part: s (p - q); the margin part is added by the second stage.
        uniform = eps / n_cols
        h = tl.zeros([], dtype=acc_ty)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            valid = cols < n_cols
            g = tl.load(base + cols, mask=valid, other=0.0)
            p_minus_q = tl.exp(g * s - lse) - uniform - tl.where(cols == y, 1.0 - eps, 0.0)
            h += tl.sum(tl.where(valid, p_minus_q * g, 0.0), axis=0)
            tl.store(base + cols, s * p_minus_q, mask=valid)
        tl.store(h_ptr + row, h)


@triton.jit
def margin_finalize_kernel(
    ce_ptr,
    g_target_ptr,
    g_runner_ptr,
    runner_ptr,
    labels_ptr,
    h_ptr,
    scale_ptr,
    moment_ptr,
    grad_ptr,
    per_row_ptr,
    margins_ptr,
    loss_ptr,
    ce_mean_ptr,
    margin_reg_ptr,
    n_rows,
    n_cols,
    stride_grad,
    alpha,
    beta,
    moment_weight,
    REDUCTION: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    HAS_MOMENT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Second stage (one program): mean and variance of the margins, R_margin, the loss (REDUCTION 0
    none, 1 mean, 2 sum) and, with COMPUTE_GRAD, the margin terms s a_i (e_y - e_r) added to J and
    a_i (G_y - G_r) added to h."""
    acc_ty = ce_ptr.dtype.element_ty
    s = tl.load(scale_ptr).to(acc_ty)
    sum_ce = tl.zeros([], dtype=acc_ty)
    sum_m = tl.zeros([], dtype=acc_ty)
    for start in range(0, n_rows, BLOCK):
        rows = start + tl.arange(0, BLOCK)
        ok = rows < n_rows
        sum_ce += tl.sum(tl.load(ce_ptr + rows, mask=ok, other=0.0), axis=0)
        m = s * tl.load(g_target_ptr + rows, mask=ok, other=0.0) - s * tl.load(
            g_runner_ptr + rows, mask=ok, other=0.0
        )
        sum_m += tl.sum(m, axis=0)
    mean_m = sum_m / n_rows
    if HAS_MOMENT:
        weighted_moment = moment_weight * tl.load(moment_ptr).to(acc_ty)
    else:
        weighted_moment = tl.zeros([], dtype=acc_ty)

    sum_dev2 = tl.zeros([], dtype=acc_ty)
    for start in range(0, n_rows, BLOCK):
        rows = (start + tl.arange(0, BLOCK)).to(tl.int64)
        ok = rows < n_rows
        g_y = tl.load(g_target_ptr + rows, mask=ok, other=0.0)
        g_r = tl.load(g_runner_ptr + rows, mask=ok, other=0.0)
        m = s * g_y - s * g_r
        dev = tl.where(ok, m - mean_m, 0.0)
        sum_dev2 += tl.sum(dev * dev, axis=0)
        tl.store(margins_ptr + rows, m, mask=ok)
        if REDUCTION == 0:
            ce = tl.load(ce_ptr + rows, mask=ok, other=0.0)
            tl.store(per_row_ptr + rows, ce - alpha * m + beta * dev * dev + weighted_moment, mask=ok)
        if COMPUTE_GRAD:
            a = -alpha + 2.0 * beta * dev
            y = tl.load(labels_ptr + rows, mask=ok, other=0)
            y_ok = ok & (y >= 0) & (y < n_cols)
            r = tl.load(runner_ptr + rows, mask=ok, other=0)
            target_ptrs = grad_ptr + rows * stride_grad + y
            runner_ptrs = grad_ptr + rows * stride_grad + r
            tl.store(target_ptrs, tl.load(target_ptrs, mask=y_ok, other=0.0) + s * a, mask=y_ok)
            tl.store(runner_ptrs, tl.load(runner_ptrs, mask=ok, other=0.0) - s * a, mask=ok)
            h = tl.load(h_ptr + rows, mask=ok, other=0.0)
            tl.store(h_ptr + rows, h + a * (g_y - g_r), mask=ok)

    ce_mean = sum_ce / n_rows
    margin_reg = -alpha * mean_m + beta * (sum_dev2 / n_rows)
    tl.store(ce_mean_ptr, ce_mean)
    tl.store(margin_reg_ptr, margin_reg)
    if REDUCTION == 1:
        tl.store(loss_ptr, ce_mean + margin_reg + weighted_moment)
    if REDUCTION == 2:
        tl.store(loss_ptr, n_rows * (ce_mean + margin_reg + weighted_moment))


@triton.jit
def center_pair_kernel(
    t_ptr,
    t0_ptr,
    sum_ptr,
    diff_ptr,
    a_ptr,
    b_ptr,
    delta_ptr,
    n_rows,
    n_cols,
    stride,
    WRITE_A: tl.constexpr,
    WRITE_B: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    """For a block of columns: the column means mu, mu0 of t, t0 (C, D), delta = mu - mu0, and the
    centered A = t - mu, B = t0 - mu0 as S = A + B, Dl = A - B (A, B themselves when asked).

    All four outputs and the inputs share one row stride (contiguous (C, D) buffers)."""
    acc_ty = sum_ptr.dtype.element_ty
    cols = tl.program_id(0).to(tl.int64) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    col_ok = cols < n_cols
    col_sum = tl.zeros([BLOCK_COLS], dtype=acc_ty)
    col_sum0 = tl.zeros([BLOCK_COLS], dtype=acc_ty)
    for start in range(0, n_rows, BLOCK_ROWS):
        rows = (start + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
        ok = (rows < n_rows)[:, None] & col_ok[None, :]
        offs = rows[:, None] * stride + cols[None, :]
        col_sum += tl.sum(tl.load(t_ptr + offs, mask=ok, other=0.0), axis=0)
        col_sum0 += tl.sum(tl.load(t0_ptr + offs, mask=ok, other=0.0), axis=0)
    mu = col_sum / n_rows
    mu0 = col_sum0 / n_rows
    tl.store(delta_ptr + cols, mu - mu0, mask=col_ok)
    for start in range(0, n_rows, BLOCK_ROWS):
        rows = (start + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
        ok = (rows < n_rows)[:, None] & col_ok[None, :]
        offs = rows[:, None] * stride + cols[None, :]
        a = tl.load(t_ptr + offs, mask=ok, other=0.0) - mu[None, :]
        b = tl.load(t0_ptr + offs, mask=ok, other=0.0) - mu0[None, :]
        tl.store(sum_ptr + offs, a + b, mask=ok)
        tl.store(diff_ptr + offs, a - b, mask=ok)
        if WRITE_A:
            tl.store(a_ptr + offs, a, mask=ok)
        if WRITE_B:
            tl.store(b_ptr + offs, b, mask=ok)
