# fio helpers for the bench guest scripts (sourced into /init after
# tests/vm/guest/lib.sh by bench/ublk-vm.sh).
# parse OP: "  write: IOPS=12.3k, BW=48.1MiB/s (...)" → "MiB/s IOPS"
parse() {
  grep -m1 " $1: IOPS=" | sed 's/.*IOPS=\([0-9.]*[kM]*\), BW=\([0-9.]*\)\([KMG]i*B\)\/s.*/\1 \2 \3/' |
  awk '{ i=$1; m=1; if (i ~ /k$/) m=1000; if (i ~ /M$/) m=1000000; sub(/[kM]$/, "", i)
         b=$2; u=$3; f=1; if (u=="KiB") f=1/1024; if (u=="GiB") f=1024; if (u=="B") f=1/1048576
         printf "%.1f %d", b*f, i*m }'
}
