"""direct_caller: a per-message hook with one plugin on it is called without pluggy's dispatch,
and behaves as pluggy's call would: the same order, results, fallback and strict errors."""

import os

import pytest

from cfn_core import COORDINATOR_ID, Coordinator, PluginError, config_from_dict, hookimpl
from cfn_core.agent import AgentContext
from cfn_core.plugins import direct_caller, make_plugin_manager


class Sender:
    """A plugin on cfn_send and cfn_flush: records its calls; answers what it is told to."""

    name = "sender"

    def __init__(self, answer=True, fail=None):
        self.calls, self.answer, self.fail = [], answer, fail

    @hookimpl
    def cfn_send(self, ctx, messages, flush):
        self.calls.append(("send", len(messages), flush))
        if self.fail is not None:
            raise self.fail
        return self.answer

    @hookimpl
    def cfn_flush(self, reason):  # fewer arguments than the hook has: pluggy passes only these
        self.calls.append(("flush", reason))


class Other:
    name = "other"

    @hookimpl
    def cfn_send(self, ctx, messages, flush):
        return None


class Wrapping:
    name = "wrapping"

    @hookimpl(wrapper=True)
    def cfn_send(self, ctx, messages, flush):
        return (yield)


def agent(extra, strict=False):
    config = config_from_dict({"plugins": [], "run": {"strict": strict}})
    pm = make_plugin_manager(config, extra_plugins=extra)
    return pm, AgentContext(config, pm, "agent-0001", "unused")


def test_one_plugin_is_called_directly_with_pluggys_results():
    sender = Sender(answer=True)
    pm, ctx = agent([sender])
    send = direct_caller(pm, "cfn_send")
    assert send is not pm.hook.cfn_send and send.__qualname__ == "direct cfn_send"
    assert send(ctx=ctx, messages=[], flush=True) is True
    assert pm.hook.cfn_send(ctx=ctx, messages=[], flush=True) is True  # the same answer through pluggy
    assert sender.calls == [("send", 0, True)] * 2
    flush = direct_caller(pm, "cfn_flush")
    assert flush is not pm.hook.cfn_flush
    flush(ctx=ctx, reason="sleep")
    assert sender.calls[-1] == ("flush", "sleep")


def session_agent(sender, bus_root):
    """An agent's context on a real session's bus (the coordinator reads what it sends)."""
    config = config_from_dict({"plugins": [], "workload": {"agents": 1}, "bus": {"root": str(bus_root)}})
    coord = Coordinator(config, extra_plugins=[sender])
    coord.open()
    run_ref = os.fspath(coord.ctx.bus.run_dir)
    ctx = AgentContext(config, coord.pm, "agent-0001", run_ref)
    ctx.bus = coord.pm.hook.cfn_bus(config=config, run_ref=run_ref)
    return coord, ctx


def arrived(coord):
    ctx = coord.ctx
    return [m.body for m in ctx.hook.cfn_read(ctx=ctx, agent_id=COORDINATOR_ID)]


@pytest.mark.parametrize("sender", [Sender(answer=None), Sender(fail=RuntimeError("boom"))], ids=["none", "raises"])
def test_the_baseline_delivers_what_the_plugin_did_not(sender, bus_root):
    """A plugin answering None leaves the send to the baseline; one raising falls back to it, counted."""
    coord, ctx = session_agent(sender, bus_root)
    try:
        message = ctx.factory.make(COORDINATOR_ID, "status", body={"text": "hello"})
        direct_caller(ctx.pm, "cfn_send")(ctx=ctx, messages=[message], flush=False)
        assert {"text": "hello"} in arrived(coord)
        assert sender.calls == [("send", 1, False)]
        if sender.fail is not None:
            assert ctx.fallbacks["cfn_send:sender"]["count"] == 1
            assert "RuntimeError: boom" in ctx.fallbacks["cfn_send:sender"]["error"]
        else:
            assert not ctx.fallbacks
    finally:
        ctx.bus.close()
        coord.close()


def test_strict_makes_the_plugins_failure_one_error_naming_it():
    pm, ctx = agent([Sender(fail=RuntimeError("boom"))], strict=True)
    with pytest.raises(PluginError, match="plugin 'sender' failed in cfn_send .*strict"):
        direct_caller(pm, "cfn_send")(ctx=ctx, messages=[], flush=False)


@pytest.mark.parametrize("extra", [[Sender(), Other()], [Sender(), Wrapping()]], ids=["two plugins", "a wrapper"])
def test_anything_more_gets_pluggy(extra):
    pm, _ = agent(extra)
    assert direct_caller(pm, "cfn_send") is pm.hook.cfn_send


def test_hook_call_monitoring_gets_pluggy():
    pm, ctx = agent([Sender()])
    assert direct_caller(pm, "cfn_send") is not pm.hook.cfn_send
    seen = []
    pm.add_hookcall_monitoring(lambda name, impls, kw: seen.append(name), lambda *a: None)
    send = direct_caller(pm, "cfn_send")  # asked again once monitoring is on (not what was cached before)
    assert send is pm.hook.cfn_send
    send(ctx=ctx, messages=[], flush=False)
    assert seen == ["cfn_send"]
