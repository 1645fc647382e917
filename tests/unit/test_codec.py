"""broker_client's codec: the encoding detection rule, round trips, and garbage as a 400."""

from __future__ import annotations

import json

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel

from broker_client import BadRequest, codec
from broker_client.codec import JSON, MSGPACK, decode, detect, encode


class TestDetect:
    @pytest.mark.parametrize(
        "header, expected",
        [
            ("application/json", JSON),
            ("application/json; charset=utf-8", JSON),
            ("Application/JSON", JSON),
            ("text/json", JSON),
            ("application/msgpack", MSGPACK),
            ("application/x-msgpack", MSGPACK),
            ("application/vnd.msgpack", MSGPACK),
        ],
    )
    def test_header_wins_over_the_body(self, header: str, expected: str) -> None:
        # A msgpack body that happens to start with '{' (0x7b is a positive fixint) must not
        # be taken for JSON when the header says otherwise, and vice versa.
        assert detect(b"{", {"Content-Type": header}) == expected
        assert detect(b"\x81", {"Content-Type": header}) == expected

    def test_lowercase_header_name_is_read(self) -> None:
        assert detect(b"\x80", {"content-type": "application/json"}) == JSON

    def test_unsupported_content_type_is_a_bad_request_naming_it(self) -> None:
        with pytest.raises(BadRequest) as info:
            detect(b"{}", {"Content-Type": "text/plain"})
        assert "'text/plain'" in info.value.message
        assert info.value.code == 400

    @pytest.mark.parametrize("body", [b"{}", b"[1]", b'  \n\t{"a": 1}', b"\r\n[]"])
    def test_object_or_array_without_header_is_json(self, body: bytes) -> None:
        assert detect(body) == JSON
        assert detect(body, {}) == JSON
        # Headers present but without a Content-Type still fall back to sniffing.
        assert detect(body, {"Natserve-Request-Id": "x"}) == JSON

    @pytest.mark.parametrize("body", [b"\x81\xa1a\x01", b"\x90", b"hello", b"\x00"])
    def test_anything_else_without_header_is_msgpack(self, body: bytes) -> None:
        assert detect(body) == MSGPACK

    @given(st.binary(max_size=8), st.sampled_from([JSON, MSGPACK]))
    def test_a_header_is_left_out_only_where_the_rule_reads_the_body_right(
        self, body: bytes, content_type: str
    ) -> None:
        if codec.detect_unambiguous(body, content_type):
            assert detect(body) == content_type

    @given(
        st.recursive(
            st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=5),
            lambda inner: (
                st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
            ),
            max_leaves=8,
        ).filter(lambda v: isinstance(v, (dict, list)))
    )
    def test_what_a_transport_sends_needs_no_header(self, value: object) -> None:
        # Objects and arrays, natserve's request bodies, in either encoding.
        for content_type in (JSON, MSGPACK):
            assert codec.detect_unambiguous(encode(value, content_type), content_type)

    @pytest.mark.parametrize("body", [b"{", b"[", b" ", b"\x00"])
    def test_msgpack_that_starts_like_json_or_blank_keeps_its_header(self, body: bytes) -> None:
        # 0x7b and 0x5b are positive fixints ({ and [); a blank is skipped by the rule.
        assert not codec.detect_unambiguous(body, MSGPACK) or detect(body) == MSGPACK

    @pytest.mark.parametrize("body", [b"", b"  ", b"\r\n"])
    def test_empty_body_without_header_is_json(self, body: bytes) -> None:
        # `nats req subject ""` must get a reply a person can read.
        assert detect(body) == JSON
        assert detect(body, {"Content-Type": MSGPACK}) == MSGPACK


class TestDecode:
    @pytest.mark.parametrize("content_type", [JSON, MSGPACK])
    @pytest.mark.parametrize("body", [b"", b" ", b"\n\t\r "])
    def test_empty_or_blank_body_means_no_parameters(self, body: bytes, content_type: str) -> None:
        assert decode(body, content_type) == {}

    def test_json(self) -> None:
        assert decode(b'{"prompt": "hi", "n": [1, 2]}', JSON) == {"prompt": "hi", "n": [1, 2]}

    def test_msgpack(self) -> None:
        assert decode(msgpack.packb({"prompt": "hi", 1: b"x"}), MSGPACK) == {"prompt": "hi", 1: b"x"}

    @pytest.mark.parametrize("body", [b'{"prompt": ', b"{'single': 1}", b'{"a": 1} trailing', b"\xff{"])
    def test_malformed_json_is_a_bad_request_saying_so(self, body: bytes) -> None:
        with pytest.raises(BadRequest) as info:
            decode(body, JSON)
        assert info.value.message.startswith("malformed JSON body")
        assert info.value.code == 400

    @pytest.mark.parametrize("body", [b"\xc1", b"\x92\x01", b"garbage", b"\xff\xff"])
    def test_garbage_msgpack_is_a_bad_request_with_a_hint(self, body: bytes) -> None:
        with pytest.raises(BadRequest) as info:
            decode(body, MSGPACK)
        message = info.value.message
        assert message.startswith("malformed msgpack body")
        # The hint tells a `nats req` user how to get JSON understood.
        assert "JSON" in message and "Content-Type" in message

    def test_the_cause_is_chained(self) -> None:
        with pytest.raises(BadRequest) as info:
            decode(b"{", JSON)
        assert isinstance(info.value.__cause__, ValueError)


class _Point(BaseModel):
    x: int
    y: float


class _Scalar:
    """Stands for a numpy or torch scalar: anything with ``.item()``."""

    def item(self) -> int:
        return 7


class _Array:
    """Stands for a numpy array: anything with ``.tolist()``."""

    def tolist(self) -> list[float]:
        return [0.5, 1.5]


class TestEncode:
    VALUE = {"text": "héllo ✓", "n": 3, "f": 0.25, "none": None, "list": [1, "a", True], "nested": {"k": []}}

    @pytest.mark.parametrize("content_type", [JSON, MSGPACK])
    def test_round_trip(self, content_type: str) -> None:
        data = encode(self.VALUE, content_type)
        assert decode(data, detect(data, {"Content-Type": content_type})) == self.VALUE

    def test_json_is_compact_utf8_and_sniffed_as_json(self) -> None:
        data = encode(self.VALUE, JSON)
        assert "héllo ✓".encode() in data
        assert b", " not in data
        assert detect(data) == JSON
        assert json.loads(data) == self.VALUE

    def test_msgpack_map_is_sniffed_as_msgpack(self) -> None:
        assert detect(encode({"a": 1}, MSGPACK)) == MSGPACK

    @pytest.mark.parametrize("content_type", [JSON, MSGPACK])
    def test_models_and_array_likes_are_encoded(self, content_type: str) -> None:
        value = {"point": _Point(x=1, y=2.5), "scalar": _Scalar(), "array": _Array()}
        decoded = decode(encode(value, content_type), content_type)
        assert decoded == {"point": {"x": 1, "y": 2.5}, "scalar": 7, "array": [0.5, 1.5]}

    @pytest.mark.parametrize("content_type", [JSON, MSGPACK])
    def test_unknown_objects_are_refused_by_name(self, content_type: str) -> None:
        class Opaque:
            pass

        with pytest.raises(TypeError, match="Opaque"):
            encode({"x": Opaque()}, content_type)

    def test_header_name_constant(self) -> None:
        assert codec.CONTENT_TYPE == "Content-Type"
