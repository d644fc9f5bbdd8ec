"""Roles: `[agents.<role>]` tables, `<role>-0001` agents, tasks that name a role (docs/USER_GUIDE.md "Roles").

Each task must run on an agent of its role, with that role's handler or command: asserted
from the result's ``agent`` and from what the handler returned (each handler says who it
is), on the baseline launcher and forked from cfn-pool's zygote, with and without the other
plugins.  Bad role configuration is one line and exit status 2 through `cfn run`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cfn_core import Coordinator, Task
from cfn_core.config import config_from_dict, load_config
from cfn_core.errors import ConfigError
from cfn_core.roles import agent_ids, directory_document, role_of, roles_of, share_out

HERE = Path(__file__).resolve().parent

THREE_ROLES = {
    "planner": {"count": 1, "handler": "roles_handlers:plan"},
    "coder": {"count": 3, "handler": "roles_handlers:code"},
    # a role with a command: the payload on stdin, stdout the result
    "reviewer": {"count": 2, "command": "printf 'reviewed by %s: ' reviewer; cat"},
}


def three_role_config(make_config, plugins=(), **tables):
    tables.setdefault("workload", {})["directory"] = str(HERE)  # roles_handlers is imported from here
    return make_config(plugins, agents=THREE_ROLES, **tables)


def three_role_tasks():
    return (
        [Task("plan", "job", role="planner")]
        + [Task(f"code-{i}", i, role="coder") for i in range(7)]
        + [Task(f"review-{i}", f"diff {i}", role="reviewer") for i in range(4)]
        + [Task("untagged", "who?")]  # no role: the default role, the first declared (planner)
    )


def check_three_roles(result):
    assert result.failed == 0 and len(result.results) == 13, {k: r.error for k, r in result.results.items() if not r.ok}
    by_role = {"plan": "planner", "code": "coder", "review": "reviewer", "untagged": "planner"}
    for task_id, r in result.results.items():
        role = by_role[task_id.split("-")[0]]
        assert r.agent.startswith(f"{role}-"), (task_id, r.agent)
        if role == "reviewer":
            assert r.value == f"reviewed by reviewer: diff {task_id.split('-')[1]}"
        else:
            assert r.value["by"] == {"planner": "plan", "coder": "code"}[role], (task_id, r.value)
    # a role's tasks are spread over its agents (7 coder tasks, 3 coders: every one works)
    assert {r.agent for k, r in result.results.items() if k.startswith("code")} == {"coder-0001", "coder-0002", "coder-0003"}
    assert {r.agent for k, r in result.results.items() if k.startswith("review")} == {"reviewer-0001", "reviewer-0002"}


def _redis_up() -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=1.0) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


_needs_redis = pytest.mark.skipif(not _redis_up(), reason="no Redis server on 127.0.0.1:6379")


@pytest.mark.parametrize(
    "plugins",
    [
        (),
        ("pool",),
        ("pool", "parallel", "batch", "shard"),
        pytest.param(("redis",), marks=_needs_redis),
        pytest.param(("redis", "pool"), marks=_needs_redis),
    ],
    ids=["baseline", "pool", "pool+parallel+batch+shard", "redis", "redis+pool"],
)
def test_each_task_runs_on_an_agent_of_its_role_with_its_handler(make_config, no_leaks, plugins):
    config = three_role_config(make_config, plugins, pool={"size": 4})
    with Coordinator(config) as coord:
        for _ in range(2):  # the second run reuses pooled agents: they keep their role
            check_three_roles(coord.run(three_role_tasks()))
        if "pool" in plugins:
            pids = {r.value["pid"] for r in coord.run(three_role_tasks()).results.values() if isinstance(r.value, dict)}
            assert len(pids) == 4  # one planner, three coders: the same processes, forked from the zygote


def test_pool_pre_spawns_its_size_shared_over_the_roles(make_config, no_leaks):
    config = three_role_config(make_config, ("pool",), pool={"size": 4})
    with Coordinator(config) as coord:
        ready = sorted(a for a, h in coord.ctx.agents.items() if h.state == "ready")
        # 4 of 6 agents by counts 1, 3, 2 (largest remainder): every role is warm
        assert ready == ["coder-0001", "coder-0002", "planner-0001", "reviewer-0001"]
        check_three_roles(coord.run(three_role_tasks()))
        doc = directory_document(coord.ctx)
    assert doc["v"] == 1 and doc["roles"] == ["planner", "coder", "reviewer"]
    assert doc["agents"] == {a: {"role": a.split("-")[0]} for a in agent_ids(config)}


def test_default_role_names_where_untagged_tasks_go(make_config, no_leaks):
    config = three_role_config(make_config, workload={"default_role": "coder"})
    result = Coordinator(config).run(["a", "b", Task("p", 1, role="planner")])
    assert result.failed == 0
    assert [result.results[t].agent.split("-")[0] for t in sorted(result.results)] == ["planner", "coder", "coder"]


def test_generated_tasks_give_every_role_one_task_per_agent(make_config, no_leaks):
    result = Coordinator(three_role_config(make_config)).run()
    assert result.failed == 0 and result.agents == 6
    assert sorted(r.agent for r in result.results.values()) == sorted(agent_ids(three_role_config(make_config)))


def test_a_role_inherits_the_workloads_handler_and_settings(make_config):
    config = make_config(workload={"handler": "json:dumps", "timeout": 7.0, "max_attempts": 2}, agents={"a": {}, "b": {"count": 2, "timeout": 3.0}})
    roles = roles_of(config)
    assert [r.count for r in roles.values()] == [1, 2] and config.workload.agents == 3
    assert roles["a"].handler == roles["b"].handler == "json:dumps"
    assert (roles["a"].timeout, roles["b"].timeout, roles["b"].max_attempts) == (7.0, 3.0, 2)
    assert role_of(config, "b-0002").name == "b" and role_of(config, "something-else").name == "a"


def test_a_roles_timeout_applies_to_its_agents_only(make_config, no_leaks):
    config = make_config(
        workload={"command": "cat", "timeout": 60.0},
        agents={"slow": {"command": "sleep 600", "timeout": 1.0}, "quick": {}},
    )
    result = Coordinator(config).run([Task("s", "x", role="slow"), Task("q", "y", role="quick")])
    assert result.results["q"].ok and result.results["q"].value == "y"
    assert not result.results["s"].ok and result.results["s"].error == "command timed out after 1s"


def test_a_roles_max_attempts_applies_to_its_tasks(make_config, no_leaks):
    config = make_config(
        workload={"directory": str(HERE), "max_attempts": 3},
        agents={"fragile": {"handler": "roles_handlers:crash", "max_attempts": 1}, "other": {"handler": "roles_handlers:code"}},
    )
    result = Coordinator(config).run([Task("f", 1, role="fragile"), Task("o", 2, role="other")])
    assert result.results["o"].ok
    f = result.results["f"]
    assert not f.ok and f.attempts == 1 and f.error.startswith("gave up after 1 attempts")


def test_a_task_naming_an_unknown_role_is_refused_before_anything_starts(make_config, no_leaks):
    with pytest.raises(ConfigError, match=r"^task 't': role 'cdoer' is not a role of this run \(did you mean 'coder'\?\); roles: planner, coder, reviewer$"):
        Coordinator(three_role_config(make_config)).run([Task("t", 1, role="cdoer")])


def test_the_shorthand_is_one_role_named_worker_with_the_old_ids(make_config, no_leaks):
    config = make_config(workload={"agents": 3})
    assert list(roles_of(config)) == ["worker"] and config.roles == {}
    assert agent_ids(config) == ["agent-0001", "agent-0002", "agent-0003"]
    result = Coordinator(config).run([Task("a", 1), Task("b", 2, role="worker")])
    assert result.failed == 0 and {r.agent for r in result.results.values()} <= {"agent-0001", "agent-0002", "agent-0003"}


def test_share_out_adds_up_and_follows_the_counts():
    assert share_out(4, {"p": 1, "c": 3, "r": 2}) == {"p": 1, "c": 2, "r": 1}
    assert share_out(6, {"p": 1, "c": 3, "r": 2}) == {"p": 1, "c": 3, "r": 2}
    assert share_out(0, {"p": 1}) == {"p": 0}
    for n in range(50):
        assert sum(share_out(n, {"a": 5, "b": 7, "c": 1}).values()) == n


# ---------------------------------------------------------------------- the command line


@pytest.fixture
def cli(tmp_path, bus_root):
    """Run ``cfn ARGS`` in ``tmp_path`` (a private bus root, no CFN_* from the developer's shell)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CFN_")}
    env["CFN_BUS_ROOT"] = str(bus_root)

    def run(*args, toml=None):
        if toml is not None:
            (tmp_path / "cfn.toml").write_text(toml)
        return subprocess.run(
            [sys.executable, "-m", "cfn_core", *args], cwd=tmp_path, env=env, text=True, capture_output=True, timeout=120
        )

    return run


def one_line_error(proc) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1, proc.stderr
    return err


ROLES_TOML = """
[workload]
handler = "roles_handlers:code"

[agents.planner]
count = 1
handler = "roles_handlers:plan"

[agents.coder]
count = 2
"""


@pytest.mark.parametrize(
    "toml, expected",
    [
        ("[agents.coder]\ncount = 0\n", r"cfn.toml: \[agents.coder\] count = 0: must be an integer from 1 to 100000"),
        ("[agents.coder]\ncomand = 'cat'\n", r"unknown key 'comand' in \[agents.coder\] \(did you mean 'command'\?\); valid keys: count, handler, command, timeout, max_attempts"),
        (
            "[agents.coder]\nhandler = 'm:f'\ncommand = 'cat'\n",
            r"cfn.toml: \[agents.coder\] sets both handler = 'm:f' and command = 'cat': give one",
        ),
        ("[agents.all]\ncount = 2\n", r"cfn.toml: \[agents.all\]: 'all' is a reserved name \(agent, all, any, coordinator, none, self\)"),
        ("[agents.coder-1]\n", r"cfn.toml: \[agents.coder-1\]: role name 'coder-1' is not allowed: .*not ending in '-<digits>'"),
        ("[agents]\ncount = 3\n", r"cfn.toml: \[agents\] count = 3: \[agents\] holds one table per role"),
        ("[agents.coder]\n[workload]\ndefault_role = 'cdoer'\n", r"cfn.toml: \[workload\] default_role = 'cdoer' is not a role of this run \(did you mean 'coder'\?\); roles: coder"),
        (
            "[workload]\nagents = 10\n[agents.coder]\ncount = 2\n",
            r"cfn.toml: \[workload\] agents = 10, but the roles \(\[agents.coder\] count = 2\) make 2 agents",
        ),
        ("[agents.coder]\nhandler = 'nosuchmodule:f'\n", r"\[agents.coder\] handler = 'nosuchmodule:f': cannot import module 'nosuchmodule'"),
    ],
    ids=["count-0", "unknown-key", "handler-and-command", "reserved", "bad-name", "not-a-table", "default-role", "agents-total", "bad-handler"],
)
def test_bad_role_configuration_is_one_line_and_exit_2(cli, toml, expected):
    import re

    err = one_line_error(cli("run", toml=toml))
    assert re.search(expected, err), err


def test_run_with_roles_from_cfn_toml(cli, tmp_path):
    (tmp_path / "roles_handlers.py").write_text((HERE / "roles_handlers.py").read_text())
    proc = cli("run", "--json", "--results", toml=ROLES_TOML)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["agents"] == 3 and out["tasks"] == 3
    results = out["rounds"][0]["results"]
    assert sorted((r["agent"], r["value"]["by"]) for r in results.values()) == [
        ("coder-0001", "code"), ("coder-0002", "code"), ("planner-0001", "plan"),
    ]
    # a role's count from the command line (a new role too)
    proc = cli("run", "--json", "--set", "agents.coder.count=4", "--set", "agents.extra.count=1")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["agents"] == 6


def test_agents_flag_with_roles_says_to_change_a_count(cli, tmp_path):
    err = one_line_error(cli("run", "--agents", "5", toml=ROLES_TOML))
    assert err.startswith("cfn: error: command line workload.agents: [workload] agents = '5', but the roles ([agents.planner] count = 1, [agents.coder] count = 2) make 3 agents")
    assert "--set agents.planner.count=N" in err
    # the total itself is accepted (it says the same thing)
    (tmp_path / "roles_handlers.py").write_text((HERE / "roles_handlers.py").read_text())
    assert cli("run", "--agents", "3").returncode == 0


def test_agents_flag_still_scales_the_shorthand(cli):
    proc = cli("run", "--agents", "4", "--json", "--results", toml="[workload]\nagents = 2\n")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["agents"] == 4 and out["tasks"] == 4
    assert sorted(r["agent"] for r in out["rounds"][0]["results"].values()) == [f"agent-000{i}" for i in range(1, 5)]


def test_max_agents_counts_every_role(make_config):
    with pytest.raises(ConfigError, match=r"\[workload\] agents = 7 exceeds \[run\] max_agents = 5"):
        Coordinator(make_config(run={"max_agents": 5}, agents={"a": {"count": 3}, "b": {"count": 4}}))


def test_roles_survive_the_configuration_agents_load(make_config):
    """What the coordinator stores for its agents (and remote hosts) rebuilds the same roles."""
    from cfn_core import config_from_state

    config = three_role_config(make_config)
    again = config_from_state(json.dumps({"config": config.to_dict(), "plugin_modules": {}}).encode(), "state")
    assert again.roles == config.roles and roles_of(again) == roles_of(config)
    assert load_config(discover=False, overrides={"agents.x.count": "2"}).workload.agents == 2


def test_the_reference_documents_every_role_key():
    import attrs

    from cfn_core.config import RoleSettings

    text = (HERE.parent / "docs" / "CONFIG.md").read_text()
    section = text.split("\n## [agents.<role>]\n", 1)[1].split("\n## ", 1)[0]
    keys = [line.split("`")[1] for line in section.splitlines() if line.startswith("| `")]
    assert keys == [f.name for f in attrs.fields(RoleSettings)]
