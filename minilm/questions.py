"""Guided questions for the config editor lesson, with checkers: answered by exploring, not by formula.

The counting exercises (:mod:`minilm.exercises`) ask for a number students derive by
hand. These ask what the config editor (:mod:`minilm.widgets`) shows when a knob turns:
the widest model that fits, what untying the head costs, how far the batch can grow. Each
answer is computed here by the same library the editor's readouts use, so the checker can
never disagree with the form. The checker speaks like the exercises' one (✅ / ❌ / ⏳, a
:class:`~minilm.exercises.Feedback`), with a hint built from the student's *own* answer
("at d_model = 896 the estimated peak is 8.50 GiB") and never the expected value. Answers
read off a readout rounded to 0.01 GiB are accepted within a stated tolerance.

    >>> from minilm.questions import config_editor_questions
    >>> qs = config_editor_questions()
    >>> print(qs[0].question)
    >>> qs[0].check(1024)          # ❌ ... at d_model = 1024 the estimated peak is 9.51 GiB, above 8 GiB
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from minilm.config import Config, ConfigError, load_config
from minilm.counting import count_parameters
from minilm.exercises import Feedback, read_answer
from minilm.memory import GB, trainer_step_memory


@dataclass(frozen=True)
class Question:
    """One question with a checked answer.

    ``tolerance`` is absolute, in ``unit`` (0: the answer must be exact). ``hint`` turns a
    wrong answer into advice computed from that answer, never from the expected value;
    ``why`` is shown with a correct answer, to say what the number means.
    """

    key: str
    title: str
    question: str
    unit: str
    _answer: float = field(repr=False)
    tolerance: float = 0.0
    why: str = field(default="", repr=False)
    hint: Callable[[float], str] | None = field(default=None, repr=False)

    def check(self, answer: Any) -> Feedback:
        """Right (within the tolerance) or wrong, with a hint that never contains the expected value."""
        value = read_answer(answer)
        if isinstance(value, Feedback):
            return value
        if abs(value - self._answer) <= self.tolerance * (1 + 1e-9):
            return Feedback(True, True, f"✅ Correct: {self.title}. {self.why}".strip())
        direction = "too high" if value > self._answer else "too low"
        advice = self.hint(value) if self.hint is not None else ""
        return Feedback(False, True, f"❌ Not quite: your answer is {direction}. {advice}".strip())


def _peak_gib(cfg: Config) -> float:
    """The config editor's readout, in GiB: one step as minilm's trainer runs it (chunked loss)."""
    return trainer_step_memory(cfg).peak_bytes / GB


def _largest(lo: int, hi: int, ok: Callable[[int], bool], step: int = 1) -> int:
    """The largest multiple of ``step`` in [lo, hi] for which ``ok`` holds, where ``ok`` is true up to
    some value and false after it (the peak grows with width and with batch). Bisection."""
    if not ok(lo):
        raise ValueError(f"even {lo} does not satisfy the question's condition")
    a, b = lo // step, hi // step  # ok(a * step) holds; find the last k in [a, b] with ok(k * step)
    if ok(b * step):
        return b * step
    while b - a > 1:
        mid = (a + b) // 2
        a, b = (mid, b) if ok(mid * step) else (a, mid)
    return a * step


def config_editor_questions(cfg: Config | None = None, budget_gib: float = 8.0) -> list[Question]:
    """The config editor lesson's questions, about ``cfg`` (default: the shipped small config).

    Memory is the editor's readout: :func:`minilm.memory.trainer_step_memory` on a GPU (the
    trainer's chunked loss, no (b, s, V) logits), in GiB. The GPT-2-small shape is ``cfg`` at
    d_model 768, 12 heads, 12 layers and a 50,257-token vocabulary, as the lesson sets it.
    """
    small = (cfg if cfg is not None else load_config("small")).replace(d_ff=None)
    questions = []

    # 1. The widest model that fits a memory budget.
    def fits(d: int) -> bool:
        return _peak_gib(small.replace(d_model=d)) <= budget_gib

    def width_hint(value: float) -> str:
        d = int(value)
        if d != value or d <= 0 or d % 64:
            return "Give a multiple of 64, the d_model you found in the form."
        try:
            peak = _peak_gib(small.replace(d_model=d))
        except ConfigError as e:  # a width no machine could hold: the config refuses to exist
            return f"At d_model = {d} there is no model to estimate: {e}"
        side = "above" if peak > budget_gib else "under"
        return f"At d_model = {d} the estimated peak is {peak:.2f} GiB, {side} {budget_gib:g} GiB."

    widest = _largest(64, 64 * 64, fits, step=64)
    at_widest = trainer_step_memory(small.replace(d_model=widest))
    questions.append(
        Question(
            key="widest_that_fits",
            title=f"the widest {small.n_layers}-layer model under {budget_gib:g} GiB",
            question=(
                f"Open the small config, tick d_ff 'auto' (d_ff = 4 x d_model) and keep everything else "
                f"({small.n_layers} layers, {small.n_heads} heads, batch {small.batch_size}, bf16). What is the widest "
                f"d_model, a multiple of 64, whose estimated peak stays at or under {budget_gib:g} GiB?"
            ),
            unit="d_model",
            _answer=widest,
            why=(
                f"Of its {at_widest.peak_bytes / GB:.2f} GiB, the weights, gradients and AdamW state are only "
                f"{at_widest.model_state / GB:.2f}: at batch {small.batch_size} x {small.max_seq_len} tokens the saved "
                "activations and the chunked loss's buffers take the rest."
            ),
            hint=width_hint,
        )
    )

    # 2-3. What an untied LM head costs, in parameters and in memory.
    gpt2 = small.replace(d_model=768, n_heads=12, n_layers=12, vocab_size=50257)
    untied = gpt2.replace(tie_embeddings=False)
    extra_params = count_parameters(untied).total - count_parameters(gpt2).total

    def params_hint(value: float) -> str:
        if value == extra_params + gpt2.vocab_size:
            return "The LM head is a Linear without a bias: count its weight only."
        return "Read the parameter count with tie_embeddings ticked and unticked, and subtract."

    questions.append(
        Question(
            key="untied_head_parameters",
            title="the parameters an untied LM head adds",
            question=(
                "Make the model GPT-2-small shaped (d_model 768, 12 heads, 12 layers, vocab_size 50,257, d_ff auto), "
                "then untick tie_embeddings. How many parameters does that add?"
            ),
            unit="parameters",
            _answer=extra_params,
            why="An untied head is a second vocab_size x d_model matrix: the embedding is no longer reused.",
            hint=params_hint,
        )
    )
    extra_gib = _peak_gib(untied) - _peak_gib(gpt2)
    tiny_vocab = gpt2.replace(vocab_size=128)
    tiny_vocab_mib = (_peak_gib(tiny_vocab.replace(tie_embeddings=False)) - _peak_gib(tiny_vocab)) * 1024
    questions.append(
        Question(
            key="untied_head_memory",
            title="the peak memory an untied LM head adds",
            question=(
                "Same GPT-2-small shape: how many GiB does unticking tie_embeddings add to the estimated peak? "
                "(Two decimals, as the readout shows; within 0.02 GiB.)"
            ),
            unit="GiB",
            _answer=extra_gib,
            tolerance=0.02,
            why=(
                "16 bytes per new parameter (weight, gradient, two AdamW moments); the activations and the loss do "
                f"not change. At a 128-token vocabulary the same switch costs {tiny_vocab_mib:.1f} MiB."
            ),
            hint=lambda v: "Read the peak with tie_embeddings ticked and unticked, and subtract.",
        )
    )

    # 4. The attention kernel: same parameters, not the same memory.
    manual_gib = _peak_gib(gpt2.replace(attention="manual")) - _peak_gib(gpt2)
    questions.append(
        Question(
            key="manual_attention_memory",
            title="the memory the manual attention path adds",
            question=(
                "Same GPT-2-small shape, tied again. Switch attention from 'sdpa' to 'manual': the parameter count "
                "does not move. How many GiB does the estimated peak grow? (Within 0.05 GiB.)"
            ),
            unit="GiB",
            _answer=manual_gib,
            tolerance=0.05,
            why=(
                "The manual path keeps each layer's attention scores and probabilities, heads x seq² per sequence, "
                "for backward; the fused kernel recomputes them instead."
            ),
            hint=lambda v: "Read the peak with each attention setting and subtract.",
        )
    )

    # 5. Checkpointing buys batch.
    big_budget = 2 * budget_gib
    ckpt = gpt2.replace(gradient_checkpointing=True)
    per_seq_ckpt = _peak_gib(ckpt.replace(batch_size=2)) - _peak_gib(ckpt.replace(batch_size=1))
    per_seq = _peak_gib(gpt2.replace(batch_size=2)) - _peak_gib(gpt2.replace(batch_size=1))

    def batch_hint(value: float) -> str:
        b = int(value)
        if b != value or b <= 0:
            return "Give a whole number of sequences."
        peak = _peak_gib(ckpt.replace(batch_size=b))
        side = "above" if peak > big_budget else "under"
        return f"At batch_size = {b} the estimated peak is {peak:.2f} GiB, {side} {big_budget:g} GiB."

    questions.append(
        Question(
            key="largest_batch_with_checkpointing",
            title=f"the largest batch under {big_budget:g} GiB with gradient checkpointing",
            question=(
                f"Same GPT-2-small shape, sdpa attention, and tick gradient_checkpointing. What is the largest "
                f"batch_size whose estimated peak stays at or under {big_budget:g} GiB?"
            ),
            unit="sequences",
            _answer=_largest(1, 4096, lambda b: _peak_gib(ckpt.replace(batch_size=b)) <= big_budget),
            why=(
                f"Checkpointing keeps one tensor per block: each extra sequence adds {per_seq_ckpt:.2f} GiB with it, "
                f"{per_seq:.2f} GiB without. The trainer's chunked loss holds no (batch, seq, vocab) logits, only a "
                "few (batch, seq, d_model) tensors."
            ),
            hint=batch_hint,
        )
    )
    return questions


def _fewest_gpus(cfg: Config, strategy: str, budget_gib: float, max_gpus: int) -> int | None:
    """The fewest GPUs (1..max_gpus) whose per-GPU estimated peak under ``strategy`` is at most ``budget_gib``."""
    from minilm.sharding import estimate_rank_memory

    for n in range(1, max_gpus + 1):  # a scan, not a bisection: ZeRO-1's peak is not monotone (buckets appear at 2)
        if estimate_rank_memory(cfg, strategy, n).peak_bytes / GB <= budget_gib:
            return n
    return None


def sharding_questions(cfg: Config | None = None, max_gpus: int = 64) -> list[Question]:
    """The sharding lesson's questions: how many GPUs of a given memory ``cfg`` needs under ZeRO-1, -2 and -3.

    ``cfg`` defaults to the shipped xl config at its own batch settings; the per-GPU peak is
    :func:`minilm.sharding.estimate_rank_memory` on a GPU, in GiB, as the lesson's table shows it.
    """
    from minilm.sharding import STRATEGY_NAMES, estimate_rank_memory

    xl = cfg if cfg is not None else load_config("xl")
    questions = []
    for strategy, budget in (("zero1", 24.0), ("zero2", 16.0), ("zero3", 16.0)):
        answer = _fewest_gpus(xl, strategy, budget, max_gpus)
        if answer is None:
            raise ValueError(f"{strategy} never fits {budget:g} GiB per GPU with up to {max_gpus} GPUs")
        name = STRATEGY_NAMES[strategy].split(" ")[0]

        def hint(value: float, strategy: str = strategy, budget: float = budget, name: str = name) -> str:
            n = int(value)
            if n != value or n < 1:
                return "Give a whole number of GPUs."
            peak = estimate_rank_memory(xl, strategy, n).peak_bytes / GB
            if peak > budget:
                return f"With {n} GPUs {name} needs {peak:.2f} GiB on each, above {budget:g} GiB."
            return f"With {n} GPUs {name} needs {peak:.2f} GiB on each, under {budget:g} GiB: would fewer do?"

        at = estimate_rank_memory(xl, strategy, answer)
        questions.append(
            Question(
                key=f"{strategy}_gpus",
                title=f"the fewest {budget:g} GiB GPUs for the xl config under {name}",
                question=(
                    f"The xl config at its own batch settings (batch {xl.batch_size} x {xl.max_seq_len} tokens "
                    f"per GPU, {xl.precision_label}). Under {STRATEGY_NAMES[strategy]}, what is the fewest number "
                    f"of {budget:g} GiB GPUs on which every GPU's estimated peak stays at or under {budget:g} GiB?"
                ),
                unit="GPUs",
                _answer=answer,
                why=(
                    f"Each of the {answer} GPUs then keeps {at.model_state_bytes / GB:.2f} GiB of weights, "
                    f"gradients and AdamW state, of a {at.peak_gb:.2f} GiB peak."
                ),
                hint=hint,
            )
        )
    return questions
