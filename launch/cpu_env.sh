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

# XLA:CPU's matmuls. jaxlib 0.10.2 hands dots to YNNPACK fusions by default; XLA's own dot
# emitter (--xla_cpu_experimental_ynn_fusion_type=, the empty list) ran the default flow's
# stages in 0.86x the time and the TRL-shaped RM step 1.25-1.29x faster than YNNPACK on the
# AVX-512 CPU (docs/benchmarks.md). The two round differently, so bits differ between them:
# WARM_JAX_CPU_DOTS=ynnpack keeps jaxlib's default (the one every run documented before the
# default changed used; docs/results.md says which). A ynn_fusion_type already in XLA_FLAGS
# is left as it is. Every run records XLA_FLAGS in its run_info.
case "${WARM_JAX_CPU_DOTS:-xla}" in
  xla)
    case " ${XLA_FLAGS:-} " in
      *--xla_cpu_experimental_ynn_fusion_type*) ;;
      *) export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_cpu_experimental_ynn_fusion_type=" ;;
    esac ;;
  ynnpack) ;;
  *) echo "launch/cpu_env.sh: WARM_JAX_CPU_DOTS must be 'xla' or 'ynnpack', got '${WARM_JAX_CPU_DOTS}'" >&2
     return 2 2>/dev/null || exit 2 ;;
esac
