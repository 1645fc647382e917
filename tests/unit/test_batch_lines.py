"""The lines of a batch job, checked and turned into natserve requests (pure: no server)."""

from __future__ import annotations

import pytest

from broker_client import BadRequest, BatchNames, batch_error_line, parse_batch_lines, parse_jsonl


def test_each_endpoint_becomes_its_operation_and_request() -> None:
    items = parse_batch_lines(
        [
            {
                "custom_id": "c",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": "m",
                    "messages": [{"role": "user", "content": "hi"}],
                    "max_completion_tokens": 3,
                },
            },
            {"custom_id": "g", "url": "/v1/completions", "body": {"prompt": "x", "temperature": 0, "n": 1}},
            {
                "custom_id": "e",
                "url": "/v1/embeddings",
                "body": {"model": "emb", "input": ["a"], "encoding_format": "float"},
            },
        ],
        model="default",
        max_lines=10,
    )
    assert [(i.line, i.custom_id, i.model, i.operation) for i in items] == [
        (1, "c", "m", "chat"),
        (2, "g", "default", "generate"),
        (3, "e", "emb", "embed"),
    ]
    assert items[0].request == {
        "messages": [{"role": "user", "content": "hi"}],
        "generate_config": {"max_tokens": 3},
    }
    assert items[1].request == {"prompt": "x", "generate_config": {"temperature": 0}}
    assert items[2].request == {"input": ["a"]}
    assert items[1].message("batch_x")["custom_id"] == "g"


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ({"custom_id": "a", "url": "/v1/completions", "body": {"prompt": "x", "n": 2}}, "line 1: body.n: 2"),
        (
            {"custom_id": "a", "url": "/v1/completions", "body": {"prompt": "x", "model": "a.b"}},
            "line 1: body.model",
        ),
        (
            {"custom_id": "a\n", "url": "/v1/completions", "body": {"prompt": "x"}},
            "line 1: custom_id: 'a\\n'",
        ),
        (
            {"custom_id": "a", "url": "/v1/embeddings", "body": {"input": "x", "encoding_format": "base64"}},
            "encoding_format",
        ),
        (
            {"custom_id": "a", "url": "/v1/embeddings", "body": {"input": "x", "max_tokens": 2}},
            "body.max_tokens",
        ),
        (
            {"custom_id": "a", "url": "/v1/completions", "body": {"prompt": "x", "top_p": 2}},
            "body.generate_config.top_p",
        ),
        ({"custom_id": "a", "url": "/v1/completions", "body": "x"}, "line 1: body: required, a JSON object"),
        (
            {"custom_id": "a", "url": "/v1/completions", "body": {}, "extra": 1},
            "line 1: extra: unknown field",
        ),
        (
            {
                "custom_id": "a",
                "url": "/v1/completions",
                "body": {"prompt": "x", "max_tokens": 2, "max_completion_tokens": 3},
            },
            "differ",
        ),
        ([1], "line 1: must be a JSON object, got list"),
    ],
)
def test_a_bad_line_names_the_line_and_the_field(line: object, says: str) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_batch_lines([line], model="m", max_lines=10)
    assert says in caught.value.message


def test_bounds_and_jsonl() -> None:
    with pytest.raises(BadRequest, match="no request lines"):
        parse_batch_lines([], max_lines=10)
    with pytest.raises(BadRequest, match="3 request lines; at most 2"):
        parse_batch_lines([{}, {}, {}], max_lines=2)
    # Blank lines are skipped, numbers stay the file's.
    assert parse_jsonl(b'{"a": 1}\n\n{"b": 2}\n') == [(1, {"a": 1}), (3, {"b": 2})]
    with pytest.raises(BadRequest, match="line 2: not a JSON object"):
        parse_jsonl('{"a": 1}\n{oops\n')
    with pytest.raises(BadRequest, match="not UTF-8"):
        parse_jsonl(b"\xff\xfe")


def test_names_and_error_lines() -> None:
    names = BatchNames("a.b")
    assert names.requests_stream("m-1") == "a_b_batch_m-1"
    assert names.requests_subject("m-1", "batch_1") == "a.b.batches.requests.m-1.batch_1"
    assert names.results_subject("batch_1") == "a.b.batches.results.batch_1"
    assert names.jobs_bucket == "a_b_batches" and names.files_bucket == "a_b_files"
    assert names.msg_id("batch_1", "c 1") == "batch_1:c 1"
    line = batch_error_line("r", "c", 400, "bad", "BadRequest")
    assert line["error"] == {"code": "BadRequest", "message": "bad"}
    assert line["response"]["status_code"] == 400
