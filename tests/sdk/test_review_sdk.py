"""The official `openai` Python SDK against an answer held for human review (run by
tests/review.rs, as the README's snippet does it).

  test_review_sdk.py hold                  generate; the SDK must raise APIStatusError with
                                           code "pending_review" (423) without retrying, and a
                                           poll must raise it again; prints the trace id last.
  test_review_sdk.py collect TRACE_ID B64  poll once approved: an ImagesResponse whose b64_json
                                           is B64 exactly.
Environment: ACC_BASE_URL (http://127.0.0.1:PORT/v1), ACC_API_KEY.
"""

import os
import sys

import openai
from openai import OpenAI


def main() -> int:
    # Retries allowed: the gateway's answer must be what stops them.
    client = OpenAI(base_url=os.environ["ACC_BASE_URL"], api_key=os.environ["ACC_API_KEY"], max_retries=3, timeout=60)
    if sys.argv[1] == "hold":
        try:
            client.images.generate(model="m", prompt="a lighthouse", response_format="b64_json")
        except openai.APIStatusError as e:
            assert e.status_code == 423, e.status_code
            assert e.code == "pending_review", e.code
            assert e.response.headers["x-should-retry"] == "false"
            trace_id = e.response.headers["x-acc-trace-id"]
            assert trace_id in e.message, e.message
        else:
            raise AssertionError("generate did not raise pending_review")
        try:
            client.get(f"/images/reviews/{trace_id}", cast_to=openai.types.ImagesResponse)
        except openai.APIStatusError as e:
            assert e.code == "pending_review", e.code
        else:
            raise AssertionError("the poll did not raise pending_review")
        print(trace_id)
        return 0
    trace_id, expected = sys.argv[2], sys.argv[3]
    image = client.get(f"/images/reviews/{trace_id}", cast_to=openai.types.ImagesResponse)
    assert len(image.data) == 1, image
    assert image.data[0].b64_json == expected, "b64_json differs from the provider's"
    print("collected")
    return 0


if __name__ == "__main__":
    sys.exit(main())
