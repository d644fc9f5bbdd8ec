# swarm.sh ROLE: one agent of the swarm (cfn.toml runs it as the command of each role).
# Agents talk with `cfn msg` as the agent that runs them ($CFN_AGENT_ID); the job is on stdin.
#
#   planner   asks the LLM to split the job, sends one part to each coder (naming its reviewer),
#             collects one result per part, then tells the reviewers to stop
#   coder     receives its part, asks the LLM for the code, asks its reviewer for a verdict
#             (`cfn msg request`), and sends the part, the verdict and the code to the planner
#   reviewer  answers review requests (`cfn msg recv` + `cfn msg reply`) until the planner says stop

# The LLM: the stand-in script next to this file. For a real one, change this one line to
#   llm() { claude -p; }
llm() { sh ./llm.sh; }

WAIT=${SWARM_WAIT:-600}   # seconds an agent waits for its next message (an LLM may be slow)

planner() {
    job=$(cat)
    coders=$(cfn msg peers --role coder) || exit 2
    reviewers=$(cfn msg peers --role reviewer) || exit 2
    n=$(printf '%s\n' "$coders" | wc -l)
    r=$(printf '%s\n' "$reviewers" | wc -l)
    cfn msg status "splitting the job into $n parts"
    parts=$(printf 'Split this job into %s parts, one line each, nothing else:\n%s\n' "$n" "$job" | llm) || exit 1
    [ "$(printf '%s\n' "$parts" | wc -l)" -eq "$n" ] || { echo "the LLM gave not $n parts:" >&2; echo "$parts" >&2; exit 1; }
    # part i goes to the i-th coder, reviewed by reviewer i mod r: the reviewers share the load evenly
    i=0
    printf '%s\n' "$parts" | while IFS= read -r spec; do
        i=$((i + 1))
        coder=$(printf '%s\n' "$coders" | sed -n "${i}p")
        reviewer=$(printf '%s\n' "$reviewers" | sed -n "$(( (i - 1) % r + 1 ))p")
        cfn msg send "$coder" "$i $reviewer $CFN_AGENT_ID $spec" --kind part >/dev/null || exit 2
    done || exit 2
    cfn msg status "waiting for $n results"
    results=$(
        got=0
        while [ "$got" -lt "$n" ]; do
            result=$(cfn msg recv --kind result --wait "$WAIT") || { echo "collected $got/$n: a result did not come" >&2; exit 1; }
            printf '%s\n' "$result" | head -n 1   # "<part> <coder> <reviewer> <verdict>: <spec>"
            got=$((got + 1))
        done
    ) || exit 1
    printf '%s\n' "$results" | sort -n
    printf '%s\n' "$reviewers" | while IFS= read -r reviewer; do
        cfn msg send "$reviewer" stop --kind stop >/dev/null || exit 2
    done
}

coder() {
    # the part: "<number> <reviewer> <planner> <spec>"
    part=$(cfn msg recv --kind part --wait "$WAIT") || { echo "no part came" >&2; exit 1; }
    read -r number reviewer planner spec <<PART
$part
PART
    code=$(printf 'Write a shell function for this spec, only the code:\n%s\n' "$spec" | llm) || exit 1
    verdict=$(printf 'part %s by %s\n%s\n' "$number" "$CFN_AGENT_ID" "$code" |
        cfn msg request "$reviewer" - --timeout "$WAIT") || { echo "$reviewer did not answer" >&2; exit 1; }
    # the result's first line is the summary the planner prints; the code follows
    printf '%s %s %s %s: %s\n%s\n' "$number" "$CFN_AGENT_ID" "$reviewer" "$(echo "$verdict" | head -n 1 | cut -d: -f1)" "$spec" "$code" |
        cfn msg send "$planner" - --kind result >/dev/null || exit 2
    echo "part $number: $verdict"
}

reviewer() {
    while message=$(cfn msg recv --wait "$WAIT" --json); do
        # the message's id, its kind, then its body (python3 reads the JSON)
        fields=$(printf '%s' "$message" | python3 -c 'import json, sys; m = json.load(sys.stdin); print(m["id"]); print(m["kind"]); print(m["body"])')
        id=$(printf '%s\n' "$fields" | sed -n 1p)
        kind=$(printf '%s\n' "$fields" | sed -n 2p)
        [ "$kind" = stop ] && exit 0
        work=$(printf '%s\n' "$fields" | sed -n '3,$p')
        verdict=$(printf 'Review this code. Answer "approve", or "revise: " and why, on one line:\n%s\n' "$work" | llm) || exit 1
        cfn msg reply "$id" "$verdict" >/dev/null || exit 2
        echo "reviewed $(printf '%s\n' "$work" | head -n 1): $verdict"   # "reviewed part 7 by coder-0007: approve"
    done
    echo "no stop from the planner" >&2
    exit 1
}

case "$1" in
planner | coder | reviewer) "$1" ;;
*) echo "usage: sh swarm.sh planner|coder|reviewer (got '$1')" >&2; exit 2 ;;
esac
