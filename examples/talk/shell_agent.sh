#!/bin/sh
# A shell agent: its task's payload (stdin) says what to do. Swap `cfn msg` calls into an
# LLM CLI's shell tool and the same protocol carries its questions and answers.
read -r what
case "$what" in
ask)
    peer=$(cfn msg peers | head -n 1)
    cfn msg status "asking $peer"
    cfn msg request "$peer" "what is 6 x 7?" --timeout 60
    ;;
answer)
    question=$(cfn msg recv --wait 60 --json) || exit 1
    id=$(printf '%s' "$question" | python3 -c 'import json, sys; print(json.load(sys.stdin)["id"])')
    cfn msg reply "$id" "42, says $CFN_AGENT_ID" >/dev/null
    echo "answered $id"
    ;;
time)  # wall time of one `cfn msg send`, averaged over 20 calls
    peer=$(cfn msg peers | head -n 1)
    start=$(date +%s%N)
    for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do cfn msg send "$peer" "$i" >/dev/null; done
    echo "cfn msg send: $(( ($(date +%s%N) - start) / 20000000 )) ms per call"
    ;;
esac
