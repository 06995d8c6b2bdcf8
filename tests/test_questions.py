"""The config editor lesson's questions: answers computed by the library, checkers that never leak them."""

import pytest

from minilm.config import load_config
from minilm.memory import GB, trainer_step_memory
from minilm.questions import Question, _largest, config_editor_questions
from minilm.widgets import ConfigEditor


@pytest.fixture(scope="module")
def questions():
    return {q.key: q for q in config_editor_questions()}


def peak_gib(cfg) -> float:
    return trainer_step_memory(cfg).peak_bytes / GB  # the editor's readout


def test_widest_model_is_the_last_width_under_the_budget(questions):
    small = load_config("small").replace(d_ff=None)
    d = questions["widest_that_fits"]._answer
    assert d % 64 == 0
    assert peak_gib(small.replace(d_model=d)) <= 8 < peak_gib(small.replace(d_model=d + 64))


def test_largest_batch_with_checkpointing_is_the_last_that_fits(questions):
    gpt2 = load_config("small").replace(
        d_ff=None, d_model=768, n_heads=12, n_layers=12, vocab_size=50257, gradient_checkpointing=True
    )
    b = questions["largest_batch_with_checkpointing"]._answer
    assert peak_gib(gpt2.replace(batch_size=b)) <= 16 < peak_gib(gpt2.replace(batch_size=b + 1))


def test_untied_head_costs_v_times_d_parameters_and_16_bytes_each(questions):
    v, d = 50257, 768
    assert questions["untied_head_parameters"]._answer == v * d
    assert questions["untied_head_memory"]._answer == pytest.approx(16 * v * d / GB)


def test_answers_are_what_the_editor_shows(questions, tmp_path):
    """A student driving the form gets the checked answers: the editor and the questions agree."""
    ed = ConfigEditor(load_config("small"), save_dir=tmp_path)
    ed.set(d_model=768, n_heads=12, n_layers=12, vocab_size=50257, d_ff=None)
    tied_params, tied_peak = ed.total_parameters, ed.memory.peak_gb
    ed.set(tie_embeddings=False)
    assert ed.total_parameters - tied_params == questions["untied_head_parameters"]._answer
    assert questions["untied_head_memory"].check(round(ed.memory.peak_gb - tied_peak, 2))
    ed.set(tie_embeddings=True, attention="manual")
    assert questions["manual_attention_memory"].check(round(ed.memory.peak_gb, 2) - round(tied_peak, 2))


def test_checker_accepts_within_tolerance_and_rejects_outside(questions):
    q = questions["manual_attention_memory"]
    a = q._answer
    assert q.check(a) and q.check(a + 0.05) and q.check(a - 0.049) and q.check(f"{a:.2f}")
    wrong = q.check(a + 0.06)
    assert not wrong and wrong.answered and "too high" in wrong.message
    assert not q.check(a - 1) and "too low" in q.check(a - 1).message
    exact = questions["untied_head_parameters"]
    assert exact.check(exact._answer) and not exact.check(exact._answer + 1)
    assert "without a bias" in exact.check(exact._answer + 50257).message  # the classic slip has its own hint


def test_not_answered_and_unreadable(questions):
    q = questions["widest_that_fits"]
    assert not q.check(None).answered and "Not answered" in q.check(None).message
    bad = q.check("wide")
    assert bad.answered and not bad and "Could not read" in bad.message


@pytest.mark.parametrize("key", ["widest_that_fits", "largest_batch_with_checkpointing", "untied_head_parameters"])
def test_hints_never_contain_the_answer(questions, key):
    q = questions[key]
    a = int(q._answer)
    for guess in (a // 2, a * 2, a + 64, a - 1, 1, 10**6):
        if guess == a or guess <= 0:
            continue
        message = q.check(guess).message
        assert not message.startswith("✅")
        assert f"{a}" not in message.replace(str(guess), "") and f"{a:,}" not in message


def test_widths_hint_reports_the_students_own_width():
    q = next(q for q in config_editor_questions() if q.key == "widest_that_fits")
    too_wide = q._answer + 128
    assert f"d_model = {too_wide}" in q.check(too_wide).message and "above" in q.check(too_wide).message


def test_largest_bisects_a_monotone_condition():
    assert _largest(1, 1000, lambda b: b <= 37) == 37
    assert _largest(64, 4096, lambda d: d <= 800, step=64) == 768
    assert _largest(1, 10, lambda b: True) == 10
    with pytest.raises(ValueError):
        _largest(1, 10, lambda b: False)
    q = Question("k", "t", "q", "x", _answer=2.5, tolerance=0.5)
    assert q.check(3) and q.check("2.0") and not q.check(3.1)


def test_sharding_questions_answer_the_fewest_gpus_that_fit():
    from minilm.questions import sharding_questions
    from minilm.sharding import estimate_rank_memory

    xl = load_config("xl")
    for q, (strategy, budget) in zip(sharding_questions(), (("zero1", 24), ("zero2", 16), ("zero3", 16)), strict=True):
        n = q._answer
        peaks = [estimate_rank_memory(xl, strategy, w).peak_bytes / GB for w in range(1, n + 1)]
        assert peaks[-1] <= budget < min(peaks[:-1]), (strategy, peaks)  # fits at n, at no fewer
        assert q.check(n) and not q.check(n - 1) and not q.check(n + 1)
        assert all(f"{n} GPUs" not in q.check(w).message for w in (n - 1, n + 1))  # hints never give the answer
        assert "whole number" in q.check(2.5).message
