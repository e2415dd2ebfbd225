"""Domain exceptions: plain Python, so the gateway, the CLI and the audit store import no Airflow.

Every failure a user can cause or a gate can decide has its own exception, and each message names the
problem and the fix. Inside Airflow, :class:`~modelops.operators.base.ModelOpsBaseOperator` is the one
place that turns a :class:`GateFailed` (a deterministic refusal) into ``AirflowFailException`` so the
task fails without a retry; any other error fails the task and is retried as Airflow is configured.
"""

from __future__ import annotations


class ModelOpsError(Exception):
    """Base class of every error this package raises on purpose."""


class GateFailed(ModelOpsError):
    """A gate decided against its input. Deterministic: retrying cannot change the decision."""


class SettingsError(ModelOpsError):
    """A settings, policy, suite, dataset or model-spec file is missing or invalid."""


class UnknownModel(SettingsError):
    """A model name that no spec in include/models/ declares."""


class ConfigurationError(ModelOpsError):
    """A connection, environment variable or other deployment setting is missing or wrong."""


class RegistryError(ModelOpsError):
    """The model registry has no such model, version or alias, or refused a call."""


class DatasetError(ModelOpsError):
    """A dataset cannot be read: missing, empty, or not the expected format."""


class DataValidationFailed(GateFailed):
    """A dataset was read but fails its expectation suite or the PII scan."""


class TrainingError(ModelOpsError):
    """Training or registration could not complete."""


class ComplianceGateFailed(GateFailed):
    """The compliance gate rejected a model version."""


class DeploymentFailed(ModelOpsError):
    """A deployment did not complete; the previous champion keeps serving."""


class DeploymentRefused(GateFailed):
    """The version may not deploy (not approved by the compliance gate); retrying cannot change that."""


class MonitoringError(ModelOpsError):
    """Drift monitoring could not produce a verdict."""


class RetirementError(ModelOpsError):
    """A retirement was refused or could not be completed safely."""


class RetirementRefused(GateFailed):
    """Every version asked for was refused (e.g. the serving champion); retrying cannot change that."""


class BatchScoringRefused(GateFailed):
    """A batch scoring may not run as asked (no champion, serving disabled, files changed after the decision,
    input missing or lacking features); retrying cannot change that."""


class BatchScoringError(ModelOpsError):
    """Spark could not score a batch (a worker or the JVM failed); retried as Airflow is configured."""


class AuditChainBroken(ModelOpsError):
    """The audit log's hash chain does not verify."""
