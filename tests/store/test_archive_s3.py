"""The archive level over s3:// for real: s3fs against a local S3 server (moto's, on 127.0.0.1),
configured the way a user configures it — the endpoint from ``AWS_ENDPOINT_URL_S3`` or from
fsspec's config (what ``FSSPEC_S3_ENDPOINT_URL`` fills), credentials from the environment.

Experts fetched by byte range from the bucket give logits bitwise those of the resident model;
an expert shard overwritten in the bucket after loading, a missing bucket, key or shard are one
sentence naming the s3:// URL, and no output."""

from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("s3fs", reason="s3:// needs s3fs (in the test extra)")
moto_server = pytest.importorskip("moto.server", reason="the local S3 server is moto's (in the test extra)")
boto3 = pytest.importorskip("boto3")

import fsspec.config  # noqa: E402
import s3fs  # noqa: E402

from lite_llm.errors import CheckpointError  # noqa: E402
from lite_llm.store import load_with_store  # noqa: E402

from .test_archive import _logits, resident_logits  # noqa: E402,F401  (the resident model's logits, a fixture)
from .test_store import EXPERT_A, checkpoint  # noqa: E402,F401  (the module's checkpoint fixture)

BUCKET = "lite-llm-test"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """(endpoint, boto3 client) of a moto S3 server on 127.0.0.1 holding an empty bucket, with
    dummy credentials in the environment and no ~/.aws, profile or instance metadata read."""
    none = tmp_path_factory.mktemp("no-aws") / "absent"
    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL"):
            mp.delenv(name, raising=False)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_CONFIG_FILE", str(none))
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(none))
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            endpoint = f"http://{host}:{port}"
            client = boto3.client("s3", endpoint_url=endpoint)
            client.create_bucket(Bucket=BUCKET)
            yield endpoint, client
        finally:
            server.stop()
            s3fs.S3FileSystem.clear_instance_cache()  # no instance bound to this endpoint outlives it


@pytest.fixture()
def endpoint(request, s3, monkeypatch):
    """The endpoint set the way a user sets it: ``AWS_ENDPOINT_URL_S3`` (botocore; the default
    here), or with ``indirect`` param "fsspec-config" fsspec's config for the s3 protocol (what
    ``FSSPEC_S3_ENDPOINT_URL`` or ~/.config/fsspec/*.json fill when fsspec is imported)."""
    url, _ = s3
    s3fs.S3FileSystem.clear_instance_cache()  # a cached instance keeps the endpoint it was made with
    if getattr(request, "param", "aws-env") == "aws-env":
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", url)
    else:
        monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
        monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": url})
    yield url
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture()
def uploaded(request, s3, endpoint, checkpoint):  # noqa: F811
    """The checkpoint's files uploaded under a prefix of this test's own; its s3:// URL."""
    _, client = s3
    prefix = re.sub(r"[^A-Za-z0-9_-]+", "-", request.node.name).strip("-")
    for path in sorted(p for p in checkpoint.rglob("*") if p.is_file()):
        client.put_object(Bucket=BUCKET, Key=f"{prefix}/{path.relative_to(checkpoint).as_posix()}", Body=path.read_bytes())
    return f"s3://{BUCKET}/{prefix}", prefix


def _expert_shards(checkpoint):  # noqa: F811
    shards = sorted(p.relative_to(checkpoint).as_posix() for p in checkpoint.rglob("*-experts.safetensors"))
    assert shards, "the test checkpoint has expert shards"
    return shards


@pytest.mark.parametrize("endpoint", ["aws-env", "fsspec-config"], indirect=True)
def test_experts_over_s3_are_bitwise_the_resident_model(uploaded, resident_logits):
    url, _ = uploaded
    stored = load_with_store(url, hot_budget=2 * EXPERT_A, warm_budget=4 * EXPERT_A)
    assert torch.equal(_logits(stored.model), resident_logits)
    stats = stored.store.stats()
    assert stats.cold_reads > 0 and stats.hot.evictions > 0  # experts fetched by range, more than once
    assert stored.tokenizer is not None
    assert torch.equal(_logits(stored.model), resident_logits)  # again, after evictions: refetched experts


@pytest.mark.parametrize("how,message", [
    ("flipped", r"does not match its sha256 in the manifest; nothing was computed with it"),  # same length, other bytes
    # the first expert fetched straddles the new end (a short answer) or lies past it (416), as the routing has it
    ("short", r"asked for \d+ bytes, got 64 .*; nothing was used|could not be read from s3://.*not satisfiable"),
    ("headers-only", r"could not be read from s3://.*not satisfiable"),  # ranges past the end: S3 answers 416
], ids=["flipped", "short", "headers-only"])
def test_an_expert_shard_changed_in_the_bucket_is_one_sentence_and_no_output(uploaded, checkpoint, s3, how, message):  # noqa: F811
    url, prefix = uploaded
    _, client = s3
    stored = load_with_store(url, hot_budget=2 * EXPERT_A)
    for shard in _expert_shards(checkpoint):  # rewritten after loading: the headers read at open no longer vouch for the bytes
        data = bytearray((checkpoint / shard).read_bytes())
        start = 8 + int.from_bytes(data[:8], "little")
        body = {"flipped": data[:start] + data[start:].translate(bytes(range(255, -1, -1))), "short": data[: start + 64], "headers-only": data[:start]}[how]
        client.put_object(Bucket=BUCKET, Key=f"{prefix}/{shard}", Body=bytes(body))
    out = None
    with pytest.raises(CheckpointError, match=message) as err:
        out = _logits(stored.model)
    assert out is None
    text = str(err.value)
    assert re.search(r"expert \d+ of tier tier_[ab] in layer \d", text), text
    assert f"{url}/" in text and "\n" not in text


@pytest.mark.parametrize("where", ["bucket", "key", "expert shard"])
def test_a_missing_bucket_key_or_shard_is_one_sentence_naming_the_url(uploaded, checkpoint, s3, where):  # noqa: F811
    url, prefix = uploaded
    _, client = s3
    if where == "bucket":
        url, missing = f"s3://no-such-bucket-here/{prefix}", f"the manifest is not at s3://no-such-bucket-here/{prefix}/manifest.json"
    elif where == "key":
        url, missing = f"{url}-nothing", f"the manifest is not at {url}-nothing/manifest.json"
    else:
        shard = _expert_shards(checkpoint)[0]
        client.delete_object(Bucket=BUCKET, Key=f"{prefix}/{shard}")
        missing = f"a shard header is not at {url}/{shard}"
    with pytest.raises(CheckpointError) as err:
        load_with_store(url, hot_budget=2 * EXPERT_A)
    text = str(err.value)
    assert text.startswith(missing) and "upload the whole checkpoint there" in text and "\n" not in text, text
