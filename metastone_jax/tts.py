"""Test-time scaling: best-of-k selection by SPRM score and the evaluation metrics, in plain NumPy.

Like the released MetaStone evaluation, a metric "@k" splits a question's n samples, in order, into n // k groups of
k, picks one sample per group and averages over the groups. n must be a multiple of k (dropping a remainder would
quietly evaluate fewer samples than were drawn), and k <= n.

Tie-breaking: best-of-k takes the first of the samples with the highest score in a group. Majority vote takes the
answer class with the most votes; among equal counts, the one with the highest summed SPRM score; then the one seen
first. SPRM-weighted majority vote (wmaj) gives each answer class the sum of its samples' trajectory scores and takes
the largest sum; among equal sums (e.g. every score 0: no steps), the class with the most votes; then the one seen
first. Samples without an answer (None) do not vote; a group where nobody answered counts as wrong.

Separation of right from wrong by the SPRM: the pooled AUROC ranks every sample of a benchmark against every other,
so it rewards a head that only tells easy questions from hard ones. Best-of-k ranks samples of one question, which
the within-question AUROC measures: the mean over the questions that have right and wrong samples of the AUROC among
that question's samples. Where steps can be checked, the step AUROC and a calibration table (reliability diagram) say
whether step scores track step correctness.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from metastone_jax.data.verify import is_equivalent

MODES = {"low": 2, "medium": 8, "high": 32}
METHODS = ("maj", "wmaj", "sprm", "oracle")  # the metrics "@k": one pick (or oracle) per group of k
NO_ANSWER = -1  # class id of a sample without an extractable answer


def _check_group_size(n: int, k: int) -> None:
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be between 1 and the number of samples n={n}")
    if n % k:
        raise ValueError(f"n={n} samples do not split into groups of k={k}; draw a multiple of k samples")


def _groups(values: np.ndarray, k: int) -> np.ndarray:
    """[n] -> [n // k, k] consecutive groups."""
    values = np.asarray(values)
    _check_group_size(len(values), k)
    return values.reshape(-1, k)


def pass_at_1(correct: Sequence[bool]) -> float:
    """Mean correctness over all samples."""
    return float(np.mean(np.asarray(correct, bool)))


def sprm_best_of_k(scores: Sequence[float], correct: Sequence[bool], k: int) -> float:
    """Per group of k, the correctness of the highest-scored sample (first on ties); mean over groups."""
    score_groups, correct_groups = _groups(np.asarray(scores, float), k), _groups(np.asarray(correct, bool), k)
    best = np.argmax(score_groups, axis=1)  # argmax returns the first maximum
    return float(np.mean(correct_groups[np.arange(len(best)), best]))


def oracle_at_k(correct: Sequence[bool], k: int) -> float:
    """Fraction of groups of k with at least one correct sample (pass@k as the released evaluation counts it)."""
    return float(np.mean(_groups(np.asarray(correct, bool), k).any(axis=1)))


def answer_classes(answers: Sequence[str | None]) -> np.ndarray:
    """[n] int: samples with mathematically equivalent answers share an id (ids by first appearance), None -> -1.

    Two answers are equivalent when `is_equivalent` says so or the strings are equal (covers unparseable answers).
    """
    representatives: list[str] = []
    classes = np.full(len(answers), NO_ANSWER, int)
    for index, answer in enumerate(answers):
        if answer is None:
            continue
        for class_id, representative in enumerate(representatives):
            if answer == representative or is_equivalent(answer, representative):
                classes[index] = class_id
                break
        else:
            classes[index] = len(representatives)
            representatives.append(answer)
    return classes


def _majority_vote(classes: np.ndarray, correct: np.ndarray, scores: np.ndarray, k: int, weighted: bool) -> float:
    """Plain (votes first, then summed score) or SPRM-weighted (summed score first, then votes) majority vote @k."""
    picked = []
    for class_group, correct_group, score_group in zip(_groups(classes, k), _groups(correct, k), _groups(scores, k)):
        tallies = {}  # class -> sort key, in order of appearance
        for class_id in dict.fromkeys(class_group.tolist()):
            if class_id != NO_ANSWER:
                members = class_group == class_id
                votes, score_sum = int(members.sum()), float(score_group[members].sum())
                tallies[class_id] = (score_sum, votes) if weighted else (votes, score_sum)
        if not tallies:
            picked.append(False)
            continue
        # max() keeps the first of equal keys, so a full tie goes to the class seen first.
        winner = max(tallies, key=tallies.__getitem__)
        picked.append(bool(correct_group[np.argmax(class_group == winner)]))
    return float(np.mean(picked))


def majority_vote_at_k(
    answers: Sequence[str | None], correct: Sequence[bool], scores: Sequence[float], k: int
) -> float:
    """Per group of k, the correctness of the most frequent answer class (ties: higher summed score, then first)."""
    return _majority_vote(answer_classes(answers), np.asarray(correct, bool), np.asarray(scores, float), k, False)


def weighted_majority_vote_at_k(
    answers: Sequence[str | None], correct: Sequence[bool], scores: Sequence[float], k: int
) -> float:
    """Per group of k, the correctness of the answer class with the largest summed score (ties: more votes, first)."""
    return _majority_vote(answer_classes(answers), np.asarray(correct, bool), np.asarray(scores, float), k, True)


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of their ranks."""
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]
    ranks = np.empty(len(values), float)
    for start, end in zip(starts, ends):
        ranks[order[start:end]] = (start + end + 1) / 2.0
    return ranks


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """P(score of a positive > score of a negative), ties counted 1/2 (Mann-Whitney U); NaN if a class is absent."""
    scores, labels = np.asarray(scores, float), np.asarray(labels, bool)
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    ranks = _average_ranks(scores)
    u_statistic = ranks[labels].sum() - positives * (positives + 1) / 2.0
    return float(u_statistic / (positives * negatives))


def within_question_auroc(scores: Sequence[Sequence[float]], correct: Sequence[Sequence[bool]]) -> tuple[float, int]:
    """(mean AUROC among one question's samples over the questions with right and wrong samples, their number).

    NaN and 0 when no question has both.
    """
    per_question = [auroc(s, c) for s, c in zip(scores, correct)]
    defined = [value for value in per_question if not np.isnan(value)]
    return (float(np.mean(defined)) if defined else float("nan")), len(defined)


def calibration_bins(scores: Sequence[float], labels: Sequence[bool], bins: int = 10) -> dict[str, Any]:
    """Reliability-diagram data of scores in [0, 1]: bin b holds bin_edges[b] <= score < bin_edges[b + 1] for
    `bins` equal-width bins (the last one also holds a score of 1).

    Per bin: "count", "mean_score" and "fraction_right" (NaN for an empty bin); "bin_edges" [bins + 1]; "ece", the
    expected calibration error sum(count * |mean_score - fraction_right|) / total (NaN without scores).
    """
    scores, labels = np.asarray(scores, float), np.asarray(labels, bool)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.searchsorted(edges, scores, side="right") - 1, 0, bins - 1)
    count = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_score = np.bincount(index, weights=scores, minlength=bins) / count
        fraction_right = np.bincount(index, weights=labels, minlength=bins) / count
    gaps = np.abs(mean_score - fraction_right)[count > 0]
    ece = float(np.sum(count[count > 0] * gaps) / count.sum()) if count.sum() else float("nan")
    return {
        "bin_edges": edges.tolist(),
        "count": count.tolist(),
        "mean_score": mean_score.tolist(),
        "fraction_right": fraction_right.tolist(),
        "ece": ece,
    }


def step_metrics(
    step_scores: Sequence[Sequence[float]], step_correct: Sequence[Sequence[bool] | None], bins: int = 10
) -> dict[str, Any]:
    """Step scores against step correctness, pooled over the samples whose steps were checked (not None).

    {"step_auroc", "steps_checked", "steps_right", "step_score_right", "step_score_wrong" (mean score of right /
    wrong steps), "step_calibration" (`calibration_bins`)}; NaN where there is nothing to measure.
    """
    checked = [(np.asarray(s, float), np.asarray(c, bool)) for s, c in zip(step_scores, step_correct) if c is not None]
    for scores, correct in checked:
        if len(scores) != len(correct):
            raise ValueError(f"{len(scores)} step scores but {len(correct)} step verdicts: need one per step")
    scores = np.concatenate([s for s, _ in checked] + [np.zeros(0)])
    correct = np.concatenate([c for _, c in checked] + [np.zeros(0, bool)])
    return {
        "step_auroc": auroc(scores, correct),
        "steps_checked": len(scores),
        "steps_right": int(correct.sum()),
        "step_score_right": float(scores[correct].mean()) if correct.any() else float("nan"),
        "step_score_wrong": float(scores[~correct].mean()) if (~correct).any() else float("nan"),
        "step_calibration": calibration_bins(scores, correct, bins),
    }


def default_ks(n: int) -> tuple[int, ...]:
    """The TTS modes (2, 8, 32) that n samples support (k <= n and n a multiple of k)."""
    return tuple(k for k in MODES.values() if k <= n and n % k == 0)


def evaluate_question(
    scores: Sequence[float],
    correct: Sequence[bool],
    answers: Sequence[str | None],
    ks: Iterable[int] | None = None,
) -> dict[str, float]:
    """{"pass@1", "maj@k", "wmaj@k", "sprm@k", "oracle@k" for each k, "auroc"} for one question's n samples."""
    scores, correct = np.asarray(scores, float), np.asarray(correct, bool)
    if not len(scores) == len(correct) == len(answers):
        raise ValueError(
            f"scores ({len(scores)}), correct ({len(correct)}) and answers ({len(answers)}) must have one entry "
            "per sample"
        )
    ks = default_ks(len(scores)) if ks is None else tuple(ks)
    classes = answer_classes(answers)
    metrics = {"pass@1": pass_at_1(correct)}
    for k in ks:
        metrics[f"maj@{k}"] = _majority_vote(classes, correct, scores, k, weighted=False)
        metrics[f"wmaj@{k}"] = _majority_vote(classes, correct, scores, k, weighted=True)
        metrics[f"sprm@{k}"] = sprm_best_of_k(scores, correct, k)
        metrics[f"oracle@{k}"] = oracle_at_k(correct, k)
    metrics["auroc"] = auroc(scores, correct)
    return metrics


def evaluate_benchmark(
    scores: Sequence[Sequence[float]],
    correct: Sequence[Sequence[bool]],
    answers: Sequence[Sequence[str | None]],
    ks: Iterable[int] | None = None,
) -> dict[str, float]:
    """Per-question metrics averaged over questions, plus "auroc_pooled" (every sample of the benchmark ranked
    together), "auroc_within" and "auroc_within_questions" (`within_question_auroc`), "questions", "samples".

    Default ks: the modes that every question's sample count supports.
    """
    if not len(scores) == len(correct) == len(answers) or len(scores) == 0:
        raise ValueError(
            f"need one entry per question in scores ({len(scores)}), correct ({len(correct)}) and answers "
            f"({len(answers)}), at least one question"
        )
    if ks is None:
        ks = tuple(k for k in MODES.values() if all(k in default_ks(len(s)) for s in scores))
    ks = tuple(ks)
    per_question = [evaluate_question(s, c, a, ks) for s, c, a in zip(scores, correct, answers)]
    metrics = {name: float(np.mean([m[name] for m in per_question])) for name in per_question[0] if name != "auroc"}
    metrics["auroc_pooled"] = auroc(
        np.concatenate([np.asarray(s, float) for s in scores]), np.concatenate([np.asarray(c, bool) for c in correct])
    )
    metrics["auroc_within"], metrics["auroc_within_questions"] = within_question_auroc(scores, correct)
    metrics["questions"] = len(per_question)
    metrics["samples"] = int(sum(len(s) for s in scores))
    return metrics
