"""The platform's shared names: registry aliases, tag keys, audit actions and subjects, event fields.

Every stage, operator, hook, the gateway and the CLI import these; no other module spells one of them
as a literal. A typo in a literal alias or tag key fails silently (MLflow accepts any string), while a
typo in an attribute of these enums fails on import. Imports nothing of Airflow or MLflow.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from modelops.audit import AuditRecord, AuditStore


class Alias(StrEnum):
    """Registry aliases: where a version stands in the lifecycle."""

    CANDIDATE = "candidate"
    """Registered by training, not yet through the compliance gate."""
    CHALLENGER = "challenger"
    """Approved by the compliance gate, waiting for deployment; during a canary, the version on trial."""
    CHAMPION = "champion"
    """The version that serves."""
    PREVIOUS_CHAMPION = "previous_champion"
    """The champion before the current one, kept for rollback."""


class Tag(StrEnum):
    """Model-version tag keys."""

    # lineage, set at registration
    TRAIN_DATA_SHA256 = "train_data_sha256"
    TRAIN_DATA_URI = "train_data_uri"
    DATASET = "dataset"
    FRAMEWORK = "framework"
    FRAMEWORK_VERSION = "framework_version"
    PYTHON_VERSION = "python_version"
    CODE_COMMIT = "code_commit"
    AIRFLOW_DAG_ID = "airflow_dag_id"
    AIRFLOW_RUN_ID = "airflow_run_id"
    TRIGGER = "trigger"
    MODEL_SPEC = "model_spec"
    TASK = "task"
    ESTIMATOR = "estimator"
    SKOPS_TRUSTED_TYPES = "skops_trusted_types"
    # compliance gate
    COMPLIANCE_STATUS = "compliance_status"
    COMPLIANCE_POLICY = "compliance_policy"
    COMPLIANCE_REPORT_SHA256 = "compliance_report_sha256"
    # deployment
    DEPLOYMENT_STATUS = "deployment_status"
    DEPLOYED_AT = "deployed_at"
    DEPLOYMENT_CHECKED_AT = "deployment_checked_at"
    PREVIOUS_CHAMPION = "previous_champion"
    SUPERSEDED_AT = "superseded_at"
    SUPERSEDED_BY = "superseded_by"
    # retirement
    RETIRED = "retired"
    RETIRED_AT = "retired_at"
    RETIRED_REASON = "retired_reason"
    RETIRED_ARCHIVE_URI = "retired_archive_uri"


class ModelTag(StrEnum):
    """Registered-model tag keys, copied from the model spec at every registration."""

    OWNER = "owner"
    TEAM = "team"
    DEPARTMENT = "department"
    RISK_TIER = "risk_tier"
    COMPLIANCE_LABELS = "compliance_labels"
    TASK = "task"
    DATASET = "dataset"
    COMPLIANCE_POLICY = "compliance_policy"
    MONITORING_POLICY = "monitoring_policy"
    RETIREMENT_POLICY = "retirement_policy"


class RunTag(StrEnum):
    """MLflow run tag keys of the runs the platform logs besides training (one per monitoring window)."""

    KIND = "modelops_kind"
    MODEL = "modelops_model"
    MODEL_VERSION = "modelops_model_version"
    WINDOW = "modelops_window"
    VERDICT = "modelops_verdict"


class ComplianceStatus(StrEnum):
    APPROVED = "approved"
    REJECTED = "rejected"
    AWAITING_APPROVAL = "awaiting_approval"


class DeploymentStatus(StrEnum):
    LIVE = "live"
    SMOKE_TEST_FAILED = "smoke_test_failed"
    ROLLED_BACK = "rolled_back"
    CANARY = "canary"
    """Serving a share of the model's traffic beside the champion, on trial."""


ARM_HEADER = "X-Model-Arm"
"""On a scoring response: which arm answered (an :class:`Arm` value)."""
ROUTING_KEY_HEADER = "X-Routing-Key"
"""Optional on a scoring call: the caller's end user or session. During a canary, calls with the same caller id
and routing key always land on the same arm; without it the caller id alone decides. Never logged."""


class Arm(StrEnum):
    """Which version of a model answered a call: the prediction log's ``arm`` and the metrics' label."""

    CHAMPION = "champion"
    CHALLENGER = "challenger"
    """The canary: the share of callers the traffic record sends to the version on trial."""
    STAGED = "staged"
    """A version asked for by ``X-Model-Version`` that is staged only (the deployment's smoke test)."""


RETIRED_TRUE = "true"
"""The value of ``Tag.RETIRED`` on a retired version."""

DRIFT_RUN_KIND = "drift_assessment"
"""The ``RunTag.KIND`` of the MLflow run logged per model and monitoring window."""

SMOKE_TEST_CALLER = "modelops-deployment-smoke-test"

# The subject of the audit log's own records (key rotations).
AUDIT_KEYRING_SUBJECT = "audit:keyring"
"""The caller id of deployment's smoke-test calls: logged, but never counted as traffic by monitoring."""


class Trigger(StrEnum):
    """Why a training run trains."""

    NEW_DATA = "new_data"
    RETRAINING_REQUEST = "retraining_request"
    MANUAL = "manual"


class AuditAction(StrEnum):
    """What an audit record records. One action per lifecycle decision."""

    DATASET_VALIDATED = "dataset.validated"
    MODEL_REGISTERED = "model.registered"
    GATE_DECIDED = "gate.decided"
    GATE_TAKEN_UP = "gate.taken_up"
    """A gate run took a version up: no other run evaluates it while that run is queued or running and has
    not decided (or waits for the approver), nor automatically after a decision. The gate runs up to 8
    runs at once (one may wait hours for a person), and each run's catch-up and the 5-minute sweep see the
    same undecided versions (see :func:`modelops.stages.common.take_up`)."""
    MODEL_DEPLOYED = "model.deployed"
    DEPLOYMENT_TAKEN_UP = "deployment.taken_up"
    """A deployment run took a model up (subject ``model:NAME``): no other run deploys it or watches its
    canary while that run is queued or running. Deployment runs several runs at once, so that one model's
    canary soaking for hours does not hold every other model's deployment back."""
    DRIFT_ASSESSED = "drift.assessed"
    RETRAINING_REQUESTED = "retraining.requested"
    MODEL_RETIRED = "model.retired"
    MODEL_ROLLED_BACK = "model.rolled_back"
    """The champion went back to an earlier deployed version (details name the champion now serving)."""
    KEY_ROTATED = "audit.key_rotated"
    """The audit log's signing key changed; the record is endorsed with the previous key."""
    ALERT_NOTIFIED = "alert.notified"
    """A monitoring alert: sent (with each channel's delivery), suppressed within its cool-down, or failed."""
    DATASET_QUARANTINED = "dataset.quarantined"
    """A person withdrew a dataset version (``modelops dataset quarantine``): no model trained on it passes."""
    TRAFFIC_SHARE_SET = "traffic.share_set"
    """Who serves which share of a model's calls: a canary started (the challenger's share), promoted or rolled
    back (share 0). The gateway splits traffic only as the newest authentic such record says."""
    MONITORING_REFERENCE_SET = "monitoring.reference_set"
    """What a version's monitoring windows are compared with: its training data, or (after its cold start, when
    the policy says so) a window of its own production traffic; the decision names which."""
    BATCH_SCORED = "batch.scored"
    """A batch of files scored on Spark with the recorded champion (``modelops_batch_scoring``): the details
    name the version, the champion record's seq, the sha256 of every input file and of the output, and rows."""
    PREDICTIONS_SEALED = "predictions.sealed"
    """A batch of prediction-log records sealed: the details hold its Merkle root, count and range (see
    :mod:`modelops.audit.seals`), so the chain's HMAC and anchors protect the batch."""
    PREDICTIONS_EXPIRED = "predictions.expired"
    """A sealed batch removed whole under the prediction log's retention: the details name the batch, its count,
    root and range and the retention applied (see :mod:`modelops.audit.retention`); written before the removal."""


class Decision(StrEnum):
    """The ``decision`` of an audit record."""

    PASSED = "passed"
    FAILED = "failed"
    UNREADABLE = "unreadable"
    CANDIDATE = "candidate"
    APPROVED = "approved"
    REJECTED = "rejected"
    DEPLOYED = "deployed"
    REFUSED = "refused"
    SMOKE_TEST_FAILED = "smoke_test_failed"
    REQUESTED = "requested"
    RETIRED = "retired"
    WOULD_RETIRE = "would_retire"
    ERROR = "error"
    PROMOTED = "promoted"
    """A deployment's decision to make a version champion, recorded before the alias moves."""
    ROLLED_BACK = "rolled_back"
    ROTATED = "rotated"
    AWAITING_APPROVAL = "awaiting_approval"
    """Every check passed and the policy asks a person to approve: the gate waits in the Airflow UI."""
    QUARANTINED = "quarantined"
    TAKEN_UP = "taken_up"
    """A run took a version (the gate) or a model (deployment) up for its stage (see
    ``AuditAction.GATE_TAKEN_UP`` and ``AuditAction.DEPLOYMENT_TAKEN_UP``)."""
    SENT = "sent"
    SUPPRESSED = "suppressed"
    SCORED = "scored"
    """A batch scoring wrote its scores (``batch.scored``)."""
    SEALED = "sealed"
    """A batch of prediction-log records was sealed (``predictions.sealed``)."""
    EXPIRED = "expired"
    """A sealed batch was removed whole because its retention ran out (``predictions.expired``)."""
    CANARY_STARTED = "canary_started"
    """A challenger serves its initial share beside the champion; the canary's soak has begun."""
    CANARY_PENDING = "canary_pending"
    """The soak is over but the arms have too few calls to compare: the canary soaks on (up to its limit)."""
    TRAINING_DATA = "training_data"
    """Monitoring compares with the version's training data."""
    PRODUCTION_WINDOW = "production_window"
    """Monitoring compares with a window of the version's own production traffic."""
    """The stage could not reach a decision (an exception); the record says which, the task log why."""


class EventField(StrEnum):
    """Keys of Asset event extras. Every event about a model carries ``model_name``."""

    MODEL_NAME = "model_name"
    MODEL_NAMES = "model_names"
    """On a validated-dataset event: the models whose spec trains on that dataset."""
    VERSION = "version"
    DATASET = "dataset"
    SHA256 = "sha256"
    TRAIN_DATA_SHA256 = "train_data_sha256"


def model_subject(name: str, version: str | int | None = None) -> str:
    """How a model (``model:NAME``) or one version (``model:NAME@VERSION``) is named in the audit log."""
    return f"model:{name}" if version is None else f"model:{name}@{version}"


def dataset_subject(sha256: str) -> str:
    """How a dataset version is named in the audit log: by the SHA-256 of its bytes."""
    return f"dataset:{sha256}"


def dataset_location_subject(uri: str) -> str:
    """A dataset file that could not be read (so has no hash), named by where it was."""
    return f"dataset-uri:{uri}"


PREDICTION_LOG_SUBJECT = "predictions"
"""The prediction log as a whole in the audit log (the subject of a sealing run's failure)."""


def prediction_batch_subject(batch_id: int) -> str:
    """How one sealed batch of the prediction log is named in the audit log."""
    return f"{PREDICTION_LOG_SUBJECT}:batch:{batch_id}"


def sha256_from_subject(subject: str) -> str:
    return subject.removeprefix("dataset:")


def latest_passed_validation(
    store: AuditStore, sha256: str | None = None, *, dataset: str | None = None
) -> AuditRecord | None:
    """The newest passing validation record of ``sha256``, or of the newest version of ``dataset``.

    The audit log is the system of record for which dataset versions passed validation. With neither
    argument any dataset's newest passing version is returned; callers that train a model always name
    the model's own dataset, so one model's retraining never picks up another model's data.
    """
    subject = dataset_subject(sha256) if sha256 else None
    records = store.records(action=AuditAction.DATASET_VALIDATED, subject=subject)
    for record in reversed(records):
        if record.decision != Decision.PASSED:
            continue
        if not store.authentic(record):
            continue  # written without the audit key: not evidence of anything
        if dataset is not None and record.details.get("dataset") != dataset:
            continue
        return record
    return None
