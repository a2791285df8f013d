"""The official `openai` Python SDK consuming an image stream through an acc gateway.

Run by tests/streaming.rs with:
  ACC_BASE_URL                 http://127.0.0.1:PORT/v1 (proxy listener, no client keys)
  ACC_PARTIAL_0, ACC_PARTIAL_1 the base64 of the upstream's two partial images
  ACC_FINAL                    the base64 of its final image
Exits non-zero (with a traceback) on the first failed check.
"""

import os
import sys

import openai
from openai import OpenAI


def main() -> int:
    client = OpenAI(base_url=os.environ["ACC_BASE_URL"], api_key="unused", max_retries=0, timeout=60)
    print(f"openai {openai.__version__}")

    stream = client.images.generate(
        model="gpt-image-1", prompt="a lighthouse at dusk", size="256x256", stream=True, partial_images=2
    )
    events = list(stream)
    kinds = [e.type for e in events]
    assert kinds == [
        "image_generation.partial_image",
        "image_generation.partial_image",
        "image_generation.completed",
    ], kinds
    assert [e.partial_image_index for e in events[:2]] == [0, 1], events[:2]
    assert events[0].b64_json == os.environ["ACC_PARTIAL_0"]
    assert events[1].b64_json == os.environ["ACC_PARTIAL_1"]
    done = events[2]
    assert done.b64_json == os.environ["ACC_FINAL"]
    assert (done.size, done.quality, done.background, done.output_format) == ("256x256", "medium", "opaque", "png"), done
    assert done.usage.total_tokens == 494 and done.usage.input_tokens_details.text_tokens == 22, done.usage
    print(f"ok: stream of {len(events)} events")

    # A bad partial_images is refused before any event, as an OpenAI error the SDK raises.
    try:
        list(client.images.generate(model="gpt-image-1", prompt="x", stream=True, partial_images=5))
    except openai.BadRequestError as e:
        assert e.code == "invalid_value" and e.param == "partial_images", e
        print("ok: partial_images=5 refused")
    else:
        raise AssertionError("partial_images=5 was accepted")
    return 0


if __name__ == "__main__":
    sys.exit(main())
