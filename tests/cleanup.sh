#!/bin/sh
# Removes everything the simulated-node tests and the demo create, for when a run was
# killed before its Drop/trap could clean up. Safe to run any time no test is running.
for p in $(pgrep -f 'podtool|mesh-agent run'); do kill -9 "$p" 2>/dev/null; done
for ns in $(ip netns list | awk '{print $1}' | grep -E '^(mt[0-9]+-|mtc[0-9]+-|mdemo-|mdemoc-)'); do ip netns del "$ns"; done
for br in $(ip -o link show type bridge | awk -F': ' '{print $2}' | grep -E '^(mtbr[0-9]+|mdemobr)$'); do ip link del "$br"; done
cg=$(awk '$9 == "cgroup2" {print $5; exit}' /proc/self/mountinfo)
for d in "$cg"/mesh-test-* "$cg"/mesh-demo "$cg"/mesh-demo-c-*; do
  [ -d "$d" ] || continue
  for sub in "$d"/*/; do [ -d "$sub" ] && rmdir "$sub" 2>/dev/null; done
  rmdir "$d" 2>/dev/null
done
for d in /sys/fs/bpf/mesh-test-* /sys/fs/bpf/mesh-demo /sys/fs/bpf/mesh-demo-c-*; do
  [ -d "$d" ] && rm -f "$d"/* && rmdir "$d"
done
rm -rf /tmp/mesh-test-* /tmp/mesh-demo /tmp/mesh-demo-cluster
exit 0
