"""The official `openai` Python SDK against a running acc gateway.

Run by tests/sdk.rs with:
  ACC_BASE_URL   http://127.0.0.1:PORT/v1 (proxy listener)
  ACC_API_KEY    a client key the gateway's policy accepts
Exits non-zero (with a traceback) on the first failed check.
"""

import base64
import os
import struct
import sys
import urllib.request

import openai
from openai import OpenAI

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_dims(data: bytes):
    assert data[:8] == PNG_SIGNATURE, f"not a PNG: {data[:8]!r}"
    assert data[12:16] == b"IHDR", "first chunk is not IHDR"
    return struct.unpack(">II", data[16:24])


def main() -> int:
    base_url = os.environ["ACC_BASE_URL"]
    api_key = os.environ["ACC_API_KEY"]
    print(f"openai {openai.__version__} against {base_url}")
    client = OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=60)

    # b64_json, n=2
    resp = client.images.generate(
        model="acc-demo", prompt="a watercolor fox", n=2, size="256x256", response_format="b64_json"
    )
    assert len(resp.data) == 2, resp
    images = [base64.b64decode(d.b64_json) for d in resp.data]
    for img in images:
        assert png_dims(img) == (256, 256), png_dims(img)
    assert images[0] != images[1], "n=2 must give two different images"
    assert isinstance(resp.created, int) and resp.created > 0, resp.created
    print("ok: b64_json n=2")

    # url, n=2, fetched with plain urllib (no auth)
    resp = client.images.generate(
        model="acc-demo", prompt="a watercolor fox", n=2, size="1792x1024", response_format="url"
    )
    assert len(resp.data) == 2, resp
    for d in resp.data:
        assert d.url and d.url.startswith("http"), d
        with urllib.request.urlopen(d.url, timeout=60) as r:
            assert r.status == 200, r.status
            assert r.headers.get("content-type") == "image/png", r.headers.get("content-type")
            body = r.read()
        assert png_dims(body) == (1792, 1024), png_dims(body)
    print("ok: url n=2")

    # Gateway extensions through the SDK: seed via extra_body, headers via with_raw_response.
    raw = client.images.with_raw_response.generate(
        model="acc-demo",
        prompt="a lighthouse",
        size="256x256",
        response_format="b64_json",
        extra_body={"seed": 11},
    )
    assert raw.headers.get("x-acc-route") == "demo", dict(raw.headers)
    assert raw.headers.get("x-acc-provider") == "demo", dict(raw.headers)
    # The SDK's request id is the gateway's trace id.
    assert raw.parse()._request_id == raw.headers.get("x-acc-trace-id"), (raw.parse()._request_id, dict(raw.headers))
    first = base64.b64decode(raw.parse().data[0].b64_json)
    again = client.images.generate(
        model="acc-demo", prompt="a lighthouse", size="256x256", response_format="b64_json", extra_body={"seed": 11}
    )
    assert base64.b64decode(again.data[0].b64_json) == first, "same prompt + seed must give the same image"
    print("ok: seed + headers")

    # gpt-image-1 code: no response_format (OpenAI always answers that model with b64_json),
    # reads data[0].b64_json and the response object's other fields, usage included.
    resp = client.images.generate(model="gpt-image-1", prompt="a product shot")
    assert resp.data[0].b64_json == os.environ["ACC_GPT_IMAGE_B64"], "the upstream's image, as b64_json"
    assert resp.data[0].url is None, resp.data[0]
    assert resp.usage is not None, resp
    assert (resp.usage.input_tokens, resp.usage.output_tokens, resp.usage.total_tokens) == (22, 272, 294), resp.usage
    assert resp.usage.input_tokens_details.text_tokens == 22, resp.usage
    assert resp.usage.input_tokens_details.image_tokens == 0, resp.usage
    assert (resp.background, resp.output_format, resp.quality, resp.size) == ("opaque", "png", "medium", "1024x1024"), resp
    # Asked for explicitly, url still wins over the model's default.
    resp = client.images.generate(model="gpt-image-1", prompt="a product shot", response_format="url")
    assert resp.data[0].url and resp.data[0].b64_json is None, resp.data[0]
    assert resp.usage.total_tokens == 294, resp.usage
    print("ok: gpt-image-1 defaults and usage")

    # models
    ids = [m.id for m in client.models.list()]
    assert "acc-demo" in ids, ids
    print("ok: models.list")

    # Unknown model -> NotFoundError
    try:
        client.images.generate(model="no-such-model", prompt="x")
    except openai.NotFoundError as e:
        assert e.status_code == 404, e.status_code
        assert e.code == "model_not_found", e.code
    else:
        raise AssertionError("unknown model did not raise openai.NotFoundError")
    print("ok: NotFoundError")

    # Out-of-range n -> BadRequestError naming the parameter
    try:
        client.images.generate(model="acc-demo", prompt="x", n=11)
    except openai.BadRequestError as e:
        assert e.status_code == 400, e.status_code
        assert e.param == "n", e.param
        assert e.code == "invalid_value", e.code
    else:
        raise AssertionError("n=11 did not raise openai.BadRequestError")
    print("ok: BadRequestError")

    # Wrong key -> AuthenticationError
    wrong = OpenAI(base_url=base_url, api_key="sk-definitely-wrong", max_retries=0, timeout=60)
    try:
        wrong.images.generate(model="acc-demo", prompt="x", size="256x256")
    except openai.AuthenticationError as e:
        assert e.status_code == 401, e.status_code
        assert e.code == "invalid_api_key", e.code
    else:
        raise AssertionError("wrong key did not raise openai.AuthenticationError")
    print("ok: AuthenticationError")

    # Idempotency-Key through extra_headers: the retry is replayed, not generated again.
    key = {"Idempotency-Key": "sdk-idem-1"}
    first = client.images.with_raw_response.generate(
        model="acc-demo", prompt="an idempotent fox", size="256x256", response_format="b64_json", extra_headers=key
    )
    again = client.images.with_raw_response.generate(
        model="acc-demo", prompt="an idempotent fox", size="256x256", response_format="b64_json", extra_headers=key
    )
    assert first.headers.get("x-acc-idempotent-replay") is None, dict(first.headers)
    assert again.headers.get("x-acc-idempotent-replay") == "true", dict(again.headers)
    assert again.headers.get("x-acc-trace-id") == first.headers.get("x-acc-trace-id"), "a replay is the same answer"
    assert again.parse().data[0].b64_json == first.parse().data[0].b64_json
    try:
        client.images.generate(
            model="acc-demo", prompt="another prompt", size="256x256", response_format="b64_json", extra_headers=key
        )
    except openai.ConflictError as e:
        assert e.status_code == 409 and e.code == "idempotency_key_reused", (e.status_code, e.code)
    else:
        raise AssertionError("a reused Idempotency-Key with another body did not raise openai.ConflictError")
    print("ok: Idempotency-Key")

    # Over a key's rate limit -> RateLimitError, with Retry-After for the SDK's own retries.
    limited = OpenAI(base_url=base_url, api_key=os.environ["ACC_LIMITED_KEY"], max_retries=0, timeout=60)
    limited.images.generate(model="acc-demo", prompt="x", size="256x256", response_format="b64_json")
    try:
        limited.images.generate(model="acc-demo", prompt="x", size="256x256", response_format="b64_json")
    except openai.RateLimitError as e:
        assert e.status_code == 429, e.status_code
        assert e.code == "rate_limit_exceeded", e.code
        assert int(e.response.headers["retry-after"]) >= 1, dict(e.response.headers)
    else:
        raise AssertionError("the second request in a minute did not raise openai.RateLimitError")
    print("ok: RateLimitError")
    return 0


if __name__ == "__main__":
    sys.exit(main())
