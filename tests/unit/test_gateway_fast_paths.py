"""The gateway's fast paths give what the slow ones they replace gave: rows and columns of a screened
frame, a new trace's traceparent, metric children looked up once."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from modelops.serving.screening import Screening, _column_lists, frame_records, typed_frame
from modelops.serving.telemetry import GatewayMetrics, trace_context

JSON_ROWS = {
    "dataframe_split": {
        "columns": ["age", "price", "category", "flag", "note"],
        "data": [[30, 1.5, "books", True, None], [41, 2.0, "toys", False, "a@b.co"]],
    }
}


def frames() -> dict[str, pd.DataFrame]:
    json_frame = Screening().raw_frame(json.loads(json.dumps(JSON_ROWS)), b"", "application/json")
    assert json_frame is not None
    return {
        "json rows (object)": json_frame,
        "mixed dtypes": pd.DataFrame(
            {
                "i": [1, 2],
                "f": [1.5, np.nan],
                "b": [True, False],
                "s": ["x", None],
                "d": pd.to_datetime(["2026-01-01", "2026-01-02"]),
                "f32": np.array([1.5, 2.5], dtype=np.float32),
            }
        ),
        "numbers only (one float block)": pd.DataFrame({"i": [1, 2], "f": [1.5, 2.0]}),
        "no rows": pd.DataFrame(columns=["a", "b"], dtype=object),
        "no columns": pd.DataFrame(index=[0, 1]),
    }


def same(left: object, right: object) -> bool:
    """Equal, NaN equal to NaN, and of the same Python types."""
    if isinstance(left, float) and isinstance(right, float) and math.isnan(left) and math.isnan(right):
        return True
    if isinstance(left, list | tuple) and isinstance(right, list | tuple):
        return len(left) == len(right) and all(same(a, b) for a, b in zip(left, right, strict=True))
    if isinstance(left, dict) and isinstance(right, dict):
        return left.keys() == right.keys() and all(same(left[k], right[k]) for k in left)
    return type(left) is type(right) and left == right


@pytest.mark.parametrize("name", list(frames()))
def test_column_lists_and_records_match_pandas(name: str) -> None:
    frame = frames()[name]
    assert same(_column_lists(frame), [frame[column].tolist() for column in frame.columns])
    assert same(frame_records(frame), frame.to_dict(orient="records"))


def test_a_new_trace_is_a_valid_sampled_traceparent() -> None:
    context = trace_context({"content-type": "application/json"})
    assert context.started_here and context.tracestate is None
    assert context.traceparent == f"00-{context.trace_id}-{context.span_id}-01"
    extracted = TraceContextTextMapPropagator().extract({"traceparent": context.traceparent})
    span = trace.get_current_span(extracted).get_span_context()
    assert span.is_valid and span.trace_flags.sampled
    assert trace_context({}).trace_id != context.trace_id
    # A caller's trace is still continued.
    continued = trace_context({"traceparent": context.traceparent})
    assert continued.trace_id == context.trace_id and continued.parent_span_id == context.span_id


def test_metrics_count_every_call_with_children_cached() -> None:
    metrics = GatewayMetrics()
    for status in (200, 200, 422, 503, 200):
        metrics.observe("ctr", "1", "champion", status, 0.01)
    text = metrics.render()[0].decode()
    assert 'modelops_gateway_requests_total{arm="champion",model="ctr",status="2xx",version="1"} 3.0' in text
    assert 'modelops_gateway_errors_total{arm="champion",model="ctr",status="4xx",version="1"} 1.0' in text
    assert 'modelops_gateway_errors_total{arm="champion",model="ctr",status="5xx",version="1"} 1.0' in text
    assert 'modelops_gateway_errors_total{arm="champion",model="ctr",status="2xx"' not in text
    assert 'modelops_gateway_request_duration_seconds_count{arm="champion",model="ctr",status="2xx"' in text


SCHEMA_ROWS = pd.DataFrame(
    {
        "age": pd.Series([30, 41], dtype="int64"),
        "small": pd.Series([1, 2], dtype="int32"),
        "price": [1.5, 2.0],
        "ratio": pd.Series([0.5, 0.25], dtype="float32"),
        "flag": [True, False],
        "category": ["books", "toys"],
    }
)


@pytest.mark.parametrize(
    "payload",
    [
        {"dataframe_split": {"columns": list(SCHEMA_ROWS), "data": [[30, 1, 1.5, 0.5, True, "books"]]}},
        # an integer in a double column, a whole float in a long column, columns in another order
        {
            "dataframe_split": {
                "columns": ["category", "flag", "ratio", "price", "small", "age"],
                "data": [["toys", False, 1, 2, 3.0, 41.0], ["books", True, 0.1, 3.25, 4, 7]],
            }
        },
        {
            "dataframe_records": [
                {"age": 3, "small": 1, "price": 1, "ratio": 2, "flag": True, "category": "x"}
            ]
        },
    ],
)
def test_typed_frame_is_what_mlflow_parses(payload: dict) -> None:
    from mlflow.models import Model, infer_signature
    from mlflow.pyfunc import scoring_server

    model = Model(signature=infer_signature(SCHEMA_ROWS))
    schema = model.get_input_schema()
    screening = Screening()
    frame = screening.raw_frame(json.loads(json.dumps(payload)), b"", "application/json")
    assert frame is not None
    assert screening.check_signature(frame, schema) == []
    parsed = scoring_server._parse_json_data(payload, model, schema).data
    pd.testing.assert_frame_equal(typed_frame(payload, frame, schema), parsed, check_dtype=True)


def test_typed_frame_declines_what_it_does_not_cover() -> None:
    from mlflow.models import infer_signature
    from mlflow.types.schema import ColSpec, Schema

    schema = infer_signature(SCHEMA_ROWS).inputs
    frame = SCHEMA_ROWS.astype(object)
    split = {"dataframe_split": {"columns": list(frame), "data": frame.values.tolist()}}
    assert typed_frame(split, frame, schema) is not None
    for payload in (
        {"inputs": {column: frame[column].tolist() for column in frame}},  # MLflow keeps a dict of columns
        {**split, "params": {"top_k": 3}},
        {"dataframe_split": {**split["dataframe_split"], "index": [7, 8]}},
        None,  # CSV or Parquet
    ):
        assert typed_frame(payload, frame, schema) is None
    assert typed_frame(split, frame.drop(columns=["flag"]), schema) is None  # a column missing
    assert typed_frame(split, frame.assign(extra=1), schema) is None  # an extra column
    assert typed_frame(split, frame.head(0), schema) is None  # no rows
    assert typed_frame(split, frame.assign(age=[np.nan, 1.0]), schema) is None  # NaN in a long column
    optional = Schema([*schema.inputs[:-1], ColSpec("string", "category", required=False)])
    assert typed_frame(split, frame, optional) is None
    with_time = Schema([*schema.inputs, ColSpec("datetime", "when")])
    assert typed_frame(split, frame.assign(when=0), with_time) is None
    assert typed_frame(split, frame, None) is None
