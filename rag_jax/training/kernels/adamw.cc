// AdamW's update of one float32 parameter in one pass over memory, as an XLA FFI handler for the
// CPU (rag_jax/training/cpu_adamw.py builds, registers and calls it). Per element, the expressions of
// rag_jax.training.optim.adamw_update:
//   g' = g * factor;  mu' = (1 - b1) g' + b1 mu;  nu' = (1 - b2) g'^2 + b2 nu
//   p' = p + rate * ((mu' / c1) / (sqrt(nu' / c2) + eps) [+ weight_decay * p])
// rounded as XLA:CPU computes them: the divisions by the bias corrections c1, c2 as products with
// their reciprocals (passed in), and the multiply-adds XLA:CPU contracts as std::fma (compiled with
// -ffp-contract=off, so no others are), which makes the results XLA's bit for bit (tested).
// The results alias the parameter and moments (the caller declares input_output_aliases), so with
// donated buffers the update is in place: read p, g, mu, nu and write p, mu, nu once each. A true
// `skip` leaves them as they are. The elements are split in chunks over XLA's intra-op thread pool.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Coefficients {
  float factor, rate, c1, c2;  // clip factor, minus the learning rate, reciprocal bias corrections 1 / (1 - b^t)
  float b1, one_minus_b1, b2, one_minus_b2, eps, weight_decay;  // 1 - b rounded from double, as jax does
};

template <bool kDecay>
void UpdateRange(const Coefficients& k, float* __restrict__ p, const float* __restrict__ g,
                 float* __restrict__ mu, float* __restrict__ nu, int64_t begin, int64_t end) {
  const float factor = k.factor, rate = k.rate, c1 = k.c1, c2 = k.c2, b1 = k.b1, one_minus_b1 = k.one_minus_b1,
              b2 = k.b2, one_minus_b2 = k.one_minus_b2, eps = k.eps, weight_decay = k.weight_decay;
  for (int64_t i = begin; i < end; ++i) {
    const float gi = g[i] * factor;
    const float m = std::fma(one_minus_b1, gi, b1 * mu[i]);
    const float v = std::fma(b2, nu[i], one_minus_b2 * (gi * gi));
    float update = (m * c1) / (std::sqrt(v * c2) + eps);
    if constexpr (kDecay) update = std::fma(weight_decay, p[i], update);
    p[i] = std::fma(update, rate, p[i]);
    mu[i] = m;
    nu[i] = v;
  }
}

// Chunks taken in turn by the calling thread and the pool's tasks; shared so that a task that starts
// after the call returned finds no chunk left and touches nothing else.
struct Work {
  Coefficients k;
  float *p, *mu, *nu;
  const float* g;
  int64_t size, chunks;
  std::atomic<int64_t> next{0}, done{0};

  static constexpr int64_t kChunk = 1 << 16;  // elements: 256 KiB of each array

  void Drain() {
    for (int64_t c; (c = next.fetch_add(1)) < chunks;) {
      const int64_t begin = c * kChunk, end = std::min(size, begin + kChunk);
      if (k.weight_decay != 0.0f) {
        UpdateRange<true>(k, p, g, mu, nu, begin, end);
      } else {
        UpdateRange<false>(k, p, g, mu, nu, begin, end);
      }
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

void CopyUnlessSame(const ffi::Buffer<ffi::F32>& from, ffi::Result<ffi::Buffer<ffi::F32>>& to) {
  if (to->typed_data() != from.typed_data()) std::copy_n(from.typed_data(), from.element_count(), to->typed_data());
}

ffi::Error AdamW(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> p, ffi::Buffer<ffi::F32> g,
                 ffi::Buffer<ffi::F32> mu, ffi::Buffer<ffi::F32> nu, ffi::Buffer<ffi::F32> scalars,
                 ffi::Buffer<ffi::PRED> skip, float b1, float one_minus_b1, float b2, float one_minus_b2,
                 float eps, float weight_decay,
                 ffi::Result<ffi::Buffer<ffi::F32>> p_out, ffi::Result<ffi::Buffer<ffi::F32>> mu_out,
                 ffi::Result<ffi::Buffer<ffi::F32>> nu_out) {
  const int64_t size = p.element_count();
  if (g.element_count() != size || mu.element_count() != size || nu.element_count() != size ||
      scalars.element_count() != 4) {
    return ffi::Error::InvalidArgument("rag_jax_adamw: the parameter, gradient and moments differ in size");
  }
  // Without aliasing (operands not donated), start from copies and update those.
  CopyUnlessSame(p, p_out);
  CopyUnlessSame(mu, mu_out);
  CopyUnlessSame(nu, nu_out);
  if (skip.typed_data()[0]) return ffi::Error::Success();

  const float* s = scalars.typed_data();
  auto work = std::make_shared<Work>();
  work->k = {s[0], s[1], s[2], s[3], b1, one_minus_b1, b2, one_minus_b2, eps, weight_decay};
  work->p = p_out->typed_data();
  work->mu = mu_out->typed_data();
  work->nu = nu_out->typed_data();
  work->g = g.typed_data();
  work->size = size;
  work->chunks = (size + Work::kChunk - 1) / Work::kChunk;
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), work->chunks) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([work] { work->Drain(); });
  work->Drain();  // the caller takes chunks too: it never waits on a task that has not started
  while (work->done.load(std::memory_order_acquire) < work->chunks) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RagJaxAdamW, AdamW,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // p
                                  .Arg<ffi::Buffer<ffi::F32>>()   // g
                                  .Arg<ffi::Buffer<ffi::F32>>()   // mu
                                  .Arg<ffi::Buffer<ffi::F32>>()   // nu
                                  .Arg<ffi::Buffer<ffi::F32>>()   // factor, rate, c1, c2
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // skip
                                  .Attr<float>("b1")
                                  .Attr<float>("one_minus_b1")
                                  .Attr<float>("b2")
                                  .Attr<float>("one_minus_b2")
                                  .Attr<float>("eps")
                                  .Attr<float>("weight_decay")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // p
                                  .Ret<ffi::Buffer<ffi::F32>>()   // mu
                                  .Ret<ffi::Buffer<ffi::F32>>());  // nu
