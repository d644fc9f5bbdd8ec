"""The smallest cfn handler: called in an agent process with one task's payload.

Whatever it returns (any JSON value) travels back to the coordinator as the
task's result; if it raises, that task gets an error result and the agent
lives on.
"""

import os


def handle(payload):
    return {"echo": payload, "length": len(payload), "agent_pid": os.getpid()}
