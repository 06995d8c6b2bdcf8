"""Memory per GPU when training is spread over N of them: DDP, ZeRO-1, ZeRO-2 and ZeRO-3 (FSDP).

Data parallelism gives every rank its own share of the batch. What differs between the
strategies is how much of the **model state** (16 bytes per parameter with AdamW in fp32,
see :mod:`minilm.memory`) each rank keeps:

============  ==========  ==========  ===============  ======================================
strategy      weights     gradients   AdamW state      extra
============  ==========  ==========  ===============  ======================================
DDP           4N          4N          8N               DDP's gradient buckets, 4N
ZeRO-1        4N          4N          ≈ 8N / W         DDP's buckets (ZeroRedundancyOptimizer)
ZeRO-2        4N / W      4N / W      8N / W           every unit gathered in forward and kept
                                                       until its backward
ZeRO-3/FSDP   4N / W      4N / W      8N / W           one or two units gathered at a time
============  ==========  ==========  ===============  ======================================

ZeRO-1 is DDP with PyTorch's ``ZeroRedundancyOptimizer`` around the same AdamW: each rank
keeps AdamW's state for, and steps, only whole tensors that a greedy partition gives it
(:func:`zero1_partition`; ranks differ by up to about one tensor), then broadcasts them.
Its weights, gradients and buckets are DDP's, so its peak is DDP's minus the other
ranks' AdamW state.

ZeRO-2 and ZeRO-3 are PyTorch's FSDP2 (``fully_shard`` on every block and on the root, as
:func:`minilm.distributed.wrap` applies it) with ``reshard_after_forward`` False and True.
A **unit** is what one ``fully_shard`` call owns: a block, or the root's leftovers (the
embeddings, the final LayerNorm and an untied head). Each parameter is split along its
first dimension into W equal pieces, padded up to a multiple of W rows.

What is alive on a rank at each moment of the step, on top of the single-GPU moments of
:func:`minilm.memory.trainer_step_memory` (the step as minilm's trainer runs it: its chunked
loss, no (b, s, V) logits; activations and the loss's chunk and head gradients are per rank and
do not shrink with W: each rank runs its own micro-batch):

* **unsharded units**: a unit's full parameters, copied out of its all-gather buffer
  (``param bytes × numel``). The root stays gathered through the forward (its head is
  used last) and from the start of backward to its end (its embedding is used last).
* **the all-gather buffer** (``param bytes × W × shard``): FSDP2 keeps a unit's flat
  all-gather output until the next unit's all-gather has been copied out, so the
  block being computed in forward still has its buffer; in backward (ZeRO-3) the next
  block's buffer is prefetched while the current block runs.
* **gradients**: a block's full fp32 gradients exist only during its backward; its
  post-backward reduce-scatters them (a padded fp32 input buffer) into a 1/W shard. The
  root's gradients (the head's, then the embedding's) stay full until the very end.

Checked against each rank's peak measured on 2 CPU processes (gloo, fp32, the trainer's
chunked loss; :mod:`minilm.measure_ranks`) by ``tests/test_sharding.py`` for DDP, ZeRO-1, ZeRO-2 and
ZeRO-3, and by hand on 4. minilm's trainer runs DDP and FSDP (ZeRO-2/3), not ZeRO-1.
Not measured: mixed-precision policies (the
unsharded copies and all-gathers then use 2 bytes; the activations are estimated as under
autocast), CUDA streams (on a GPU FSDP2 overlaps the next all-gather with compute, which
this counts as the prefetched buffer) and NCCL's own buffers (not tensors).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from minilm.config import Config
from minilm.counting import count_parameters, parameter_shapes
from minilm.memory import GB, MemoryEstimate, adamw_temporaries, trainer_step_memory

STRATEGIES = ("ddp", "zero1", "zero2", "zero3")
STRATEGY_NAMES = {
    "ddp": "DDP",
    "zero1": "ZeRO-1 (optimizer state sharded)",
    "zero2": "ZeRO-2 / FSDP without resharding (+ gradients)",
    "zero3": "ZeRO-3 / FSDP (+ parameters)",
}


@dataclass(frozen=True)
class Unit:
    """One ``fully_shard`` unit: its parameter count and its padded per-rank shard."""

    name: str
    numel: int  # parameters, unpadded
    shard_numel: int  # one rank's piece: each parameter's dim 0 padded up to a multiple of W


def shard_units(cfg: Config, world_size: int) -> list[Unit]:
    """The root unit, then one unit per block, as FSDP2 shards them over ``world_size`` ranks."""
    groups: dict[str, list[tuple[int, ...]]] = {"root": []}
    for name, shape in parameter_shapes(cfg):
        key = ".".join(name.split(".")[:2]) if name.startswith("blocks.") else "root"
        groups.setdefault(key, []).append(shape)
    units = []
    for key, shapes in groups.items():
        numel = sum(math.prod(s) for s in shapes)
        shard = sum(math.ceil(s[0] / world_size) * math.prod(s[1:]) for s in shapes)
        units.append(Unit(key, numel, shard))
    return units


def zero1_partition(cfg: Config, world_size: int) -> list[tuple[list[int], list[int]]]:
    """Which parameter tensors each rank's ZeRO-1 optimizer steps: per rank, (matrices, vectors) sizes in elements.

    PyTorch's ``ZeroRedundancyOptimizer`` does not split tensors: for each AdamW group in
    turn (matrices with weight decay, then biases and norms, as
    :func:`minilm.optim.make_optimizer` builds them) it takes the tensors largest first and
    gives each to the rank with the fewest elements so far (the lowest rank on a tie).
    Ranks therefore differ by up to about one tensor. Each list is in the order the
    rank's local AdamW steps them.
    """
    sizes = [0] * world_size
    share: list[tuple[list[int], list[int]]] = [([], []) for _ in range(world_size)]
    for group, is_matrix in enumerate((True, False)):
        numels = [math.prod(shape) for _, shape in parameter_shapes(cfg) if (len(shape) >= 2) == is_matrix]
        for numel in sorted(numels, reverse=True):  # a stable sort, like torch's of the same list
            r = sizes.index(min(sizes))
            share[r][group].append(numel)
            sizes[r] += numel
    return share


@dataclass(frozen=True)
class RankMemory:
    """One rank's estimated peak under a strategy; ``estimate`` holds the moments (bytes)."""

    strategy: str
    world_size: int
    estimate: MemoryEstimate

    @property
    def peak_bytes(self) -> int:
        return self.estimate.peak_bytes

    @property
    def peak_gb(self) -> float:
        return self.estimate.peak_bytes / GB

    @property
    def peak_moment(self) -> str:
        return self.estimate.peak_moment

    @property
    def model_state_bytes(self) -> int:
        """Weights, gradients and AdamW state this rank keeps between steps (sharded or not)."""
        return self.estimate.parameters + self.estimate.gradients + self.estimate.optimizer_state

    def table(self, fmt: str = "text") -> str:
        head = f"{STRATEGY_NAMES[self.strategy]} over {self.world_size} ranks, per rank:"
        return head + ("\n\n" if fmt == "markdown" else "\n") + self.estimate.table(fmt)


def estimate_rank_memory(
    cfg: Config,
    strategy: str,
    world_size: int,
    *,
    batch_size: int | None = None,
    seq_len: int | None = None,
    optimizer: str = "fused",
    device_type: str = "cuda",
    param_dtype_bytes: int | None = None,
    rank: int | None = None,
) -> RankMemory:
    """Peak bytes on each rank of one training step of ``cfg`` under ``strategy`` over ``world_size`` ranks.

    ``strategy`` is one of :data:`STRATEGIES`; ``batch_size`` is the micro-batch per rank
    (default ``cfg.batch_size``). ``param_dtype_bytes``: bytes per element of the gathered
    (unsharded) parameters, 2 under a bf16/fp16 mixed-precision policy, 4 in fp32 (default:
    from ``cfg``'s precision). The other arguments are those of
    :func:`minilm.memory.estimate_training_memory`; the loss is the trainer's chunked one
    (:func:`minilm.memory.trainer_step_memory`). ``rank``: which rank, for ZeRO-1, whose
    ranks hold different whole tensors (default: the one with the most, whose peak is the
    highest); the other strategies give every rank the same share.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if rank is not None and not 0 <= rank < world_size:
        raise ValueError(f"rank must be in 0..{world_size - 1}, got {rank}")
    W = world_size
    base = trainer_step_memory(
        cfg.replace(world_size=W if strategy in ("ddp", "zero1") else 1),
        batch_size=batch_size,
        seq_len=seq_len,
        optimizer=optimizer,
        device_type=device_type,
    )
    if strategy in ("ddp", "zero1"):
        if strategy == "ddp":
            return RankMemory(strategy, W, base)
        # ZeroRedundancyOptimizer: AdamW's state (and its step) only for this rank's whole tensors.
        share = zero1_partition(cfg, W)
        mine = share[max(range(W), key=lambda r: sum(map(sum, share[r]))) if rank is None else rank]
        adam = 8 * sum(map(sum, mine))
        tmp = adamw_temporaries(mine, optimizer)
        moments = {m: {**c, "optimizer state": adam} for m, c in base.moments.items()}
        moments["optimizer step"]["optimizer temporaries"] = tmp
        return RankMemory(strategy, W, _replace(base, moments, optimizer_state=adam, optimizer_temporaries=tmp))

    pb = param_dtype_bytes or (2 if cfg.precision != "fp32" else 4)
    units = shard_units(cfg, W)
    root, blocks = units[0], units[1:]
    shard = sum(u.shard_numel for u in units)
    params, adam, grads = 4 * shard, 8 * shard, 4 * shard
    root_full = pb * root.numel  # the root's gathered parameters
    block_full = max(pb * u.numel for u in blocks)  # one gathered block
    block_buffer = max(pb * W * u.shard_numel for u in blocks)  # one block's all-gather output
    all_full = root_full + sum(pb * u.numel for u in blocks)
    block_grads = 4 * max(u.numel for u in blocks)  # one block's full gradients before reduce-scatter
    block_rs = 4 * W * max(u.shard_numel for u in blocks)  # the reduce-scatter's padded input
    block_grad_shard = 4 * max(u.shard_numel for u in blocks)
    L = len(blocks)
    pc = count_parameters(cfg)
    root_grads = 4 * (cfg.vocab_size * cfg.d_model + pc.final_norm)  # head (or tied embedding) + ln_f
    reshard = strategy == "zero3"
    prefetch = block_buffer if (reshard and L > 1) else 0  # the block below, gathered ahead in backward

    def rank_state(c: dict[str, int]) -> dict[str, int]:
        out = {k: v for k, v in c.items() if k not in ("parameters", "optimizer state", "DDP buckets")}
        return {"parameters (shard)": params, "optimizer state (shard)": adam, **out}

    b = base.moments
    moments: dict[str, dict[str, int]] = {}
    gathered_fwd = (root_full + block_full) if reshard else all_full
    for name in ("last block forward", "last block recompute"):
        if name in b:
            moments[name] = {
                **rank_state(b[name]),
                "gathered parameters": gathered_fwd,
                "all-gather buffer": block_buffer,
            }
    # The chunked loss runs inside the root's forward, after the last block: the root (its head)
    # is gathered and the last block's all-gather buffer is not yet freed.
    moments["chunked loss"] = {
        **rank_state(b["chunked loss"]),
        "gathered parameters": root_full if reshard else all_full,
        "all-gather buffer": block_buffer,  # the last block's, freed by the next all-gather
    }
    moments["last block backward"] = {
        **rank_state(b["last block backward"]),
        "gathered parameters": (root_full + block_full) if reshard else all_full,
        "all-gather buffer": prefetch,
    }
    fwd = b.get("last block forward") or b["last block recompute"]
    below = fwd["saved activations"]  # what the blocks below the last one keep for their backward
    moments["block reduce-scatter"] = {
        "parameters (shard)": params,
        "optimizer state (shard)": adam,
        "batch": base.batch,
        "saved activations": below,
        "gathered parameters": root_full + (0 if reshard else (L - 1) * block_full),
        "all-gather buffer": prefetch,
        "gradients so far": root_grads,
        "block gradients (full)": block_grads,
        "reduce-scatter input": block_rs,
        "gradient in flight": b["last block backward"]["gradient in flight"],
    }
    # FSDP2 keeps a reduce-scatter's input until the next one is issued, so every block's
    # backward but the last's (the first to run) also holds the previous block's buffer.
    previous_rs = block_rs if L > 1 else 0
    if L > 1:
        second = rank_state(b["last block backward"])
        second["saved activations"] = fwd["saved activations"]  # one block's fewer than at the last
        second["gradients so far"] = root_grads + block_grad_shard
        moments["second-to-last block backward"] = {
            **second,
            "gathered parameters": root_full + (block_full if reshard else (L - 1) * block_full),
            "all-gather buffer": block_buffer if (reshard and L > 2) else 0,
            "previous reduce-scatter input": previous_rs,
        }
    first = rank_state(b["first block backward"])
    first["gradients so far"] = root_grads + (L - 1) * block_grad_shard
    moments["first block backward"] = {
        **first,
        "gathered parameters": root_full + block_full,
        "all-gather buffer": 0,
        "previous reduce-scatter input": previous_rs,
    }
    tied_extra = 2 * 4 * cfg.vocab_size * cfg.d_model if cfg.tie_embeddings else 0
    moments["embedding backward"] = {
        "parameters (shard)": params,
        "optimizer state (shard)": adam,
        "batch": base.batch,
        "gathered parameters": root_full,
        "all-gather buffer": 0,
        "gradients so far": 4 * root.numel + tied_extra + L * block_grad_shard,
        "previous reduce-scatter input": block_rs,
        "gradient in flight": b["embedding backward"]["gradient in flight"],
    }
    moments["optimizer step"] = {
        "parameters (shard)": params,
        "optimizer state (shard)": adam,
        "batch": base.batch,
        "gradients (shard)": grads,
        "optimizer temporaries": math.ceil(b["optimizer step"]["optimizer temporaries"] / W),
    }
    if base.workspaces:
        for c in moments.values():
            c["cuBLAS workspaces"] = base.workspaces
    return RankMemory(strategy, W, _replace(base, moments, parameters=params, gradients=grads, optimizer_state=adam))


def _replace(base: MemoryEstimate, moments: dict[str, dict[str, int]], **fields: int) -> MemoryEstimate:
    import dataclasses

    return dataclasses.replace(base, moments=moments, ddp_buckets=0, **fields)


def rank_memory_table(
    cfg: Config, world_sizes: tuple[int, ...] = (1, 2, 4, 8), *, device_type: str = "cuda", fmt: str = "markdown"
) -> str:
    """Per-GPU peak (GiB) of ``cfg`` under every strategy at each world size, at its batch settings."""
    rows = []
    for strategy in STRATEGIES:
        cells = [f"{estimate_rank_memory(cfg, strategy, w, device_type=device_type).peak_gb:,.2f}" for w in world_sizes]
        rows.append((STRATEGY_NAMES[strategy], cells))
    if fmt == "markdown":
        lines = ["| strategy | " + " | ".join(f"{w} GPU{'s' if w > 1 else ''}" for w in world_sizes) + " |"]
        lines.append("|---|" + "---:|" * len(world_sizes))
        lines += [f"| {name} | " + " | ".join(cells) + " |" for name, cells in rows]
        return "\n".join(lines)
    w0 = max(len(n) for n, _ in rows) + 2
    lines = [f"{'per-GPU peak, GiB':<{w0}}" + "".join(f"{f'{w} GPU':>10}" for w in world_sizes)]
    lines += [f"{name:<{w0}}" + "".join(f"{c:>10}" for c in cells) for name, cells in rows]
    return "\n".join(lines)
