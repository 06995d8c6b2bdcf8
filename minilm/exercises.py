"""Classroom exercises with instant checkers: right or wrong, and a hint, never the answer.

Every exercise is computed by the library itself (:mod:`minilm.counting`), so a
checker can never disagree with the notebooks. A wrong answer is compared against a
catalogue of the usual mistakes (forgot the biases, counted a tied LM head twice, left
out the position embedding, ...), each of which is also computed by the library on a
slightly wrong config; a matching mistake gets a targeted hint, anything else a hint
about the direction and size of the error. Hints are built from words and from the
student's own config values only, so they cannot leak the answer.

Students::

    >>> from minilm import exercises
    >>> ex = exercises.for_student("ada")          # this student's variant
    >>> print(ex[0].question)
    >>> ex[0].check(123_456)                        # ❌ ... a hint
    >>> ex[0].check(None)                           # not answered yet

A practice table for a student or a room::

    >>> report = exercises.grade("ada", [answer1, answer2, ...])   # or {key: answer}
    >>> print(report.table()); report.score
    >>> print(exercises.grade_class({"ada": [...], "alan": [...]}))

Variants are seeded by a hash of the student id (not Python's randomised ``hash``), so
the same id always gets the same model, and different ids almost always different ones.

These exercises are **practice**, not marks: a question shows the whole model, so the
library's own counting could answer it, and there is deliberately no public answer key.
Marks come from :mod:`minilm.grading`: functions the student writes, checked on the
instructor's side on configs derived from an instructor secret.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from minilm.config import Config, count_value
from minilm.counting import count_parameters

# ---------------------------------------------------------------------------------------
# Feedback
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Feedback:
    """The checker's verdict. ``bool(feedback)`` is True only for a correct answer."""

    correct: bool
    answered: bool
    message: str

    def __bool__(self) -> bool:
        return self.correct

    @property
    def status(self) -> str:
        return "correct" if self.correct else ("wrong" if self.answered else "not answered")

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:  # what a notebook cell shows when it ends with ex.check(...)
        return self.message


NOT_ANSWERED = "⏳ Not answered yet: replace None with your answer and run the cell again."


def _is_empty(answer: Any) -> bool:
    if answer is None or answer is Ellipsis or answer is NotImplemented:
        return True
    return isinstance(answer, str) and not answer.strip()


def parse_answer(answer: Any) -> float:
    """A number from an int, float, numpy scalar or string ('33,936,384', '33_936_384', '34M').

    A string is read as exactly the number it spells, never rounded to a whole count: the text
    '33936384.4' is then as wrong as the number 33936384.4 (the checker hints that a count is a
    whole number). '33.9M' is 33,900,000, a whole number, and is checked as one.
    """
    if isinstance(answer, bool):
        raise ValueError("a True/False is not a count")
    if isinstance(answer, str):
        exact = count_value(answer)
        value = float(exact)
        if value.is_integer() and exact != exact.to_integral_value():
            # A fraction too small for a float ('33936384.000000001'): it would read as the count itself.
            # Not echoed back: the student's text starts with the expected count.
            raise ValueError("it has digits after the decimal point, and a count is a whole number")
        return value
    try:
        value = float(answer)
    except (TypeError, ValueError):
        raise ValueError(f"cannot read a number from {type(answer).__name__}") from None
    if not math.isfinite(value):
        raise ValueError("not a finite number")
    return value


# ---------------------------------------------------------------------------------------
# Exercises
# ---------------------------------------------------------------------------------------


def read_answer(answer: Any, advice: str = "") -> float | Feedback:
    """The number a student typed, or the :class:`Feedback` to show when there is none to read."""
    if _is_empty(answer):
        return Feedback(False, False, NOT_ANSWERED)
    try:
        return parse_answer(answer)
    except ValueError as e:
        return Feedback(False, True, f"❌ Could not read your answer as a number ({e}). {advice}".strip())


@dataclass(frozen=True)
class Mistake:
    """A wrong answer students often give, and the hint that points at it (without the answer)."""

    value: int
    hint: str


@dataclass(frozen=True)
class Exercise:
    """One question about one config, with its checker.

    ``key`` names the kind of question (see :data:`KINDS`); ``question`` is what the
    student reads; the expected value and the mistake catalogue are kept out of the repr.
    """

    key: str
    title: str
    question: str
    cfg: Config = field(repr=False)
    unit: str = "parameters"
    formula_hint: str = field(default="", repr=False)
    _answer: int = field(default=0, repr=False)
    _mistakes: tuple[Mistake, ...] = field(default=(), repr=False)

    def check(self, answer: Any) -> Feedback:
        """Right or wrong, with a hint that never contains the expected value."""
        value = read_answer(answer, "Give a whole number.")
        if isinstance(value, Feedback):
            return value
        expected = self._answer
        if value == expected:
            return Feedback(True, True, f"✅ Correct: {self.title}.")
        for m in self._mistakes:
            if value == m.value and m.value != expected:
                return Feedback(False, True, f"❌ Not quite. {m.hint}")
        return Feedback(False, True, "❌ Not quite. " + self._generic_hint(value))

    def _generic_hint(self, value: float) -> str:
        expected = self._answer
        if value <= 0:
            return f"The number of {self.unit} is positive. {self.formula_hint}".strip()
        if value != int(value):
            return f"A count of {self.unit} is a whole number. {self.formula_hint}".strip()
        direction = "too high" if value > expected else "too low"
        ratio = value / expected
        L = self.cfg.n_layers
        if L > 1 and any(math.isclose(ratio, r, rel_tol=0.02) for r in (L, 1 / L)):
            return (
                f"Your answer is {direction} by about a factor of the number of layers: "
                f"check where you multiply by n_layers = {L}."
            )
        rel = abs(ratio - 1)
        if rel < 0.01:
            small = "biases or LayerNorm parameters" if self.unit == "parameters" else "a small tensor"
            size = f"very close (within 1%): look for a small term, such as {small}"
        elif rel < 0.10:
            size = "close (within 10%), but a whole component is missing or extra"
        elif rel < 1.0:
            size = "off by more than 10%: a large component is missing or extra"
        else:
            size = "off by more than a factor of two: re-derive it step by step"
        return f"Your answer is {direction}; it is {size}. {self.formula_hint}".strip()


# ---------------------------------------------------------------------------------------
# Kinds of exercise: each computes (expected value, mistakes) from the library's counts
# ---------------------------------------------------------------------------------------


def _shape(cfg: Config) -> str:
    d_ff = f"d_ff = {cfg.ff_width}" + (" (= 4·d_model)" if cfg.ff_width == 4 * cfg.d_model else "")
    return (
        f"vocab_size = {cfg.vocab_size:,}, d_model = {cfg.d_model}, n_heads = {cfg.n_heads}, "
        f"n_layers = {cfg.n_layers}, {d_ff}, max_seq_len = {cfg.max_seq_len}, "
        f"bias = {cfg.bias}, tie_embeddings = {cfg.tie_embeddings}"
    )


def _training(cfg: Config) -> str:
    precision = cfg.precision_label
    return f"batch_size = {cfg.batch_size}, sequence length = max_seq_len, {precision}"


def _bias_mistake(cfg: Config, pick: Callable[[Config], int], what: str) -> list[Mistake]:
    if not cfg.bias:
        return []
    return [Mistake(pick(cfg.replace(bias=False)), f"You counted the weight matrices only: {what} has biases too.")]


def _attention(cfg: Config) -> tuple[int, list[Mistake]]:
    pc = count_parameters(cfg)
    ans = pc.attention_per_layer
    mistakes = _bias_mistake(cfg, lambda c: count_parameters(c).attention_per_layer, "every Linear layer")
    mistakes += [
        # q, k, v projections only (3/4 of the four same-sized Linear layers)
        Mistake(ans * 3 // 4, "You have Q, K and V. What happens after the heads are joined again?"),
        Mistake(ans * cfg.n_heads, "The heads split d_model between them; each does not get a full-size projection."),
        Mistake(ans * cfg.n_layers, "The question asks for one layer, not all of them."),
    ]
    return ans, mistakes


def _mlp(cfg: Config) -> tuple[int, list[Mistake]]:
    pc = count_parameters(cfg)
    ans = pc.mlp_per_layer
    mistakes = _bias_mistake(cfg, lambda c: count_parameters(c).mlp_per_layer, "each of the two Linear layers")
    if cfg.ff_width != 4 * cfg.d_model:
        mistakes.append(
            Mistake(
                count_parameters(cfg.replace(d_ff=None)).mlp_per_layer,
                "You assumed the hidden width is 4·d_model; this config sets d_ff explicitly.",
            )
        )
    mistakes.append(Mistake(ans * cfg.n_layers, "The question asks for one layer, not all of them."))
    return ans, mistakes


def _per_layer(cfg: Config) -> tuple[int, list[Mistake]]:
    pc = count_parameters(cfg)
    ans = pc.per_layer
    mistakes = [
        Mistake(
            ans - pc.norms_per_layer, "Attention and MLP look right; a block also has two LayerNorms with parameters."
        ),
        Mistake(ans - pc.norms_per_layer // 2, "A block has two LayerNorms (before attention and before the MLP)."),
        Mistake(pc.attention_per_layer + pc.norms_per_layer, "You left out the MLP (feed-forward) part of the block."),
        Mistake(pc.mlp_per_layer + pc.norms_per_layer, "You left out the attention part of the block."),
        Mistake(ans * cfg.n_layers, "The question asks for one block, not the whole stack."),
    ]
    mistakes += _bias_mistake(cfg, lambda c: count_parameters(c).per_layer, "every Linear layer and LayerNorm")
    return ans, mistakes


def _total(cfg: Config) -> tuple[int, list[Mistake]]:
    pc = count_parameters(cfg)
    ans = pc.total
    L = cfg.n_layers
    mistakes = []
    if cfg.tie_embeddings:
        untied = count_parameters(cfg.replace(tie_embeddings=False)).total
        mistakes.append(
            Mistake(untied, "The LM head is tied to the token embedding: one tensor used twice, counted once.")
        )
    else:
        mistakes.append(
            Mistake(ans - pc.lm_head, "This config does not tie embeddings: the LM head has its own matrix.")
        )
    mistakes += [
        Mistake(
            ans - pc.position_embedding, "GPT-2 style models also learn a position embedding: one vector per position."
        ),
        Mistake(ans - pc.token_embedding, "Did you forget the token embedding?"),
        Mistake(ans - pc.final_norm, "Almost: there is one more LayerNorm after the last block."),
        Mistake(ans - pc.norms_per_layer * L, "The LayerNorms inside each block have parameters too."),
        Mistake(ans - pc.norms_per_layer * L - pc.final_norm, "LayerNorms have parameters too (a scale and a shift)."),
        Mistake(ans - pc.per_layer * (L - 1), "You counted one block: the model stacks n_layers of them."),
        Mistake(pc.non_embedding, "That is the non-embedding count: the question asks for everything."),
        Mistake(pc.blocks, "That is the blocks alone: add the embeddings and the final LayerNorm."),
    ]
    mistakes += _bias_mistake(cfg, lambda c: count_parameters(c).total, "every Linear layer and LayerNorm")
    return ans, mistakes


def _non_embedding(cfg: Config) -> tuple[int, list[Mistake]]:
    pc = count_parameters(cfg)
    ans = pc.non_embedding
    mistakes = [
        Mistake(pc.total, "That includes the embeddings: leave out the token and position embeddings (and the head)."),
        Mistake(pc.blocks, "Almost: the final LayerNorm is not an embedding, so it counts."),
        Mistake(ans + pc.position_embedding, "The position embedding is an embedding too: leave it out."),
        Mistake(pc.per_layer, "You counted one block: the model stacks n_layers of them."),
    ]
    mistakes += _bias_mistake(cfg, lambda c: count_parameters(c).non_embedding, "every Linear layer and LayerNorm")
    return ans, mistakes


def _embeddings(cfg: Config) -> tuple[int, list[Mistake]]:
    pc = count_parameters(cfg)
    ans = pc.embeddings
    mistakes = [Mistake(ans - pc.position_embedding, "Add the learned position embedding (one vector per position).")]
    if cfg.tie_embeddings:
        mistakes.append(
            Mistake(ans + pc.token_embedding, "The LM head is tied to the token embedding: count that matrix once.")
        )
    else:
        mistakes.append(Mistake(ans - pc.lm_head, "This config does not tie embeddings: include the LM head's matrix."))
    return ans, mistakes


def _memory_estimate(cfg: Config):
    from minilm.memory import estimate_training_memory  # the memory lesson's library; imported when used

    return estimate_training_memory(cfg)


def _model_state(cfg: Config) -> tuple[int, list[Mistake]]:
    est = _memory_estimate(cfg)
    n = est.n_parameters
    ans = est.model_state
    untied = count_parameters(cfg.replace(tie_embeddings=False)).total
    mistakes = [
        Mistake(n, "The question asks for bytes, not parameters: how many bytes is one fp32 number?"),
        Mistake(
            est.parameters, "That is the weights alone. Training also keeps a gradient per weight, and AdamW more."
        ),
        Mistake(
            est.parameters + est.gradients, "Weights and gradients are there. What does AdamW remember per weight?"
        ),
        Mistake(
            ans - est.optimizer_state // 2,
            "One fp32 tensor of the model's size is missing: list the weights, the gradients and each of "
            "AdamW's running averages (m and v).",
        ),
        Mistake(ans * untied // n, "The tied LM head is one tensor: it has one gradient and one pair of moments."),
    ]
    if cfg.bf16 or cfg.fp16:  # 8 bytes/parameter is then most likely "autocast halves it"
        mistakes.insert(
            0, Mistake(ans // 2, "Autocast does not halve model state: weights, gradients and AdamW stay fp32.")
        )
    return ans, mistakes


def _logits(cfg: Config) -> tuple[int, list[Mistake]]:
    est = _memory_estimate(cfg)
    ans = est.logits
    b, s, V, d = est.batch_size, est.seq_len, cfg.vocab_size, cfg.d_model
    mistakes = [
        Mistake(b * s * V, "That is the number of values; the question asks for bytes."),
        Mistake(2 * b * s * V, "Cross-entropy works in fp32 even under autocast: the saved log-probs are fp32."),
        Mistake(4 * b * V, "Every position of every sequence predicts a next token, not only the last one."),
        Mistake(4 * s * V, "There is a row of log-probs for every sequence in the batch."),
        Mistake(4 * b * s * d, "The head maps each position to a score per vocabulary entry, not per channel."),
        Mistake(3 * ans, "That is the moment early in backward; the question asks what the forward pass saves."),
    ]
    return ans, mistakes


@dataclass(frozen=True)
class Kind:
    title: str
    question: str
    formula_hint: str
    compute: Callable[[Config], tuple[int, list[Mistake]]]
    unit: str = "parameters"


KINDS: dict[str, Kind] = {
    "attention_per_layer": Kind(
        "Attention parameters per layer",
        "How many parameters does the attention of ONE layer have (Q, K, V and output projections)?",
        "Hint: attention has four d_model × d_model projections (Q, K, V fused as one d_model × 3·d_model).",
        _attention,
    ),
    "mlp_per_layer": Kind(
        "MLP parameters per layer",
        "How many parameters does the MLP (feed-forward) of ONE layer have?",
        "Hint: two Linear layers, d_model → d_ff and d_ff → d_model, each with a weight (and a bias if bias=True).",
        _mlp,
    ),
    "per_layer": Kind(
        "Parameters per block",
        "How many parameters does ONE transformer block have in total (attention, MLP and LayerNorms)?",
        "Hint: block = attention + MLP + two LayerNorms (each d_model scales, plus d_model shifts if bias=True).",
        _per_layer,
    ),
    "embeddings": Kind(
        "Embedding parameters",
        "How many parameters sit in the embeddings (token embedding, position embedding and the LM head)?",
        "Hint: token embedding vocab_size × d_model, positions max_seq_len × d_model; a tied head adds nothing.",
        _embeddings,
    ),
    "non_embedding": Kind(
        "Non-embedding parameters",
        "How many NON-embedding parameters does the model have (all blocks plus the final LayerNorm)?",
        "Hint: n_layers × (parameters per block) + the final LayerNorm.",
        _non_embedding,
    ),
    "total": Kind(
        "Total parameters",
        "How many parameters does the whole model have?",
        "Hint: embeddings + n_layers × block + final LayerNorm (+ the LM head only if it is not tied).",
        _total,
    ),
    "model_state_bytes": Kind(
        "Model state in bytes",
        "Training with AdamW, how many BYTES do the weights, their gradients and the optimizer state take?",
        "Hint: count the parameters first; then count the fp32 tensors of that size that training keeps.",
        _model_state,
        unit="bytes",
    ),
    "logits_bytes": Kind(
        "Saved log-probabilities in bytes",
        "How many BYTES of log-probabilities does cross-entropy save for backward, for one micro-batch?",
        "Hint: one fp32 value per (sequence, position, vocabulary entry).",
        _logits,
        unit="bytes",
    ),
}
MEMORY_KINDS = ("model_state_bytes", "logits_bytes")

DEFAULT_SET = ("attention_per_layer", "mlp_per_layer", "per_layer", "total")


def count_exercise(key: str, cfg: Config, *, title: str | None = None, question: str | None = None) -> Exercise:
    """An exercise of kind ``key`` (one of :data:`KINDS`) about ``cfg``."""
    if key not in KINDS:
        raise KeyError(f"unknown exercise kind {key!r}; choose from {', '.join(KINDS)}")
    kind = KINDS[key]
    answer, mistakes = kind.compute(cfg)
    mistakes = tuple(m for m in mistakes if m.value != answer)
    return Exercise(
        key=key,
        title=title or kind.title,
        question=f"{question or kind.question}\nModel: {_shape(cfg)}."
        + (f"\nTraining: {_training(cfg)}." if kind.unit == "bytes" else ""),
        cfg=cfg,
        unit=kind.unit,
        formula_hint=kind.formula_hint,
        _answer=answer,
        _mistakes=mistakes,
    )


# ---------------------------------------------------------------------------------------
# Per-student variants
# ---------------------------------------------------------------------------------------
_D_MODELS = (192, 256, 320, 384, 448, 512, 576, 640, 768, 896, 1024, 1280)
_VOCABS = (4096, 8000, 12000, 16000, 24000, 32000, 32768, 50257, 50304, 65536)
_SEQ_LENS = (128, 256, 512, 1024, 2048)


def _rng(student_id: str) -> random.Random:
    if not isinstance(student_id, str) or not student_id.strip():
        raise ValueError("student_id must be a non-empty string (a name, an e-mail or a number as text)")
    digest = hashlib.sha256(student_id.strip().encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def student_config(student_id: str) -> Config:
    """The model this student's exercises are about: reproducible per id, varied across ids."""
    rng = _rng(student_id)
    d = rng.choice(_D_MODELS)
    head_dim = rng.choice([h for h in (32, 64, 128) if d % h == 0 and d // h >= 2])
    # d_ff: usually the GPT-2 default 4·d; sometimes an explicit width, as in many newer models
    d_ff = rng.choice((None, None, None, 2 * d, 3 * d, 8 * d // 3 // 64 * 64 or 2 * d))
    return Config(
        vocab_size=rng.choice(_VOCABS),
        d_model=d,
        n_heads=d // head_dim,
        n_layers=rng.randint(2, 24),
        d_ff=d_ff,
        max_seq_len=rng.choice(_SEQ_LENS),
        bias=rng.random() < 0.75,
        tie_embeddings=rng.random() < 0.7,
        description=f"exercise model for student {student_id.strip()!r}",
        # drawn last, so adding them kept every earlier draw (and every student's model) unchanged
        batch_size=rng.choice((4, 8, 16, 32)),
        bf16=rng.random() < 0.5,
    )


def for_student(student_id: str, kinds: Sequence[str] = DEFAULT_SET) -> list[Exercise]:
    """This student's exercises, all about :func:`student_config`'s model, in ``kinds`` order."""
    cfg = student_config(student_id)
    return [count_exercise(k, cfg) for k in kinds]


# ---------------------------------------------------------------------------------------
# Grading
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Grade:
    """One student's graded answers: ``rows`` are (exercise key, status, hint or '')."""

    student_id: str
    rows: tuple[tuple[str, str, str], ...]

    @property
    def score(self) -> int:
        return sum(status == "correct" for _, status, _ in self.rows)

    @property
    def total(self) -> int:
        return len(self.rows)

    def table(self) -> str:
        width = max([len("exercise")] + [len(k) for k, _, _ in self.rows])
        lines = [f"student {self.student_id!r}: {self.score}/{self.total}", f"{'exercise':<{width}}  status"]
        lines += [f"{k:<{width}}  {status}" for k, status, _ in self.rows]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def grade(student_id: str, answers: Sequence[Any] | Mapping[str, Any], kinds: Sequence[str] = DEFAULT_SET) -> Grade:
    """Check a student's answers: a list in exercise order, or a mapping from exercise key.

    Missing answers count as not answered; keys that are not exercises raise ``KeyError``.
    """
    exercises = for_student(student_id, kinds)
    if isinstance(answers, Mapping):
        unknown = set(answers) - {ex.key for ex in exercises}
        if unknown:
            raise KeyError(f"not exercises of this set: {', '.join(sorted(unknown))}")
        given = [answers.get(ex.key) for ex in exercises]
    else:
        if len(answers) > len(exercises):
            raise ValueError(f"{len(answers)} answers for {len(exercises)} exercises")
        given = list(answers) + [None] * (len(exercises) - len(answers))
    rows = []
    for ex, a in zip(exercises, given, strict=True):
        fb = ex.check(a)
        rows.append((ex.key, fb.status, "" if fb.correct else fb.message))
    return Grade(student_id, tuple(rows))


def grade_class(
    submissions: Mapping[str, Sequence[Any] | Mapping[str, Any]], kinds: Sequence[str] = DEFAULT_SET
) -> str:
    """A text table, one row per student: a mark per exercise (✓ right, ✗ wrong, · blank) and the score."""
    grades = [grade(sid, answers, kinds) for sid, answers in submissions.items()]
    mark = {"correct": "✓", "wrong": "✗", "not answered": "·"}
    width = max([len("student")] + [len(g.student_id) for g in grades])
    cols = [f"{i + 1:>2}" for i in range(len(kinds))]
    lines = [f"{'student':<{width}}  {' '.join(cols)}  score", "-" * (width + 3 * len(kinds) + 8)]
    for g in grades:
        marks = " ".join(f"{mark[s]:>2}" for _, s, _ in g.rows)
        lines.append(f"{g.student_id:<{width}}  {marks}  {g.score}/{g.total}")
    lines.append("columns: " + ", ".join(f"{i + 1} {k}" for i, k in enumerate(kinds)))
    return "\n".join(lines)
