#!/bin/sh
# A stand-in for an LLM command line such as `claude -p`: the prompt arrives on
# stdin, the answer goes to stdout, diagnostics go to stderr, and a non-zero exit
# status means the task failed.  Swap it for the real CLI in cfn.toml.
prompt=$(cat)
case "$prompt" in
  *"[fail]"*)
    echo "fake-llm: cannot answer: $prompt" >&2
    exit 3 ;;
  *"[hang]"*)
    echo "fake-llm: thinking about '$prompt' forever..." >&2
    sleep 600 ;;  # [workload] timeout kills it (and everything it started)
esac
# what the call cost, in the convention cfn-llm reads (claude -p --output-format json
# reports it in its result document instead)
echo '{"cfn_usage": {"tokens_in": 12, "tokens_out": 8, "cost_usd": 0.001}}' >&2
words=$(printf '%s' "$prompt" | wc -w)
printf 'answer to a %s-word prompt: %s\n' "$words" "$(printf '%s' "$prompt" | tr 'a-z' 'A-Z')"
