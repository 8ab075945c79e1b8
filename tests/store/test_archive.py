"""The archive level: experts by byte range from a URL — a local HTTP server on 127.0.0.1 that
honours Range requests, and file:// — bitwise equal to the resident model; a server that fails
or answers with other bytes is one sentence naming the expert and the URL, and no output."""

from __future__ import annotations

import functools
import http.server
import re
import threading
from pathlib import Path

import pytest
import torch

from lite_llm.checkpoint import load_checkpoint
from lite_llm.errors import CheckpointError
from lite_llm.store import load_with_store

from .test_store import EXPERT_A, PROMPT, checkpoint  # noqa: F401  (the module's checkpoint fixture)


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with ``Range: bytes=a-b`` (which http.server lacks), and switchable faults
    for requests of expert shards: ``fault`` = None, "error" (HTTP 500) or "corrupt" (a flipped byte)."""

    fault: str | None = None

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):  # noqa: N802
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        expert_shard = path.name.endswith("-experts.safetensors")
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if match and expert_shard and int(match.group(1)) >= 8 + 2**12 and self.fault == "error":
            self.send_error(500, "disk on fire")
            return
        if match:
            start, end = int(match.group(1)), int(match.group(2) or len(data) - 1)
            body = bytearray(data[start : end + 1])
            if expert_shard and self.fault == "corrupt" and len(body) > 1000:
                body[len(body) // 2] ^= 0xFF
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{start + len(body) - 1}/{len(data)}")
        else:
            body = bytearray(data)
            self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(bytes(body))


@pytest.fixture()
def server(checkpoint):  # noqa: F811
    handler = type("Handler", (_RangeHandler,), {"fault": None})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(checkpoint)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd, handler, f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def _logits(model):
    with torch.no_grad():
        return model(PROMPT).logits


@pytest.fixture(scope="module")
def resident_logits(checkpoint):  # noqa: F811
    return _logits(load_checkpoint(checkpoint).model.eval())


def test_experts_over_http_are_bitwise_the_resident_model(server, resident_logits):
    _, _, url = server
    stored = load_with_store(url, hot_budget=2 * EXPERT_A, warm_budget=4 * EXPERT_A)
    assert torch.equal(_logits(stored.model), resident_logits)
    assert stored.store.stats().cold_reads > 0 and stored.tokenizer is not None


def test_experts_from_a_file_url(checkpoint, resident_logits):  # noqa: F811
    stored = load_with_store(checkpoint.resolve().as_uri(), hot_budget=EXPERT_A)
    assert torch.equal(_logits(stored.model), resident_logits)


@pytest.mark.parametrize("fault,message", [("error", "could not be read from http://127.0.0.1"), ("corrupt", "does not match its sha256 in the manifest")])
def test_a_failing_or_lying_server_is_one_sentence_and_no_output(server, fault, message):
    _, handler, url = server
    stored = load_with_store(url, hot_budget=2 * EXPERT_A)
    handler.fault = fault
    with pytest.raises(CheckpointError, match=message) as err:
        _logits(stored.model)
    assert re.search(r"expert \d+ of tier tier_[ab] in layer \d", str(err.value)) and "\n" not in str(err.value)


def test_an_unreachable_archive_is_one_sentence():
    with pytest.raises(CheckpointError, match="could not be read from http://127.0.0.1:9/manifest.json"):
        load_with_store("http://127.0.0.1:9", hot_budget="1MB")


def test_a_bad_manifest_at_a_url_is_named_by_its_url(checkpoint, tmp_path):  # noqa: F811
    """The URL stays a URL in the message (a Path would fold ``file://`` into ``file:/``)."""
    import json
    import shutil

    copy = tmp_path / "ckpt"
    shutil.copytree(checkpoint, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["model_config"]["d_model"] = "wide"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    url = copy.resolve().as_uri()
    with pytest.raises(CheckpointError) as err:
        load_with_store(url, hot_budget="1MB")
    assert str(err.value).startswith(f"{url}/manifest.json holds an invalid model_config")


def test_a_server_that_never_answers_times_out_in_words(monkeypatch):
    """aiohttp's default waited 5 minutes in all and then gave an empty reason."""
    import socket
    import time

    import lite_llm.store.archive as archive

    monkeypatch.setattr(archive, "HTTP_TIMEOUT_S", 1.0)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    held = []
    threading.Thread(target=lambda: held.append(listener.accept()), daemon=True).start()  # accepts, then says nothing
    start = time.monotonic()
    try:
        with pytest.raises(CheckpointError, match=r"the manifest could not be read from .*: the server sent nothing for 1 s"):
            load_with_store(f"http://127.0.0.1:{listener.getsockname()[1]}/ckpt", hot_budget="1MB")
    finally:
        listener.close()
    assert time.monotonic() - start < 30
