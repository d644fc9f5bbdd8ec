"""Agents that talk, under SIGKILL: a retried sender's re-sends and a replacement
receiver's redelivery are each de-duplicated by message id, nothing is lost."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_talk_api import flow_config, run_one, talk_dir  # noqa: E402,F401 (talk_dir: a fixture)


def test_retried_sender_resends_are_deduplicated(make_config, no_leaks, talk_dir):
    config = flow_config(make_config, agents=2, handler="talk_handlers:Sender")
    (seen,), result = run_one(config, "send_then_die")
    assert result.rounds[0].retries == 1 and next(iter(result.results.values())).attempts == 2
    # the first attempt's five messages arrived, the retry re-sent the same five ids: counted once
    assert [body for _id, body in seen] == [0, 1, 2, 3, 4]
    assert len({msg_id for msg_id, _ in seen}) == 5


def test_replacement_receiver_rereads_unsettled_messages(make_config, no_leaks, talk_dir):
    config = flow_config(make_config, agents=2, handler="talk_handlers:Sender")
    (got, sent), result = run_one(config, "receive_then_die", "send_three")
    assert sent == "sent" and result.rounds[0].retries == 1
    # consumed by the task that died, so not settled: its replacement's retry receives them again
    assert got == ["m0", "m1", "m2"]
