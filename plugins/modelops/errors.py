"""Domain exceptions.

Every failure a user can cause or a gate can decide has its own exception, and each message names the
problem and the fix. They subclass ``AirflowException`` so that Airflow marks the task failed (and
retries it where retries make sense) while tests and the CLI can catch them by type.
"""

from __future__ import annotations

from airflow.sdk.exceptions import AirflowException, AirflowFailException


class ModelOpsError(AirflowException):
    """Base class of every error this package raises on purpose."""


class GateFailed(ModelOpsError, AirflowFailException):
    """A gate decided against its input. Deterministic, so Airflow fails the task without retrying it."""


class SettingsError(ModelOpsError):
    """A settings, policy, suite or model-spec file is missing or invalid."""


class ConfigurationError(ModelOpsError):
    """A connection, environment variable or other deployment setting is missing or wrong."""


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


class AuditChainBroken(ModelOpsError):
    """The audit log's hash chain does not verify."""
