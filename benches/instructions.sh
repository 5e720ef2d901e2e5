#!/usr/bin/env bash
# Instructions per `tools/call` of the proxy, counted by callgrind: unlike time, the count does
# not drift with a shared machine, so it shows what a change saves. Needs valgrind.
#
#   benches/instructions.sh                 # sequential calls, the release build in target/release
#   benches/instructions.sh path/to/apie-mcp
#   benches/instructions.sh --guard [path]  # the guard-service section: calls the service decides
#
# The workload runs twice (APIE_BENCH_SCALE 0.1 and 0.3) with the proxy under callgrind; the
# difference of the two totals over the difference of the calls leaves out start-up. Under
# valgrind, SHA-256 runs in software (valgrind hides the SHA extensions), so the audit-log
# figures include about 11,000 instructions that take a few hundred on the real CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
section=seq calls_per_run=4000 configs="proxy.json proxynoaudit.json"
if [ "${1:-}" = --guard ]; then
    section=guard calls_per_run=2000 configs="proxy.json proxyguard.json proxyguardevents.json"
    shift
fi
bin=$(realpath "${1:-target/release/apie-mcp}")
[ -x "$bin" ] || { echo "no proxy binary at $bin (cargo build --release)" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cat > "$work/proxy" <<EOT
#!/bin/sh
exec valgrind --tool=callgrind --callgrind-out-file="$work/out.%p" "$bin" "\$@" 2>/dev/null
EOT
chmod +x "$work/proxy"
# One round of the section: its calls x scale, after 300 x scale of warm-up.
declare -A total
for scale in 0.1 0.3; do
    rm -f "$work"/out.*
    APIE_BENCH_PROXY="$work/proxy" APIE_BENCH_ONLY=$section APIE_BENCH_ROUNDS=1 \
        APIE_BENCH_SCALE=$scale cargo bench --bench proxy > /dev/null 2> "$work/cargo.log" \
        || { cat "$work/cargo.log" >&2; exit 1; }
    for f in "$work"/out.*; do
        config=$(grep -o 'proxy[a-z]*\.json' "$f" | head -1)
        total[$scale.$config]=$(awk '/^(summary|totals):/ {print $2; exit}' "$f")
    done
done
calls=$(( (calls_per_run + 300) * 3 / 10 - (calls_per_run + 300) / 10 ))
for config in $configs; do
    per_call=$(( (total[0.3.$config] - total[0.1.$config]) / calls ))
    case $config in
        proxy.json) label="audit log on" ;;
        proxynoaudit.json) label="no audit log" ;;
        proxyguard.json) label="guard service" ;;
        *) label="guard + events" ;;
    esac
    printf '%-14s %7d instructions per call\n' "$label" "$per_call"
done
