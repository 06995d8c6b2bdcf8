"""Graded assignments: functions students write, checked on configs they never see.

The graded lesson (``notebooks/12_graded_exercises.ipynb``) asks for six functions of plain
numbers (:data:`GRADED`): a parameter count, activation bytes per layer, FLOPs per token,
hours to a Chinchilla budget on a named GPU, the compute-optimal size for a budget, and
KV-cache bytes. Marks come from three checks, all on the instructor's side:

1. **Hidden cases.** Each student's functions are called on configs drawn from
   ``HMAC-SHA256(instructor secret, student id)`` (:func:`hidden_cases`). Without the
   secret nobody, the student's kernel included, can tell which configs will be tried, and
   the expected values are computed in the grader's process, never in the kernel.
2. **A static check** (:func:`static_check`, :mod:`ast`): a function that calls minilm's own
   counting, FLOPs, memory or sizing code, the grader, or an escape hatch that could reach
   it (``__import__``, ``exec``, ``importlib``, ...) is marked "not the student's work" and
   earns nothing, however right its numbers.
3. **Near-miss hints** keyed to the usual mistakes (biases forgotten, the forward pass only,
   K without V, the square root left out, ...), in the gradebook's notes column.

Students check their work on *public* examples with :func:`check`; instructors grade a
class with ``minilm grade SUBMISSIONS_DIR --out grades.csv`` (:func:`main`), which executes
every notebook with a per-notebook time limit, never stops on a broken one, and writes one
row per student, one column per exercise, and a summary plot::

    export MINILM_GRADING_SECRET=$(python -c "import secrets; print(secrets.token_hex(32))")
    minilm grade submitted/ --out grades.csv --answer-key key.json

Secret: ``--secret-file PATH`` or ``$MINILM_GRADING_SECRET``; keep it out of the students'
reach, and keep the same one for a whole course (the hidden cases follow from it).
"""

from __future__ import annotations

import argparse
import ast
import csv
import hashlib
import hmac
import json
import math
import os
import random
import secrets as _secrets
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minilm.colab import setup_cell_source
from minilm.config import Config

SECRET_ENV = "MINILM_GRADING_SECRET"
ASSIGNMENT = "12_graded_exercises"
CASES_PER_EXERCISE = 3

# ---------------------------------------------------------------------------------------
# Reference solutions: the library where it has the rule, else the textbook formula
# ---------------------------------------------------------------------------------------


def _config(V: int, d: int, L: int, P: int, d_ff: int | None = None, bias: bool = True, tied: bool = True) -> Config:
    # Heads do not change any count or FLOP asked here; one head always divides d_model.
    return Config(
        vocab_size=V, d_model=d, n_heads=1, n_layers=L, max_seq_len=P, d_ff=d_ff, bias=bias, tie_embeddings=tied
    )


def ref_count_parameters(V: int, d: int, L: int, P: int, d_ff: int | None = None, bias: bool = True, tied: bool = True):
    """Parameters of a GPT-2 style model (minilm.counting)."""
    from minilm.counting import count_parameters

    return count_parameters(_config(V, d, L, P, d_ff, bias, tied)).total


def ref_activation_bytes_per_layer(s: int, b: int, d: int, a: int, bytes_per_value: int = 2) -> int:
    """Bytes one block saves for backward, Korthikanti et al. 2022's accounting, generalised to e bytes.

    Per layer: s·b·d·(16e + 2) + a·s²·b·(2e + 1): every saved activation at e bytes, the three
    dropout masks at 1 byte, manual attention with dropout (softmax output, mask, dropped
    probabilities). With e = 2 it is the paper's s·b·d·(34 + 5·a·s/d).
    """
    e = bytes_per_value
    return s * b * d * (16 * e + 2) + a * s * s * b * (2 * e + 1)


def ref_flops_per_token(V: int, d: int, L: int, s: int, d_ff: int | None = None) -> int:
    """Training FLOPs per token, 6·N_mm + 12·L·s·d (minilm.flops)."""
    from minilm.flops import flops_per_token

    return flops_per_token(_config(V, d, L, s, d_ff), seq_len=s)


def _gpu_peak(gpu: str) -> float:
    from minilm.hardware import peak_flops

    return peak_flops(gpu, "bf16")


def ref_chinchilla_hours(n_params: int, gpu: str, mfu: float = 0.4, n_gpus: int = 1) -> float:
    """Hours to train N parameters on 20·N tokens (6·N·D FLOPs) at ``mfu`` of ``n_gpus`` GPUs' bf16 peak."""
    from minilm.flops import chinchilla_tokens, training_flops

    flops = training_flops(n_params, chinchilla_tokens(n_params))
    return flops / (_gpu_peak(gpu) * mfu * n_gpus) / 3600


def ref_compute_optimal_parameters(flops: float) -> float:
    """N with C = 6·N·D and D = 20·N (Chinchilla): N = sqrt(C / 120)."""
    from minilm.flops import CHINCHILLA_TOKENS_PER_PARAMETER

    return math.sqrt(flops / (6 * CHINCHILLA_TOKENS_PER_PARAMETER))


def ref_kv_cache_bytes(n_layers: int, d_model: int, seq_len: int, batch_size: int, bytes_per_value: int = 2) -> int:
    """Bytes of the KV cache: a key and a value vector of d_model per layer, per cached token."""
    return 2 * n_layers * d_model * bytes_per_value * seq_len * batch_size


# ---------------------------------------------------------------------------------------
# Near misses: (value, hint) for one case; hints never contain the expected value
# ---------------------------------------------------------------------------------------
Near = list[tuple[float, str]]


def _count_mistakes(V, d, L, P, d_ff=None, bias=True, tied=True) -> Near:
    from minilm.exercises import _total  # the practice exercises' catalogue: one home for the hints

    return [(m.value, m.hint) for m in _total(_config(V, d, L, P, d_ff, bias, tied))[1]]


def _activation_mistakes(s, b, d, a, bytes_per_value=2) -> Near:
    e = bytes_per_value
    ref = ref_activation_bytes_per_layer(s, b, d, a, e)
    return [
        (s * b * d * 16 * e + a * s * s * b * 2 * e, "Dropout keeps a mask too: one byte per value, three of them."),
        (s * b * d * (16 * e + 2), "Without a fused kernel the softmax probabilities (a·s² per sequence) are saved."),
        (s * b * d * 18 * e + a * s * s * b * 3 * e, "A dropout mask is one byte per value, whatever the precision."),
        (s * b * d * (16 * e + 2) + s * s * b * (2 * e + 1), "Every head has its own s × s attention matrix."),
        (s * b * d * (10 * e + 2) + a * s * s * b * (2 * e + 1), "The MLP's hidden layer is 4·d_model wide."),
        (ref // b, "The question is about a micro-batch of b sequences, not one."),
        (ref_activation_bytes_per_layer(s, b, d, a, 4), "Use bytes_per_value for the saved activations."),
        (ref * 8, "The question asks for bytes, not bits."),
    ]


def _flops_mistakes(V, d, L, s, d_ff=None) -> Near:
    from minilm.flops import flop_breakdown

    fb = flop_breakdown(_config(V, d, L, s, d_ff), seq_len=s)
    return [
        (fb.forward, "That is the forward pass; training adds a backward pass that costs twice as much."),
        (
            fb.total - 3 * fb.attention_scores,
            "Add the attention scores: q·kᵀ and probabilities·v, each token against s.",
        ),
        (fb.total - 3 * fb.lm_head, "The LM head multiplies every token by a d_model × vocab matrix (even when tied)."),
        (6 * ref_count_parameters(V, d, L, s, d_ff), "6·N counts every parameter; embedding lookups cost no FLOPs."),
        (fb.total - fb.attention_scores * 3 // 2, "q·kᵀ and probabilities·v both cost 2·s·d FLOPs per layer forward."),
    ]


def _hours_mistakes(n_params, gpu, mfu=0.4, n_gpus=1) -> Near:
    ref = ref_chinchilla_hours(n_params, gpu, mfu, n_gpus)
    near = [
        (ref * mfu, "The GPUs do not run at their peak: divide by the MFU as well."),
        (ref * 3600, "That is seconds; the question asks for hours."),
        (ref / 24, "That is days; the question asks for hours."),
        (ref / 3, "Training costs 6 FLOPs per parameter per token (forward 2, backward 4)."),
        (ref / 20, "Chinchilla trains on 20 tokens per parameter, not one."),
    ]
    if n_gpus > 1:
        near.append((ref * n_gpus, "Several GPUs share the work: divide by their number."))
    return near


def _optimal_mistakes(flops) -> Near:
    ref = ref_compute_optimal_parameters(flops)
    return [
        (flops / 120, "C = 6·N·D with D = 20·N grows with N squared: take a square root."),
        (math.sqrt(flops / 6), "The tokens are not a free choice: Chinchilla's D is 20·N."),
        (20 * ref, "That is the number of tokens D; the question asks for parameters N."),
        (flops / 6, "C = 6·N·D has two unknowns; Chinchilla ties them with D = 20·N."),
    ]


def _kv_mistakes(n_layers, d_model, seq_len, batch_size, bytes_per_value=2) -> Near:
    ref = ref_kv_cache_bytes(n_layers, d_model, seq_len, batch_size, bytes_per_value)
    return [
        (ref // 2, "The cache keeps keys AND values."),
        (ref * 8, "The question asks for bytes, not bits."),
        (ref // n_layers, "Every layer has its own keys and values."),
        (ref // batch_size, "Every sequence in the batch has its own cache."),
        (ref // bytes_per_value, "That is the number of values; multiply by bytes_per_value."),
    ]


# ---------------------------------------------------------------------------------------
# Hidden cases: drawn from a seeded generator; realistic and varied
# ---------------------------------------------------------------------------------------
_VOCABS = (4096, 8000, 16000, 32000, 32768, 50257, 50304, 65536)
_WIDTHS = (128, 256, 384, 512, 640, 768, 1024, 1280, 1536, 2048)
_GPUS = ("H100 SXM", "H100 PCIe", "A100 80GB", "A100 40GB", "L4", "RTX 4090", "RTX 3090")


def _draw_count(r: random.Random) -> tuple:
    d = r.choice(_WIDTHS)
    d_ff = r.choice((None, None, 2 * d, 3 * d))
    return (
        r.choice(_VOCABS),
        d,
        r.randint(2, 36),
        r.choice((256, 512, 1024, 2048)),
        d_ff,
        r.random() < 0.7,
        r.random() < 0.6,
    )


def _draw_activation(r: random.Random) -> tuple:
    d = r.choice(_WIDTHS)
    return (r.choice((128, 256, 512, 1024, 2048)), r.choice((1, 2, 4, 8, 16)), d, d // 64, r.choice((2, 2, 4)))


def _draw_flops(r: random.Random) -> tuple:
    d = r.choice(_WIDTHS)
    return (
        r.choice(_VOCABS),
        d,
        r.randint(2, 36),
        r.choice((256, 512, 1024, 2048, 4096)),
        r.choice((None, None, 3 * d)),
    )


def _draw_hours(r: random.Random) -> tuple:
    n = r.choice((10, 25, 50, 125, 350, 760)) * 10**6 + r.randrange(0, 10**6)
    return (n, r.choice(_GPUS), r.choice((0.3, 0.35, 0.4, 0.45, 0.5)), r.choice((1, 1, 2, 4, 8)))


def _draw_optimal(r: random.Random) -> tuple:
    return (float(r.choice((1, 2, 3, 5, 7)) * 10 ** r.randint(17, 23)),)


def _draw_kv(r: random.Random) -> tuple:
    return (
        r.randint(4, 48),
        r.choice(_WIDTHS),
        r.choice((512, 1024, 2048, 4096, 8192)),
        r.choice((1, 4, 8, 32)),
        r.choice((2, 2, 1, 4)),
    )


@dataclass(frozen=True)
class GradedExercise:
    """One function the student writes: its name, points, arguments, reference and near misses."""

    key: str  # the function's name, and the nbgrader grade id of its solution cell
    points: int
    params: tuple[str, ...]  # positional arguments, in order (the grader passes all of them)
    reference: Callable[..., float] = field(repr=False)
    near_misses: Callable[..., Near] = field(repr=False)
    draw: Callable[[random.Random], tuple] = field(repr=False)
    examples: tuple[tuple, ...] = field(default=(), repr=False)  # public: the student's own checks
    rel_tol: float = 0.0  # 0: a whole number, exactly; else a float within this relative tolerance

    def is_right(self, value: float, expected: float) -> bool:
        if self.rel_tol == 0:
            return value == expected
        return math.isclose(value, expected, rel_tol=self.rel_tol)

    def feedback(self, value: Any, args: tuple) -> tuple[bool, str]:
        """(correct, hint) for the value a student's function returned on ``args``; no hint leaks the answer."""
        if isinstance(value, dict) and "error" in value:
            return False, f"raised {value['error']}"
        try:
            number = _as_number(value)
        except ValueError as e:
            return False, f"returned {str(value)[:40]!r}, not a number ({e})"
        expected = self.reference(*args)
        if self.is_right(number, expected):
            return True, ""
        for near, hint in self.near_misses(*args):
            if not self.is_right(near, expected) and math.isclose(number, near, rel_tol=max(self.rel_tol, 1e-12)):
                return False, hint
        if self.rel_tol == 0 and number != int(number):
            return False, "the answer is a whole number"
        direction = "too high" if number > expected else "too low"
        ratio = number / expected if expected else math.inf
        how = "by less than 1%" if abs(ratio - 1) < 0.01 else f"by a factor of {ratio:.3g}"
        return False, f"{direction} {how}"

    def call(self, args: tuple) -> str:
        """How the call reads in a notebook: ``count_parameters(50257, 768, 12, 1024, None, True, True)``."""
        return f"{self.key}({', '.join(repr(a) for a in args)})"


def _as_number(value: Any) -> float:
    from minilm.exercises import parse_answer

    if isinstance(value, str) and value.startswith("'"):
        value = value.strip("'")
    return parse_answer(value)


GRADED: tuple[GradedExercise, ...] = (
    GradedExercise(
        "count_parameters",
        2,
        ("V", "d", "L", "P", "d_ff", "bias", "tied"),
        ref_count_parameters,
        _count_mistakes,
        _draw_count,
        examples=((50257, 768, 12, 1024, None, True, True), (128, 128, 4, 256, None, True, True)),
    ),
    GradedExercise(
        "activation_bytes_per_layer",
        2,
        ("s", "b", "d", "a", "bytes_per_value"),
        ref_activation_bytes_per_layer,
        _activation_mistakes,
        _draw_activation,
        examples=((1024, 8, 768, 12, 2), (256, 4, 128, 4, 4)),
    ),
    GradedExercise(
        "flops_per_token",
        2,
        ("V", "d", "L", "s", "d_ff"),
        ref_flops_per_token,
        _flops_mistakes,
        _draw_flops,
        examples=((50257, 768, 12, 1024, None), (16000, 512, 8, 1024, None)),
    ),
    GradedExercise(
        "chinchilla_hours",
        2,
        ("n_params", "gpu", "mfu", "n_gpus"),
        ref_chinchilla_hours,
        _hours_mistakes,
        _draw_hours,
        examples=((124_439_808, "A100 80GB", 0.4, 1), (354_560_000, "H100 SXM", 0.5, 8)),
        rel_tol=1e-6,
    ),
    GradedExercise(
        "compute_optimal_parameters",
        1,
        ("flops",),
        ref_compute_optimal_parameters,
        _optimal_mistakes,
        _draw_optimal,
        examples=((1e21,), (5.76e23,)),
        rel_tol=1e-6,
    ),
    GradedExercise(
        "kv_cache_bytes",
        1,
        ("n_layers", "d_model", "seq_len", "batch_size", "bytes_per_value"),
        ref_kv_cache_bytes,
        _kv_mistakes,
        _draw_kv,
        examples=((12, 768, 1024, 1, 2), (24, 1024, 2048, 8, 2)),
    ),
)
BY_KEY = {ex.key: ex for ex in GRADED}
MAX_POINTS = sum(ex.points for ex in GRADED)


# ---------------------------------------------------------------------------------------
# The student's side: public examples only
# ---------------------------------------------------------------------------------------


def check(fn: Callable[..., Any], cases: Iterable[tuple] | None = None, *, key: str | None = None) -> str:
    """Run a student's function on the public examples (or ``cases``); raise AssertionError with a hint.

    The message names the call and the mistake it looks like, never the expected value.
    Returns a one-line "✓" summary when every case is right.
    """
    key = key or getattr(fn, "__name__", "")
    if key not in BY_KEY:
        raise KeyError(f"no graded exercise named {key!r}; the exercises are: {', '.join(BY_KEY)}")
    ex = BY_KEY[key]
    cases = list(ex.examples if cases is None else cases)
    for args in cases:
        try:
            value = fn(*args)
        except NotImplementedError:
            raise AssertionError(f"{key} is not written yet (it raises NotImplementedError)") from None
        ok, hint = ex.feedback(value, tuple(args))
        if not ok:
            raise AssertionError(f"{ex.call(tuple(args))} is not right: {hint}")
    return f"✓ {key}: right on {len(cases)} case(s)"


# ---------------------------------------------------------------------------------------
# The instructor's side: secret, hidden cases, answer key
# ---------------------------------------------------------------------------------------


class SecretError(ValueError):
    """No instructor secret, or one too short to keep the hidden cases hidden."""


def _secret_bytes(secret: str | bytes | None) -> bytes:
    if secret is None or not str(secret if isinstance(secret, str) else secret.decode(errors="replace")).strip():
        raise SecretError(
            f"the instructor secret is required: pass --secret-file PATH or set ${SECRET_ENV} "
            '(make one with: python -c "import secrets; print(secrets.token_hex(32))")'
        )
    raw = secret.strip().encode() if isinstance(secret, str) else secret.strip()
    if len(raw) < 16:
        raise SecretError(f"the instructor secret is {len(raw)} characters long; use at least 16 (32 hex digits)")
    return raw


def load_secret(path: str | Path | None = None) -> bytes:
    """The instructor secret from ``path``, else from ``$MINILM_GRADING_SECRET``; raises :class:`SecretError`."""
    if path is not None:
        try:
            return _secret_bytes(Path(path).read_text())
        except OSError as e:
            raise SecretError(f"{path}: cannot read the instructor secret ({e.strerror or e})") from None
    return _secret_bytes(os.environ.get(SECRET_ENV))


def new_secret() -> str:
    """A fresh random instructor secret (64 hex digits)."""
    return _secrets.token_hex(32)


def hidden_cases(student_id: str, secret: str | bytes, n: int = CASES_PER_EXERCISE) -> dict[str, list[tuple]]:
    """The arguments each graded function of ``student_id`` is called with: ``n`` cases per exercise.

    Drawn from HMAC-SHA256(secret, assignment + student id): reproducible for the instructor,
    different for every student, and unknowable without the secret.
    """
    if not isinstance(student_id, str) or not student_id.strip():
        raise ValueError("student_id must be a non-empty string")
    key = _secret_bytes(secret)
    cases: dict[str, list[tuple]] = {}
    for ex in GRADED:
        msg = f"{ASSIGNMENT}\0{student_id.strip()}\0{ex.key}".encode()
        rng = random.Random(int.from_bytes(hmac.new(key, msg, hashlib.sha256).digest(), "big"))
        drawn: list[tuple] = []
        while len(drawn) < n:  # distinct cases, none equal to a public example
            args = ex.draw(rng)
            if args not in drawn and args not in ex.examples:
                drawn.append(args)
        cases[ex.key] = drawn
    return cases


def answer_key(student_id: str, secret: str | bytes) -> dict[str, list[dict[str, Any]]]:
    """The instructor's key for one student: each hidden call and its expected value. Needs the secret."""
    return {
        k: [{"args": list(args), "expected": BY_KEY[k].reference(*args)} for args in calls]
        for k, calls in hidden_cases(student_id, secret).items()
    }


# ---------------------------------------------------------------------------------------
# Static check: is each function the student's own arithmetic?
# ---------------------------------------------------------------------------------------
# The GPU table is data. Nothing else: even minilm.config can count (its estimate check does).
ALLOWED_MINILM = ("minilm.hardware",)
ESCAPES = frozenset(
    "__import__ importlib exec eval compile globals locals vars getattr __builtins__ builtins sys inspect gc "
    "subprocess os runpy pickle ctypes get_ipython".split()
)
# Anywhere in the notebook, these can define or replace a function where no def shows it.
DEFINERS = frozenset("exec eval compile globals locals vars setattr __import__ importlib __builtins__".split())


def _code_cells(nb) -> list[str]:
    from IPython.core.inputtransformer2 import TransformerManager  # %magics and !shell become Python

    tm = TransformerManager()
    setup = setup_cell_source()  # the lessons' Colab cell (importlib, sys): skipped only while unchanged
    out = []
    for cell in nb.cells:
        if cell.cell_type == "code" and cell.source != setup:
            try:
                out.append(tm.transform_cell(cell.source))
            except Exception:  # a cell IPython cannot read fails when it runs, too
                out.append("")
    return out


def _allowed(module: str) -> bool:
    return any(module == m or module.startswith(m + ".") for m in ALLOWED_MINILM)


def _is_minilm(module: str | None) -> bool:
    return bool(module) and (module == "minilm" or module.startswith("minilm."))


def static_check(nb, keys: Sequence[str] = tuple(BY_KEY)) -> dict[str, str]:
    """For each exercise whose function is not the student's own arithmetic: the reason why.

    Flags a function (or a helper it uses, followed through the notebook's top-level
    definitions) that names something imported from minilm other than the GPU table
    (:mod:`minilm.hardware`), that is itself imported from minilm, or that uses an escape hatch
    (:data:`ESCAPES`) through which library code could be reached unseen.
    """
    defs: dict[str, list[ast.AST]] = {}
    forbidden: dict[str, str] = {}  # local name -> where it comes from
    star = False
    definers: set[str] = set()
    for src in _code_cells(nb):
        try:
            tree = ast.parse(src)
        except SyntaxError:
            continue
        definers |= {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id in DEFINERS}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if _is_minilm(a.name) and not (a.asname and _allowed(a.name)):
                        forbidden[a.asname or a.name.split(".")[0]] = a.name
            elif isinstance(node, ast.ImportFrom) and _is_minilm(node.module):
                for a in node.names:
                    full = f"{node.module}.{a.name}"
                    if a.name == "*":
                        star = star or not _allowed(node.module)
                    elif not (_allowed(node.module) or _allowed(full)):
                        forbidden[a.asname or a.name] = full
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                defs.setdefault(node.name, []).append(node)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    for n in ast.walk(t):
                        if isinstance(n, ast.Name) and node.value is not None:
                            defs.setdefault(n.id, []).append(node.value)

    def attribute_chain(node: ast.Attribute) -> str:
        parts = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        return ".".join([node.id, *reversed(parts)]) if isinstance(node, ast.Name) else ""

    def reasons(name: str, seen: set[str]) -> list[str]:
        """Everything ``name``'s definitions (and the helpers they use) reach that is not arithmetic."""
        if name in forbidden:
            return [f"comes from {forbidden[name]}"]
        seen.add(name)
        found: list[str] = []
        for definition in defs.get(name, []):
            for node in ast.walk(definition):
                why = ""
                if isinstance(node, ast.Attribute):
                    chain = attribute_chain(node)
                    if chain.startswith("minilm.") and not _allowed(chain):
                        why = f"uses {chain}"
                elif isinstance(node, ast.Name):
                    if node.id in forbidden:
                        why = f"uses {node.id} (from {forbidden[node.id]})"
                    elif node.id in ESCAPES:
                        why = f"uses {node.id}, through which library code could be reached unseen"
                    elif node.id in defs and node.id not in seen:
                        found += [f"{w} (via {node.id})" for w in reasons(node.id, seen)]
                elif isinstance(node, (ast.Import, ast.ImportFrom)):
                    module = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                    if _is_minilm(module) and not _allowed(module):
                        why = f"imports {module}"
                if why and why not in found:
                    found.append(why)
        return found

    flagged = {}
    for key in keys:
        if star:
            why = "may come from a star import from minilm, which hides what it calls"
        elif definers:
            why = f"may be (re)defined by {', '.join(sorted(definers))}, which the check cannot follow"
        elif key not in defs and key not in forbidden:
            flagged[key] = f"{key}: no def in the notebook"
            continue
        else:
            why = ", ".join(reasons(key, set()))
        if why:
            flagged[key] = f"not the student's work: {key} {why}"
    return flagged


# ---------------------------------------------------------------------------------------
# Running one submission
# ---------------------------------------------------------------------------------------
_HARNESS = """\
def _minilm_grade(_cases, _limit):
    import json, signal

    def _alarm(*_):
        raise TimeoutError(f"took longer than {_limit} s")

    out = {}
    for _name, _calls in _cases.items():
        _fn, _res = globals().get(_name), []
        for _args in _calls:
            if not callable(_fn):
                _res.append({"error": f"NameError: {_name} is not defined"})
                continue
            _old = signal.signal(signal.SIGALRM, _alarm)
            signal.alarm(_limit)
            try:
                _v = _fn(*_args)
                _v = _v.item() if hasattr(_v, "item") else _v
                _res.append(_v if isinstance(_v, (int, float)) and not isinstance(_v, bool) else repr(_v)[:80])
            except BaseException as _e:  # the student's error is a result, not the grader's
                _msg = str(_e)
                _res.append({"error": (type(_e).__name__ + (f": {_msg}" if _msg else ""))[:200]})
                break  # one failure fails the exercise: a slow function costs one call's limit, not three
            finally:
                signal.alarm(0)
                signal.signal(signal.SIGALRM, _old)
        out[_name] = _res
    return json.dumps(out)
print(MARK + _minilm_grade(CASES, LIMIT))
"""


def harness_source(cases: dict[str, list[tuple]], mark: str, call_limit: int) -> str:
    """The cell appended to a submission: it calls the functions on the hidden arguments and prints
    what they return. Only arguments enter the student's kernel; expected values never do."""
    setup = (
        f"import json as _json\n\nMARK, LIMIT = {mark!r}, {call_limit}\nCASES = _json.loads({json.dumps(cases)!r})\n"
    )
    return setup + _HARNESS


@dataclass
class Row:
    """One student's line of the gradebook."""

    student: str
    points: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.points.values())


def _is_test_cell(cell) -> bool:
    meta = cell.get("metadata", {}).get("nbgrader", {})
    return bool(meta.get("grade")) and not meta.get("solution")


def grade_notebook(path: Path, student: str, secret: bytes, timeout: float = 120, call_limit: int = 10) -> Row:
    """Execute one submitted notebook and grade its functions; never raises for the student's faults."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError

    start = time.perf_counter()
    row = Row(student, {ex.key: 0 for ex in GRADED})
    try:
        nb = nbformat.read(path, as_version=4)
    except Exception as e:  # not JSON, not a notebook: the row says so, the class goes on
        row.notes.append(f"cannot read {path.name} as a notebook ({type(e).__name__}): cut off, or not a notebook")
        row.seconds = time.perf_counter() - start
        return row
    flagged = static_check(nb)
    cases = hidden_cases(student, secret)
    mark = f"@@minilm-grade-{_secrets.token_hex(8)}@@"
    run = nbformat.v4.new_notebook(metadata=nb.metadata)
    # Instructor test cells are skipped: they check public examples; marks come from the hidden cases.
    run.cells = [c for c in nb.cells if c.cell_type == "code" and not _is_test_cell(c)]
    run.cells.append(nbformat.v4.new_code_cell(harness_source(cases, mark, call_limit)))
    pythonpath = str(Path(__file__).resolve().parents[1])  # this minilm, also when run from a checkout
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [pythonpath, os.environ.get("PYTHONPATH")]))}
    client = NotebookClient(
        run,
        timeout=timeout,
        kernel_name="python3",
        interrupt_on_timeout=True,
        resources={"metadata": {"path": str(path.parent)}},
    )
    deadline = start + timeout
    results: dict[str, list] | None = None
    try:
        with client.setup_kernel(env=env):
            for i, cell in enumerate(run.cells):
                last = i == len(run.cells) - 1
                # the harness gets its own budget: a slow notebook still has its functions graded
                client.timeout = int(call_limit * CASES_PER_EXERCISE * len(GRADED) + 30) if last else None
                if not last:
                    left = deadline - time.perf_counter()
                    if left <= 0:
                        row.notes.append(f"time limit of {timeout:g} s reached before cell {i + 1}")
                        continue
                    client.timeout = max(1, int(left))
                try:
                    client.execute_cell(cell, i)
                except CellTimeoutError:
                    row.notes.append(f"cell {i + 1} ran past the {timeout:g} s time limit")
                except CellExecutionError as e:
                    if last:
                        pass
                    elif e.ename == "KeyboardInterrupt":  # nbclient interrupted it at the time limit
                        row.notes.append(f"cell {i + 1} ran past the {timeout:g} s time limit and was interrupted")
                    else:
                        row.notes.append(f"cell {i + 1} raised {e.ename}: {str(e.evalue)[:100]}")
            for out in run.cells[-1].get("outputs", []):
                for line in out.get("text", "").splitlines():
                    if line.startswith(mark):
                        results = json.loads(line[len(mark) :])
    except Exception as e:  # the kernel died or would not start
        row.notes.append(f"could not run the notebook: {type(e).__name__}: {str(e)[:120]}")
    if results is None:
        row.notes.append("the functions could not be called (the notebook did not run to the end)")
        results = {}
    for ex in GRADED:
        if ex.key in flagged:
            row.notes.append(flagged[ex.key])
            continue
        values = results.get(ex.key)
        if values is None:
            continue
        for args, value in zip(cases[ex.key], values, strict=False):  # the harness stops at a failure
            ok, hint = ex.feedback(value, tuple(args))
            if not ok:
                row.notes.append(f"{ex.key}: {hint}")
                break
        else:
            row.points[ex.key] = ex.points
    row.seconds = time.perf_counter() - start
    return row


# ---------------------------------------------------------------------------------------
# A class
# ---------------------------------------------------------------------------------------


def find_submissions(root: Path, notebook: str = f"{ASSIGNMENT}.ipynb") -> list[tuple[str, Path | None]]:
    """(student id, notebook) pairs: ``root/<student>/.../<notebook>`` (nbgrader's submitted/ layout too)
    or ``root/<student>.ipynb``. A student folder without the notebook gives (student, None)."""
    found: list[tuple[str, Path | None]] = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_file() and entry.suffix == ".ipynb":
            found.append((entry.stem, entry))
        elif entry.is_dir():
            hits = sorted(p for p in entry.rglob(notebook) if ".ipynb_checkpoints" not in p.parts)
            if not hits:
                hits = sorted(p for p in entry.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)
                hits = hits if len(hits) == 1 else []
            found.append((entry.name, hits[0] if hits else None))
    return found


def _grade_one(args: tuple) -> Row:
    student, path, secret, timeout, call_limit = args
    if path is None:
        return Row(student, {ex.key: 0 for ex in GRADED}, [f"no {ASSIGNMENT}.ipynb in the student's folder"])
    return grade_notebook(path, student, secret, timeout, call_limit)


def grade_class(
    submissions: Path,
    secret: str | bytes,
    timeout: float = 120,
    jobs: int = 1,
    notebook: str = f"{ASSIGNMENT}.ipynb",
    call_limit: int = 10,
) -> list[Row]:
    """Grade every submission under ``submissions``; ``jobs`` notebooks run at once.

    ``timeout``: seconds per notebook (its cells); ``call_limit``: seconds per call of a graded function.
    """
    secret = _secret_bytes(secret)
    work = [(s, p, secret, timeout, call_limit) for s, p in find_submissions(submissions, notebook)]
    if jobs <= 1:
        return [_grade_one(w) for w in work]
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(_grade_one, work))


def write_csv(rows: Sequence[Row], path: Path) -> None:
    """The gradebook: student, one column per exercise (points), total, max, seconds, notes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["student", *BY_KEY, "total", "max", "seconds", "notes"])
        for r in rows:
            w.writerow(
                [r.student, *(r.points[k] for k in BY_KEY), r.total, MAX_POINTS, f"{r.seconds:.1f}", "; ".join(r.notes)]
            )


def plot_summary(rows: Sequence[Row], path: Path) -> None:
    """Two panels: how many students earned each exercise's points, and the spread of totals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    share = [sum(r.points[k] > 0 for r in rows) / max(len(rows), 1) for k in BY_KEY]
    left.barh(list(BY_KEY), share, color="tab:blue")
    left.set_xlim(0, 1)
    left.invert_yaxis()
    left.set_xlabel("share of students with full marks")
    right.hist([r.total for r in rows], bins=range(MAX_POINTS + 2), align="left", rwidth=0.8, color="tab:green")
    right.set_xlabel(f"total points (of {MAX_POINTS})")
    right.set_ylabel("students")
    right.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    fig.suptitle(f"{ASSIGNMENT}: {len(rows)} submissions")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_answer_key(students: Iterable[str], secret: bytes, path: Path) -> None:
    """The instructor's file: every student's hidden calls and expected values, as JSON."""
    path.write_text(json.dumps({s: answer_key(s, secret) for s in students}, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    """``minilm grade SUBMISSIONS_DIR --out grades.csv``: exit 0 when graded, 2 on a bad command line."""
    parser = argparse.ArgumentParser(prog="minilm grade", description="Grade a class's graded-exercise notebooks.")
    parser.add_argument("submissions", type=Path, help="folder of <student>/... notebooks (nbgrader's submitted/)")
    parser.add_argument("--out", type=Path, default=Path("grades.csv"), help="gradebook CSV (default grades.csv)")
    parser.add_argument("--plot", type=Path, help="summary plot (default: the CSV's name with .png)")
    parser.add_argument("--secret-file", type=Path, help=f"instructor secret (default ${SECRET_ENV})")
    parser.add_argument("--timeout", type=float, default=120, help="seconds per notebook (default 120)")
    parser.add_argument("--call-timeout", type=int, default=10, help="seconds per call of a function (default 10)")
    parser.add_argument("--jobs", type=int, default=1, help="notebooks graded at once (default 1)")
    parser.add_argument("--notebook", default=f"{ASSIGNMENT}.ipynb", help="file name in each student's folder")
    parser.add_argument("--answer-key", type=Path, help="also write the instructor's answer key (JSON) here")
    ns = parser.parse_args(argv)
    try:
        secret = load_secret(ns.secret_file)
    except SecretError as e:
        parser.error(str(e))
    if not ns.submissions.is_dir():
        parser.error(f"{ns.submissions}: not a folder of submissions")
    start = time.perf_counter()
    rows = grade_class(ns.submissions, secret, ns.timeout, ns.jobs, ns.notebook, ns.call_timeout)
    if not rows:
        parser.error(f"{ns.submissions}: no submissions found")
    write_csv(rows, ns.out)
    plot = ns.plot or ns.out.with_suffix(".png")
    plot_summary(rows, plot)
    if ns.answer_key:
        write_answer_key([r.student for r in rows], secret, ns.answer_key)
    took = time.perf_counter() - start
    print(f"{len(rows)} submission(s) graded in {took:.1f} s: {ns.out}, {plot}")
    for r in rows:
        print(f"  {r.student:<20} {r.total:>2}/{MAX_POINTS}  {'; '.join(r.notes)[:100]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
