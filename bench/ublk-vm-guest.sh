# /init body (after tests/vm/guest/lib.sh) for bench/ublk-vm.sh: fio on the raw
# virtio disk, then on /dev/ublkb<minor> standalone and mirrored in each mode
# (backing files on an ext4 on that same disk), each written once first.
# Prints "BENCH <target> <job>
# <MiB/s> <IOPS>" lines, then "RESULT: PASS".
boot_guest
# The raw virtio disk (/dev/vda): its driver is a module in Debian's kernel.
while read -r m; do insmod "/modules/$m" 2>/dev/null; done < /modules/extra.list
wait_until 10 test -b /dev/vda || { echo "no /dev/vda"; echo "RESULT: FAIL"; poweroff -f; }
FIO="fio --ioengine=io_uring --direct=1 --time_based --runtime=${BENCH_S:-10} --ramp_time=2 --group_reporting"
job() { # TARGET DEVICE SIZE
  local t=$1 dev=$2 size=$3
  # Write the whole device once first (not measured): the jobs then see
  # allocated backing blocks and regions already marked in the state map,
  # the steady state, not first-touch costs.
  fio --name=fill --ioengine=io_uring --direct=1 --filename=$dev --size=$size --rw=write --bs=1m --iodepth=16 >/dev/null
  echo "BENCH $t randwrite-4k-qd32 $($FIO --name=r4k --filename=$dev --size=$size --rw=randwrite --bs=4k --iodepth=32 | parse write)"
  echo "BENCH $t randwrite-4k-qd1 $($FIO --name=r4k1 --filename=$dev --size=$size --rw=randwrite --bs=4k --iodepth=1 | parse write)"
  echo "BENCH $t write-1m-qd16 $($FIO --name=s1m --filename=$dev --size=$size --rw=write --bs=1m --iodepth=16 | parse write)"
  echo "BENCH $t randread-4k-qd32 $($FIO --name=rr4k --filename=$dev --size=$size --rw=randread --bs=4k --iodepth=32 | parse read)"
}
job raw /dev/vda 256M
mkfs.ext4 -q -F /dev/vda && umount /t && mount -t ext4 /dev/vda /t || { echo "RESULT: FAIL"; poweroff -f; }
minor=0
for mode in standalone mwc async sync; do
  m=$mode; [ $mode = standalone ] && m=mwc
  d=/t/$mode; make_cluster "$d" $m $minor 256
  gmdd_up "$d" alpha
  ctl "$d" alpha configure d$minor >/dev/null && ctl "$d" alpha down d$minor beta >/dev/null && ctl "$d" alpha start d$minor >/dev/null
  if [ $mode != standalone ]; then
    gmdd_up "$d" beta
    ctl "$d" beta configure d$minor >/dev/null && ctl "$d" beta start d$minor >/dev/null
    wait_until 120 in_sync "$d" alpha d$minor
  fi
  job $mode /dev/ublkb$minor 256M
  # How many writes ran on the ublk queue threads (gmdstat local counters).
  s=$(gmdstat --socket "$d/alpha.sock" -l d$minor --json | tr -d ' \n')
  echo "BENCH-INFO $mode writes $(echo "$s" | sed -n 's/.*"local":{[^}]*"writes":\([0-9]*\).*/\1/p') direct_writes $(echo "$s" | sed -n 's/.*"direct_writes":\([0-9]*\).*/\1/p')"
  ctl "$d" alpha stop d$minor >/dev/null; [ $mode != standalone ] && ctl "$d" beta stop d$minor >/dev/null
  gmdd_kill "$d" alpha TERM; [ $mode != standalone ] && gmdd_kill "$d" beta TERM
  minor=$((minor + 1))
done
echo "RESULT: PASS"
sync; poweroff -f
