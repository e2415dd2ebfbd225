"""Licences of a model's requirements: read from real distribution metadata, judged by a policy."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from modelops.licences import (
    ALLOWED,
    CLASSIFIER_LICENCES,
    DEFAULT_POLICY,
    DENIED,
    NOT_ALLOWED,
    SOURCE_CLASSIFIER,
    SOURCE_EXPRESSION,
    SOURCE_LICENSE_FIELD,
    SOURCE_NOT_INSTALLED,
    SOURCE_OVERRIDE,
    UNKNOWN,
    LicencePolicy,
    check_licences,
    judge_expression,
    licence_of,
    read_requirements,
)

POLICY = LicencePolicy(allow=("MIT", "BSD-*", "Apache-2.0"), deny=("AGPL-*", "GPL-3.0-*", "SSPL-1.0"))


def fake_distribution(site: Path, name: str, version: str = "1.0", *headers: str, body: str = "") -> None:
    """A real ``.dist-info`` folder, read by importlib.metadata like any installed package."""
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    lines = ["Metadata-Version: 2.4", f"Name: {name}", f"Version: {version}", *headers]
    (info / "METADATA").write_text("\n".join(lines) + "\n" + (f"\n{body}" if body else ""), encoding="utf-8")


@pytest.fixture
def site(tmp_path: Path) -> Path:
    site = tmp_path / "site"
    fake_distribution(site, "agplthing", "1.0", "License-Expression: AGPL-3.0-only")
    fake_distribution(site, "mitthing", "2.0", "License-Expression: MIT")
    fake_distribution(site, "classified", "1.0", "Classifier: License :: OSI Approved :: MIT License")
    fake_distribution(site, "bsdish", "1.0", "Classifier: License :: OSI Approved :: BSD License")
    fake_distribution(site, "freetext", "1.0", "License: Apache-2.0")
    fake_distribution(
        site, "longtext", "1.0", "License: Copyright (c) 2020 Someone", "  All rights reserved."
    )
    fake_distribution(site, "vague", "1.0", "Classifier: License :: OSI Approved")
    fake_distribution(site, "nothing", "1.0")
    fake_distribution(site, "gibberish", "1.0", "License: see the LICENSE file")
    fake_distribution(site, "oddclassifier", "1.0", "Classifier: License :: Freely Distributable")
    fake_distribution(site, "dual", "1.0", "License-Expression: MIT OR GPL-3.0-only")
    fake_distribution(site, "both", "1.0", "License-Expression: MIT AND GPL-3.0-or-later")
    fake_distribution(site, "mixed", "1.0", "License-Expression: Apache-2.0 AND LGPL-3.0-only")
    fake_distribution(site, "badexpr", "1.0", "License-Expression: MIT AND", "License: MIT")
    return site


def check(requirement: str, site: Path, policy: LicencePolicy = POLICY):
    [finding] = check_licences([requirement], policy, paths=[str(site)])
    return finding


def test_an_agpl_dependency_is_denied_naming_package_and_licence(site: Path) -> None:
    finding = check("agplthing==1.0", site)
    assert finding.verdict == DENIED and not finding.passed
    assert (finding.package, finding.version, finding.licence) == ("agplthing", "1.0", "AGPL-3.0-only")
    assert finding.source == SOURCE_EXPRESSION
    assert "agplthing" in finding.detail and "AGPL-3.0-only" in finding.detail


def test_an_mit_dependency_is_allowed(site: Path) -> None:
    finding = check("MitThing>=2", site)
    assert finding.passed and finding.verdict == ALLOWED
    assert (finding.requirement, finding.package, finding.licence) == ("MitThing>=2", "mitthing", "MIT")


def test_a_classifier_only_package_maps_to_spdx(site: Path) -> None:
    finding = check("classified", site)
    assert (finding.licence, finding.source, finding.verdict) == ("MIT", SOURCE_CLASSIFIER, ALLOWED)


def test_the_bsd_classifier_is_a_family_the_policy_must_allow_explicitly(site: Path) -> None:
    # "BSD-*" does not cover it: the classifier does not say which BSD licence.
    finding = check("bsdish", site)
    assert (finding.licence, finding.verdict) == ("LicenseRef-BSD", NOT_ALLOWED)
    allowing = LicencePolicy(allow=("LicenseRef-BSD",))
    assert check("bsdish", site, allowing).verdict == ALLOWED


def test_a_short_spdx_license_field_is_read(site: Path) -> None:
    finding = check("freetext", site)
    assert (finding.licence, finding.source, finding.verdict) == ("Apache-2.0", SOURCE_LICENSE_FIELD, ALLOWED)


@pytest.mark.parametrize(
    ("package", "why"),
    [
        ("longtext", "licence text"),
        ("vague", "names no licence"),
        ("nothing", "no License-Expression"),
        ("gibberish", "unknown SPDX id"),
        ("oddclassifier", "not mapped"),
        ("badexpr", "License-Expression"),
    ],
)
def test_unusable_licence_metadata_is_unknown_and_never_passes(site: Path, package: str, why: str) -> None:
    finding = check(package, site)
    assert finding.verdict == UNKNOWN and not finding.passed
    assert finding.licence is None and finding.version == "1.0"
    assert package in finding.detail and why in finding.detail


def test_a_package_that_is_not_installed_is_unknown(site: Path) -> None:
    finding = check("ghostpkg==1.0", site)
    assert (finding.verdict, finding.source, finding.version) == (UNKNOWN, SOURCE_NOT_INSTALLED, None)
    assert "ghostpkg is not installed" in finding.detail


def test_or_passes_when_one_option_is_allowed_and_and_needs_all(site: Path) -> None:
    assert check("dual", site).verdict == ALLOWED
    both = check("both", site)
    assert both.verdict == DENIED and "GPL-3.0-or-later" in both.detail
    mixed = check("mixed", site)
    assert mixed.verdict == NOT_ALLOWED and "LGPL-3.0-only" in mixed.detail


@pytest.mark.parametrize(
    ("expression", "verdict"),
    [
        ("MIT", ALLOWED),
        ("mit OR apache-2.0", ALLOWED),
        ("MIT AND BSD-3-Clause", ALLOWED),
        ("AGPL-3.0-only OR MIT", ALLOWED),
        ("AGPL-3.0-only OR SSPL-1.0", DENIED),
        ("AGPL-3.0-only OR LGPL-3.0-only", NOT_ALLOWED),
        ("MIT AND (Apache-2.0 OR GPL-3.0-only)", ALLOWED),
        ("MIT AND (LGPL-3.0-only OR GPL-3.0-only)", NOT_ALLOWED),
        ("GPL-3.0", DENIED),  # deprecated id: "GPL-3.0-*" still catches it
        ("GPL-3.0+", DENIED),
        ("GPL-2.0-only", NOT_ALLOWED),
        ("BSD-2-Clause", ALLOWED),
        ("Apache-2.0 WITH LLVM-exception", ALLOWED),
        ("GPL-3.0-only WITH GCC-exception-3.1", DENIED),
        ("Not-A-Licence", UNKNOWN),
    ],
)
def test_expressions(expression: str, verdict: str) -> None:
    assert judge_expression(expression, POLICY)[0] == verdict


def test_deny_wins_over_allow() -> None:
    policy = LicencePolicy(allow=("GPL-*",), deny=("GPL-3.0-*",))
    assert judge_expression("GPL-3.0-only", policy)[0] == DENIED
    assert judge_expression("GPL-2.0-only", policy)[0] == ALLOWED


def test_a_reviewed_licence_overrides_the_metadata(site: Path) -> None:
    policy = LicencePolicy(allow=POLICY.allow, deny=POLICY.deny, reviewed={"Vague": "MIT"})
    finding = check("vague", site, policy)
    assert (finding.licence, finding.source, finding.verdict) == ("MIT", SOURCE_OVERRIDE, ALLOWED)
    assert "License :: OSI Approved" in finding.detail
    # It overrides good metadata too: a human's reading wins, and a wrong one is caught by the deny list.
    denied = LicencePolicy(allow=POLICY.allow, deny=POLICY.deny, reviewed={"mitthing": "AGPL-3.0-or-later"})
    assert check("mitthing", site, denied).verdict == DENIED


def test_a_reviewed_licence_must_be_valid_spdx() -> None:
    with pytest.raises(ValueError, match="reviewed licence of 'x'"):
        LicencePolicy(allow=("MIT",), reviewed={"x": "MIT-ish"})


def test_the_installed_version_is_consulted_and_a_mismatch_said(site: Path) -> None:
    finding = check("mitthing==1.5", site)
    assert finding.verdict == ALLOWED and finding.version == "2.0"
    assert "installed 2.0 does not satisfy ==1.5" in finding.detail


REAL = ("mlflow", "scikit-learn", "skops", "numpy", "scipy", "pandas")


@pytest.mark.parametrize("package", REAL)
def test_the_real_model_requirements_pass_the_default_policy(package: str) -> None:
    from importlib.metadata import version

    [finding] = check_licences([f"{package}=={version(package)}"], DEFAULT_POLICY)
    assert finding.passed, finding
    assert "does not satisfy" not in finding.detail


def test_what_the_real_packages_declare() -> None:
    """Facts of the installed metadata the default policy was written for (skops declares nothing)."""
    assert licence_of("scikit-learn").licence == "BSD-3-Clause"
    numpy = licence_of("numpy")
    assert numpy.source == SOURCE_EXPRESSION and "0BSD" in numpy.licence and " AND " in numpy.licence
    assert licence_of("skops").licence is None
    assert DEFAULT_POLICY.reviewed["skops"] == "MIT"


def test_classifier_ids_are_kept_as_written() -> None:
    """license-expression aliases some LicenseRef ids (LicenseRef-Apache is Apache-2.0 to it): ours not."""
    for classifier, spdx in CLASSIFIER_LICENCES.items():
        verdict, why = judge_expression(spdx, DEFAULT_POLICY)
        assert verdict != UNKNOWN, (classifier, why)
        if spdx.startswith("LicenseRef-"):
            assert judge_expression(spdx, LicencePolicy(allow=(spdx,)))[0] == ALLOWED


def test_read_requirements(tmp_path: Path) -> None:
    path = tmp_path / "requirements.txt"
    path.write_text(
        "# written by mlflow\n"
        "\n"
        "mlflow==3.17.2\n"
        "scikit-learn==1.9.1  # the model's flavour\n"
        "--extra-index-url https://packages.example.com/simple\n"
        "--index-url=https://pypi.org/simple\n"
        "--prefer-binary\n"
        "-c constraints.txt\n"
        "numpy==2.4.6 \\\n"
        "    --hash=sha256:0123456789abcdef\n"
        "git+https://github.com/example/featurestore.git@v1#egg=featurestore\n"
        "-e ./local_pkg\n"
        "-r more.txt\n"
        "mylib @ https://example.com/mylib-1.0-py3-none-any.whl\n",
        encoding="utf-8",
    )
    lines = read_requirements(path)
    assert lines == [
        "mlflow==3.17.2",
        "scikit-learn==1.9.1",
        "--extra-index-url https://packages.example.com/simple",
        "--index-url=https://pypi.org/simple",
        "numpy==2.4.6",
        "git+https://github.com/example/featurestore.git@v1#egg=featurestore",
        "-e ./local_pkg",
        "-r more.txt",
        "mylib @ https://example.com/mylib-1.0-py3-none-any.whl",
    ]
    findings = {f.requirement: f for f in check_licences(lines, DEFAULT_POLICY)}
    assert findings["mlflow==3.17.2"].passed and findings["numpy==2.4.6"].passed
    assert findings["--index-url=https://pypi.org/simple"].passed
    outside = [
        "--extra-index-url https://packages.example.com/simple",
        "git+https://github.com/example/featurestore.git@v1#egg=featurestore",
        "-e ./local_pkg",
        "mylib @ https://example.com/mylib-1.0-py3-none-any.whl",
    ]
    for line in outside:
        assert findings[line].verdict == NOT_ALLOWED, line
        assert "installs from outside PyPI" in findings[line].detail
    assert findings[outside[1]].package == "featurestore"
    assert findings[outside[3]].package == "mylib"
    assert findings["-r more.txt"].verdict == NOT_ALLOWED and "more.txt" in findings["-r more.txt"].detail


def test_imports_neither_airflow_nor_mlflow() -> None:
    code = (
        "import sys, modelops.licences, modelops.secret_scan; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('airflow', 'mlflow')); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=120)
