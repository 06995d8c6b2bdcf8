"""The LM head and its cross-entropy in one step, a chunk of positions at a time.

The usual way writes ``logits = lm_head(h)`` for all B·T positions, a (B·T, V) tensor, and
then ``F.cross_entropy(logits, targets)``, which keeps fp32 log-probabilities of the same
size for backward, and makes two more in backward. At the small config's batch 16 × 1024
and 16,000 words that is 1 GiB per (B·T, V) fp32 tensor, the largest allocation of the step;
on a CPU, writing and re-reading it costs as much as the matmul that makes it.

:func:`linear_cross_entropy` computes the same mean loss a chunk of rows at a time
(:func:`chunk_rows`, at most ``CHUNK_BYTES`` of fp32 logits), and, when a gradient is wanted,
the gradient in the same pass: for one chunk of positions

    logits  = h_c · Wᵀ                      (n, V)   in the matmul precision (bf16 under autocast)
    loss_c  = logsumexp(logits) - logits[target]    in fp32
    dlogits = (softmax(logits) - onehot(target)) / N_valid
    dh_c    = dlogits · W                   (n, C)
    dW     += dlogitsᵀ · h_c                (V, C)   summed in fp32

so the (B·T, V) logits never exist, in fp32 or otherwise: only one chunk does. The
gradients dh (B·T, C) and dW (V, C) wait for backward, which only scales them by the
incoming gradient (1, or 1/k with k-step accumulation, or a loss scale). FLOPs are those of
the usual head (forward 2·N·V·C, then 4·N·V·C for the two gradients), all spent during the
forward call.

    >>> loss = linear_cross_entropy(h.flatten(0, 1), model.lm_head.weight, targets.flatten())
    >>> loss.backward()      # gradients for h and for the head (the tied embedding) weight

Targets equal to ``ignore_index`` (-1) count for nothing, as in ``F.cross_entropy``.
"""

from __future__ import annotations

import torch

# The most bytes one chunk's fp32 logits may take. 32 MiB is also glibc's largest mmap
# threshold: blocks up to it are reused from the heap rather than mapped (and page-faulted in)
# afresh on every step, which on a CPU costs about as much as the arithmetic on them.
# (The compiled small step at 4 x 256, its 1024 positions in one 64 MiB chunk instead of two: no faster, 1.009.)
CHUNK_BYTES = 32 * 2**20


def chunk_rows(vocab_size: int, chunk_bytes: int | None = None) -> int:
    """Positions per chunk: the largest power of two whose fp32 logits (rows · V · 4 bytes) fit
    ``chunk_bytes`` (default :data:`CHUNK_BYTES`)."""
    rows = max(1, (chunk_bytes or CHUNK_BYTES) // (4 * vocab_size))
    return 1 << (rows.bit_length() - 1)


def linear_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -1
) -> torch.Tensor:
    """Mean cross-entropy of ``softmax(h · weightᵀ)`` against ``targets``, without the full logits.

    h: (N, C) final hidden states; weight: (V, C) the LM head; targets: (N,) int64 ids.
    Returns a 0-dim fp32 tensor in nats per (non-ignored) token. Under autocast the matmuls
    run in the autocast dtype and the softmax in fp32, as autocast would run
    ``F.cross_entropy(lm_head(h), targets)``.
    """
    device_type = h.device.type
    autocast = torch.is_autocast_enabled(device_type)
    dtype = torch.get_autocast_dtype(device_type) if autocast else h.dtype
    return _LinearCrossEntropy.apply(h, weight, targets, dtype, ignore_index, chunk_rows(weight.shape[0]))


def _chunk(
    h_c: torch.Tensor,
    w: torch.Tensor,
    t_c: torch.Tensor,
    share: torch.Tensor,
    grad_h_c: torch.Tensor | None,
    grad_w: torch.Tensor | None,
    first: bool = False,
) -> torch.Tensor:
    """One chunk of n positions: its part of the mean loss; adds its gradients when grad_h_c is given.

    h_c (n, C) in the matmul dtype, w (V, C) likewise, t_c (n, 1) target ids, share (n, 1) each
    position's weight in the mean. Its (n, V) temporaries die when it returns. ``first``: grad_w
    is uninitialised memory, which this chunk's product overwrites rather than adds to (the same
    numbers as zeros plus it, without a pass that writes the zeros and one that reads them).
    """
    logits = (h_c @ w.t()).float()  # (n, V) fp32: one chunk's logits
    target_logit = logits.gather(1, t_c)  # (n, 1)
    top = logits.amax(dim=1, keepdim=True)  # subtract the row max, so exp cannot overflow
    probs = logits.sub_(top).exp_()  # unnormalised probabilities, in place of the logits
    total = probs.sum(dim=1, keepdim=True)
    loss = ((top + total.log() - target_logit) * share).sum()  # (logsumexp - target logit), weighted
    if grad_h_c is not None:
        # d loss / d logits = (softmax - onehot(target)) · share. The target's entry is computed
        # apart, in fp32 from its gathered logit, and written over the rounded row: the same numbers
        # as subtracting the onehot before rounding, but nothing reads the (n, V) fp32 values except
        # to round them, so a compiled step writes the bf16 row straight from the exponentials
        # (no fp32 (n, V) buffer written and read back).
        scale = share / total  # (n, 1)
        d_target = (target_logit - top).exp() * scale - share  # (n, 1) fp32
        dlogits = probs.mul_(scale).to(w.dtype).scatter_(1, t_c, d_target.to(w.dtype))
        grad_h_c.copy_(dlogits @ w)  # (n, C)
        if w.dtype == torch.float32:
            # (V, C) summed in place (FLOP counters see out=); beta=0 ignores the uninitialised grad_w
            torch.addmm(grad_w, dlogits.t(), h_c, beta=0 if first else 1, out=grad_w)
        elif first:
            grad_w.copy_(dlogits.t() @ h_c)  # a bf16 product, to fp32
        else:
            grad_w += dlogits.t() @ h_c  # a bf16 product, summed over the chunks in fp32
    return loss


class _LinearCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and (when needed) both gradients chunk by chunk; backward scales them."""

    @staticmethod
    def forward(ctx, h, weight, targets, dtype, ignore_index, rows):  # noqa: ANN001, ANN205
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        with torch.autocast(h.device.type, enabled=False):  # precisions chosen here, explicitly
            w = weight.to(dtype)  # (V, C) the head in the matmul precision (no copy in fp32)
            valid = targets != ignore_index  # (N,)
            per_row = (valid / valid.sum())[:, None]  # (N, 1) each position's share of the mean (nan if none)
            safe_targets = targets.masked_fill(~valid, 0)[:, None]  # (N, 1) ignored rows: any id, weight 0
            grad_h = torch.empty_like(h) if needs_grad else None  # (N, C)
            grad_w = torch.empty_like(weight, dtype=torch.float32) if needs_grad else None  # (V, C), see first
            loss = torch.zeros((), dtype=torch.float32, device=h.device)
            for start in range(0, h.shape[0], rows):
                rows_c = slice(start, start + rows)
                grad_h_c = grad_h[rows_c] if needs_grad else None
                loss += _chunk(
                    h[rows_c].to(dtype), w, safe_targets[rows_c], per_row[rows_c], grad_h_c, grad_w, start == 0
                )
        if needs_grad:
            ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):  # noqa: ANN001, ANN205
        grad_h, grad_w = ctx.saved_tensors  # d loss / d h and d loss / d weight, for a loss gradient of 1
        # In place: nothing else holds them (a second backward through the same graph is an error,
        # which autograd reports because the saved tensors changed). A plain loss.backward() on a
        # CPU passes exactly 1: then the scaling is skipped (two passes over (N, C) and (V, C)).
        # (Not while torch.compile traces: the test reads a tensor's value, which would break its graph.)
        eager_cpu = grad_loss.device.type == "cpu" and not torch.compiler.is_compiling()
        unit = eager_cpu and not grad_loss.requires_grad and bool(grad_loss == 1)
        grad_h = (grad_h if unit else grad_h.mul_(grad_loss)) if ctx.needs_input_grad[0] else None
        grad_w = (grad_w if unit else grad_w.mul_(grad_loss)) if ctx.needs_input_grad[1] else None
        return grad_h, grad_w, None, None, None, None
