"""Presigned URLs from jobs.bucket.store: expiry end to end on s3rver, and each URL's scope read back from it.

s3rver refuses an expired SigV4 URL, so expiry is tested against it over HTTP. No local server checks a
SigV4 signature (s3rver and moto both accept a URL used for another key, method or header), and neither
enforces anything in a POST policy (size range, content type, key, expiry, signature: tried, all accepted).
So what an upload URL or form allows (its bucket, key, method, Content-Type and size) is shown by what it
carries and by recomputing its signature with botocore: that S3 and R2 then refuse anything else rests on them.
"""

from __future__ import annotations

import base64
import calendar
import json
import time
import uuid
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit, urlunsplit

import httpx
import pytest
from botocore.auth import ISO8601, SIGV4_TIMESTAMP, S3SigV4PostAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from jobs.bucket.store import ObjectStore
from jobs.settings import Settings
from tests.conftest import wait_until
from tests.integration.s3rver import S3RVER_ACCESS_KEY, S3rverProcess
from tests.integration.test_files_store import REGION, signature_matches

pytestmark = pytest.mark.integration

#: How far past a URL's expiry a test waits before using it: s3rver compares to the millisecond, on this
#: machine's clock, and refuses once its time is strictly after the expiry.
PAST_EXPIRY = 0.02
#: The query fields a SigV4 presigned URL carries, and all that rpq's URLs may carry.
SIGV4_FIELDS = {"X-Amz-Algorithm", "X-Amz-Credential", "X-Amz-Date", "X-Amz-Expires", "X-Amz-SignedHeaders",
                "X-Amz-Signature"}
#: The form fields of a SigV4 POST besides the file: those rpq sets (key, Content-Type) and the signature's.
POST_FIELDS = {"key", "Content-Type", "policy", "x-amz-algorithm", "x-amz-credential", "x-amz-date",
               "x-amz-signature"}


@pytest.fixture
def store(s3rver: S3rverProcess, s3_credentials: str, monkeypatch: pytest.MonkeyPatch) -> ObjectStore:
    """A store on s3rver's bucket under a prefix of this test's own, built from settings as rpq builds it.
    The secret is the distinctive test one: s3rver checks only the access key id."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3RVER_ACCESS_KEY)
    return ObjectStore.from_settings(Settings(
        s3_bucket=s3rver.bucket, s3_endpoint_url=s3rver.url, s3_region=REGION,
        s3_prefix=f"t-{uuid.uuid4().hex[:12]}"))


def query_of(url: str) -> dict[str, str]:
    pairs = parse_qsl(urlsplit(url).query, keep_blank_values=True, strict_parsing=True)
    assert len(pairs) == len(dict(pairs)), "a query field appears twice"
    return dict(pairs)


def expires_at(url: str) -> float:
    """The instant (Unix time) a SigV4 presigned URL stops working: its signing time plus its lifetime."""
    query = query_of(url)
    signed = calendar.timegm(time.strptime(query["X-Amz-Date"], SIGV4_TIMESTAMP))
    return signed + int(query["X-Amz-Expires"])


def wait_until_past(instant: float) -> None:
    """Wait on the clock until just after `instant`, and no longer; fail if that is more than the 2 s the tests'
    URLs are asked to last (plus a second), rather than wait for a URL that outlives what was asked."""
    wait_until(lambda: time.time() > instant + PAST_EXPIRY, timeout=3, interval=0.01,
               what="the URL's expiry, at most 2 s away, to pass")


def post_signature_matches(fields: dict[str, str], secret: str) -> bool:
    """Whether the form's signature is the one SigV4 gives its base64 policy (what S3 checks a POST by)."""
    request = AWSRequest(method="POST", url="http://unused")
    request.context["timestamp"] = fields["x-amz-date"]
    auth = S3SigV4PostAuth(Credentials(fields["x-amz-credential"].split("/")[0], secret), "s3", REGION)
    return bool(auth.signature(fields["policy"], request) == fields["x-amz-signature"])


def decoded_policy(fields: dict[str, str]) -> dict[str, Any]:
    """The POST policy the form carries, as S3 reads it: base64 of a JSON document."""
    policy: dict[str, Any] = json.loads(base64.b64decode(fields["policy"], validate=True))
    return policy


def refused_as_expired(response: httpx.Response) -> bool:
    return (response.status_code == 403 and "<Code>AccessDenied</Code>" in response.text
            and "Request has expired" in response.text)


def test_a_presigned_get_works_fresh_and_is_refused_just_past_its_expiry(store: ObjectStore) -> None:
    key = store.key_for("job-1", 1, "result.txt")
    store.put(key, b"the result", "text/plain")
    url = store.presign_get(key, expires=2)  # signed to the second: 1 to 2 s of life from now

    fresh = httpx.get(url)
    fresh_at = time.time()
    wait_until_past(expires_at(url))
    expired = httpx.get(url)

    assert fresh_at < expires_at(url)
    assert (fresh.status_code, fresh.content) == (200, b"the result")
    assert refused_as_expired(expired), (expired.status_code, expired.text)
    assert b"the result" not in expired.content


def test_a_presigned_put_stores_fresh_and_just_past_its_expiry_changes_and_creates_nothing(
        store: ObjectStore) -> None:
    used, unused = store.key_for("job-2", 1, "used.bin"), store.key_for("job-2", 1, "unused.bin")
    used_url = store.presign_put(used, "application/octet-stream", 5, expires=2)
    unused_url = store.presign_put(unused, "application/octet-stream", 5, expires=2)
    headers = {"Content-Type": "application/octet-stream"}

    fresh = httpx.put(used_url, content=b"first", headers=headers)
    fresh_at = time.time()
    wait_until_past(max(expires_at(used_url), expires_at(unused_url)))
    again = httpx.put(used_url, content=b"later", headers=headers)
    late = httpx.put(unused_url, content=b"later", headers=headers)

    assert fresh_at < expires_at(used_url)
    assert fresh.status_code == 200
    assert refused_as_expired(again), (again.status_code, again.text)
    assert refused_as_expired(late), (late.status_code, late.text)
    assert store.client.get_object(Bucket=store.bucket, Key=used)["Body"].read() == b"first"
    assert store.head(unused) is None


def test_a_presigned_put_names_exactly_its_bucket_and_key_and_signs_the_method_and_both_headers(
        store: ObjectStore, s3rver: S3rverProcess, s3_credentials: str) -> None:
    key = store.key_for("job-3", 2, "frames/0001 a.png")
    other = store.key_for("job-3", 2, "frames/0002 a.png")

    url = store.presign_put(key, "image/png", 4096, expires=900)
    parts, query = urlsplit(url), query_of(url)

    assert f"{parts.scheme}://{parts.netloc}" == s3rver.url
    assert parts.path == f"/{store.bucket}/{quote(key)}"  # path style: the bucket, then the key, nothing else
    assert set(query) == SIGV4_FIELDS  # no x-id, no checksum, no response-header overrides
    assert query["X-Amz-Algorithm"] == "AWS4-HMAC-SHA256"
    assert query["X-Amz-SignedHeaders"] == "content-length;content-type;host"
    assert query["X-Amz-Expires"] == "900"
    assert query["X-Amz-Credential"] == f"{S3RVER_ACCESS_KEY}/{query['X-Amz-Date'][:8]}/{REGION}/s3/aws4_request"
    headers = {"Content-Type": "image/png", "Content-Length": "4096"}
    assert signature_matches(url, "PUT", headers, s3_credentials)
    elsewhere = {
        "another key": (urlunsplit(parts._replace(path=f"/{store.bucket}/{quote(other)}")), "PUT", headers),
        "another bucket": (urlunsplit(parts._replace(path=f"/rpq-other/{quote(key)}")), "PUT", headers),
        "GET": (url, "GET", headers),
        "POST": (url, "POST", headers),
        "another type": (url, "PUT", {**headers, "Content-Type": "text/html"}),
        "another size": (url, "PUT", {**headers, "Content-Length": "4097"}),
    }
    assert [use for use, (changed, method, sent) in elsewhere.items()
            if signature_matches(changed, method, sent, s3_credentials)] == []


def test_a_presigned_get_names_its_key_and_lasts_what_was_asked(store: ObjectStore, s3_credentials: str) -> None:
    key = store.key_for("job-4", 1, "out.wav")

    url = store.presign_get(key, expires=120)
    query = query_of(url)

    assert urlsplit(url).path == f"/{store.bucket}/{quote(key)}"
    assert set(query) == SIGV4_FIELDS
    assert (query["X-Amz-Expires"], query["X-Amz-SignedHeaders"]) == ("120", "host")
    assert signature_matches(url, "GET", {}, s3_credentials)
    assert not signature_matches(url, "PUT", {}, s3_credentials)


def test_a_presigned_put_without_a_size_signs_the_content_type_only(
        store: ObjectStore, s3_credentials: str) -> None:
    key = store.key_for("job-6", 1, "out.json")

    url = store.presign_put(key, "application/json", None, expires=300)

    assert query_of(url)["X-Amz-SignedHeaders"] == "content-type;host"
    assert signature_matches(url, "PUT", {"Content-Type": "application/json"}, s3_credentials)
    assert not signature_matches(url, "PUT", {"Content-Type": "text/html"}, s3_credentials)


def test_a_presigned_post_signs_a_policy_of_exactly_its_bucket_key_content_type_size_range_and_expiry(
        store: ObjectStore, s3rver: S3rverProcess, s3_credentials: str) -> None:
    key = store.key_for("job-7", 1, "upload 1.png")

    url, fields = store.presign_post(key, "image/png", 5_000_000, expires=600)
    policy = decoded_policy(fields)
    signed_at = calendar.timegm(time.strptime(fields["x-amz-date"], SIGV4_TIMESTAMP))
    expiration = calendar.timegm(time.strptime(str(policy["expiration"]), ISO8601))

    assert url == f"{s3rver.url}/{store.bucket}"  # path style; the key travels in the form, bound by the policy
    assert set(fields) == POST_FIELDS
    assert (fields["key"], fields["Content-Type"]) == (key, "image/png")
    assert sorted(map(json.dumps, policy["conditions"])) == sorted(map(json.dumps, [
        {"Content-Type": "image/png"}, ["content-length-range", 0, 5_000_000], {"bucket": store.bucket},
        {"key": key}, {"x-amz-algorithm": "AWS4-HMAC-SHA256"}, {"x-amz-credential": fields["x-amz-credential"]},
        {"x-amz-date": fields["x-amz-date"]}]))  # exact matches only: no "starts-with" to widen the key or type
    assert 0 <= signed_at + 600 - expiration <= 1  # botocore reads the clock twice, at most a second apart
    assert post_signature_matches(fields, s3_credentials)
    wider = json.dumps({**policy, "conditions": [["content-length-range", 0, 10**10] if isinstance(c, list) else c
                                                 for c in policy["conditions"]]})
    assert not post_signature_matches({**fields, "policy": base64.b64encode(wider.encode()).decode()},
                                      s3_credentials)


def test_a_presigned_posts_form_stores_the_file_at_its_key(store: ObjectStore) -> None:
    key = store.key_for("job-8", 1, "photo.png")
    url, fields = store.presign_post(key, "image/png", 100)

    answer = httpx.post(url, data=fields, files={"file": ("photo.png", b"\x89PNG data", "image/png")})

    assert answer.status_code == 204
    info = store.head(key)
    assert info is not None and (info.size, info.content_type) == (len(b"\x89PNG data"), "image/png")


def test_no_url_holds_the_secret_and_the_access_key_id_only_as_sigv4s_public_credential_scope(
        store: ObjectStore, s3_credentials: str) -> None:
    # SigV4 puts the access key id in every presigned URL (X-Amz-Credential) and POST form (x-amz-credential,
    # also inside the policy): it names the key, like a user name, and is public to whoever holds a URL. Only
    # the secret signs, and it never leaves the process.
    key = store.key_for("job-5", 1, "a.bin")
    urls = [store.presign_get(key), store.presign_get(key, expires=1),
            store.presign_put(key, "application/octet-stream", 10), store.presign_put(key, "text/plain", 0, 60),
            store.presign_put(key, "text/plain", None)]
    post_url, fields = store.presign_post(key, "text/plain", 10)

    for url in urls:
        decoded = unquote(url)
        assert s3_credentials not in decoded and quote(s3_credentials, safe="") not in url
        holding_the_key_id = [name for name, value in query_of(url).items() if S3RVER_ACCESS_KEY in value]
        assert holding_the_key_id == ["X-Amz-Credential"]
        assert query_of(url)["X-Amz-Credential"].split("/")[0] == S3RVER_ACCESS_KEY
        assert decoded.count(S3RVER_ACCESS_KEY) == 1
    form = json.dumps({**fields, "policy": decoded_policy(fields)})
    assert s3_credentials not in post_url + form
    assert [name for name, value in fields.items() if S3RVER_ACCESS_KEY in value] == ["x-amz-credential"]
    assert form.count(S3RVER_ACCESS_KEY) == 2  # the field, and the policy's condition on it
    assert S3RVER_ACCESS_KEY not in post_url
