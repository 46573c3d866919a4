import json

import pytest

from serving.admission.outcomes import HTTP_ERRORS, AdmissionError, Outcome, error_response

EXPECTED = {
    Outcome.REJECTED_INVALID_KEY: (401, "invalid_api_key", False),
    Outcome.REJECTED_CONCURRENCY_LIMIT: (429, "concurrency_limit_exceeded", True),
    Outcome.REJECTED_QUEUE_FULL: (503, "server_overloaded", True),
    Outcome.EVICTED_QUEUE_TIMEOUT: (503, "queue_timeout", True),
    Outcome.REJECTED_DRAINING: (503, "draining", True),
    Outcome.REJECTED_CONTEXT_LENGTH: (400, "context_length_exceeded", False),
    Outcome.REJECTED_LEDGER_UNAVAILABLE: (503, "ledger_unavailable", True),
    Outcome.REJECTED_EXCEEDS_PLAN: (400, "request_exceeds_plan", False),
    Outcome.REJECTED_BODY_TOO_LARGE: (413, "request_too_large", False),
    Outcome.REJECTED_BODY_TIMEOUT: (408, "request_timeout", False),
    Outcome.REJECTED_INVALID_JSON: (400, "invalid_json", False),
    Outcome.REJECTED_INVALID_IMAGE: (400, "invalid_image", False),
    Outcome.REJECTED_IMAGE_TOO_LARGE: (400, "image_too_large", False),
    Outcome.REJECTED_IMAGE_URL: (400, "image_url_not_allowed", False),
    Outcome.REJECTED_UNSUPPORTED_MEDIA: (400, "unsupported_media", False),
    Outcome.REJECTED_TOO_MANY_IMAGES: (400, "too_many_images", False),
    Outcome.REJECTED_NOT_FOUND: (404, "not_found", False),
    Outcome.REJECTED_ENGINE_FAILED: (503, "engine_unavailable", True),
    Outcome.EVICTED_ENGINE_FAILED: (503, "engine_unavailable", True),
    Outcome.EVICTED_DRAINED: (503, "draining", True),
    Outcome.REJECTED_INVALID_PRIORITY: (400, "invalid_priority", False),
    Outcome.REJECTED_PRIORITY_NOT_ALLOWED: (403, "priority_not_allowed", False),
}
# The successes, and the ends whose client gets nothing (it left, or stopped reading).
NO_RESPONSE = {Outcome.ADMITTED, Outcome.COMPLETED, Outcome.EVICTED_CLIENT_GONE, Outcome.EVICTED_CLIENT_STALLED}


def test_every_refusal_has_exactly_one_http_mapping():
    refusals = {o for o in Outcome if o not in NO_RESPONSE}
    assert set(HTTP_ERRORS) == refusals == set(EXPECTED)


@pytest.mark.parametrize("outcome", list(EXPECTED))
def test_outcome_to_response(outcome):
    status, code, retry = EXPECTED[outcome]
    got_status, headers, body = error_response(
        AdmissionError(outcome, "why", retry_after_s=2.2), {"x-ratelimit-limit-concurrency": "2"}
    )
    headers = dict(headers)
    assert got_status == status
    assert json.loads(body) == {
        "error": {"message": "why", "type": HTTP_ERRORS[outcome].type, "param": None, "code": code}
    }
    assert (b"retry-after" in headers) is retry
    if retry:
        assert headers[b"retry-after"] == b"3"  # rounded up, whole seconds
    assert headers[b"x-ratelimit-limit-concurrency"] == b"2"
    assert headers[b"content-length"] == str(len(body)).encode()


def test_outcome_values_are_metric_labels_by_family():
    for outcome in Outcome:
        assert outcome.value in ("admitted", "completed") or outcome.value.startswith(("rejected_", "evicted_"))
