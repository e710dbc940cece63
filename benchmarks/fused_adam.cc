// Fused Adam for XLA:CPU through the XLA FFI (jax.ffi.ffi_call), for the issue-14 contenders of
// benchmarks/optimizer_update.py; built at first use by benchmarks/_fused_adam.py. One call
// updates every float32 leaf of a parameter tree, one pass per element (Kingma & Ba 2015,
// Algorithm 1; seeds 000, 004):
//
//   m' = b1 m + (1 - b1) g
//   v' = b2 v + (1 - b2) g^2
//   u  = -lr (m' / bc1) / (sqrt(v' / bc2) + eps)      bc1 = 1 - b1^t, bc2 = 1 - b2^t
//   mode 0 (optax's protocol):  reads g, m, v; writes u, m', v'       (24 B/param)
//   mode 1 (PyTorch's fused):   reads p, g, m, v; writes p + u, m', v' (28 B/param)
//
// The operations are those XLA:CPU compiles jaxdl's scale_by_adam and scale_by_learning_rate to
// when the update is compiled on its own, so u, m', v' equal it bitwise there: division by the
// scalars bc1, bc2 becomes multiplication by their reciprocals (XLA's algebraic simplifier), and
// LLVM contracts b1 m + (1-b1) g, b2 v + (1-b2) g^2 and p + u into FMAs, written out here as
// std::fma with the same operands (compiled with -ffp-contract=off so that GCC adds none). XLA
// rewrites the same expression differently inside a larger fusion, so p can differ from a jitted
// step of jaxdl.adam by an ulp per step (benchmarks/RESULTS.md).
//
// Operands: scalars f32[8] = (b1, 1-b1, b2, 1-b2, eps, 1/bc1, 1/bc2, -lr), then per leaf
// (g, m, v) in mode 0 or (p, g, m, v) in mode 1. Results per leaf: (u or p', m', v'); the caller
// aliases m', v' (and p') to their operands so donated buffers are updated in place.
// Attribute: mode (int64).
//
// The elements of all leaves, laid end to end, are cut into one contiguous range per thread of
// XLA's intra-op pool; the handler returns a Future that completes when every range is done.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Scalars {
  float b1, omb1, b2, omb2, eps, rbc1, rbc2, neg_lr;
};

struct Leaf {
  const float* p;  // mode 1 only
  const float* g;
  const float* m;
  const float* v;
  float* out;
  float* m_out;
  float* v_out;
  int64_t n;
};

// One contiguous range [lo, hi) of one leaf. m_out may equal m (and out may equal p or g): an
// iteration reads index i before writing it and touches no other index, so the loop carries no
// dependence through the aliases (hence ivdep, which lets GCC vectorize without alias checks).
template <bool kApply>
void RunRange(const Leaf& l, int64_t lo, int64_t hi, const Scalars& s) {
  const float* p = l.p;
  const float* g = l.g;
  const float* m = l.m;
  const float* v = l.v;
  float* out = l.out;
  float* mo = l.m_out;
  float* vo = l.v_out;
#pragma GCC ivdep
  for (int64_t i = lo; i < hi; ++i) {
    const float gi = g[i];
    const float mi = std::fma(s.b1, m[i], s.omb1 * gi);
    const float vi = std::fma(s.b2, v[i], s.omb2 * (gi * gi));
    const float d = (mi * s.rbc1) / (std::sqrt(vi * s.rbc2) + s.eps);
    if constexpr (kApply) {
      out[i] = std::fma(d, s.neg_lr, p[i]);  // p + u, u unrounded: as XLA fuses apply_updates
    } else {
      out[i] = d * s.neg_lr;
    }
    mo[i] = mi;
    vo[i] = vi;
  }
}

void RunLeafRange(const Leaf& l, int64_t lo, int64_t hi, const Scalars& s, bool apply) {
  apply ? RunRange<true>(l, lo, hi, s) : RunRange<false>(l, lo, hi, s);
}

// Elements [lo, hi) of the leaves laid end to end.
void RunSpan(const std::vector<Leaf>& leaves, int64_t lo, int64_t hi, const Scalars& s, bool apply) {
  int64_t start = 0;
  for (const Leaf& l : leaves) {
    const int64_t end = start + l.n;
    const int64_t a = std::max(lo, start), b = std::min(hi, end);
    if (a < b) RunLeafRange(l, a - start, b - start, s, apply);
    if (end >= hi) break;
    start = end;
  }
}

// Below this many elements per thread, the work runs on the calling thread.
constexpr int64_t kMinPerTask = int64_t{1} << 16;
// Ranges start at multiples of this (16 floats: one 64-byte cache line).
constexpr int64_t kAlign = 16;

ffi::Future Failed(const char* what) {
  ffi::Promise promise;
  ffi::Future future(promise);
  promise.SetError(ffi::Error::InvalidArgument(what));
  return future;
}

ffi::Future AdamImpl(ffi::ThreadPool pool, ffi::AnyBuffer scalars, ffi::RemainingArgs args,
                     ffi::RemainingRets rets, int64_t mode) {
  if (mode != 0 && mode != 1) return Failed("jaxdl fused adam: mode must be 0 or 1");
  const bool apply = mode == 1;
  const size_t per_leaf = apply ? 4 : 3;
  if (scalars.element_type() != ffi::DataType::F32 || scalars.element_count() != 8) {
    return Failed("jaxdl fused adam: scalars must be f32[8]");
  }
  if (args.size() % per_leaf != 0 || rets.size() != 3 * (args.size() / per_leaf)) {
    return Failed("jaxdl fused adam: expected 3 (mode 0) or 4 (mode 1) operands and 3 results per leaf");
  }
  const float* sc = scalars.typed_data<float>();
  const Scalars s{sc[0], sc[1], sc[2], sc[3], sc[4], sc[5], sc[6], sc[7]};
  const size_t n_leaves = args.size() / per_leaf;
  auto leaves = std::make_shared<std::vector<Leaf>>();
  leaves->reserve(n_leaves);
  int64_t total = 0;
  for (size_t i = 0; i < n_leaves; ++i) {
    const float* in[4] = {nullptr, nullptr, nullptr, nullptr};  // p, g, m, v
    float* out[3];
    int64_t n = -1;
    for (size_t k = 0; k < per_leaf; ++k) {
      auto b = args.get<ffi::AnyBuffer>(per_leaf * i + k);
      if (!b.has_value() || b->element_type() != ffi::DataType::F32) {
        return Failed("jaxdl fused adam: every operand must be a float32 array");
      }
      const int64_t count = static_cast<int64_t>(b->element_count());
      if (n >= 0 && count != n) return Failed("jaxdl fused adam: a leaf's operands differ in size");
      n = count;
      in[k + (apply ? 0 : 1)] = b->typed_data<float>();
    }
    for (size_t k = 0; k < 3; ++k) {
      auto r = rets.get<ffi::AnyBuffer>(3 * i + k);
      if (!r.has_value() || (*r)->element_type() != ffi::DataType::F32 ||
          static_cast<int64_t>((*r)->element_count()) != n) {
        return Failed("jaxdl fused adam: every result must be float32 of its leaf's size");
      }
      out[k] = (*r)->typed_data<float>();
    }
    leaves->push_back(Leaf{in[0], in[1], in[2], in[3], out[0], out[1], out[2], n});
    total += n;
  }

  int64_t threads = std::max<int64_t>(1, pool.num_threads());
  int64_t tasks = std::min<int64_t>(threads, std::max<int64_t>(1, total / kMinPerTask));
  if (tasks <= 1) {
    RunSpan(*leaves, 0, total, s, apply);
    ffi::Promise promise;
    ffi::Future future(promise);
    promise.SetAvailable();
    return future;
  }
  ffi::CountDownPromise done(tasks);
  ffi::Future future(done);
  const int64_t per = (total / tasks + kAlign - 1) / kAlign * kAlign;
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t lo = std::min(total, t * per), hi = (t == tasks - 1) ? total : std::min(total, (t + 1) * per);
    pool.Schedule([leaves, lo, hi, s, apply, done]() mutable {
      RunSpan(*leaves, lo, hi, s, apply);
      done.CountDown();
    });
  }
  return future;
}

}  // namespace

// Built with -fvisibility=hidden: the handler is the one exported symbol.
extern "C" __attribute__((visibility("default"))) XLA_FFI_Error* JaxdlFusedAdam(XLA_FFI_CallFrame*);

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxdlFusedAdam, AdamImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<int64_t>("mode"));
