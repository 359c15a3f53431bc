"""Safetensors reader/writer faults: bad headers, bad spans, truncation, non-regular files."""

from __future__ import annotations

import copy
import json
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import safetensors.numpy as st_ref  # the reference implementation, for files it writes and reads

from jaxinterp.hf import ConversionError, read_safetensors, write_safetensors
from tests.faults.harness import Case, Raises, Returns, expect

A = np.arange(4, dtype=np.float32).reshape(2, 2)
B = np.array([10.0, 20.0, 30.0], dtype=np.float32)
DATA = A.tobytes() + B.tobytes()  # a: bytes [0, 16), b: bytes [16, 28)
NAME = "w.safetensors"


def good_header() -> dict:
    return {"__metadata__": {"format": "pt"},
            "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
            "b": {"dtype": "F32", "shape": [3], "data_offsets": [16, 28]}}


def build(tmp: Path, header=None, data: bytes = DATA, *, raw_header: bytes | None = None,
          header_len: int | None = None, name: str = NAME) -> Path:
    """A .safetensors file written byte by byte (independent of the writer under test)."""
    blob = raw_header if raw_header is not None else json.dumps(good_header() if header is None else header).encode()
    if raw_header is None:
        blob += b" " * (-len(blob) % 8)
    path = tmp / name
    path.write_bytes(struct.pack("<Q", len(blob) if header_len is None else header_len) + blob + data)
    return path


def edited(fn) -> dict:
    header = copy.deepcopy(good_header())
    fn(header)
    return header


def raw_file(tmp: Path, data: bytes) -> Path:
    (tmp / NAME).write_bytes(data)
    return tmp / NAME


def bad(case_id: str, make, match: str, exc=ConversionError) -> Case:
    return Case(f"st-{case_id}", lambda tmp: read_safetensors(make(tmp)), Raises(exc, match))


def set_field(tensor: str, field: str, value):
    return lambda h: h[tensor].__setitem__(field, value)


def del_field(tensor: str, field: str):
    return lambda h: h[tensor].pop(field)


def _fifo(tmp: Path) -> Path:
    os.mkfifo(tmp / NAME)
    return tmp / NAME


def _symlink_to(target: str):
    def make(tmp: Path) -> Path:
        (tmp / NAME).symlink_to(target)
        return tmp / NAME
    return make


def _sparse_with_header_len(n: int):
    def make(tmp: Path) -> Path:
        path = build(tmp, header_len=n)
        os.truncate(path, n + 1024)  # a sparse file big enough to hold the header
        return path
    return make


BAD = [
    bad("empty-file", lambda t: raw_file(t, b""), r"w\.safetensors.*(short|truncated)"),
    bad("four-bytes", lambda t: raw_file(t, b"\x01\x02\x03\x04"), r"w\.safetensors.*(short|truncated)"),
    bad("header-len-2^62", lambda t: build(t, header_len=2**62), r"w\.safetensors.*header length"),
    bad("header-len-2^64-1", lambda t: build(t, header_len=2**64 - 1), r"w\.safetensors.*header length"),
    bad("header-len-past-eof", lambda t: build(t, header_len=10_000), r"w\.safetensors.*header length"),
    bad("header-len-zero", lambda t: build(t, header_len=0), r"w\.safetensors.*header"),
    bad("header-len-over-100MB", _sparse_with_header_len(150_000_000), r"w\.safetensors.*header length.*(MB|limit)"),
    bad("header-not-utf8", lambda t: build(t, raw_header=b"\xff\xfe\xfd\xfc\xfb\xfa\xf9\xf8"),
        r"w\.safetensors.*header.*(UTF-8|JSON)"),
    bad("header-not-json", lambda t: build(t, raw_header=b'{"a": [1, 2'), r"w\.safetensors.*header.*JSON"),
    bad("header-json-list", lambda t: build(t, raw_header=b"[1, 2, 3]", data=b""), r"w\.safetensors.*JSON object"),
    bad("header-json-string", lambda t: build(t, raw_header=b'"tensor"', data=b""), r"w\.safetensors.*JSON object"),
    bad("header-json-number", lambda t: build(t, raw_header=b"12345678", data=b""),
        r"w\.safetensors.*JSON object"),
    bad("duplicate-tensor-name", lambda t: build(t, raw_header=(
        b'{"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},'
        b'"a":{"dtype":"F32","shape":[3],"data_offsets":[16,28]}}')), r"w\.safetensors.*'a'.*(twice|duplicate)"),
    bad("entry-not-object", lambda t: build(t, edited(lambda h: h.__setitem__("a", [0, 16]))),
        r"w\.safetensors.*'a'"),
    bad("missing-dtype", lambda t: build(t, edited(del_field("a", "dtype"))), r"w\.safetensors.*'a'.*dtype"),
    bad("missing-shape", lambda t: build(t, edited(del_field("b", "shape"))), r"w\.safetensors.*'b'.*shape"),
    bad("missing-offsets", lambda t: build(t, edited(del_field("a", "data_offsets"))),
        r"w\.safetensors.*'a'.*data_offsets"),
    bad("unknown-field", lambda t: build(t, edited(set_field("a", "strides", [2, 1]))),
        r"w\.safetensors.*'a'.*strides"),
    bad("unknown-dtype", lambda t: build(t, edited(set_field("a", "dtype", "F128"))),
        r"w\.safetensors.*'a'.*dtype.*F128"),
    bad("lowercase-dtype", lambda t: build(t, edited(set_field("a", "dtype", "f32"))),
        r"w\.safetensors.*'a'.*dtype.*f32"),
    bad("dtype-not-string", lambda t: build(t, edited(set_field("a", "dtype", 4))), r"w\.safetensors.*'a'.*dtype"),
    bad("shape-negative", lambda t: build(t, edited(set_field("a", "shape", [-2, -2]))),
        r"w\.safetensors.*'a'.*shape"),
    bad("shape-float", lambda t: build(t, edited(set_field("a", "shape", [2.0, 2.0]))),
        r"w\.safetensors.*'a'.*shape"),
    bad("shape-bool", lambda t: build(t, edited(set_field("b", "shape", [True, 3]))),
        r"w\.safetensors.*'b'.*shape"),
    bad("shape-string", lambda t: build(t, edited(set_field("a", "shape", "2x2"))), r"w\.safetensors.*'a'.*shape"),
    bad("shape-null", lambda t: build(t, edited(set_field("a", "shape", None))), r"w\.safetensors.*'a'.*shape"),
    bad("shape-huge-product", lambda t: build(t, edited(set_field("a", "shape", [2**40, 2**40]))),
        r"w\.safetensors.*'a'.*(bytes|span)"),
    bad("offsets-one-number", lambda t: build(t, edited(set_field("a", "data_offsets", [16]))),
        r"w\.safetensors.*'a'.*data_offsets"),
    bad("offsets-negative", lambda t: build(t, edited(set_field("a", "data_offsets", [-16, 0]))),
        r"w\.safetensors.*'a'.*data_offsets"),
    bad("offsets-reversed", lambda t: build(t, edited(set_field("a", "data_offsets", [16, 0]))),
        r"w\.safetensors.*'a'.*data_offsets"),
    bad("offsets-float", lambda t: build(t, edited(set_field("a", "data_offsets", [0.0, 16.0]))),
        r"w\.safetensors.*'a'.*data_offsets"),
    bad("span-too-short", lambda t: build(t, edited(set_field("a", "data_offsets", [0, 12]))),
        r"w\.safetensors.*'a'.*16 bytes.*12"),
    bad("span-too-long", lambda t: build(t, edited(set_field("b", "shape", [2]))),
        r"w\.safetensors.*'b'.*8 bytes.*12"),
    bad("truncated-data", lambda t: build(t, data=DATA[:-4]), r"w\.safetensors.*'b'.*(past|beyond|truncated)"),
    bad("truncated-to-header", lambda t: build(t, data=b""), r"w\.safetensors.*(past|beyond|truncated)"),
    bad("overlapping-tensors", lambda t: build(t, edited(
        lambda h: (h["b"].update(shape=[3], data_offsets=[4, 16]), h.__setitem__(
            "c", {"dtype": "F32", "shape": [3], "data_offsets": [16, 28]})))),
        r"w\.safetensors.*overlap"),
    bad("aliased-tensors", lambda t: build(t, edited(
        lambda h: h["b"].update(shape=[4], data_offsets=[0, 16])), data=A.tobytes()),
        r"w\.safetensors.*overlap"),
    bad("gap-between-tensors", lambda t: build(t, edited(
        lambda h: h["b"].update(shape=[2], data_offsets=[20, 28]))), r"w\.safetensors.*(gap|hole|not covered)"),
    bad("trailing-bytes", lambda t: build(t, data=DATA + b"\0" * 8), r"w\.safetensors.*(trailing|not covered|after)"),
    bad("metadata-not-object", lambda t: build(t, edited(lambda h: h.__setitem__("__metadata__", [1]))),
        r"w\.safetensors.*__metadata__"),
    bad("metadata-not-strings", lambda t: build(t, edited(lambda h: h.__setitem__("__metadata__", {"format": 1}))),
        r"w\.safetensors.*__metadata__"),
    bad("fifo", _fifo, r"w\.safetensors.*not a regular file"),
    bad("directory", lambda t: (t / NAME).mkdir() or t / NAME, r"w\.safetensors.*not a regular file"),
    bad("symlink-to-char-device", _symlink_to("/dev/zero"), r"w\.safetensors.*not a regular file"),
    bad("broken-symlink", _symlink_to("/nonexistent/x.safetensors"), r"w\.safetensors.*no such file",
        exc=FileNotFoundError),
    bad("missing-file", lambda t: t / NAME, r"w\.safetensors.*no such file", exc=FileNotFoundError),
]


def _expect_ab(result, tmp) -> None:
    assert sorted(result) == ["a", "b"]
    np.testing.assert_array_equal(result["a"], A)
    np.testing.assert_array_equal(result["b"], B)


def _ref_roundtrip(arrays: dict):
    """Our writer -> the reference reader, and the reference writer -> our reader, both exact."""
    def run(tmp: Path):
        write_safetensors(tmp / "ours.safetensors", arrays)
        st_ref.save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp / "ref.safetensors"))
        return st_ref.load_file(str(tmp / "ours.safetensors")), read_safetensors(tmp / "ref.safetensors")

    def check(result, tmp):
        for got in result:
            assert sorted(got) == sorted(arrays)
            for k, v in arrays.items():
                assert got[k].dtype == v.dtype and got[k].shape == v.shape, (k, got[k].dtype, got[k].shape)
                np.testing.assert_array_equal(got[k], v)
    return run, check


def _good(case_id: str, run, check) -> Case:
    return Case(f"st-ok-{case_id}", run, Returns(check))


RNG = np.random.default_rng(0)
GOOD = [
    _good("plain", lambda t: read_safetensors(build(t)), _expect_ab),
    _good("json-order-differs", lambda t: read_safetensors(build(t, {k: good_header()[k] for k in ("b", "a")})),
          _expect_ab),
    _good("no-metadata", lambda t: read_safetensors(build(t, edited(lambda h: h.pop("__metadata__")))), _expect_ab),
    _good("no-tensors", lambda t: read_safetensors(build(t, {}, b"")), lambda r, t: expect(r == {}, r)),
    _good("zero-size-tensor", lambda t: read_safetensors(build(t, edited(
        lambda h: h.__setitem__("z", {"dtype": "F32", "shape": [0, 3], "data_offsets": [28, 28]})))),
        lambda r, t: (_expect_ab({k: r[k] for k in "ab"}, t), np.testing.assert_equal(r["z"].shape, (0, 3)))),
    _good("scalar", lambda t: read_safetensors(build(t, {"s": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}},
                                                     np.float32(2.5).tobytes())),
          lambda r, t: np.testing.assert_array_equal(r["s"], np.float32(2.5))),
    _good("bfloat16", lambda t: _bf16(t),
          lambda r, t: np.testing.assert_array_equal(r["h"].astype(np.float32), [1.5, -2.0, 3.0])),
    Case("st-ok-roundtrip-dtypes", *(lambda rc: (rc[0], Returns(rc[1])))(_ref_roundtrip({
        "f64": RNG.normal(size=(3, 2)), "f32": RNG.normal(size=(4,)).astype(np.float32),
        "f16": RNG.normal(size=(2, 2)).astype(np.float16), "i64": np.arange(5, dtype=np.int64) - 2,
        "i32": np.arange(6, dtype=np.int32).reshape(2, 3), "i8": np.array([-128, 127], np.int8),
        "u8": np.array([0, 255], np.uint8), "bool": np.array([True, False, True])}))),
    Case("st-ok-roundtrip-noncontiguous", *(lambda rc: (rc[0], Returns(rc[1])))(_ref_roundtrip({
        "t": np.asfortranarray(RNG.normal(size=(3, 5)).astype(np.float32)),
        "s": RNG.normal(size=(6, 4)).astype(np.float32)[::2, 1:]}))),
]


def _bf16(tmp: Path) -> dict:
    values = np.array([1.5, -2.0, 3.0], ml_dtypes.bfloat16).tobytes()
    return read_safetensors(build(tmp, {"h": {"dtype": "BF16", "shape": [3], "data_offsets": [0, 6]}}, values))


WRITER = [
    Case("sw-name-not-string", lambda t: write_safetensors(t / NAME, {3: A}), Raises(ConversionError, r"name")),
    Case("sw-empty-name", lambda t: write_safetensors(t / NAME, {"": A}), Raises(ConversionError, r"name")),
    Case("sw-reserved-name", lambda t: write_safetensors(t / NAME, {"__metadata__": A}),
         Raises(ConversionError, r"__metadata__")),
    Case("sw-complex-dtype", lambda t: write_safetensors(t / NAME, {"c": np.ones(2, np.complex64)}),
         Raises(ConversionError, r"'c'.*complex64")),
    Case("sw-object-dtype", lambda t: write_safetensors(t / NAME, {"o": np.array([None, 1], dtype=object)}),
         Raises(ConversionError, r"'o'.*object")),
    Case("sw-metadata-not-strings", lambda t: write_safetensors(t / NAME, {"a": A}, {"format": 1}),
         Raises(ConversionError, r"metadata")),
    Case("sw-failed-write-leaves-no-file", lambda t: write_safetensors(t / NAME, {"a": A, "o": np.array([None])}),
         Raises(ConversionError, r"'o'"), after=lambda t: expect(not (t / NAME).exists(), "a refused write left a file")),
]

CASES = BAD + GOOD + WRITER
