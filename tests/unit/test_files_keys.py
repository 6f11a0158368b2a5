"""Object keys for job outputs, and the client settings the store picks for each kind of endpoint."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jobs.bucket.store import ObjectStore
from jobs.errors import InvalidObjectName
from jobs.settings import Settings


def offline_store(prefix: str = "rpq") -> ObjectStore:
    return ObjectStore(None, bucket="rpq-files", prefix=prefix, presign_seconds=3600)


def test_an_output_key_is_the_prefix_the_job_the_attempt_and_the_name() -> None:
    assert offline_store("prod/rpq").key_for("0b1c-job", 3, "frames/0001.png") == \
        "prod/rpq/jobs/0b1c-job/3/out/frames/0001.png"


@pytest.mark.parametrize("name", [
    "", "/etc/passwd", "../other-job/out/x", "a/../../b", "a//b", "a/./b", "dir/", ".", "line\nbreak",
    "tab\there", "x" * 256,
])
def test_a_name_that_could_leave_its_folder_or_blur_a_key_is_refused(name: str) -> None:
    with pytest.raises(InvalidObjectName) as caught:
        offline_store().key_for("job-1", 1, name)

    assert caught.value.problems
    assert all(problem.startswith("name:") for problem in caught.value.problems)


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(InvalidObjectName) as caught:
        offline_store().key_for("../job", 0, "/..")

    assert [problem.split(":")[0] for problem in caught.value.problems] == ["name", "name", "job_id", "attempt"]


@given(st.text(max_size=300))
def test_any_name_gives_a_key_inside_the_attempts_folder_or_a_clear_refusal(name: str) -> None:
    folder = "rpq/jobs/job-1/2/out/"
    try:
        key = offline_store().key_for("job-1", 2, name)
    except InvalidObjectName as refused:
        assert refused.problems
    else:
        assert key == folder + name
        assert not {".", "..", ""} & set(name.split("/"))
        assert key.isprintable() and len(key.encode()) <= 1024


@pytest.mark.usefixtures("s3_credentials")  # boto3 reads its chain when the client is made: keep it to the test's
def test_an_r2_endpoint_signs_for_region_auto_with_path_style_and_no_default_checksums() -> None:
    store = ObjectStore.from_settings(Settings(
        s3_bucket="rpq-files", s3_endpoint_url="https://0123abcd.r2.cloudflarestorage.com"))
    config = store.client.meta.config

    assert store.client.meta.region_name == "auto"
    assert config.s3["addressing_style"] == "path"
    assert (config.request_checksum_calculation, config.response_checksum_validation) == (
        "when_required", "when_required")
    assert config.signature_version == "s3v4"


@pytest.mark.usefixtures("s3_credentials")
def test_aws_keeps_boto3s_addressing_and_the_region_it_is_given() -> None:
    store = ObjectStore.from_settings(Settings(s3_bucket="rpq-files", s3_region="eu-west-1"))

    assert store.client.meta.region_name == "eu-west-1"
    assert store.client.meta.config.s3["addressing_style"] == "auto"
