# coder.sh: a stand-in for an LLM CLI such as `claude -p`: the spec on stdin, the code on stdout.
# Anything about a report is "too hard": the answer leaves a TODO, which the reviewer sends back.
spec=$(cat)
name=$(printf '%s' "$spec" | tr -cs 'A-Za-z0-9' '_' | cut -c1-40)
echo "def ${name%_}():"
echo "    \"\"\"$spec\"\"\""
case "$spec" in
  *report*) echo "    # TODO: not done yet" ;;
  *) echo "    return True" ;;
esac
