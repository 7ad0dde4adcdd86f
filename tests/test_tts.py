"""Best-of-k selection and metrics equal plain-Python references on hand-made samples (ties, no-step scores of 0)."""

import math

import numpy as np
import pytest

from metastone_jax import tts

# Two questions' worth of hand-made samples: ties of score (0.9 twice, four trajectories without a step: 0).
SCORES = np.array([0.5, 0.9, 0.9, 0.1, 0.0, 0.0, 0.0, 0.0])
CORRECT = np.array([False, False, True, True, False, True, True, True])
ANSWERS = ["3", "4", "1/2", "0.5", "4.0", None, "\\frac{1}{2}", "2"]  # 1/2 = 0.5 = \frac{1}{2}; 4 = 4.0


def reference_best_of_k(scores, correct, k):
    picks = []
    for start in range(0, len(scores), k):
        best = start
        for i in range(start, start + k):
            if scores[i] > scores[best]:  # strict: the first of equal scores stays
                best = i
        picks.append(correct[best])
    return sum(picks) / len(picks)


def reference_oracle(correct, k):
    groups = [correct[s : s + k] for s in range(0, len(correct), k)]
    return sum(any(g) for g in groups) / len(groups)


def test_pass_at_1_is_the_mean_correctness():
    assert tts.pass_at_1(CORRECT) == 5 / 8


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_sprm_best_of_k_picks_first_highest_score_per_group(k):
    assert tts.sprm_best_of_k(SCORES, CORRECT, k) == pytest.approx(reference_best_of_k(SCORES, CORRECT, k))


def test_sprm_best_of_k_hand_computed_values():
    # k=2 groups pick indices 1 (F), 2 (T), 4 (F: no-step tie, first), 6 (T).
    assert tts.sprm_best_of_k(SCORES, CORRECT, 2) == 0.5
    assert tts.sprm_best_of_k(SCORES, CORRECT, 8) == 0.0  # k == n: the first 0.9 (index 1) is wrong
    assert tts.sprm_best_of_k(SCORES, CORRECT, 1) == tts.pass_at_1(CORRECT)


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_oracle_at_k_counts_groups_with_a_correct_sample(k):
    assert tts.oracle_at_k(CORRECT, k) == pytest.approx(reference_oracle(CORRECT, k))


def test_answer_classes_group_mathematically_equivalent_answers():
    np.testing.assert_array_equal(tts.answer_classes(ANSWERS), [0, 1, 2, 2, 1, -1, 2, 3])
    # Unparseable answers still match themselves.
    np.testing.assert_array_equal(tts.answer_classes(["\\frac{", "\\sqrt{", "\\frac{"]), [0, 1, 0])


def test_majority_vote_hand_computed_with_ties():
    # k=8: class 1/2 (indices 2, 3, 6) has 3 votes > class 4 (1, 4) -> index 2, correct.
    assert tts.majority_vote_at_k(ANSWERS, CORRECT, SCORES, 8) == 1.0
    # k=4: group 1 {3, 4, 1/2, 1/2} -> 1/2 (index 2, correct); group 2 {4.0, None, 1/2, 2}: a 3-way tie of one
    # vote, every summed score 0 -> first seen, 4.0 (index 4, wrong).
    assert tts.majority_vote_at_k(ANSWERS, CORRECT, SCORES, 4) == 0.5
    # k=2: {3, 4} tie, higher score 0.9 -> 4 (wrong); {1/2, 0.5} -> correct; {4.0, None} -> 4.0 (wrong);
    # {1/2, 2} tie at score 0 -> first, 1/2 (correct).
    assert tts.majority_vote_at_k(ANSWERS, CORRECT, SCORES, 2) == 0.5
    assert tts.majority_vote_at_k(ANSWERS, CORRECT, SCORES, 1) == pytest.approx(5 / 8 - 1 / 8)  # None never wins


def test_majority_vote_tie_goes_to_higher_summed_score_then_first_seen():
    answers, correct = ["7", "8", "8", "7"], [True, False, False, True]
    assert tts.majority_vote_at_k(answers, correct, [0.2, 0.3, 0.3, 0.5], 4) == 1.0  # 0.7 > 0.6
    assert tts.majority_vote_at_k(answers, correct, [0.3, 0.4, 0.4, 0.3], 4) == 0.0  # 0.8 > 0.6
    assert tts.majority_vote_at_k(answers, correct, [0.0, 0.0, 0.0, 0.0], 4) == 1.0  # full tie: "7" seen first
    assert tts.majority_vote_at_k([None, None], [False, False], [0.9, 0.1], 2) == 0.0  # nobody answered


def reference_auroc(scores, labels):
    positives = [s for s, y in zip(scores, labels) if y]
    negatives = [s for s, y in zip(scores, labels) if not y]
    if not positives or not negatives:
        return math.nan
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


def test_auroc_equals_pairwise_count_with_half_ties():
    assert tts.auroc(SCORES, CORRECT) == pytest.approx(reference_auroc(SCORES, CORRECT))
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 60) / 4  # many ties
    labels = rng.random(60) < 0.4
    assert tts.auroc(scores, labels) == pytest.approx(reference_auroc(scores, labels))
    assert tts.auroc([0.1, 0.2, 0.8, 0.9], [False, False, True, True]) == 1.0
    assert tts.auroc([0.1, 0.2, 0.8, 0.9], [True, True, False, False]) == 0.0
    assert tts.auroc([0.0, 0.0, 0.0], [True, False, True]) == 0.5


def test_auroc_is_nan_when_a_class_is_absent():
    assert math.isnan(tts.auroc([0.1, 0.9], [True, True]))
    assert math.isnan(tts.auroc([0.1, 0.9], [False, False]))


def test_group_size_errors_name_n_and_k():
    with pytest.raises(ValueError, match="k=16 .* n=8"):
        tts.sprm_best_of_k(SCORES, CORRECT, 16)
    with pytest.raises(ValueError, match="n=8 .* k=3"):
        tts.oracle_at_k(CORRECT, 3)
    with pytest.raises(ValueError, match="k=0"):
        tts.majority_vote_at_k(ANSWERS, CORRECT, SCORES, 0)


def test_evaluate_question_reports_every_metric_for_the_supported_modes():
    metrics = tts.evaluate_question(SCORES, CORRECT, ANSWERS)
    assert set(metrics) == {"pass@1", "maj@2", "sprm@2", "oracle@2", "maj@8", "sprm@8", "oracle@8", "auroc"}
    assert metrics["maj@8"] == 1.0 and metrics["sprm@8"] == 0.0 and metrics["oracle@8"] == 1.0
    assert metrics["sprm@2"] == pytest.approx(reference_best_of_k(SCORES, CORRECT, 2))
    assert metrics["auroc"] == pytest.approx(reference_auroc(SCORES, CORRECT))
    assert tts.default_ks(32) == (2, 8, 32) and tts.default_ks(6) == (2,)
    with pytest.raises(ValueError, match="one entry per sample"):
        tts.evaluate_question(SCORES, CORRECT[:4], ANSWERS)


def test_evaluate_benchmark_averages_questions_and_pools_auroc():
    rng = np.random.default_rng(1)
    scores = [rng.random(8) for _ in range(3)]
    correct = [rng.random(8) < 0.5 for _ in range(3)]
    answers = [[str(int(c)) for c in row] for row in correct]  # answer "1" is right, "0" wrong
    metrics = tts.evaluate_benchmark(scores, correct, answers, ks=(2, 8))
    for k in (2, 8):
        expected = np.mean([reference_best_of_k(s, c, k) for s, c in zip(scores, correct)])
        assert metrics[f"sprm@{k}"] == pytest.approx(expected)
        expected = np.mean([reference_oracle(c, k) for c in correct])
        assert metrics[f"oracle@{k}"] == pytest.approx(expected)
    assert metrics["pass@1"] == pytest.approx(np.mean(np.concatenate(correct)))
    assert metrics["auroc"] == pytest.approx(reference_auroc(np.concatenate(scores), np.concatenate(correct)))
    assert metrics["questions"] == 3 and metrics["samples"] == 24
