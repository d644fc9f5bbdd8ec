"""``cfn msg``: the messaging CLI of command agents (a client of ``$CFN_AGENT_SOCKET``).

It runs once per call, so it imports only the standard library's smallest modules
(``cfn_core.cli`` dispatches ``msg`` here before importing anything else).  The agent
process behind the socket does the work (:mod:`cfn_core.agent_socket`): a command can
only send as its own agent, and the agent stays the single reader of its inbox.

Exit codes: 0 ok, 1 timeout or nothing received, 2 usage error (one line, no traceback).

A BODY that is valid JSON is sent as that value (``'{"a": 1}'``, ``42``); anything else
as a string.  ``-`` reads it from stdin.
"""

from __future__ import annotations

import json
import os
import socket
import sys

USAGE = """usage: cfn msg send TO [BODY|-] [--kind K]
       cfn msg recv [--wait SECONDS] [--from ID] [--kind K] [--json]
       cfn msg request TO [BODY|-] --timeout SECONDS
       cfn msg reply MSG_ID [BODY|-]
       cfn msg peers [--role R] [--json]
       cfn msg status TEXT"""

#: flags each subcommand takes: name -> takes a value
FLAGS = {
    "send": {"--kind": True},
    "recv": {"--wait": True, "--from": True, "--kind": True, "--json": False},
    "request": {"--timeout": True},
    "reply": {},
    "peers": {"--role": True, "--json": False},
    "status": {},
}
#: positional arguments: (required, optional)
POSITIONAL = {"send": (1, 1), "recv": (0, 0), "request": (1, 1), "reply": (1, 1), "peers": (0, 0), "status": (1, 0)}


class Usage(Exception):
    """A usage error: one line on stderr, exit 2."""


def parse(argv: list[str]) -> tuple[str, list[str], dict[str, str | bool]]:
    if not argv or argv[0] in ("-h", "--help"):
        raise Usage(USAGE if argv else "missing subcommand (send, recv, request, reply, peers, status)")
    sub, rest = argv[0], argv[1:]
    if sub not in FLAGS:
        raise Usage(f"unknown subcommand {sub!r}: use send, recv, request, reply, peers or status")
    flags: dict[str, str | bool] = {}
    positional: list[str] = []
    i = 0
    while i < len(rest):
        arg = rest[i]
        if arg.startswith("--"):
            name, eq, value = arg.partition("=")
            if name not in FLAGS[sub]:
                raise Usage(f"cfn msg {sub}: unknown option {name} (allowed: {', '.join(FLAGS[sub]) or 'none'})")
            if FLAGS[sub][name]:
                if not eq:
                    i += 1
                    if i >= len(rest):
                        raise Usage(f"cfn msg {sub}: {name} needs a value")
                    value = rest[i]
                flags[name] = value
            else:
                flags[name] = True
        else:
            positional.append(arg)
        i += 1
    need, optional = POSITIONAL[sub]
    if not need <= len(positional) <= need + optional:
        raise Usage(f"cfn msg {sub}: expected {need}{f'-{need + optional}' if optional else ''} argument(s), got {len(positional)}")
    for name in ("--wait", "--timeout"):
        if name in flags:
            try:
                if float(flags[name]) < 0:
                    raise ValueError
            except ValueError:
                raise Usage(f"cfn msg {sub}: {name} = {flags[name]!r} is not a number of seconds >= 0") from None
    if sub == "request" and "--timeout" not in flags:
        raise Usage("cfn msg request: --timeout SECONDS is required")
    return sub, positional, flags


def body_of(text: str | None) -> object:
    if text is None:
        return None
    if text == "-":
        text = sys.stdin.read()
    try:
        return json.loads(text)
    except ValueError:
        return text


def request_of(sub: str, pos: list[str], flags: dict) -> dict:
    if sub == "send":
        return {"op": "send", "to": pos[0], "body": body_of(pos[1] if len(pos) > 1 else None), "kind": flags.get("--kind")}
    if sub == "recv":
        return {"op": "recv", "wait": float(flags.get("--wait", 0)), "sender": flags.get("--from"), "kind": flags.get("--kind")}
    if sub == "request":
        return {"op": "request", "to": pos[0], "body": body_of(pos[1] if len(pos) > 1 else None),
                "timeout": float(flags["--timeout"])}
    if sub == "reply":
        return {"op": "reply", "id": pos[0], "body": body_of(pos[1] if len(pos) > 1 else None)}
    if sub == "peers":
        return {"op": "peers", "role": flags.get("--role")}
    return {"op": "status", "text": pos[0]}


def call(path: str, request: dict) -> dict:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
        sock.sendall(json.dumps(request).encode() + b"\n")
        data = bytearray()
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        sock.close()
    if not data:
        raise ConnectionError("the agent closed the connection without an answer")
    return json.loads(data)


def show(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def main(argv: list[str]) -> int:
    """``cfn msg ARGS``; returns the exit status."""
    try:
        sub, pos, flags = parse(argv)
    except Usage as exc:
        print(f"cfn msg: {exc}" if "\n" not in str(exc) else str(exc), file=sys.stderr)
        return 2
    path = os.environ.get("CFN_AGENT_SOCKET")
    if not path:
        print("cfn msg: not inside a cfn agent (CFN_AGENT_SOCKET is not set): run it from a command agent's command",
              file=sys.stderr)
        return 2
    try:
        response = call(path, request_of(sub, pos, flags))
    except (OSError, ValueError) as exc:
        print(f"cfn msg: cannot reach the agent at {path}: {exc}", file=sys.stderr)
        return 2
    if not response.get("ok"):
        print(f"cfn msg {sub}: {response.get('error')}", file=sys.stderr)
        return 1 if response.get("code") == 1 else 2
    if sub == "recv":
        message = response["message"]
        print(json.dumps(message) if flags.get("--json") else show(message["body"]))
    elif sub == "request":
        print(show(response["body"]))
    elif sub == "peers":
        print(json.dumps(response["peers"]) if flags.get("--json") else "\n".join(response["peers"]))
    elif sub in ("send", "reply"):
        print(response["id"])
    return 0
