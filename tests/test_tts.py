"""Best-of-k selection and metrics equal plain-Python references on hand-made samples (ties, no-step scores of 0,
questions with one class, trajectories without steps or without an answer)."""

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


def reference_weighted_vote(answers, correct, scores, k):
    """SPRM-weighted vote with plain strings as answer classes: largest score sum, then most votes, then first seen."""
    picks = []
    for start in range(0, len(answers), k):
        totals, votes, first_index = {}, {}, {}
        for i in range(start, start + k):
            if answers[i] is None:
                continue
            first_index.setdefault(answers[i], i)
            totals[answers[i]] = totals.get(answers[i], 0.0) + scores[i]
            votes[answers[i]] = votes.get(answers[i], 0) + 1
        best = None
        for answer in sorted(first_index, key=first_index.get):
            if best is None or (totals[answer], votes[answer]) > (totals[best], votes[best]):
                best = answer
        picks.append(False if best is None else correct[first_index[best]])
    return sum(picks) / len(picks)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("k", [2, 4, 8])
def test_weighted_majority_vote_equals_a_plain_python_count(seed, k):
    rng = np.random.default_rng(seed)
    answers = [None if a == 3 else str(a) for a in rng.integers(0, 4, 16)]  # "0", "1", "2" or no answer
    correct = [a == "1" for a in answers]
    scores = rng.integers(0, 3, 16) / 2  # 0, 0.5, 1: sums are exact, so ties of sums really occur
    expected = reference_weighted_vote(answers, correct, scores.tolist(), k)
    assert tts.weighted_majority_vote_at_k(answers, correct, scores, k) == pytest.approx(expected)


def test_weighted_majority_vote_hand_computed_with_ties():
    answers, correct = ["7", "8", "8", "9"], [True, False, False, False]
    # "7" sums 0.9 > "8" 0.6: the weighted vote follows the SPRM where the plain vote follows the count.
    assert tts.weighted_majority_vote_at_k(answers, correct, [0.9, 0.3, 0.3, 0.1], 4) == 1.0
    assert tts.majority_vote_at_k(answers, correct, [0.9, 0.3, 0.3, 0.1], 4) == 0.0
    # Equal sums (0.5 each for "7" and "8"): more votes wins ("8").
    assert tts.weighted_majority_vote_at_k(answers, correct, [0.5, 0.25, 0.25, 0.0], 4) == 0.0
    # Every trajectory without a step (score 0): one vote each for "7" and "9", two for "8" -> "8".
    assert tts.weighted_majority_vote_at_k(answers, correct, [0.0] * 4, 4) == 0.0
    # Full tie (equal sums and votes): the class seen first.
    assert tts.weighted_majority_vote_at_k(["7", "9"], [True, False], [0.0, 0.0], 2) == 1.0
    assert tts.weighted_majority_vote_at_k(["9", "7"], [False, True], [0.0, 0.0], 2) == 0.0
    # A high-scored sample without an answer does not vote; nobody answering counts as wrong.
    assert tts.weighted_majority_vote_at_k([None, "7"], [False, True], [0.9, 0.1], 2) == 1.0
    assert tts.weighted_majority_vote_at_k([None, None], [False, False], [0.9, 0.1], 2) == 0.0


def test_weighted_majority_vote_merges_equivalent_answers():
    # k=8: sums 3 -> 0.5, {4, 4.0} -> 0.9, {1/2, 0.5, \frac{1}{2}} -> 1.0, 2 -> 0: the 1/2 class (index 2, right).
    assert tts.weighted_majority_vote_at_k(ANSWERS, CORRECT, SCORES, 8) == 1.0
    # k=2: {3, 4}: 4 (0.9, wrong); {1/2, 0.5}: right; {4.0, None}: 4.0 (wrong); {1/2, 2} tie at 0: first, right.
    assert tts.weighted_majority_vote_at_k(ANSWERS, CORRECT, SCORES, 2) == 0.5


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


def reference_within_question_auroc(scores, correct):
    values = [reference_auroc(s, c) for s, c in zip(scores, correct)]
    defined = [v for v in values if not math.isnan(v)]
    return (sum(defined) / len(defined) if defined else math.nan), len(defined)


def test_within_question_auroc_averages_only_questions_with_both_classes():
    scores = [[0.5, 0.9, 0.9, 0.1], [0.0, 0.0, 0.0, 0.0], [0.3, 0.7, 0.2, 0.2], [0.8, 0.1, 0.4, 0.6]]
    correct = [[False, False, True, True], [False, True, True, True], [True] * 4, [False] * 4]  # two one-class ones
    value, count = tts.within_question_auroc(scores, correct)
    expected_value, expected_count = reference_within_question_auroc(scores, correct)
    assert count == expected_count == 2
    assert value == pytest.approx(expected_value)
    assert value == pytest.approx((1.5 / 4 + 0.5) / 2)  # question 1: 0.9 ties 0.9 (1/2), 0.1 beats nothing
    value, count = tts.within_question_auroc([[0.1, 0.2]], [[True, True]])
    assert math.isnan(value) and count == 0


def test_within_question_auroc_ignores_separation_between_questions():
    # Within each question the wrong sample scores highest, but the easy question scores high overall: pooled
    # ranking looks fine, within-question ranking is inverted.
    scores = [[0.9, 0.8, 0.85, 0.95], [0.1, 0.2, 0.15, 0.05]]
    correct = [[True, True, True, False], [False, False, False, True]]
    metrics = tts.evaluate_benchmark(scores, correct, [["1"] * 4, ["1"] * 4], ks=(2,))
    assert metrics["auroc_within"] == 0.0 and metrics["auroc_within_questions"] == 2
    expected_pooled = reference_auroc(sum(scores, []), sum(correct, []))
    assert metrics["auroc_pooled"] == pytest.approx(expected_pooled) == 9 / 16


def reference_calibration(scores, labels, bins):
    edges = [b / bins for b in range(bins + 1)]
    rows = []
    for b in range(bins):
        inside = [
            (s, y) for s, y in zip(scores, labels) if edges[b] <= s < edges[b + 1] or (b == bins - 1 and s == 1.0)
        ]
        if inside:
            rows.append((len(inside), sum(s for s, _ in inside) / len(inside), sum(y for _, y in inside) / len(inside)))
        else:
            rows.append((0, math.nan, math.nan))
    total = sum(r[0] for r in rows)
    ece = sum(n * abs(m - f) for n, m, f in rows if n) / total if total else math.nan
    return rows, ece


def test_calibration_bins_equal_a_loop_over_bins():
    scores = [0.0, 0.05, 0.12, 0.18, 0.55, 0.55, 0.61, 0.97, 1.0, 0.33]
    labels = [False, False, True, False, True, False, True, True, True, False]
    calibration = tts.calibration_bins(scores, labels, bins=5)
    rows, ece = reference_calibration(scores, labels, 5)
    np.testing.assert_allclose(calibration["bin_edges"], [0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert calibration["count"] == [r[0] for r in rows] == [4, 1, 2, 1, 2]
    np.testing.assert_allclose(calibration["mean_score"], [r[1] for r in rows])
    np.testing.assert_allclose(calibration["fraction_right"], [r[2] for r in rows])
    assert calibration["ece"] == pytest.approx(ece)
    rng = np.random.default_rng(2)
    scores, labels = rng.random(200), rng.random(200) < 0.6
    calibration = tts.calibration_bins(scores, labels, bins=10)
    rows, ece = reference_calibration(scores.tolist(), labels.tolist(), 10)
    assert calibration["count"] == [r[0] for r in rows]
    np.testing.assert_allclose(calibration["fraction_right"], [r[2] for r in rows])
    assert calibration["ece"] == pytest.approx(ece)


def test_calibration_bins_leave_empty_bins_nan():
    calibration = tts.calibration_bins([0.91, 0.95], [True, False], bins=4)
    assert calibration["count"] == [0, 0, 0, 2]
    assert all(math.isnan(v) for v in calibration["mean_score"][:3] + calibration["fraction_right"][:3])
    assert calibration["ece"] == pytest.approx(abs(0.93 - 0.5))
    assert math.isnan(tts.calibration_bins([], [], bins=4)["ece"])


def test_step_metrics_pool_the_checked_steps_only():
    # Sample 2 has no steps; sample 3's steps were not checked (None) and must not count.
    step_scores = [[0.9, 0.2], [], [0.7], [0.4, 0.6, 0.8]]
    step_correct = [[True, False], [], None, [False, True, True]]
    metrics = tts.step_metrics(step_scores, step_correct, bins=2)
    pooled_scores, pooled_labels = [0.9, 0.2, 0.4, 0.6, 0.8], [True, False, False, True, True]
    assert metrics["step_auroc"] == pytest.approx(reference_auroc(pooled_scores, pooled_labels)) == 1.0
    assert metrics["steps_checked"] == 5 and metrics["steps_right"] == 3
    assert metrics["step_score_right"] == pytest.approx((0.9 + 0.6 + 0.8) / 3)
    assert metrics["step_score_wrong"] == pytest.approx((0.2 + 0.4) / 2)
    assert metrics["step_calibration"]["count"] == [2, 3]
    with pytest.raises(ValueError, match="2 step scores but 1 step verdicts"):
        tts.step_metrics([[0.1, 0.2]], [[True]])


def test_step_metrics_without_checked_steps_are_nan():
    metrics = tts.step_metrics([[0.5], []], [None, None])
    assert metrics["steps_checked"] == 0 and math.isnan(metrics["step_auroc"])
    assert math.isnan(metrics["step_score_right"]) and math.isnan(metrics["step_calibration"]["ece"])


def test_group_size_errors_name_n_and_k():
    with pytest.raises(ValueError, match="k=16 .* n=8"):
        tts.sprm_best_of_k(SCORES, CORRECT, 16)
    with pytest.raises(ValueError, match="n=8 .* k=3"):
        tts.oracle_at_k(CORRECT, 3)
    with pytest.raises(ValueError, match="k=0"):
        tts.majority_vote_at_k(ANSWERS, CORRECT, SCORES, 0)


def test_evaluate_question_reports_every_metric_for_the_supported_modes():
    metrics = tts.evaluate_question(SCORES, CORRECT, ANSWERS)
    assert set(metrics) == {"pass@1", "auroc"} | {f"{m}@{k}" for m in tts.METHODS for k in (2, 8)}
    assert metrics["maj@8"] == 1.0 and metrics["sprm@8"] == 0.0 and metrics["oracle@8"] == 1.0
    assert metrics["wmaj@2"] == pytest.approx(reference_weighted_vote(ANSWERS, CORRECT, SCORES.tolist(), 2))
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
        expected = np.mean([reference_weighted_vote(a, c, s.tolist(), k) for s, c, a in zip(scores, correct, answers)])
        assert metrics[f"wmaj@{k}"] == pytest.approx(expected)
    assert metrics["pass@1"] == pytest.approx(np.mean(np.concatenate(correct)))
    assert metrics["auroc_pooled"] == pytest.approx(reference_auroc(np.concatenate(scores), np.concatenate(correct)))
    within, count = reference_within_question_auroc(scores, correct)
    assert metrics["auroc_within"] == pytest.approx(within) and metrics["auroc_within_questions"] == count
    assert metrics["questions"] == 3 and metrics["samples"] == 24
