"""Give each agent one prompt, print every answer, failure and timeout.

    python run.py                 # the prompts below
    python run.py "a prompt" ...  # your own

Each agent runs `[workload] command` from cfn.toml once per task, with the
prompt on stdin.  Exit status: 0 when every prompt was answered, 1 otherwise
(as `cfn run`).
"""

import sys
from pathlib import Path

from cfn_core import Coordinator, load_config

PROMPTS = [
    "summarize the plan in one line",
    "list three risks",
    "[fail] a prompt the tool rejects",
    "[hang] a prompt the tool never finishes",
]


def main(prompts: list[str]) -> int:
    config = load_config(Path(__file__).with_name("cfn.toml"))
    config = config.evolve(workload={"agents": len(prompts)})  # one agent per prompt
    with Coordinator(config) as coord:
        result = coord.run(prompts)
    # task ids are r<round>-t<index>, in the order the payloads were given
    for (task_id, res), prompt in zip(sorted(result.results.items()), prompts):
        print(f"{task_id} {prompt!r}")
        if res.ok:
            print(f"    ok     {res.value.strip()}")
        else:
            print(f"    FAILED {res.error}")
            tail = (res.stderr or "").strip()  # the last 2,000 bytes of the command's stderr
            if tail and tail not in res.error:  # (a failed command's last line is in the error already)
                print(f"    stderr {tail}")
    print(f"{result.delivered}/{result.planned} messages delivered, {result.failed} task(s) failed")
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or PROMPTS))
