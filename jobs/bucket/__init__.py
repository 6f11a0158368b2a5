"""Files: job inputs and outputs in S3 or an S3-compatible store (Cloudflare R2, MinIO)."""

from jobs.bucket.store import ObjectInfo, ObjectStore

__all__ = ["ObjectInfo", "ObjectStore"]
