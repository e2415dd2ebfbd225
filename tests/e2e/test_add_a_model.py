"""README, "Add your own model", followed to the letter: its file blocks are copied out of the README
into a copy of ``include/``, its Python block drops the data, and the chain must take the new model to a
serving version with no hand trigger after the validation poll."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import httpx
import pytest
from airflow.utils.state import DagRunState

from modelops.registry import ModelRegistry
from modelops.vocabulary import Alias, ModelTag

from .conftest import PROJECT_ROOT, Stack

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.filterwarnings("ignore:Hint. Inferred schema contains integer column:UserWarning"),
]

SECTION = "## Add your own model"
FILE_BLOCK = re.compile(r"\*\*`(include/[^`]+)`\*\*\n```\w+\n(.*?)```", re.DOTALL)
PYTHON_BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def readme_section() -> str:
    text = (PROJECT_ROOT / "README.md").read_text()
    assert SECTION in text, f"README.md has no section {SECTION!r}"
    section = text.split(SECTION, 1)[1]
    return section.split("\n## ", 1)[0]


def test_readme_section_names_three_files_and_a_drop() -> None:
    section = readme_section()
    paths = [path for path, _ in FILE_BLOCK.findall(section)]
    assert [p.split("/")[1] for p in paths] == ["datasets", "expectations", "models"]
    assert len(PYTHON_BLOCK.findall(section)) == 1


def test_a_third_model_added_by_the_readme_alone_serves(
    stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    section = readme_section()
    include = tmp_path / "include"
    shutil.copytree(PROJECT_ROOT / "include", include)
    for relative, content in FILE_BLOCK.findall(section):
        target = include / relative.removeprefix("include/")
        target.write_text(content)
    monkeypatch.setenv("MODELOPS_INCLUDE_DIR", str(include))

    from modelops.settings import load_catalog

    spec = load_catalog().model("tumour_classifier")
    # A sqlite-backed MLflow (this test's stack) needs an artifact location; a tracking server has one.
    from mlflow import MlflowClient

    MlflowClient(stack.tracking_uri).create_experiment(
        spec.experiment_name, artifact_location=(tmp_path / "artifacts").as_uri()
    )

    (drop_code,) = PYTHON_BLOCK.findall(section)
    exec(drop_code.replace(".demo/modelops/incoming", str(stack.incoming)), {})  # noqa: S102
    assert (stack.incoming / "tumours" / "tumours-1.csv").is_file()

    stack.clear_queue()
    # No conf, as the five-minute schedule runs it (the parsed form does not list the new dataset yet).
    validation = stack.run("modelops_data_validation")
    assert validation.state == DagRunState.SUCCESS
    runs = stack.run_queued()
    assert {run.dag_id for run in runs} >= {
        "modelops_training",
        "modelops_compliance_gate",
        "modelops_deployment",
    }
    assert all(run.state == DagRunState.SUCCESS for run in runs), [(r.dag_id, r.state) for r in runs]

    registry = ModelRegistry(stack.tracking_uri)
    champion = registry.version_by_alias("tumour_classifier", Alias.CHAMPION)
    assert champion is not None
    assert registry.model("tumour_classifier").tags[ModelTag.TEAM] == "radiology"
    response = httpx.post(
        f"{stack.gateway_url}/models/tumour_classifier/invocations",
        json={
            "dataframe_records": [
                {
                    "mean_radius": 12.1,
                    "mean_texture": 18.2,
                    "mean_perimeter": 78.0,
                    "mean_area": 450.0,
                    "mean_smoothness": 0.09,
                }
            ]
        },
        headers=stack.key_headers("radiology"),
    )
    assert response.status_code == 200, response.text
    assert response.headers["X-Model-Version"] == champion.version
