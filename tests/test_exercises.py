"""Exercise checkers: right answers pass, near misses get a hint without the answer, variants per student."""

import pytest

from minilm import exercises as E
from minilm.config import Config
from minilm.counting import count_parameters, format_count

STUDENTS = ["ada", "alan", "grace", "edsger", "barbara", "student-017", "42"]


def forms_of(n: int) -> list[str]:
    """Ways the expected value could be written inside a hint."""
    return [str(n), f"{n:,}", f"{n:_}", format_count(n)]


def key_of(sid: str) -> dict[str, int]:
    """The expected practice answers, read from the exercises themselves (there is no public answer key)."""
    return {ex.key: ex._answer for ex in E.for_student(sid)}


def assert_no_answer_in(text: str, n: int) -> None:
    for form in forms_of(n):
        assert form not in text, f"hint leaks the answer as {form!r}: {text}"


@pytest.mark.parametrize("sid", STUDENTS)
def test_right_answers_are_accepted_in_any_spelling(sid):
    key = key_of(sid)
    for ex in E.for_student(sid):
        n = key[ex.key]
        for answer in (n, float(n), f"{n:,}", f"{n:_}", f" {n} "):
            fb = ex.check(answer)
            assert fb.correct and fb.answered and bool(fb), (ex.key, answer, fb)


@pytest.mark.parametrize("sid", STUDENTS)
def test_near_misses_are_rejected_with_a_hint_that_hides_the_answer(sid):
    key = key_of(sid)
    for ex in E.for_student(sid):
        n = key[ex.key]
        wrong = [n + 1, n - 1, n + ex.cfg.d_model, 2 * n, n // 2, round(n * 1.05), n + 0.5]
        wrong += [m.value for m in ex._mistakes]
        for answer in wrong:
            fb = ex.check(answer)
            assert not fb.correct and fb.answered, (ex.key, answer)
            assert fb.message.startswith("❌")
            assert len(fb.message) > 30, "a rejection should come with a hint"
            assert_no_answer_in(fb.message, n)


def test_known_mistakes_get_their_specific_hint():
    cfg = Config(vocab_size=16000, d_model=512, n_heads=8, n_layers=8)  # the design's "small": tied, biases
    pc = count_parameters(cfg)
    total = E.count_exercise("total", cfg)
    assert "tied" in total.check(count_parameters(cfg.replace(tie_embeddings=False)).total).message
    assert "position" in total.check(pc.total - pc.position_embedding).message
    assert "biases" in total.check(count_parameters(cfg.replace(bias=False)).total).message
    assert "n_layers" in total.check(pc.total - pc.per_layer * (cfg.n_layers - 1)).message
    assert "LayerNorm" in E.count_exercise("per_layer", cfg).check(pc.per_layer - pc.norms_per_layer).message
    # The design's own label, 124M, is not the count: rejected, and "too high".
    fb = total.check("124M")
    assert not fb.correct and "too high" in fb.message


@pytest.mark.parametrize("sid", STUDENTS)
def test_text_answers_are_not_rounded_to_a_whole_count(sid):
    """'n.4' as text is wrong, as the number n + 0.4 is: a count is a whole number, not rounded to one."""
    key = key_of(sid)
    for ex in E.for_student(sid):
        n = key[ex.key]
        for answer in (f"{n - 1}.6", f"{n}.4", f"{n:,}.5", f"{n}.000000001", n + 0.4):
            fb = ex.check(answer)
            assert not fb.correct and fb.answered, (ex.key, answer)
            assert "whole number" in fb.message
            assert_no_answer_in(fb.message, n)
        assert ex.check(f"{n}.0").correct  # a whole number written with a decimal point is fine


def test_suffixed_text_answers_keep_their_value():
    cfg = Config(vocab_size=16000, d_model=512, n_heads=8, n_layers=8)
    total = E.count_exercise("total", cfg)
    assert E.parse_answer("33.9M") == 33_900_000 and E.parse_answer("1.3B") == 1_300_000_000
    fb = total.check("33.9M")  # 33,900,000: a whole number, near but not the count
    assert not fb.correct and "within 1%" in fb.message
    assert "whole number" in total.check("33.9363844M").message  # 33,936,384.4 is not a count either


@pytest.mark.parametrize("empty", [None, "", "   ", ...])
def test_empty_answers_are_not_answered(empty):
    ex = E.for_student("ada")[0]
    fb = ex.check(empty)
    assert not fb.correct and not fb.answered and fb.status == "not answered"
    assert "Not answered" in fb.message


@pytest.mark.parametrize("junk", ["lots", "12 apples", True, [1, 2], float("nan")])
def test_unreadable_answers_are_rejected_not_raised(junk):
    fb = E.for_student("ada")[0].check(junk)
    assert not fb.correct and fb.answered and "number" in fb.message


def test_variants_are_reproducible_and_differ_between_students():
    configs = [E.student_config(s) for s in STUDENTS]
    assert configs == [E.student_config(s) for s in STUDENTS]  # same id, same model
    assert key_of("ada") == key_of("ada")
    assert len({tuple(sorted(c.to_dict().items())) for c in configs}) == len(STUDENTS)
    assert len({key_of(s)["total"] for s in STUDENTS}) == len(STUDENTS)
    for c in configs:  # every variant is a valid model whose count the library computes
        assert count_parameters(c).total > 0 and c.d_model % c.n_heads == 0


def test_student_id_is_required():
    with pytest.raises(ValueError):
        E.student_config("  ")


def test_grade_scores_a_list_or_a_mapping():
    key = key_of("grace")
    keys = list(key)
    g = E.grade("grace", [key[keys[0]], key[keys[1]] + 1])  # right, wrong, then two missing
    assert (g.score, g.total) == (1, len(keys))
    assert [s for _, s, _ in g.rows] == ["correct", "wrong"] + ["not answered"] * (len(keys) - 2)
    assert "1/4" in g.table()
    assert E.grade("grace", key).score == len(keys)
    with pytest.raises(KeyError):
        E.grade("grace", {"nonsense": 1})
    with pytest.raises(ValueError):
        E.grade("grace", [1] * (len(keys) + 1))


def test_grade_class_table():
    table = E.grade_class({"ada": key_of("ada"), "alan": [None, 3]})
    lines = table.splitlines()
    assert lines[2].startswith("ada") and lines[2].endswith("4/4")
    assert lines[3].startswith("alan") and "✗" in lines[3] and lines[3].endswith("0/4")


def test_unknown_kind():
    with pytest.raises(KeyError):
        E.count_exercise("flops", Config())


@pytest.mark.parametrize("sid", STUDENTS)
def test_memory_exercises_accept_the_estimate_and_hide_it(sid):
    from minilm.memory import estimate_training_memory

    est = estimate_training_memory(E.student_config(sid))
    expected = {"model_state_bytes": est.model_state, "logits_bytes": est.logits}
    for ex in E.for_student(sid, E.MEMORY_KINDS):
        n = expected[ex.key]
        assert "bytes" in ex.question.lower() and "batch_size" in ex.question
        assert ex.check(n).correct and not ex.check(None).answered
        for answer in [n + 4, n // 2, n * 3, *(m.value for m in ex._mistakes)]:
            fb = ex.check(answer)
            assert not fb.correct and fb.answered
            assert_no_answer_in(fb.message, n)


def test_memory_mistakes_get_their_hint():
    cfg = Config(vocab_size=16000, d_model=512, n_heads=8, n_layers=8, batch_size=8, bf16=True)
    n = count_parameters(cfg).total
    state = E.count_exercise("model_state_bytes", cfg)
    assert "bytes" in state.check(n).message
    assert "Autocast" in state.check(8 * n).message
    assert "AdamW" in state.check(4 * n).message
    logits = E.count_exercise("logits_bytes", cfg)
    assert "fp32" in logits.check(2 * 8 * 1024 * 16000).message
    assert logits.check(4 * 8 * 1024 * 16000).correct


def test_precision_and_batch_vary_between_students():
    configs = [E.student_config(f"s{i}") for i in range(40)]
    assert {c.bf16 for c in configs} == {True, False}
    assert len({c.batch_size for c in configs}) > 1


def test_there_is_no_public_answer_key():
    """The practice module offers no answer key: marks come from minilm.grading, behind a secret."""
    assert not hasattr(E, "answer_key")
