# Sourced by the launch scripts (local.sh, test.sh, seeds.sh): how glibc's malloc serves
# XLA:CPU's buffers. XLA:CPU allocates a program's temporaries afresh on every call; above
# 32 MB (glibc's largest mmap threshold) malloc maps them anew each time and the kernel
# faults in and zeroes every 4 KB page, every step: ~20% of the default flow's CPU time was
# system time. glibc.malloc.hugetlb=1 has malloc ask for transparent huge pages (madvise):
# 512x fewer faults where the kernel's THP mode is 'madvise' or 'always' (no effect where it
# is 'never'). Keeping smaller blocks on the heap as well (mmap/trim thresholds, top pad,
# two arenas) measured no faster. docs/benchmarks.md ("The C allocator"); bench/allocator.py.
# An explicitly set GLIBC_TUNABLES (even empty) is left as it is; other libcs ignore it.
if [ -z "${GLIBC_TUNABLES+x}" ]; then
  export GLIBC_TUNABLES=glibc.malloc.hugetlb=1
fi
