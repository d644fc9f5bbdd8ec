"""[bench] -> cells: keywords, explicit combinations, references, and the errors a user can cause."""

import pytest

from cfn_core.bench.matrix import combinations, expand
from cfn_core.config import config_from_dict
from cfn_core.errors import ConfigError

INSTALLED = ["batch", "parallel", "pool", "shard"]


def bench(**values):
    return config_from_dict({"bench": values}).section("bench")


def test_default_is_baseline_each_plugin_alone_and_all_combined():
    combos = combinations(bench(), INSTALLED)
    assert combos == [(), ("batch",), ("parallel",), ("pool",), ("shard",), ("batch", "parallel", "pool", "shard")]


def test_all_is_every_subset_once():
    combos = combinations(bench(combinations=["all", "pool+batch"], plugins=["pool", "batch", "shard"]), INSTALLED)
    assert len(combos) == 2**3
    assert len({frozenset(c) for c in combos}) == 8
    assert combos[0] == ()


def test_explicit_lists_and_joined_strings_are_the_same_combination():
    combos = combinations(bench(combinations=[["pool", "batch"], "batch+pool", "baseline", []]), INSTALLED)
    assert combos == [(), ("pool", "batch")]


def test_baseline_is_always_in_the_matrix():
    assert combinations(bench(combinations=["pool"]), INSTALLED) == [(), ("pool",)]


def test_cells_ids_and_references_only_for_star():
    cells = expand(bench(agents=[20, 10], combinations=["pool+batch"], workloads=["star", "mesh"]), INSTALLED)
    ids = [c.id for c in cells]
    assert ids == [
        "baseline-10", "pool+batch-10", "ref-processpool-10", "ref-mp-pipes-10", "ref-floor-10",
        "baseline-10-mesh", "pool+batch-10-mesh",
        "baseline-20", "pool+batch-20", "ref-processpool-20", "ref-mp-pipes-20", "ref-floor-20",
        "baseline-20-mesh", "pool+batch-20-mesh",
    ]
    assert [c.id for c in expand(bench(agents=[5], combinations=["baseline"], references=False), INSTALLED)] == ["baseline-5"]


@pytest.mark.parametrize(
    "values, message",
    [
        ({"combinations": ["pool+redis"]}, "unknown plugin 'redis'"),
        ({"combinations": ["pol"]}, "did you mean 'pool'?"),
        ({"plugins": ["nope"]}, "[bench] plugins: unknown plugin 'nope'"),
        ({"combinations": ["pool+all"]}, "'all' is a keyword"),
        ({"combinations": ["pool+pool"]}, "names a plugin twice"),
    ],
)
def test_unknown_or_wrong_combinations_are_clear_errors(values, message):
    with pytest.raises(ConfigError) as err:
        expand(bench(**values), INSTALLED)
    assert message in str(err.value)
    assert "installed: batch, parallel, pool, shard" in str(err.value) or "keyword" in message or "twice" in message


@pytest.mark.parametrize(
    "values, message",
    [
        ({"agents": [0]}, "[bench] agents = [0]: must be a list of integers, each from 1 to 100000"),
        ({"agents": "100"}, "must be a list of integers"),
        ({"workloads": ["stars"]}, "each one of star, mesh (did you mean 'star'?)"),
        ({"combinations": [[1]]}, "an item may be a list of strings"),
        ({"repetitions": 0}, "[bench] repetitions = 0"),
        ({"min_delivery": 1.5}, "[bench] min_delivery = 1.5"),
    ],
)
def test_bad_bench_table_names_key_value_and_allowed(values, message):
    with pytest.raises(ConfigError) as err:
        bench(**values)
    assert message in str(err.value)


def test_transport_plugins_join_the_default_matrix_only_when_named():
    from cfn_core.bench.matrix import bundled_plugins, optimization_plugins
    from cfn_core.plugins import load_plugin

    default = optimization_plugins()
    for name in bundled_plugins():
        replaces_bus = callable(getattr(load_plugin(name), "cfn_bus", None))
        assert (name in default) is not replaces_bus
    assert not {"limits", "llm"} & set(default)  # shipped, but they limit and account: named to join
    named = combinations(bench(combinations=["default", "redis"]), INSTALLED + ["redis"], default=INSTALLED)
    assert ("redis",) in named and ("batch", "parallel", "pool", "shard") in named
    assert not any("redis" in c and len(c) > 1 for c in named)


def test_the_cells_of_one_comparison_alternate_repetition_by_repetition(bus_root, no_leaks):
    """A slow stretch of the machine falls on every row of a comparison, not on whichever ran next."""
    from cfn_core.bench.matrix import Cell
    from cfn_core.bench.runner import comparison_groups, run_interleaved

    base = config_from_dict({"bus": {"root": str(bus_root)}})
    b = bench(repetitions=3, cell_budget=0)
    pool, batched = Cell(("pool",), 2, "star"), Cell(("pool", "batch"), 2, "star")
    mesh = Cell(("pool",), 2, "mesh")
    assert comparison_groups([pool, mesh, batched]) == [[pool, batched], [mesh]]
    steps = []
    summaries = run_interleaved([pool, batched], base, b, step=steps.append)
    reps = [s for s in steps if s.endswith(("rep 1/3", "rep 2/3", "rep 3/3"))]
    assert reps == [
        "pool-2 rep 1/3", "pool+batch-2 rep 1/3",
        "pool+batch-2 rep 2/3", "pool-2 rep 2/3",  # reversed every other round: neither always goes first
        "pool-2 rep 3/3", "pool+batch-2 rep 3/3",
    ]
    assert [s["id"] for s in summaries] == ["pool-2", "pool+batch-2"]
    assert all(s["repetitions"] == 3 and s["delivery_rate"] == 1.0 for s in summaries)


def test_a_cell_over_its_budget_stops_while_the_others_go_on(bus_root, no_leaks):
    from cfn_core.bench.matrix import Cell
    from cfn_core.bench.runner import CellRun

    base = config_from_dict({"bus": {"root": str(bus_root)}})
    run = CellRun(Cell(("pool",), 2, "star"), base, bench(repetitions=5, cell_budget=0.001))
    run.run_one()
    assert run.done and len(run.reps) == 1  # its one repetition spent the budget
    assert run.finish(resource_pass=False)["repetitions"] == 1
