"""Honest alarms: on stationary traffic the monitoring verdicts raise no more alarms than the policy
implies, injected drift with a click-through drop is critical in the hour it happens, drift without a drop
stays a warning, and the per-feature statistics Evidently reports agree with scipy on the same data.

Every hour here is a real Evidently run on a 400-row window of seeded synthetic traffic from four callers,
with labels drawn from the synthetic click model itself (what `POST /labels` delivers later)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from modelops.data.synthetic import DriftShift, generate_clicks
from modelops.settings import load_catalog
from modelops.stages.monitoring import assess_drift, business_metric, correlated_verdict

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

HOURS = 100
ROWS = 400
CALLERS = ["web", "app", "email", "partner"]


@pytest.fixture(scope="module")
def setting():
    catalog = load_catalog()
    spec = catalog.model("ctr_recommender")
    policy = catalog.policies_for(spec).monitoring
    reference = generate_clicks(20_000, seed=1)
    baseline = {"holdout_positive_rate": float(reference["clicked"].mean())}
    return spec, policy, reference, baseline


def hour(seed: int, shift: DriftShift | None = None) -> pd.DataFrame:
    window = generate_clicks(ROWS, seed=seed, shift=shift)
    window["label"] = window["clicked"].astype(float)
    window["prediction"] = 0.5
    window["caller_id"] = [CALLERS[i % len(CALLERS)] for i in range(len(window))]
    return window


def verdict_of(window: pd.DataFrame, setting) -> tuple[str, object]:
    spec, policy, reference, baseline = setting
    assessment = assess_drift(current=window[spec.features], reference=reference, spec=spec, policy=policy)
    assessment.drift_level = assessment.verdict
    assessment.business = business_metric(window, spec, policy, baseline)
    verdict, _ = correlated_verdict(assessment, policy)
    return verdict, assessment


def _stationary_verdict(index: int, setting) -> str:
    return verdict_of(hour(1000 + index), setting)[0]


def test_a_hundred_stationary_hours_raise_no_more_alarms_than_the_policy_implies(setting) -> None:
    """The false-alarm rate the standard policy implies: critical needs critical drift *and* a click-through
    drop at least 2 standard errors below the baseline in two callers' rows; on stationary traffic that is
    a coincidence of independent rare events, so no critical hour is expected in 100. A warning from the
    business metric alone is a one-sided z >= 2 event (2.3 % of hours) and drift warnings need 25 % of the
    features past their thresholds, which stationary windows do not reach: at most 2.3 % of hours warn in
    expectation. We allow 8 warnings in 100 (the binomial 99.9 % bound at 2.3 %)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # Both cores: each hour is an independent Evidently run.
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("fork")) as pool:
        verdicts = list(pool.map(_stationary_verdict, range(HOURS), [setting] * HOURS))
    counts = {v: verdicts.count(v) for v in set(verdicts)}
    assert counts.get("critical", 0) == 0, counts
    assert counts.get("warning", 0) <= 8, counts


def test_injected_drift_with_a_click_drop_is_critical_in_that_hour_and_without_the_drop_a_warning(
    setting,
) -> None:
    drift = dict(age_shift=15, out_of_range_share=0.2, category_weights={"fashion": 5, "toys": 1})
    critical, assessment = verdict_of(hour(7, DriftShift(**drift, click_logit_shift=-2.5)), setting)
    assert critical == "critical", assessment.reasons
    assert assessment.business["drop"] > 0.3 and len(assessment.business["by_caller"]) == len(CALLERS)
    warning, assessment = verdict_of(hour(7, DriftShift(**drift)), setting)
    assert warning == "warning" and assessment.drift_level == "critical"


def test_per_feature_statistics_agree_with_scipy_and_with_evidentlys_report(setting) -> None:
    from scipy.spatial.distance import jensenshannon
    from scipy.stats import wasserstein_distance

    spec, policy, reference, _ = setting
    window = hour(3, DriftShift(age_shift=8, category_weights={"fashion": 3, "toys": 1}))
    sample = reference[spec.features]
    if len(sample) > policy.reference_sample_rows:
        sample = sample.sample(policy.reference_sample_rows, random_state=0).sort_index()
    assessment = assess_drift(current=window[spec.features], reference=reference, spec=spec, policy=policy)
    for column in spec.numeric_features:
        ours = assessment.feature_scores[column]["value"]
        # Evidently's "normed" Wasserstein: the distance divided by the reference's standard deviation.
        expected = wasserstein_distance(sample[column], window[column]) / np.std(sample[column])
        assert ours == pytest.approx(expected, abs=1e-3), column
    for column in spec.categorical_features:
        categories = sorted(set(sample[column]) | set(window[column]))
        ref = sample[column].value_counts(normalize=True).reindex(categories, fill_value=0)
        cur = window[column].value_counts(normalize=True).reindex(categories, fill_value=0)
        expected = jensenshannon(ref.to_numpy(), cur.to_numpy())
        assert assessment.feature_scores[column]["value"] == pytest.approx(expected, abs=1e-3), column
    # And with Evidently's own report on the same data (the statistics are computed natively for speed).
    from modelops.stages.monitoring import _evidently_report, _evidently_scores

    evidently = _evidently_scores(_evidently_report(window[spec.features], sample, spec, policy))
    for column, score in assessment.feature_scores.items():
        assert score["value"] == pytest.approx(evidently[column]["value"], abs=1e-5), column
        assert score["drifted"] == evidently[column]["drifted"], column
