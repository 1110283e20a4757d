// A streaming-read bandwidth probe (benchmarks/kernel.py measures read_bw_gbs
// with it in the same run as the kernels).
#ifndef CQJAX_STREAM_READ_H_
#define CQJAX_STREAM_READ_H_

#include <cstddef>

namespace cqjax {

// Best read bandwidth in GB/s over `reps` passes of `threads` threads summing
// a freshly allocated and touched buffer of `bytes` bytes (each thread a slice).
double StreamReadGbs(std::size_t bytes, int threads, int reps);

}  // namespace cqjax

#endif  // CQJAX_STREAM_READ_H_
