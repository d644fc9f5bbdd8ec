"""Property tests (hypothesis) of the message decoder and the inbox reader with arbitrary bytes.

The decoder never raises anything but MalformedMessage; the inbox reader,
given valid records interleaved with junk (binary, torn, oversized, JSON of
the wrong shape), never crashes, returns every valid message in order, and
dead-letters exactly the rest (counted and settled, so the cursor moves past it).
"""

from __future__ import annotations

import os
import re

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cfn_core.builtin import decode_records
from cfn_core.bus.shm import ShmBus
from cfn_core.config import config_from_dict
from cfn_core.messages import KINDS, MalformedMessage, Message, decode

LIMIT = 4096

ids = st.text(st.characters(min_codepoint=32, max_codepoint=0x2FFF), min_size=1, max_size=20)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
messages = st.builds(
    Message,
    id=ids, src=ids, dst=ids, kind=st.sampled_from(sorted(KINDS)),
    round=st.integers(0, 10**6), task=st.none() | ids, body=json_values,
    ts=st.floats(0, 2e9), seq=st.integers(0, 10**9),
)
junk = st.one_of(
    st.binary(max_size=200),
    st.binary(min_size=LIMIT, max_size=LIMIT + 300).map(lambda b: b.replace(b"\n", b"x")),  # oversized
    st.just(b"{"),
    st.just(b"[1,2,3]"),
    st.just(b'{"id": 1}'),
    st.just(b'{"id":"a","src":"b","dst":"c","kind":"nope","round":1}'),
    st.just(b'{"id":"a","src":"b","dst":"c","kind":"task","round":true}'),
    st.just(b"\xff\xfe\x00"),
    json_values.map(lambda v: orjson.dumps(v)),
)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300) | junk)
def test_decode_never_raises_anything_but_malformed(data):
    try:
        msg = decode(data)
    except MalformedMessage:
        return
    assert isinstance(msg, Message) and msg.kind in KINDS and isinstance(msg.round, int)


@settings(max_examples=200, deadline=None)
@given(messages)
def test_encode_decode_round_trip(msg):
    raw = msg.encode()
    assert raw.endswith(b"\n") and raw.count(b"\n") == 1  # a newline only ever ends a record
    back = decode(raw)
    assert (back.id, back.src, back.dst, back.kind, back.round, back.task, back.body, back.seq) == (
        msg.id, msg.src, msg.dst, msg.kind, msg.round, msg.task, msg.body, msg.seq
    )


class _Ctx:
    """The part of an agent context that decode_records uses."""

    def __init__(self, bus):
        self.bus = bus
        self.config = config_from_dict({"bus": {"max_message_bytes": LIMIT}})
        self.counters = {"dead_lettered": 0}


@pytest.fixture(scope="module")
def fuzz_root():
    root = f"/dev/shm/cfnfuzz-{os.urandom(4).hex()}" if os.path.isdir("/dev/shm") else None
    if root:
        os.mkdir(root, 0o700)
    yield root
    if root:
        leftovers = os.listdir(root)
        os.rmdir(root) if not leftovers else None
        assert not leftovers


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.booleans(), messages.filter(lambda m: len(m.encode()) <= LIMIT), junk), max_size=25),
       st.booleans())
def test_inbox_reader_keeps_every_valid_message_and_dead_letters_the_rest(fuzz_root, items, torn_tail):
    bus = ShmBus.create(fuzz_root, max_message_bytes=LIMIT)
    try:
        expected, stream = [], []
        for valid, msg, bad in items:
            if valid:
                expected.append(msg.id)
                stream.append(msg.encode())
            else:
                stream.append(bad + b"\n")
        # a record ends in b"\n" or, inside one batched write, in the record separator b"\x1e"
        # (JSON never contains either raw); junk containing them splits into several records
        records = re.split(b"[\n\x1e]", b"".join(stream))[:-1]
        junk_records = 0
        for rec in records:
            try:
                if len(rec) + 1 > LIMIT:
                    raise MalformedMessage("too big")
                decode(rec)
            except MalformedMessage:
                junk_records += 1
        inbox = bus.run_dir / "inbox" / "a1"
        inbox.parent.mkdir(mode=0o700)
        inbox.write_bytes(b"".join(stream) + (b'{"torn": "by a sender that died' if torn_tail else b""))
        if torn_tail:  # the next sender closes the torn record: one more dead letter, then its message
            tail = Message(id="after-torn", src="s", dst="a1", kind="peer")
            bus.deliver("a1", "inbox/a1", [tail.encode()])
            expected.append("after-torn")
            junk_records += 1

        ctx = _Ctx(bus)
        got = decode_records(ctx, "a1", bus.read("a1", "inbox/a1"))
        valid_ids = [m.id for m in got]
        # every valid message, in order (junk that happens to be a valid message is kept too)
        it = iter(valid_ids)
        assert all(any(v == e for v in it) for e in expected)
        assert len(valid_ids) + ctx.counters["dead_lettered"] == len(records) + (2 if torn_tail else 0)
        assert ctx.counters["dead_lettered"] == junk_records
        assert bus.dead_letter_count() == junk_records
        # settling the valid ones moves the cursor over everything: a replacement re-reads nothing
        bus.ack("a1", [m.receipt for m in got])
        assert bus.unread_bytes("a1", "inbox/a1") == 0
    finally:
        bus.destroy()
