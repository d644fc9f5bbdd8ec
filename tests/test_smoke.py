"""End-to-end coordinations on the baseline: real processes, real /dev/shm files."""

from cfn_core import Coordinator


def test_star_round_delivers_everything(make_config, no_leaks):
    config = make_config(workload={"agents": 4, "payload_bytes": 10})
    with Coordinator(config) as coord:
        result = coord.run()
    assert result.ok
    assert result.delivery_rate == 1.0
    assert result.delivered == result.planned == 8
    assert {r.value for r in result.results.values()} == {"x" * 10}


def test_mesh_round_counts_peer_messages(make_config, no_leaks):
    config = make_config(workload={"agents": 5, "topology": "mesh", "messages_per_agent": 7})
    with Coordinator(config) as coord:
        result = coord.run()
    assert result.ok
    assert result.planned == 2 * 5 + 5 * 7
    assert result.delivered == result.planned


def test_mesh_handler_bodies_travel_in_peer_messages(make_config, no_leaks):
    config = make_config(
        workload={"agents": 6, "topology": "mesh", "messages_per_agent": 4, "handler": "cfn_core.handlers:peer_sum"}
    )
    with Coordinator(config) as coord:
        result = coord.run()
    assert result.ok
    # every agent scatters 1+2+3+4 = 10 over its peers; the gathered sums add up to what was sent
    assert sum(r.value for r in result.results.values()) == 6 * 10
