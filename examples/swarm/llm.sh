# llm.sh: a stand-in for an LLM CLI such as `claude -p`: the prompt on stdin, the answer on stdout.
# It answers the three prompts of swarm.sh the way a model told to would, deterministically:
#   "Split this job into N parts ..."  -> N lines, one part each
#   "Write a shell function ..."       -> the code (it leaves a TODO in anything about a report)
#   "Review this code ..."             -> "approve", or "revise: <why>" for code that still says TODO
prompt=$(cat)
case "$prompt" in
"Split this job into "*)
    n=$(printf '%s\n' "$prompt" | head -n 1 | cut -d' ' -f5)
    job=$(printf '%s\n' "$prompt" | sed -n '2,$p')
    # consecutive words of the job per part, shared out evenly; a short job is used round again
    printf '%s\n' "$job" | awk -v n="$n" '{ for (i = 1; i <= NF; i++) w[++count] = $i }
        END { for (p = 0; p < n; p++) {
                  from = int(p * count / n); to = int((p + 1) * count / n); if (to == from) to = from + 1
                  line = w[from % count + 1]
                  for (k = from + 1; k < to; k++) line = line " " w[k % count + 1]
                  print line } }'
    ;;
"Write a shell function "*)
    spec=$(printf '%s\n' "$prompt" | sed -n '2,$p')
    name=$(printf '%s' "$spec" | tr -cs 'A-Za-z0-9' '_' | cut -c1-40)
    echo "${name%_}() {"
    echo "    # $spec"
    case "$spec" in
    *report*) echo "    : TODO not done yet" ;;
    *) echo "    return 0" ;;
    esac
    echo "}"
    ;;
"Review this code"*)
    case "$prompt" in
    *TODO*) echo "revise: it still says TODO" ;;
    *) echo "approve" ;;
    esac
    ;;
*)
    echo "llm.sh: a prompt I was not written for: $(printf '%s' "$prompt" | head -c 60)" >&2
    exit 1
    ;;
esac
