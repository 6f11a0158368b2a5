"""rpq: hand GPU jobs from web apps to RunPod serverless endpoints through Celery.

The Python API for web apps::

    import jobs

    job = jobs.submit("tts", {"text": "hello"}, idempotency_key="order-42")
    job = jobs.wait(job.id, timeout=300)
    print(job.status, job.output)
"""

from jobs.api import (
    Event,
    InvalidJob,
    InvalidTransition,
    Job,
    JobNotFound,
    StreamItem,
    cancel,
    events,
    get,
    list_jobs,
    release,
    retry,
    stream_events,
    stream_outputs_before,
    submit,
    wait,
    webhook_received,
)
from jobs.bucket.access import (
    FileNotFound,
    InvalidUpload,
    JobFileInfo,
    UploadTicket,
    file_url,
    files,
    prepare_upload,
)
from jobs.flow.waiting import Waiting, WaitReason
from jobs.states import JobStatus
from jobs.tenants import TenantLimited

__all__ = [
    "Event",
    "FileNotFound",
    "InvalidJob",
    "InvalidTransition",
    "InvalidUpload",
    "Job",
    "JobFileInfo",
    "JobNotFound",
    "JobStatus",
    "StreamItem",
    "TenantLimited",
    "UploadTicket",
    "WaitReason",
    "Waiting",
    "cancel",
    "events",
    "file_url",
    "files",
    "get",
    "list_jobs",
    "prepare_upload",
    "release",
    "retry",
    "stream_events",
    "stream_outputs_before",
    "submit",
    "wait",
    "webhook_received",
]
