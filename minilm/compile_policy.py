"""Whether ``torch.compile`` pays for itself on a CPU run: its warm-up against the time it saves.

``torch.compile`` fuses the work around the matmuls (the residual adds, the dtype casts, the
loss) into generated C++ loops, but first spends a warm-up tracing the model and compiling them.
A compiled CPU step also runs things of its own: attention's backward as matmuls at short
sequences (:class:`minilm.attention.CausalAttentionCPU`), ATen's GELU and LayerNorm kernels and
oneDNN's Linear with its bias fused (:mod:`minilm.aten_ops`), and a rewrite of the tied
embedding's gradient (:mod:`minilm.graph_passes`). On the CPU this toolkit was tuned on (2-core Xeon with
AVX512-BF16 and AMX, torch 2.13, one thread, the small config at batch 4 x 256 in bf16) a
compiled step first took 848 ms against 1,000 ms eager, about 15% less, after a warm-up of 27 s
of the process's own CPU time plus the C++ compiler's (several minutes of wall time on a busy
shared machine). With them, eager over compiled was 1.19-1.32x in fifteen runs of the throughput
benchmark (16-24% less time; the machine was shared and often throttled). The policy keeps the
15%: at the config's own 1,024-token sequences attention's backward stays PyTorch's fused kernel.

So a run compiles only when it is long: when its eager time, estimated from the model FLOPs
of the whole run (``max_steps × tokens_per_step × flops_per_token``) at
:data:`CPU_TRAINING_FLOPS`, times the saving, exceeds the warm-up. The lesson-sized ``tiny``
run (600 steps, about a minute of work) stays eager; the ``small`` config's 10,000 steps compile.
``compile: true`` in a config always compiles. GPUs are left to the config (``compile``).

    >>> compile_decision(cfg, torch.device("cpu"), flops_per_token(cfg))
    (False, 'eager: ~69 s of training would save ~10 s, less than the ~120 s compile warm-up')
"""

from __future__ import annotations

import torch

from minilm.config import Config

COMPILE_SAVING = 0.15  # fraction of an eager CPU step that compiling saved (measured, see above)
COMPILE_WARMUP_S = 120.0  # seconds of warm-up to repay: the measured 27 s of CPU time, with margin for the compiler
CPU_TRAINING_FLOPS = 0.2e12  # model FLOP/s an eager CPU training step reached here (small, bf16, 1 thread)


def compile_model(model: torch.nn.Module, device: torch.device, cpp_wrapper: bool = True) -> torch.nn.Module:
    """``torch.compile(model)`` as minilm's trainer runs it: on a CPU with inductor's C++ wrapper.

    ``cpp_wrapper`` calls the generated kernels from C++ instead of a Python wrapper, which cost
    ~16 ms of each small step at 4 x 256 (bf16, one thread): the step ran 2.4% and 2.9% faster in two
    in-process A/B runs of 12 and 16 alternating steps (with :mod:`minilm.aten_ops` as well, 0-2%:
    see there), for a longer first compile (the wrapper is C++ too: 51 s instead of 14 s, once;
    inductor caches both). On a CPU its backward graphs also get
    :class:`minilm.graph_passes.ScatterIntoSum`, which adds a tied embedding's rows straight into
    the head's gradient. GPUs get torch.compile's defaults. ``cpp_wrapper=False`` keeps the Python
    wrapper, which a profiler can see into (the benchmark's profile of the compiled step).

    A model that checkpoints its activations keeps the Python wrapper: the recomputed forward
    saves and restores the RNG state around SDPA's kernel (it could draw dropout), and the C++
    wrapper cannot call that operator (torch 2.13 fails the compile with an AssertionError
    naming ``RunAndSaveRngState``, even at dropout 0).
    """
    if device.type == "cpu":
        from minilm.graph_passes import ScatterIntoSum  # imports inductor (~1 s): only when compiling

        checkpointed = bool(getattr(model, "gradient_checkpointing", False))
        options = {"cpp_wrapper": cpp_wrapper and not checkpointed, "post_grad_custom_post_pass": ScatterIntoSum()}
        return torch.compile(model, options=options)
    return torch.compile(model)


def compile_decision(cfg: Config, device: torch.device, flops_per_token: float) -> tuple[bool, str]:
    """(compile or not, the reason in a few words, for the run header)."""
    if cfg.compile:
        return True, "torch.compile (compile: true in the config)"
    if device.type != "cpu":
        return False, "compile: false in the config"
    eager_s = cfg.max_steps * cfg.tokens_per_step * flops_per_token / CPU_TRAINING_FLOPS
    saved_s = COMPILE_SAVING * eager_s
    pays = saved_s > COMPILE_WARMUP_S
    verdict = "more" if pays else "less"
    way = "torch.compile" if pays else "eager"
    return pays, (
        f"{way}: ~{eager_s:,.0f} s of training would save ~{saved_s:,.0f} s, "
        f"{verdict} than the ~{COMPILE_WARMUP_S:.0f} s compile warm-up"
    )
