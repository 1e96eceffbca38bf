#!/usr/bin/env bash
# Print this node's address as other nodes reach it: `hostname -i`, unless that is loopback (a Debian-style
# 127.0.1.1 entry), then the first address from `hostname -I`, then the bare hostname.
addr=$(hostname -i 2>/dev/null | awk '{print $1}')
case "$addr" in
    "" | 127.* | ::1) addr=$(hostname -I 2>/dev/null | awk '{print $1}') ;;
esac
echo "${addr:-$(hostname)}"
