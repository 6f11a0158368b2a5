"""rpq's exceptions, split by what the caller does next.

    RpqError
    ├── ConfigError                 a setting is missing or malformed: fix the environment
    │   └── FilesNotConfigured      files were asked for but RPQ_S3_BUCKET is not set
    ├── InvalidObjectName           a file name or object key rpq refuses (also a ValueError); nothing sent
    ├── ObjectStoreError            S3 (or R2, MinIO) could not be reached, refused the credentials or
    │                               the request; the message names the operation, key and S3's error code
    └── RunPodError                 anything that went wrong talking to RunPod
        ├── RunPodTransient         timeout, connection error, 429, 5xx: try again later
        │   ├── RunPodRateLimited   429; carries RunPod's Retry-After when it sent one
        │   ├── RunPodBudgetExhausted  rpq's own request budget is spent: nothing was sent;
        │   │                       retry_after says when a token is free
        │   └── StreamReadUnknown   a /stream read whose answer was lost: the chunks it handed
        │                           out may be gone (RunPod gives each chunk out once)
        ├── RunPodRejected          any other 4xx: the request itself is wrong; do not retry
        │   └── PayloadTooLarge     refused before sending: the body is over RunPod's limit
        ├── RunPodAuthError         401/403: the API key is wrong or lacks access
        ├── RunPodNotFound          404: unknown endpoint, or a job RunPod no longer keeps
        ├── RunOutcomeUnknown       a /run (or /runsync) whose request may or may not have
        │   │                       created a job: never resubmit it blindly
        │   └── ChangeOutcomeUnknown  a management write (PATCH) whose answer was lost: read the
        │                           resource back before deciding to send it again
        └── RunPodProtocolError     RunPod answered something we cannot read (an unknown
                                    status, a body that is not the documented shape)

Every error raised at the HTTP boundary is chained (`raise ... from exc`) to what httpx raised,
and no message ever contains the API key: messages are built from the method, the path and
RunPod's own error text only. Likewise ObjectStoreError is built from the operation, the key and S3's
error code: never a credential, and never a presigned URL (its signature is a bearer token).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a request: which field, which rule it broke, and a message for people.

    `constraint` is a short stable word (required, type, range, format, unknown, size, known, unique,
    configured: the server lacks a setting the request needs; scope and allowed: the token may not do this;
    limit: its tenant is at a limit) that
    programs can branch on; `message` may change. Messages never quote the offending value's content.
    """

    field: str
    constraint: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


class RpqError(Exception):
    """Base of every error rpq raises on purpose."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class ConfigError(RpqError):
    """The configuration is invalid."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


class FilesNotConfigured(ConfigError):
    """Files need an object store, and RPQ_S3_BUCKET names none."""

    def __init__(self) -> None:
        super().__init__(["RPQ_S3_BUCKET: not set; files (inputs and outputs in S3 or R2) need a bucket"])


class InvalidObjectName(RpqError, ValueError):
    """A file name or object key rpq refuses to store: every problem is listed, and nothing was sent."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


class ObjectStoreError(RpqError):
    """The object store did not do what was asked."""

    def __init__(self, message: str, *, operation: str, code: str | None = None,
                 status_code: int | None = None) -> None:
        self.operation = operation
        self.code = code
        self.status_code = status_code
        super().__init__(message)


class RunPodError(RpqError):
    """RunPod did not do what was asked."""

    def __init__(
        self,
        message: str | None = None,
        *,
        status_code: int | None = None,
        operation: str | None = None,
    ) -> None:
        self.status_code = status_code
        self.operation = operation
        super().__init__(message)


class RunPodTransient(RunPodError):
    """RunPod could not be reached or was briefly unable to answer; try again later."""

    def __init__(
        self,
        message: str | None = None,
        *,
        status_code: int | None = None,
        operation: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.retry_after = retry_after
        super().__init__(message, status_code=status_code, operation=operation)


class RunPodRateLimited(RunPodTransient):
    """RunPod's rate limit was hit (429); back off before the next call."""


class RunPodBudgetExhausted(RunPodTransient):
    """rpq's own budget of RunPod requests (`jobs.runpod.budget`) had no token in time; nothing was sent.

    `retry_after` is the seconds until a token would be free. A /run refused this way provably never
    reached RunPod, so it is sent later like any other unsent request."""


class StreamReadUnknown(RunPodTransient):
    """A /stream read may have taken chunks from RunPod whose answer never arrived; they may be missing."""


class RunPodRejected(RunPodError):
    """RunPod refused the request as invalid; sending it again will not help."""


class PayloadTooLarge(RunPodRejected):
    """The request body is larger than RunPod accepts; nothing was sent."""


class RunPodAuthError(RunPodError):
    """RunPod refused the API key (401/403)."""


class RunPodNotFound(RunPodError):
    """RunPod does not know this endpoint or job (404): wrong id, or the job expired."""


class RunOutcomeUnknown(RunPodError):
    """The submit may or may not have reached RunPod; an operator must decide whether to resubmit."""


class ChangeOutcomeUnknown(RunOutcomeUnknown):
    """A management change (an endpoint PATCH) may or may not have been applied; read it back before resending."""


class RunPodProtocolError(RunPodError):
    """RunPod's answer did not have the documented shape."""
