"""Key names.  Every key carries the run id, inside a Redis Cluster hash tag.

Run-wide keys use the tag ``{RUN}``; inbox streams use ``{RUN:SHARD}`` where
SHARD is the directory part of the location ``cfn_route`` returned
(``inbox`` for the baseline, ``shard-3`` with cfn-shard), so one shard's
inboxes share a slot and different shards can live on different nodes.

::

    cfn:runs                       sorted set of live run ids (for `cfn agent` discovery)
    cfn:{RUN}:meta                 hash: created, coordinator host; expires unless renewed (the run's lease)
    cfn:{RUN}:state                hash: put_state / get_state
    cfn:{RUN}:dead                 stream of dead letters (agent, reason, raw)
    cfn:{RUN}:hosts                hash: host id -> JSON (hostname, pid, capacity)
    cfn:{RUN}:lease:HOST           string with a PX expiry, renewed by the host
    cfn:{RUN}:ctl:HOST             stream of requests to a host (launch, kill, nudge)
    cfn:{RUN}:events               stream of host events for the coordinator (started, exited)
    cfn:{RUN:SHARD}:in:AGENT       one inbox stream per agent, consumer group ``cfn``
"""

from __future__ import annotations

GROUP = "cfn"
RUNS = "cfn:runs"


def run_key(run: str, name: str) -> str:
    return f"cfn:{{{run}}}:{name}"


def inbox_key(run: str, location: str) -> str:
    shard, sep, name = location.rpartition("/")
    if not sep:
        shard = "inbox"
    return f"cfn:{{{run}:{shard}}}:in:{name}"


def run_patterns(run: str) -> list[str]:
    """SCAN patterns matching every key of the run."""
    return [f"cfn:{{{run}}}:*", f"cfn:{{{run}:*"]
