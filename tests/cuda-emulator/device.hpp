// The device side of Tessera's CUDA emulator: what a kernel source needs to compile as host C++
// and run with CUDA's thread model, on one CPU thread.
//
// The fake NVRTC (nvrtc.cpp) compiles `kernels/cuda/*.cu` unchanged, apart from two textual
// rewrites it documents, with this header in front, into a shared object; the fake driver
// (driver.cpp) loads it for cuModuleLoadData and calls `tessera_emu_launch` for cuLaunchKernel.
//
// Every CUDA thread of a block is a fiber with its own stack, so thread-private
// variables are real locals. Blocks run one after another; `__shared__` variables are therefore
// plain statics, shared by the fibers of the running block. A fiber runs until it reaches a
// barrier (`__syncthreads`, or the exchange inside a warp shuffle) and then yields; a barrier
// opens once every thread of its scope that has not exited has arrived. If no fiber can run
// while some wait, the kernel would hang on a GPU too (a barrier reached by only part of its
// scope): the launch fails with a message naming the barrier and the block.
//
// What this cannot find: data races between threads that a real GPU would interleave
// differently, out-of-bounds accesses that land in mapped memory, and anything about PTX or the
// hardware (numerics of expf, tensor cores, timing). It checks the kernels' logic, indexing and
// synchronisation, and the host code that launches them.

#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#include <cstdio>
#include <deque>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __align__(n) __attribute__((aligned(n)))
// One block runs at a time, so a block's shared memory is a static (see above).
#define __shared__ static
#define TESSERA_EMULATOR 1

struct uint3 {
    unsigned x, y, z;
};
struct dim3 {
    unsigned x, y, z;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};

namespace emu {

constexpr unsigned WARP = 32;
constexpr size_t STACK_BYTES = 128 * 1024;

struct Fiber;

struct Barrier {
    const char* what;
    unsigned expected = 0;  // live threads of its scope
    unsigned arrived = 0;
    std::vector<Fiber*> waiters;
};

enum class State { Ready, Waiting, Done };

struct Fiber {
    void* sp = nullptr;     // saved stack pointer while switched out
    char* stack = nullptr;  // STACK_BYTES, from the stack pool
    State state = State::Ready;
    Barrier* waiting_on = nullptr;
    uint3 tid;
    unsigned linear = 0;
};

struct Launch {
    void (*entry)(void**) = nullptr;
    void** params = nullptr;
    dim3 grid, block;
    std::vector<Fiber> fibers;
    void* scheduler_sp = nullptr;
    Barrier block_barrier{"__syncthreads"};
    std::vector<Barrier> warp_barriers;
    std::vector<unsigned long long> lanes;  // shuffle exchange, one slot per thread
    std::vector<unsigned> mma;              // mma_tf32 exchange, MMA_SLOTS per thread
    std::vector<char> dynamic_shared;
    Fiber* current = nullptr;
    std::deque<Fiber*> ready;  // fibers to run, in order
    uint3 block_idx;
};

inline Launch* launch = nullptr;

}  // namespace emu

// Saves the callee-saved registers on the current stack, stores its pointer in *from, and
// resumes the stack `to` (System V x86-64). glibc's swapcontext would also save the signal mask
// with a system call per switch, which made kernels with many shuffles crawl.
extern "C" void tessera_emu_switch(void** from, void* to);
#if !defined(__x86_64__)
#error "the CUDA emulator's fibers are written for x86-64"
#endif
asm(R"(
    .text
    .p2align 4
    .type tessera_emu_switch, @function
tessera_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size tessera_emu_switch, .-tessera_emu_switch
)");

// Under AddressSanitizer (TESSERA_EMU_ASAN=1, see nvrtc.cpp) every switch between stacks is
// announced, as ASan requires for fibers; otherwise these are no-ops.
#ifdef __SANITIZE_ADDRESS__
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define EMU_ASAN 1
#else
#define EMU_ASAN 0
#endif

namespace emu {

// The scheduler's stack, as ASan needs it to switch back (learnt on the first switch in).
inline const void* scheduler_stack_bottom = nullptr;
inline size_t scheduler_stack_size = 0;

inline void leave_fiber(bool dying) {
#if EMU_ASAN
    __sanitizer_start_switch_fiber(nullptr, scheduler_stack_bottom, scheduler_stack_size);
#endif
    (void)dying;
}

inline void entered_fiber() {
#if EMU_ASAN
    __sanitizer_finish_switch_fiber(nullptr, &scheduler_stack_bottom, &scheduler_stack_size);
#endif
}

inline void yield_to_scheduler() {
    leave_fiber(false);
    tessera_emu_switch(&launch->current->sp, launch->scheduler_sp);
    entered_fiber();
}

inline void open_if_complete(Barrier& b) {
    if (b.arrived == 0 || b.arrived < b.expected) return;
    b.arrived = 0;
    for (Fiber* f : b.waiters) {
        f->state = State::Ready;
        f->waiting_on = nullptr;
        launch->ready.push_back(f);
    }
    b.waiters.clear();
}

inline void arrive(Barrier& b) {
    Fiber* f = launch->current;
    b.arrived++;
    if (b.arrived == b.expected) {
        open_if_complete(b);
        return;
    }
    f->state = State::Waiting;
    f->waiting_on = &b;
    b.waiters.push_back(f);
    yield_to_scheduler();
}

inline Barrier& warp_barrier() { return launch->warp_barriers[launch->current->linear / WARP]; }

// A fiber's whole life: run the kernel for its thread, then leave every barrier it belonged to.
inline void fiber_main() {
    entered_fiber();
    Launch* l = launch;
    l->entry(l->params);
    Fiber* f = l->current;
    f->state = State::Done;
    Barrier* scopes[2] = {&l->block_barrier, &l->warp_barriers[f->linear / WARP]};
    for (Barrier* b : scopes) {
        b->expected--;
        open_if_complete(*b);
    }
    leave_fiber(true);
    tessera_emu_switch(&l->current->sp, l->scheduler_sp);  // never resumed
    __builtin_trap();
}

// A fresh stack whose first switch-in "returns" into fiber_main, as if called: the six
// registers tessera_emu_switch pops, then fiber_main's address, leaving the stack pointer 8 off a
// 16-byte boundary at its entry, as the ABI has it after a call.
inline void* fresh_stack(char* stack) {
    uintptr_t top = ((uintptr_t)stack + STACK_BYTES) & ~(uintptr_t)15;
    void** sp = (void**)(top - 8);
    *--sp = (void*)&fiber_main;
    for (int i = 0; i < 6; i++) *--sp = nullptr;
    return sp;
}

template <class T>
inline unsigned long long to_bits(T v) {
    static_assert(sizeof(T) <= 8, "shuffle of a type over 8 bytes");
    unsigned long long u = 0;
    memcpy(&u, &v, sizeof(T));
    return u;
}

template <class T>
inline T from_bits(unsigned long long u) {
    T v;
    memcpy(&v, &u, sizeof(T));
    return v;
}

// The value of lane `src` of the calling warp (the caller's own if `src` is out of range).
template <class T>
inline T exchange(T v, int src) {
    const unsigned me = launch->current->linear;
    const unsigned base = me - me % WARP;
    launch->lanes[me] = to_bits(v);
    Barrier& b = warp_barrier();
    arrive(b);  // every lane has published
    T out = v;
    const unsigned n = launch->block.x * launch->block.y * launch->block.z;
    if (src >= 0 && src < (int)WARP && base + src < n) out = from_bits<T>(launch->lanes[base + src]);
    arrive(b);  // every lane has read before anyone publishes again
    return out;
}

inline unsigned lane() { return launch->current->linear % WARP; }

// Start of the launch's dynamic shared memory (`extern __shared__` arrays), 16-byte aligned.
inline char* dynamic_shared() {
    const uintptr_t p = (uintptr_t)launch->dynamic_shared.data();
    return (char*)((p + 15) & ~(uintptr_t)15);
}

}  // namespace emu

#define threadIdx (emu::launch->current->tid)
#define blockIdx (emu::launch->block_idx)
#define blockDim (emu::launch->block)
#define gridDim (emu::launch->grid)

inline void __syncthreads() { emu::arrive(emu::launch->block_barrier); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::arrive(emu::warp_barrier()); }

template <class T>
inline T __shfl_xor_sync(unsigned, T v, int mask) {
    return emu::exchange(v, (int)(emu::lane() ^ (unsigned)mask));
}
template <class T>
inline T __shfl_up_sync(unsigned, T v, unsigned delta) {
    return emu::exchange(v, (int)emu::lane() - (int)delta);
}
template <class T>
inline T __shfl_down_sync(unsigned, T v, unsigned delta) {
    return emu::exchange(v, (int)(emu::lane() + delta));
}
template <class T>
inline T __shfl_sync(unsigned, T v, int src) {
    return emu::exchange(v, src);
}

// One fiber runs at a time, so atomics need no hardware support.
template <class T>
inline T atomicAdd(T* p, T v) {
    const T old = *p;
    *p = old + v;
    return old;
}
template <class T>
inline T atomicMax(T* p, T v) {
    const T old = *p;
    if (v > old) *p = v;
    return old;
}

template <class T>
inline T __ldg(const T* p) {
    return *p;
}

inline float __int_as_float(int i) { return emu::from_bits<float>((unsigned)i); }
inline float __uint_as_float(unsigned u) { return emu::from_bits<float>(u); }
inline unsigned __float_as_uint(float f) { return (unsigned)emu::to_bits(f); }
inline int __float_as_int(float f) { return (int)(unsigned)emu::to_bits(f); }

// CUDA's integer min/max overloads (the kernels call them on unsigned values).
template <class T>
inline T min(T a, T b) {
    return b < a ? b : a;
}
template <class T>
inline T max(T a, T b) {
    return a < b ? b : a;
}

// tf32 for prelude.cu's tensor-core helpers (the GPU uses PTX there). The tensor cores read the
// top 19 bits of each f32 operand, so the emulated product does too: a kernel that forgets to
// round its operands with to_tf32 gets the truncation a GPU would give it.
inline float emu_tf32_bits(unsigned u) { return emu::from_bits<float>(u & 0xffffe000u); }

// Round to nearest, ties away from zero (PTX cvt.rna.tf32.f32); NaN and infinity unchanged.
inline unsigned emu_to_tf32(float f) {
    const unsigned u = (unsigned)emu::to_bits(f);
    if ((u & 0x7f800000u) == 0x7f800000u) return u;
    return (u + 0x1000u) & 0xffffe000u;
}

namespace emu {
constexpr unsigned MMA_SLOTS = 6;  // a[4], b[2]
}

// One warp's m16n8k8 tf32 product (prelude.cu's mma_tf32 documents the lane layout): every lane
// publishes its fragments, then computes its own four outputs from the whole warp's.
inline void emu_mma_tf32(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
    emu::Launch* l = emu::launch;
    const unsigned me = l->current->linear, base = me - me % emu::WARP;
    unsigned* mine = &l->mma[me * emu::MMA_SLOTS];
    for (int i = 0; i < 4; i++) mine[i] = a[i];
    for (int i = 0; i < 2; i++) mine[4 + i] = b[i];
    emu::Barrier& bar = emu::warp_barrier();
    emu::arrive(bar);  // every lane has published
    auto at = [&](unsigned lane, unsigned slot) {
        return emu_tf32_bits(l->mma[(base + lane) * emu::MMA_SLOTS + slot]);
    };
    // A[r][k] is on lane (r % 8) * 4 + k % 4, register (r / 8) + 2 * (k / 4);
    // B[k][n] on lane n * 4 + k % 4, register 4 + k / 4.
    const unsigned g = (me % emu::WARP) / 4, t = me % 4;
    for (unsigned e = 0; e < 4; e++) {
        const unsigned r = g + 8 * (e / 2), n = 2 * t + e % 2;
        float sum = 0.0f;
        for (unsigned k = 0; k < 8; k++) {
            sum += at((r % 8) * 4 + k % 4, r / 8 + 2 * (k / 4)) * at(n * 4 + k % 4, 4 + k / 4);
        }
        d[e] += sum;
    }
    emu::arrive(bar);  // every lane has read before anyone publishes again
}

// f16 conversions: prelude.cu uses inline PTX on the GPU and these under TESSERA_EMULATOR.
inline float emu_f16_to_f32(unsigned short h) { return (float)emu::from_bits<_Float16>(h); }
inline unsigned short emu_f32_to_f16(float f) {
    return (unsigned short)emu::to_bits((_Float16)f);
}

namespace emu {

template <class... A, size_t... I>
inline void call_with(void (*f)(A...), void** p, std::index_sequence<I...>) {
    f(*static_cast<std::remove_cv_t<std::remove_reference_t<A>>*>(p[I])...);
}

// Calls kernel `f` with cuLaunchKernel's parameter array: p[i] points at argument i.
template <class... A>
inline void call(void (*f)(A...), void** p) {
    call_with(f, p, std::index_sequence_for<A...>{});
}

}  // namespace emu

namespace emu {

// The byte size of each of `f`'s parameters into `out` (at most `max`); returns their count.
template <class... A>
inline unsigned param_sizes(void (*)(A...), size_t* out, unsigned max) {
    const size_t sizes[] = {sizeof(std::remove_cv_t<std::remove_reference_t<A>>)..., 0};
    const unsigned n = sizeof...(A);
    for (unsigned i = 0; i < n && i < max; i++) out[i] = sizes[i];
    return n;
}

}  // namespace emu

// What the fake NVRTC appends for every kernel: an entry point the fake driver looks up by name,
// and its parameters' sizes (for copying arguments into a captured graph).
#define TESSERA_EMU_KERNEL(name)                                                  \
    extern "C" void tessera_emu_entry_##name(void** p) { emu::call(&name, p); } \
    extern "C" unsigned tessera_emu_params_##name(size_t* s, unsigned max) {    \
        return emu::param_sizes(&name, s, max);                                 \
    }

// Runs a whole grid. Returns 0, or writes why it failed into `err` and returns 1.
extern "C" int tessera_emu_launch(void (*entry)(void**), const unsigned* grid, const unsigned* block,
                                  unsigned shared_bytes, void** params, char* err,
                                  unsigned err_len) {
    emu::Launch l;
    l.entry = entry;
    l.params = params;
    l.grid = {grid[0], grid[1], grid[2]};
    l.block = {block[0], block[1], block[2]};
    const unsigned n = block[0] * block[1] * block[2];
    if (n == 0 || n > 1024 || grid[0] == 0 || grid[1] == 0 || grid[2] == 0) {
        snprintf(err, err_len, "invalid launch: grid (%u,%u,%u), block (%u,%u,%u)", grid[0],
                 grid[1], grid[2], block[0], block[1], block[2]);
        return 1;
    }
    if (shared_bytes > 227 * 1024) {
        snprintf(err, err_len, "%u bytes of dynamic shared memory (an H100 block has 227 KiB)",
                 shared_bytes);
        return 1;
    }
    const unsigned warps = (n + emu::WARP - 1) / emu::WARP;
    l.fibers.resize(n);
    l.warp_barriers.resize(warps);
    l.lanes.assign(warps * emu::WARP, 0);
    l.mma.assign(warps * emu::WARP * emu::MMA_SLOTS, 0);
    // Uninitialised on a GPU: filled with 0xff bytes (NaN as floats), so a kernel that reads
    // dynamic shared memory before writing it gets visibly wrong results.
    l.dynamic_shared.assign(shared_bytes + 16, (char)0xff);
    // Stacks outlive launches (launches never overlap: the driver serialises them), so a kernel
    // with 1024 threads does not allocate 128 MiB every time.
    static std::vector<std::unique_ptr<char[]>> stacks;
    while (stacks.size() < n) stacks.emplace_back(new char[emu::STACK_BYTES]);
    for (unsigned i = 0; i < n; i++) l.fibers[i].stack = stacks[i].get();
    emu::Launch* outer = emu::launch;
    emu::launch = &l;
    int rc = 0;
    for (unsigned bz = 0; bz < grid[2] && rc == 0; bz++)
        for (unsigned by = 0; by < grid[1] && rc == 0; by++)
            for (unsigned bx = 0; bx < grid[0] && rc == 0; bx++) {
                l.block_idx = {bx, by, bz};
                l.block_barrier = emu::Barrier{"__syncthreads", n};
                for (unsigned w = 0; w < warps; w++) {
                    const unsigned live = n - w * emu::WARP < emu::WARP ? n - w * emu::WARP : emu::WARP;
                    l.warp_barriers[w] = emu::Barrier{"a warp shuffle", live};
                }
                for (unsigned i = 0; i < n; i++) {
                    emu::Fiber& f = l.fibers[i];
                    f.state = emu::State::Ready;
                    f.waiting_on = nullptr;
                    f.linear = i;
                    f.tid = {i % block[0], (i / block[0]) % block[1], i / (block[0] * block[1])};
#if EMU_ASAN
                    // Frames that never returned (fiber_main's, or a deadlocked launch's) left
                    // their redzones poisoned.
                    __asan_unpoison_memory_region(f.stack, emu::STACK_BYTES);
#endif
                    f.sp = emu::fresh_stack(f.stack);
                }
                l.ready.clear();
                for (emu::Fiber& f : l.fibers) l.ready.push_back(&f);
                while (!l.ready.empty()) {
                    l.current = l.ready.front();
                    l.ready.pop_front();
#if EMU_ASAN
                    __sanitizer_start_switch_fiber(nullptr, l.current->stack, emu::STACK_BYTES);
#endif
                    tessera_emu_switch(&l.scheduler_sp, l.current->sp);
#if EMU_ASAN
                    __sanitizer_finish_switch_fiber(nullptr, nullptr, nullptr);
#endif
                }
                unsigned stuck = 0;
                const emu::Fiber* first = nullptr;
                for (const emu::Fiber& f : l.fibers) {
                    if (f.state == emu::State::Waiting && stuck++ == 0) first = &f;
                }
                if (stuck > 0) {
                    snprintf(err, err_len,
                             "deadlock in block (%u,%u,%u): %u of %u thread(s) wait at %s (first: "
                             "thread %u), the others have exited; a GPU would hang",
                             bx, by, bz, stuck, n, first->waiting_on->what, first->linear);
                    rc = 1;
                }
            }
    emu::launch = outer;
    return rc;
}
