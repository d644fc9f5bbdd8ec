"""A fake LLM CLI for the limits/LLM tests: `python llm_fake_cli.py MODE LOGDIR`.

Reads the prompt on stdin, appends one line per call to LOGDIR/calls (task id and
what it answered), and behaves by MODE:

* ``ok``: sleeps ``FAKE_SLEEP`` (0.2 s) and prints ``answer: <prompt>``;
* ``json``: prints a ``claude -p --output-format json`` result document
  (tests/data/claude_result.json with this call's cost and tokens);
* ``flaky429``: 30% of calls print ``Error: 429 Too Many Requests`` on stderr and exit 1;
* ``exit75``: the first call of each task exits 75 (a retryable failure), the next answers;
* ``hang``: prints one line, then stays silent (a wedged CLI);
* ``chatty``: prints a line every 50 ms forever (a CLI that never finishes);
* ``usage``: answers and prints a ``cfn_usage`` JSON line on stderr;
* ``server``: a provider that allows ``FAKE_LIMIT`` (5) calls per second across every
  caller (their times kept in LOGDIR/window under a lock) and answers 429 beyond it.
"""

import json
import os
import random
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def log(logdir: str, what: str) -> None:
    with open(os.path.join(logdir, "calls"), "a") as f:
        f.write(f"{os.environ.get('CFN_TASK_ID', '?')} {what}\n")


def main() -> int:
    mode, logdir = sys.argv[1], sys.argv[2]
    prompt = sys.stdin.read()
    task = os.environ.get("CFN_TASK_ID", "?")
    if mode == "ok":
        time.sleep(float(os.environ.get("FAKE_SLEEP", "0.2")))
        log(logdir, "ok")
        print(f"answer: {prompt}")
        return 0
    if mode == "flaky429":
        if random.random() < 0.3:
            log(logdir, "429")
            print("Error: 429 Too Many Requests (rate_limit_error)", file=sys.stderr)
            return 1
        time.sleep(0.05)
        log(logdir, "ok")
        print(f"answer: {prompt}")
        return 0
    if mode == "exit75":
        marker = os.path.join(logdir, f"seen-{task}")
        if not os.path.exists(marker):
            open(marker, "w").close()
            log(logdir, "75")
            print("temporary failure, try again", file=sys.stderr)
            return 75
        log(logdir, "ok")
        print("answer after a retry")
        return 0
    if mode == "json":
        with open(os.path.join(HERE, "data", "claude_result.json")) as f:
            doc = json.load(f)
        n = int(prompt.strip() or 1)  # the prompt says how expensive the call is
        doc["total_cost_usd"] = round(0.01 * n, 6)
        doc["usage"]["input_tokens"] = 100 * n
        doc["usage"]["output_tokens"] = 10 * n
        doc["session_id"] = f"session-{task}"
        doc["result"] = f"answer {n}"
        log(logdir, f"json {n}")
        time.sleep(float(os.environ.get("FAKE_SLEEP", "0.05")))
        print(json.dumps(doc))
        return 0
    if mode == "server":
        import fcntl

        limit = int(os.environ.get("FAKE_LIMIT", "5"))
        with open(os.path.join(logdir, "window"), "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            f.seek(0)
            now = time.time()
            recent = [float(t) for t in f.read().split() if now - float(t) < 1.0]
            refused = len(recent) >= limit
            if not refused:
                recent.append(now)
            f.seek(0)
            f.truncate()
            f.write(" ".join(map(str, recent)))
        if refused:
            log(logdir, "429")
            print("Error: 429 Too Many Requests (rate_limit_error)", file=sys.stderr)
            return 1
        log(logdir, "ok")
        print(f"answer: {prompt}")
        return 0
    if mode == "usage":
        log(logdir, "usage")
        print(json.dumps({"cfn_usage": {"tokens_in": 7, "tokens_out": 3, "cost_usd": 0.5}}), file=sys.stderr)
        print("answer")
        return 0
    if mode == "hang":
        print("thinking...", flush=True)
        log(logdir, "hang")
        os.execvp("sleep", ["sleep", "600"])
    if mode == "chatty":
        log(logdir, "chatty")
        while True:
            print("still working...", flush=True)
            time.sleep(0.05)
    raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    sys.exit(main())
