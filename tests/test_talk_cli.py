"""Command agents that talk: ``cfn msg`` against the socket its agent serves while the command runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cfn_core import Coordinator

HERE = Path(__file__).resolve().parent
CFN = shutil.which("cfn", path=os.path.dirname(sys.executable)) or "cfn"


@pytest.fixture
def shell_config(make_config, monkeypatch):
    monkeypatch.setenv("CFN_TEST_CFN", CFN)

    def make(agents=2, plugins=()):
        extra = {"pool": {"size": agents}} if "pool" in plugins else {}
        return make_config(plugins=plugins, workload={"agents": agents, "command": f"sh {HERE / 'talk_agent.sh'}",
                                                      "timeout": 60}, **extra)

    return make


def values(result):
    assert result.ok, [(r.error, r.stderr) for r in result.results.values() if not r.ok]
    return [result.results[f"r1-t{i:06d}"].value.strip() for i in range(len(result.results))]


def test_command_gets_its_identity_and_a_socket(shell_config, no_leaks):
    result = Coordinator(shell_config(agents=1)).run(["env"])
    assert values(result) == ["agent-0001 worker r1-t000000 socket"]


@pytest.mark.parametrize("plugins", [(), ("batch", "shard", "pool")], ids=["baseline", "batch+shard+pool"])
def test_shell_agents_request_and_reply(shell_config, no_leaks, plugins):
    with Coordinator(shell_config(agents=2, plugins=plugins)) as coord:
        result = coord.run(["ask", "answer"])
        asked, answered = values(result)
        asker = result.results["r1-t000000"].agent
        assert asked.startswith("pong from ") and asker not in asked and answered.startswith("answered ")
        assert coord.ctx.agents[asker].info["status"]["text"].startswith("asking ")


def test_shell_agents_ten_messages_in_order(shell_config, no_leaks):
    result = Coordinator(shell_config(agents=2)).run(["send10", "recv10"])
    assert values(result) == ["sent", "0 1 2 3 4 5 6 7 8 9"]


def test_exit_codes_inside_an_agent(shell_config, no_leaks):
    result = Coordinator(shell_config(agents=2)).run(["codes"])
    # nothing received: 1; unknown agent: 2; usage: 2; a request nobody answers: 1
    assert values(result) == ["1 2 2 1"]


def test_outside_an_agent_says_so(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "CFN_AGENT_SOCKET"}
    proc = subprocess.run([CFN, "msg", "send", "agent-0001", "hi"], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == (
        "cfn msg: not inside a cfn agent (CFN_AGENT_SOCKET is not set): run it from a command agent's command"
    )
    usage = subprocess.run([CFN, "msg", "recv", "--wait", "soon"], capture_output=True, text=True, env=env, timeout=60)
    assert usage.returncode == 2 and len(usage.stderr.strip().splitlines()) == 1 and "--wait" in usage.stderr
