#!/bin/sh
# A shell agent for tests/test_talk_cli.py: stdin is the task's payload (a word).
cfn=${CFN_TEST_CFN:-cfn}
read -r what
case "$what" in
env)
    echo "$CFN_AGENT_ID $CFN_ROLE $CFN_TASK_ID $(test -S "$CFN_AGENT_SOCKET" && echo socket)"
    ;;
ask)
    peer=$($cfn msg peers | head -n 1)
    $cfn msg status "asking $peer" || exit 9
    $cfn msg request "$peer" '{"q": "ping"}' --timeout 60
    ;;
answer)
    json=$($cfn msg recv --wait 60 --json) || exit 8
    id=$(printf '%s' "$json" | python3 -c 'import json, sys; print(json.load(sys.stdin)["id"])')
    printf 'pong from %s' "$CFN_AGENT_ID" | $cfn msg reply "$id" - >/dev/null
    echo "answered $id"
    ;;
codes)
    $cfn msg recv; a=$?
    $cfn msg send agent-9999 hello 2>/dev/null; b=$?
    $cfn msg send 2>/dev/null; c=$?
    $cfn msg request agent-0002 x --timeout 0.5 2>/dev/null; d=$?
    echo "$a $b $c $d"
    ;;
send10)
    peer=$($cfn msg peers | head -n 1)
    i=0
    while [ $i -lt 10 ]; do $cfn msg send "$peer" "$i" --kind n >/dev/null || exit 7; i=$((i + 1)); done
    echo sent
    ;;
recv10)
    got=""
    i=0
    while [ $i -lt 10 ]; do got="$got $($cfn msg recv --wait 60 --kind n)" || exit 6; i=$((i + 1)); done
    echo $got
    ;;
esac
