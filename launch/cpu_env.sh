# Sourced by the launch scripts (local.sh, test.sh, seeds.sh): how glibc's malloc serves
# XLA:CPU's buffers. XLA:CPU allocates a program's temporaries afresh on every call; above
# 32 MB (glibc's largest mmap threshold) malloc maps them anew each time and the kernel
# faults in and zeroes every 4 KB page, every step: ~20% of the default flow's CPU time was
# system time. glibc.malloc.hugetlb=1 backs large blocks with transparent huge pages (512x
# fewer faults where the kernel's THP mode is 'madvise' or 'always'); the other tunables
# keep smaller blocks on the heap instead of returning them to the kernel after each step.
# Measured in docs/benchmarks.md ("The C allocator"); bench/allocator.py repeats it.
# An explicitly set GLIBC_TUNABLES (even empty) is left as it is; other libcs ignore it.
if [ -z "${GLIBC_TUNABLES+x}" ]; then
  export GLIBC_TUNABLES=glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=1073741824:glibc.malloc.top_pad=67108864:glibc.malloc.arena_max=2
fi
