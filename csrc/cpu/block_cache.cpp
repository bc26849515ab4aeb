// The CPU memory behind empty_large(): the large per-call tensors (outputs, saved values, chunk
// buffers, input gradients) come from here, and their blocks come back here when freed instead of
// going back to the system.
//
// Why: glibc serves blocks this large with a fresh mmap and returns them with munmap, so every
// call paid a page fault and the kernel's zeroing per 4 KB of them, on every call (an LSTM
// training step at T=100, B=64, H=512 allocates about 100 MB that way). A kept block is already
// mapped. Huge pages (MADV_HUGEPAGE) were tried first; with the kernel's defrag=madvise setting they
// made the first write stall on compaction at random (bench/NOTES.md has both measurements).
//
// The cache holds at most cpu_cache_mb megabytes (the FUSED_RNN_CPU_CACHE_MB override; default 1024, 0 turns it off) of free
// blocks; fused_rnn.empty_cache() gives them all back. Blocks are reused for requests of up to
// 5/4 their size and taken best-fit, so a training loop over sequences of varying length reuses
// its blocks too.
#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/Exception.h>

#include <map>
#include <mutex>

#include "../overrides.h"
#include "layer_cpu.h"

namespace fused_rnn {
namespace {

// Below this a block is left to the ordinary allocator, whose small blocks are cheap.
constexpr size_t kMinBytes = size_t{1} << 20;

class BlockCache final : public c10::Allocator {
  struct Block {
    void* data;
    size_t size;
  };

 public:
  // The limit is the cpu_cache_mb override's (csrc/overrides.h), read at every use, so that a
  // change applies to the next block freed.
  static size_t limit() { return static_cast<size_t>(override_value(Override::kCpuCacheMb)) << 20; }
  bool enabled() const { return limit() > 0; }

  c10::DataPtr allocate(size_t bytes) override {
    Block block = take(bytes);
    if (!block.data) {
      try {
        block = {c10::alloc_cpu(bytes), bytes};
      } catch (const c10::Error&) {  // out of memory: give the kept blocks back and try once more
        clear();
        block = {c10::alloc_cpu(bytes), bytes};
      }
    }
    return {block.data, new Block(block), &BlockCache::release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  size_t cached_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return cached_;
  }

  void clear() {
    std::lock_guard<std::mutex> lock(mutex_);
    for (const auto& [size, data] : free_) c10::free_cpu(data);
    free_.clear();
    cached_ = 0;
  }

  static BlockCache& get() {
    static BlockCache* cache = new BlockCache();  // never destroyed: tensors may outlive static teardown
    return *cache;
  }

 private:
  // The smallest free block of at least `bytes` and at most 5/4 of it, or {null, 0}.
  Block take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto it = free_.lower_bound(bytes);
    if (it == free_.end() || it->first > bytes + bytes / 4) return {nullptr, 0};
    const Block block{it->second, it->first};
    cached_ -= block.size;
    free_.erase(it);
    return block;
  }

  static void release(void* context) {
    Block* block = static_cast<Block*>(context);
    get().keep_or_free(block->data, block->size);
    delete block;
  }

  void keep_or_free(void* data, size_t size) {
    if (!data) return;  // a zero-byte request (a tensor resized to nothing)
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (cached_ + size <= limit()) {
        free_.emplace(size, data);
        cached_ += size;
        return;
      }
    }
    c10::free_cpu(data);
  }

  std::mutex mutex_;
  std::multimap<size_t, void*> free_;  // size -> block
  size_t cached_ = 0;
};

}  // namespace

at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options) {
  if (!options.device().is_cpu()) return at::empty(sizes, options);
  BlockCache& cache = BlockCache::get();
  const size_t bytes = c10::multiply_integers(sizes) * options.dtype().itemsize();
  if (!cache.enabled() || bytes < kMinBytes) return at::empty(sizes, options);
  return at::detail::empty_generic(sizes, &cache, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), c10::nullopt);
}

size_t cpu_cache_bytes() { return BlockCache::get().cached_bytes(); }

void empty_cpu_cache() { BlockCache::get().clear(); }

}  // namespace fused_rnn
