// The CPU emulator's CUDA driver (libcuda.so): the driver API calls cudarc makes for Tessera's
// CUDA backend, on host memory.
//
// Device memory is host memory; a CUdeviceptr is its address. Every allocation is recorded, so
// copies, frees and cuBLAS operands outside an allocation fail with CUDA_ERROR_INVALID_VALUE and a
// message on stderr rather than corrupting memory. New allocations are filled with 0xff bytes (NaN
// as f32) so that reading memory nobody wrote shows. Streams and events exist but all work runs
// at once, in call order, which is one of the orders a stream allows. Kernels run through the
// module that the emulator's NVRTC built (device.hpp); everything in the process is serialised
// by one lock, because a block's shared memory is static storage.
//
// Environment: TESSERA_EMU_DEVICES (default 1) devices, each with TESSERA_EMU_MEMORY_MIB
// (default 8192) MiB. Devices report compute capability 9.0 and the name "Tessera CUDA emulator
// (CPU)", so nothing mistakes a run here for a GPU measurement.

#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <iterator>
#include <set>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace {

typedef int CUresult;
typedef unsigned long long CUdeviceptr;

enum : int {
    CUDA_SUCCESS = 0,
    CUDA_ERROR_INVALID_VALUE = 1,
    CUDA_ERROR_OUT_OF_MEMORY = 2,
    CUDA_ERROR_INVALID_DEVICE = 101,
    CUDA_ERROR_INVALID_IMAGE = 200,
    CUDA_ERROR_INVALID_CONTEXT = 201,
    CUDA_ERROR_INVALID_HANDLE = 400,
    CUDA_ERROR_NOT_FOUND = 500,
    CUDA_ERROR_NOT_READY = 600,
    CUDA_ERROR_LAUNCH_FAILED = 719,
    CUDA_ERROR_NOT_SUPPORTED = 801,
};

struct Context {
    int device;
};
struct Stream {
    int unused;
};
struct Event {
    std::chrono::steady_clock::time_point at;
    unsigned long long mark = 0;  // the last async ticket issued when recorded
};

// Asynchronous work (the emulated NCCL's operations) still running, by ticket.
std::mutex async_mu;
std::condition_variable async_cv;
std::set<unsigned long long> async_running;
unsigned long long async_issued = 0;

// Whether work with a ticket up to `mark` is still running.
bool async_pending(unsigned long long mark) {
    return !async_running.empty() && *async_running.begin() <= mark;
}

// Waits until every ticket up to `mark` has finished: what stream order means for work queued
// after it.
void async_wait(unsigned long long mark = ~0ull) {
    std::unique_lock<std::mutex> g(async_mu);
    async_cv.wait(g, [&] { return !async_pending(mark); });
}
typedef int (*LaunchFn)(void (*)(void**), const unsigned*, const unsigned*, unsigned, void**,
                        char*, unsigned);
struct Module {
    void* handle;
    LaunchFn launch;
};
struct Function {
    Module* module;
    void (*entry)(void**);
    std::string name;
    // The byte size of each parameter, for copying arguments into a captured graph.
    unsigned (*param_sizes)(size_t*, unsigned) = nullptr;
    int max_dynamic_shared = 48 * 1024;  // raised by cuFuncSetAttribute, as on a GPU
};

std::recursive_mutex big_lock;
std::map<CUdeviceptr, size_t> allocations;  // start -> bytes
size_t allocated = 0;
Context contexts[64];
thread_local Context* current = nullptr;

unsigned env_unsigned(const char* name, unsigned fallback) {
    const char* v = getenv(name);
    if (!v || !*v) return fallback;
    char* end = nullptr;
    const unsigned long n = strtoul(v, &end, 10);
    return *end == 0 && n > 0 ? (unsigned)n : fallback;
}

int device_count() {
    const unsigned n = env_unsigned("TESSERA_EMU_DEVICES", 1);
    return n > 64 ? 64 : (int)n;
}

size_t total_bytes() { return (size_t)env_unsigned("TESSERA_EMU_MEMORY_MIB", 8192) << 20; }

CUresult fail(CUresult code, const char* what, const std::string& detail) {
    fprintf(stderr, "tessera CUDA emulator: %s: %s\n", what, detail.c_str());
    return code;
}

// The allocation holding [p, p + n), or nullptr.
bool inside_allocation(CUdeviceptr p, size_t n) {
    auto it = allocations.upper_bound(p);
    if (it == allocations.begin()) return false;
    --it;
    return p >= it->first && p + n <= it->first + it->second;
}

// What the process asked of the "device", for tests that check how a step uses it (how many
// copies and waits, how many launches per kernel): written to the file TESSERA_EMU_STATS names
// when the process exits, one `<what> <count>` line each, `launch:<kernel>` per kernel.
std::map<std::string, unsigned long long> stats;

void count(const std::string& what, unsigned long long n = 1) {
    std::lock_guard<std::recursive_mutex> g(big_lock);
    static const bool registered = [] {
        if (getenv("TESSERA_EMU_STATS")) atexit([] {
            FILE* f = fopen(getenv("TESSERA_EMU_STATS"), "w");
            if (!f) return;
            for (const auto& [k, v] : stats) fprintf(f, "%s %llu\n", k.c_str(), v);
            fclose(f);
        });
        return true;
    }();
    (void)registered;
    stats[what] += n;
}

CUresult check_range(const char* op, CUdeviceptr p, size_t n) {
    if (n == 0 || inside_allocation(p, n)) return CUDA_SUCCESS;
    char buf[128];
    snprintf(buf, sizeof buf, "%zu bytes at 0x%llx are not inside one allocation", n, p);
    return fail(CUDA_ERROR_INVALID_VALUE, op, buf);
}

// Device memory as a GPU accounts it. A synchronous allocation (cuMemAlloc) takes its bytes from
// the device; a stream-ordered one (cuMemAllocAsync) from the device's default pool, which grows
// by what it lacks and, on a free, keeps what its release threshold allows (the CUDA backend
// keeps everything); memory allocated during a capture belongs to the graph until the graph is
// destroyed. `allocated`, what cuMemGetInfo counts as used, is the sum of the three. Unlike a
// GPU's pool this one never fragments: a freed range serves any later size.
enum class Owner { Plain, Pool, Graph };

struct Held {
    size_t used = 0, reserved = 0, used_high = 0, reserved_high = 0;
    void note_highs() {
        used_high = std::max(used_high, used);
        reserved_high = std::max(reserved_high, reserved);
    }
};

Held pool, graph_memory;
unsigned long long release_threshold = 0;
std::map<CUdeviceptr, Owner> owners;

// Bytes the pool keeps past what its allocations use.
void pool_release_to(size_t keep) {
    const size_t target = std::max(pool.used, keep);
    if (pool.reserved > target) {
        allocated -= pool.reserved - target;
        pool.reserved = target;
    }
}

CUresult alloc(CUdeviceptr* out, size_t bytes, Owner owner) {
    std::lock_guard<std::recursive_mutex> g(big_lock);
    if (bytes == 0) return fail(CUDA_ERROR_INVALID_VALUE, "cuMemAlloc", "0 bytes");
    size_t need = bytes;
    if (owner == Owner::Pool) {
        const size_t spare = pool.reserved - pool.used;
        need = bytes > spare ? bytes - spare : 0;
    }
    if (allocated + need > total_bytes()) {
        return fail(CUDA_ERROR_OUT_OF_MEMORY, "cuMemAlloc",
                    std::to_string(bytes) + " bytes with " + std::to_string(allocated) + " of " +
                        std::to_string(total_bytes()) + " in use");
    }
    // 256-byte aligned like cudaMalloc, but exactly `bytes` long, so that under ASan an access
    // one element past the end lands in a redzone.
    void* p = nullptr;
    if (posix_memalign(&p, 256, bytes) != 0) return CUDA_ERROR_OUT_OF_MEMORY;
    memset(p, 0xff, bytes);
    *out = (CUdeviceptr)p;
    allocations[*out] = bytes;
    owners[*out] = owner;
    allocated += need;
    if (owner != Owner::Plain) {
        Held& h = owner == Owner::Pool ? pool : graph_memory;
        h.used += bytes;
        h.reserved += need;
        h.note_highs();
    }
    return CUDA_SUCCESS;
}

CUresult release(CUdeviceptr p) {
    std::lock_guard<std::recursive_mutex> g(big_lock);
    auto it = allocations.find(p);
    if (it == allocations.end()) {
        char buf[64];
        snprintf(buf, sizeof buf, "0x%llx was not allocated (or was freed already)", p);
        return fail(CUDA_ERROR_INVALID_VALUE, "cuMemFree", buf);
    }
    const size_t bytes = it->second;
    const Owner owner = owners[p];
    switch (owner) {
        case Owner::Plain:
            allocated -= bytes;
            break;
        case Owner::Pool:
            pool.used -= bytes;
            if (pool.reserved > release_threshold) pool_release_to(release_threshold);
            break;
        case Owner::Graph:
            graph_memory.used -= bytes;
            graph_memory.reserved -= bytes;
            allocated -= bytes;
            break;
    }
    owners.erase(p);
    allocations.erase(it);
    free((void*)p);
    return CUDA_SUCCESS;
}

CUresult copy(const char* op, void* dst, const void* src, size_t n) {
    std::lock_guard<std::recursive_mutex> g(big_lock);
    memmove(dst, src, n);
    return CUDA_SUCCESS;
}

#include "capture.hpp"

}  // namespace

extern "C" {

// For the emulated NCCL: work that finishes later on another thread. Returns its ticket.
unsigned long long tessera_emu_async_begin() {
    std::lock_guard<std::mutex> g(async_mu);
    async_running.insert(++async_issued);
    return async_issued;
}

// For the emulated NCCL: the work of `ticket` has finished (or was aborted).
void tessera_emu_async_end(unsigned long long ticket) {
    {
        std::lock_guard<std::mutex> g(async_mu);
        async_running.erase(ticket);
    }
    async_cv.notify_all();
}

// For the emulator's cuBLAS: waits for asynchronous work queued before a GEMM.
void tessera_emu_async_wait() { async_wait(); }

// For the emulator's cuBLAS: adds to a counter of the TESSERA_EMU_STATS report.
void tessera_emu_count(const char* what) { count(what); }

// For the emulator's cuBLAS: whether [p, p + n) lies inside one device allocation.
int tessera_emu_check_range(const char* op, CUdeviceptr p, size_t n) {
    std::lock_guard<std::recursive_mutex> g(big_lock);
    return check_range(op, p, n);
}

CUresult cuInit(unsigned) { return CUDA_SUCCESS; }

CUresult cuDriverGetVersion(int* v) {
    *v = 13000;
    return CUDA_SUCCESS;
}

CUresult cuGetErrorString(CUresult e, const char** s) {
    switch (e) {
        case CUDA_SUCCESS: *s = "no error"; break;
        case CUDA_ERROR_INVALID_VALUE: *s = "invalid argument (emulator: see stderr)"; break;
        case CUDA_ERROR_OUT_OF_MEMORY: *s = "out of memory"; break;
        case CUDA_ERROR_INVALID_DEVICE: *s = "invalid device ordinal"; break;
        case CUDA_ERROR_INVALID_IMAGE: *s = "device kernel image is invalid"; break;
        case CUDA_ERROR_NOT_FOUND: *s = "named symbol not found"; break;
        case CUDA_ERROR_LAUNCH_FAILED: *s = "unspecified launch failure (emulator: see stderr)"; break;
        case CUDA_ERROR_ILLEGAL_STATE: *s = "the operation is not valid in this state"; break;
        case CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED:
            *s = "operation not permitted when stream is capturing (emulator: see stderr)";
            break;
        case CUDA_ERROR_STREAM_CAPTURE_INVALIDATED:
            *s = "operation failed due to a previous error during capture";
            break;
        default: *s = "unknown error (emulator)"; break;
    }
    return CUDA_SUCCESS;
}

CUresult cuGetErrorName(CUresult e, const char** s) {
    switch (e) {
        case CUDA_SUCCESS: *s = "CUDA_SUCCESS"; break;
        case CUDA_ERROR_INVALID_VALUE: *s = "CUDA_ERROR_INVALID_VALUE"; break;
        case CUDA_ERROR_OUT_OF_MEMORY: *s = "CUDA_ERROR_OUT_OF_MEMORY"; break;
        case CUDA_ERROR_INVALID_DEVICE: *s = "CUDA_ERROR_INVALID_DEVICE"; break;
        case CUDA_ERROR_INVALID_IMAGE: *s = "CUDA_ERROR_INVALID_IMAGE"; break;
        case CUDA_ERROR_NOT_FOUND: *s = "CUDA_ERROR_NOT_FOUND"; break;
        case CUDA_ERROR_LAUNCH_FAILED: *s = "CUDA_ERROR_LAUNCH_FAILED"; break;
        case CUDA_ERROR_ILLEGAL_STATE: *s = "CUDA_ERROR_ILLEGAL_STATE"; break;
        case CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED: *s = "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED"; break;
        case CUDA_ERROR_STREAM_CAPTURE_INVALIDATED: *s = "CUDA_ERROR_STREAM_CAPTURE_INVALIDATED"; break;
        default: *s = "CUDA_ERROR_UNKNOWN"; break;
    }
    return CUDA_SUCCESS;
}

// ---- devices and contexts

CUresult cuDeviceGetCount(int* n) {
    *n = device_count();
    return CUDA_SUCCESS;
}

CUresult cuDeviceGet(int* dev, int ordinal) {
    if (ordinal < 0 || ordinal >= device_count()) return CUDA_ERROR_INVALID_DEVICE;
    *dev = ordinal;
    return CUDA_SUCCESS;
}

CUresult cuDeviceGetName(char* name, int len, int) {
    snprintf(name, (size_t)len, "Tessera CUDA emulator (CPU)");
    return CUDA_SUCCESS;
}

CUresult cuDeviceGetUuid(char* uuid, int dev) {
    memset(uuid, 0, 16);
    memcpy(uuid, "tessera-emu", 11);
    uuid[15] = (char)dev;
    return CUDA_SUCCESS;
}

CUresult cuDeviceGetUuid_v2(char* uuid, int dev) { return cuDeviceGetUuid(uuid, dev); }

CUresult cuDeviceTotalMem_v2(size_t* bytes, int) {
    *bytes = total_bytes();
    return CUDA_SUCCESS;
}

CUresult cuDeviceGetAttribute(int* v, int attribute, int) {
    switch (attribute) {
        case 1: *v = 1024; break;       // max threads per block
        case 8: *v = 48 * 1024; break;  // shared memory per block
        case 10: *v = 32; break;        // warp size
        case 16: *v = 132; break;       // multiprocessors, as an H100 SXM
        case 36: *v = 2619000; break;   // memory clock (kHz), as an H100 SXM
        case 37: *v = 5120; break;      // memory bus width (bits)
        case 75: *v = 9; break;         // compute capability major
        case 76: *v = 0; break;         // minor
        case 97: *v = 227 * 1024; break;  // shared memory per block, opt-in
        case 115: *v = 1; break;        // memory pools: yes, as every GPU since Pascal (cudarc then
                                        // allocates and frees in stream order, without waiting)
        default: *v = 0; break;
    }
    return CUDA_SUCCESS;
}

CUresult cuDevicePrimaryCtxRetain(Context** ctx, int dev) {
    if (dev < 0 || dev >= device_count()) return CUDA_ERROR_INVALID_DEVICE;
    contexts[dev].device = dev;
    *ctx = &contexts[dev];
    return CUDA_SUCCESS;
}

CUresult cuDevicePrimaryCtxRelease_v2(int) { return CUDA_SUCCESS; }

CUresult cuCtxSetCurrent(Context* ctx) {
    current = ctx;
    return CUDA_SUCCESS;
}

CUresult cuCtxGetCurrent(Context** ctx) {
    *ctx = current;
    return CUDA_SUCCESS;
}

CUresult cuCtxGetDevice(int* dev) {
    if (!current) return CUDA_ERROR_INVALID_CONTEXT;
    *dev = current->device;
    return CUDA_SUCCESS;
}

CUresult cuCtxSynchronize() {
    {
        std::lock_guard<std::recursive_mutex> g(big_lock);
        if (capturing_any()) return refuse_in_capture("cuCtxSynchronize", "synchronising");
    }
    async_wait();
    return CUDA_SUCCESS;
}

// ---- streams and events (all work is done when it is queued)

CUresult cuStreamCreate(Stream** s, unsigned) {
    *s = new Stream{0};
    return CUDA_SUCCESS;
}

CUresult cuStreamCreateWithPriority(Stream** s, unsigned flags, int) {
    return cuStreamCreate(s, flags);
}

CUresult cuStreamDestroy_v2(Stream* s) {
    delete s;
    return CUDA_SUCCESS;
}

CUresult cuStreamSynchronize(Stream*) {
    {
        std::lock_guard<std::recursive_mutex> g(big_lock);
        if (capturing_any()) return refuse_in_capture("cuStreamSynchronize", "synchronising");
    }
    count("stream_synchronize");
    async_wait();
    return CUDA_SUCCESS;
}
CUresult cuStreamQuery(Stream*) {
    std::lock_guard<std::mutex> g(async_mu);
    return async_running.empty() ? CUDA_SUCCESS : CUDA_ERROR_NOT_READY;
}
CUresult cuStreamWaitEvent(Stream*, Event*, unsigned) { return CUDA_SUCCESS; }

CUresult cuEventCreate(Event** e, unsigned) {
    *e = new Event{std::chrono::steady_clock::now()};
    return CUDA_SUCCESS;
}

CUresult cuEventRecord(Event* e, Stream*) {
    e->at = std::chrono::steady_clock::now();
    std::lock_guard<std::mutex> g(async_mu);
    e->mark = async_issued;
    return CUDA_SUCCESS;
}

CUresult cuEventSynchronize(Event* e) {
    async_wait(e->mark);
    return CUDA_SUCCESS;
}
CUresult cuEventQuery(Event* e) {
    std::lock_guard<std::mutex> g(async_mu);
    return async_pending(e->mark) ? CUDA_ERROR_NOT_READY : CUDA_SUCCESS;
}

CUresult cuEventDestroy_v2(Event* e) {
    delete e;
    return CUDA_SUCCESS;
}

CUresult cuEventElapsedTime(float* ms, Event* a, Event* b) {
    *ms = std::chrono::duration<float, std::milli>(b->at - a->at).count();
    return CUDA_SUCCESS;
}

CUresult cuEventElapsedTime_v2(float* ms, Event* a, Event* b) { return cuEventElapsedTime(ms, a, b); }

// ---- memory

CUresult cuMemGetInfo_v2(size_t* free_bytes, size_t* total) {
    std::lock_guard<std::recursive_mutex> g(big_lock);
    *total = total_bytes();
    *free_bytes = *total - allocated;
    return CUDA_SUCCESS;
}

// One stand-in pool per device (all of them share the accounting above): its release threshold
// (counted when set to keep everything, what the CUDA backend asks for) and its usage attributes.
CUresult cuDeviceGetDefaultMemPool(void** pool_out, int dev) {
    static char pools[64];
    if (dev < 0 || dev >= device_count()) return CUDA_ERROR_INVALID_DEVICE;
    *pool_out = &pools[dev];
    return CUDA_SUCCESS;
}

CUresult cuMemPoolSetAttribute(void* p, int attribute, void* value) {
    std::lock_guard<std::recursive_mutex> g(big_lock);
    if (!p || !value) return CUDA_ERROR_INVALID_VALUE;
    const unsigned long long v = *(unsigned long long*)value;
    switch (attribute) {
        case 4:  // CU_MEMPOOL_ATTR_RELEASE_THRESHOLD
            release_threshold = v;
            if (v == ~0ull) count("mempool_keeps_freed_memory");
            return CUDA_SUCCESS;
        case 6:  // RESERVED_MEM_HIGH: only a reset to 0 (to the current value) is allowed
        case 8:  // USED_MEM_HIGH
            if (v != 0) {
                return fail(CUDA_ERROR_INVALID_VALUE, "cuMemPoolSetAttribute",
                            "high-water marks reset only to 0");
            }
            if (attribute == 6) pool.reserved_high = pool.reserved;
            else pool.used_high = pool.used;
            return CUDA_SUCCESS;
        default:
            return CUDA_SUCCESS;
    }
}

CUresult cuMemPoolGetAttribute(void* p, int attribute, void* value) {
    std::lock_guard<std::recursive_mutex> g(big_lock);
    if (!p || !value) return CUDA_ERROR_INVALID_VALUE;
    unsigned long long* out = (unsigned long long*)value;
    switch (attribute) {
        case 4: *out = release_threshold; break;
        case 5: *out = pool.reserved; break;
        case 6: *out = pool.reserved_high; break;
        case 7: *out = pool.used; break;
        case 8: *out = pool.used_high; break;
        default:
            return fail(CUDA_ERROR_INVALID_VALUE, "cuMemPoolGetAttribute",
                        "attribute " + std::to_string(attribute));
    }
    return CUDA_SUCCESS;
}

CUresult cuMemPoolTrimTo(void* p, size_t keep) {
    std::lock_guard<std::recursive_mutex> g(big_lock);
    if (!p) return CUDA_ERROR_INVALID_VALUE;
    count("mempool_trim");
    pool_release_to(keep);
    return CUDA_SUCCESS;
}

// Graph memory: the CU_GRAPH_MEM_ATTR_* usage of graphs' allocations. A graph's memory is freed
// with the graph here, so there is never any cached to trim.
CUresult cuDeviceGetGraphMemAttribute(int dev, int attribute, void* value) {
    std::lock_guard<std::recursive_mutex> g(big_lock);
    if (dev < 0 || dev >= device_count()) return CUDA_ERROR_INVALID_DEVICE;
    if (!value) return CUDA_ERROR_INVALID_VALUE;
    unsigned long long* out = (unsigned long long*)value;
    switch (attribute) {
        case 0: *out = graph_memory.used; break;
        case 1: *out = graph_memory.used_high; break;
        case 2: *out = graph_memory.reserved; break;
        case 3: *out = graph_memory.reserved_high; break;
        default:
            return fail(CUDA_ERROR_INVALID_VALUE, "cuDeviceGetGraphMemAttribute",
                        "attribute " + std::to_string(attribute));
    }
    return CUDA_SUCCESS;
}

CUresult cuDeviceSetGraphMemAttribute(int dev, int attribute, void* value) {
    std::lock_guard<std::recursive_mutex> g(big_lock);
    if (dev < 0 || dev >= device_count()) return CUDA_ERROR_INVALID_DEVICE;
    if (!value || *(unsigned long long*)value != 0 || (attribute != 1 && attribute != 3)) {
        return fail(CUDA_ERROR_INVALID_VALUE, "cuDeviceSetGraphMemAttribute",
                    "only the high-water marks reset, to 0");
    }
    if (attribute == 1) graph_memory.used_high = graph_memory.used;
    else graph_memory.reserved_high = graph_memory.reserved;
    return CUDA_SUCCESS;
}

CUresult cuDeviceGraphMemTrim(int dev) {
    if (dev < 0 || dev >= device_count()) return CUDA_ERROR_INVALID_DEVICE;
    count("graph_memory_trim");
    return CUDA_SUCCESS;
}

CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t bytes) {
    std::lock_guard<std::recursive_mutex> g(big_lock);
    if (capturing_any()) return refuse_in_capture("cuMemAlloc", "a synchronous allocation");
    count("alloc");
    return alloc(p, bytes, Owner::Plain);
}
CUresult cuMemAllocAsync(CUdeviceptr* p, size_t bytes, Stream* s) {
    std::lock_guard<std::recursive_mutex> g(big_lock);
    count("alloc");
    if (CUresult r = alloc(p, bytes, capturing(s) ? Owner::Graph : Owner::Pool)) return r;
    if (capturing(s)) {
        Node node{Node::Alloc};
        node.dst = *p;
        node.n = bytes;
        capture.data->nodes.push_back(node);
        capture.data->owned.push_back(*p);
    }
    return CUDA_SUCCESS;
}
CUresult cuMemFree_v2(CUdeviceptr p) {
    std::lock_guard<std::recursive_mutex> g(big_lock);
    if (capturing_any()) return refuse_in_capture("cuMemFree", "a synchronous free");
    return release(p);
}
CUresult cuMemFreeAsync(CUdeviceptr p, Stream* s) {
    std::lock_guard<std::recursive_mutex> g(big_lock);
    if (capturing(s)) {
        // The graph keeps its own allocations for its launches; anything else would be freed by
        // every launch.
        const auto& owned = capture.data->owned;
        if (std::find(owned.begin(), owned.end(), p) != owned.end()) return CUDA_SUCCESS;
        return refuse_in_capture("cuMemFreeAsync", "freeing memory allocated before the capture");
    }
    return release(p);
}

CUresult cuMemHostAlloc(void** p, size_t bytes, unsigned) {
    *p = malloc(bytes ? bytes : 1);
    return *p ? CUDA_SUCCESS : CUDA_ERROR_OUT_OF_MEMORY;
}

CUresult cuMemFreeHost(void* p) {
    free(p);
    return CUDA_SUCCESS;
}

CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t n) {
    async_wait();
    std::lock_guard<std::recursive_mutex> g(big_lock);
    if (capturing_any()) return refuse_in_capture("cuMemcpyHtoD", "a synchronous or host copy");
    if (CUresult r = check_range("cuMemcpyHtoD", dst, n)) return r;
    count("copy_to_device");
    count("copy_to_device_bytes", n);
    return copy("cuMemcpyHtoD", (void*)dst, src, n);
}

CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t n, Stream*) {
    return cuMemcpyHtoD_v2(dst, src, n);
}

CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t n) {
    async_wait();
    std::lock_guard<std::recursive_mutex> g(big_lock);
    if (capturing_any()) return refuse_in_capture("cuMemcpyDtoH", "a synchronous or host copy");
    if (CUresult r = check_range("cuMemcpyDtoH", src, n)) return r;
    count("copy_to_host");
    count("copy_to_host_bytes", n);
    return copy("cuMemcpyDtoH", dst, (const void*)src, n);
}

CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t n, Stream*) {
    return cuMemcpyDtoH_v2(dst, src, n);
}

CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t n) {
    async_wait();
    std::lock_guard<std::recursive_mutex> g(big_lock);
    if (capturing_any()) return refuse_in_capture("cuMemcpyDtoD", "a synchronous or host copy");
    if (CUresult r = check_range("cuMemcpyDtoD (source)", src, n)) return r;
    if (CUresult r = check_range("cuMemcpyDtoD (destination)", dst, n)) return r;
    count("copy_on_device");
    return copy("cuMemcpyDtoD", (void*)dst, (const void*)src, n);
}

CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, Stream* s) {
    {
        std::lock_guard<std::recursive_mutex> g(big_lock);
        if (capturing(s)) return record_memory(Node::Copy, dst, src, 0, n);
    }
    return cuMemcpyDtoD_v2(dst, src, n);
}

// CUDA_MEMCPY2D; the memory types are CU_MEMORYTYPE_HOST = 1, DEVICE = 2, UNIFIED = 4.
struct Memcpy2D {
    size_t src_x, src_y;
    int src_type;
    const void* src_host;
    CUdeviceptr src_device;
    void* src_array;
    size_t src_pitch;
    size_t dst_x, dst_y;
    int dst_type;
    void* dst_host;
    CUdeviceptr dst_device;
    void* dst_array;
    size_t dst_pitch;
    size_t width, height;
};

CUresult cuMemcpy2D_v2(const Memcpy2D* c) {
    async_wait();
    std::lock_guard<std::recursive_mutex> g(big_lock);
    if (capturing_any()) return refuse_in_capture("cuMemcpy2D", "a 2-D copy (not captured here)");
    if (c->height == 0 || c->width == 0) return CUDA_SUCCESS;
    if (c->src_array || c->dst_array) return fail(CUDA_ERROR_NOT_SUPPORTED, "cuMemcpy2D", "arrays");
    if (c->src_pitch < c->width || c->dst_pitch < c->width) {
        return fail(CUDA_ERROR_INVALID_VALUE, "cuMemcpy2D", "a pitch below the row width");
    }
    const char* src = c->src_type == 1 ? (const char*)c->src_host : (const char*)c->src_device;
    char* dst = c->dst_type == 1 ? (char*)c->dst_host : (char*)c->dst_device;
    src += c->src_y * c->src_pitch + c->src_x;
    dst += c->dst_y * c->dst_pitch + c->dst_x;
    // The whole strided extent of each side must lie in one allocation (host sides are not ours
    // to check).
    const size_t src_extent = (c->height - 1) * c->src_pitch + c->width;
    const size_t dst_extent = (c->height - 1) * c->dst_pitch + c->width;
    if (c->src_type != 1) {
        if (CUresult r = check_range("cuMemcpy2D (source)", (CUdeviceptr)src, src_extent)) return r;
    }
    if (c->dst_type != 1) {
        if (CUresult r = check_range("cuMemcpy2D (destination)", (CUdeviceptr)dst, dst_extent)) {
            return r;
        }
    }
    count("copy_2d");
    for (size_t y = 0; y < c->height; y++) memmove(dst + y * c->dst_pitch, src + y * c->src_pitch, c->width);
    return CUDA_SUCCESS;
}

CUresult cuMemcpy2DAsync_v2(const Memcpy2D* c, Stream*) { return cuMemcpy2D_v2(c); }

CUresult cuMemsetD8_v2(CUdeviceptr dst, unsigned char v, size_t n) {
    async_wait();
    std::lock_guard<std::recursive_mutex> g(big_lock);
    if (capturing_any()) return refuse_in_capture("cuMemsetD8", "a synchronous memset");
    if (CUresult r = check_range("cuMemsetD8", dst, n)) return r;
    count("memset");
    memset((void*)dst, v, n);
    return CUDA_SUCCESS;
}

CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char v, size_t n, Stream* s) {
    {
        std::lock_guard<std::recursive_mutex> g(big_lock);
        if (capturing(s)) return record_memory(Node::Memset, dst, 0, v, n);
    }
    return cuMemsetD8_v2(dst, v, n);
}

// ---- modules and launches

CUresult cuModuleLoadData(Module** out, const void* image) {
    static const char tag[] = "TESSERA-EMU-MODULE ";
    const char* text = (const char*)image;
    if (strncmp(text, tag, sizeof tag - 1) != 0) {
        return fail(CUDA_ERROR_INVALID_IMAGE, "cuModuleLoadData",
                    "not a module of the emulator's NVRTC (is the real libnvrtc first on the "
                    "library path?)");
    }
    const char* path = text + sizeof tag - 1;
    void* h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!h) return fail(CUDA_ERROR_INVALID_IMAGE, "cuModuleLoadData", dlerror());
    auto launch = (LaunchFn)dlsym(h, "tessera_emu_launch");
    if (!launch) return fail(CUDA_ERROR_INVALID_IMAGE, "cuModuleLoadData", "no tessera_emu_launch");
    *out = new Module{h, launch};
    return CUDA_SUCCESS;
}

CUresult cuModuleUnload(Module* m) {
    dlclose(m->handle);
    delete m;
    return CUDA_SUCCESS;
}

CUresult cuModuleGetFunction(Function** f, Module* m, const char* name) {
    const std::string sym = std::string("tessera_emu_entry_") + name;
    auto entry = (void (*)(void**))dlsym(m->handle, sym.c_str());
    if (!entry) return CUDA_ERROR_NOT_FOUND;
    *f = new Function{m, entry, name};
    const std::string sizes = std::string("tessera_emu_params_") + name;
    (*f)->param_sizes = (unsigned (*)(size_t*, unsigned))dlsym(m->handle, sizes.c_str());
    return CUDA_SUCCESS;
}

CUresult cuFuncGetAttribute(int* v, int, Function*) {
    *v = 0;
    return CUDA_SUCCESS;
}

CUresult cuFuncSetAttribute(Function* f, int attribute, int value) {
    if (attribute == 8) {  // CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        if (value < 0 || value > 227 * 1024) {
            return fail(CUDA_ERROR_INVALID_VALUE, "cuFuncSetAttribute",
                        std::to_string(value) + " bytes of dynamic shared memory (at most 227 KiB)");
        }
        f->max_dynamic_shared = value;
    }
    return CUDA_SUCCESS;
}
CUresult cuFuncSetCacheConfig(Function*, int) { return CUDA_SUCCESS; }

CUresult cuLaunchKernel(Function* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                        unsigned by, unsigned bz, unsigned shared_bytes, Stream* s, void** params,
                        void** extra) {
    if (!f) return CUDA_ERROR_INVALID_HANDLE;
    if (extra) return fail(CUDA_ERROR_NOT_SUPPORTED, "cuLaunchKernel", "`extra` parameters");
    async_wait();
    std::lock_guard<std::recursive_mutex> g(big_lock);
    // The hardware's limits (compute capability 9.0), which the emulated launch would not notice.
    if (gx > 2147483647u || gy > 65535 || gz > 65535 || bx > 1024 || by > 1024 || bz > 64) {
        return fail(CUDA_ERROR_INVALID_VALUE, ("kernel " + f->name).c_str(),
                    "grid (" + std::to_string(gx) + "," + std::to_string(gy) + "," +
                        std::to_string(gz) + ") or block (" + std::to_string(bx) + "," +
                        std::to_string(by) + "," + std::to_string(bz) +
                        ") beyond the device's limits");
    }
    if ((int)shared_bytes > f->max_dynamic_shared) {
        return fail(CUDA_ERROR_INVALID_VALUE, ("kernel " + f->name).c_str(),
                    std::to_string(shared_bytes) + " bytes of dynamic shared memory over the " +
                        std::to_string(f->max_dynamic_shared) +
                        " allowed (more than 48 KiB needs CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_"
                        "SIZE_BYTES)");
    }
    const unsigned grid[3] = {gx, gy, gz}, block[3] = {bx, by, bz};
    if (capturing(s)) return record_launch(f, grid, block, shared_bytes, params);
    count("launch:" + f->name);
    return run_kernel(f, grid, block, shared_bytes, params);
}

// ---- stream capture and graphs (capture.hpp)

CUresult cuStreamBeginCapture_v2(Stream* s, int) {
    std::lock_guard<std::recursive_mutex> g(big_lock);
    if (capturing_any()) {
        return fail(CUDA_ERROR_ILLEGAL_STATE, "cuStreamBeginCapture", "a capture is in progress");
    }
    capture = Capture{s, std::make_shared<GraphData>(), false};
    return CUDA_SUCCESS;
}

CUresult cuStreamEndCapture(Stream* s, Graph** out) {
    std::lock_guard<std::recursive_mutex> g(big_lock);
    *out = nullptr;
    if (!capturing(s)) {
        return fail(CUDA_ERROR_ILLEGAL_STATE, "cuStreamEndCapture", "the stream is not capturing");
    }
    Capture done = std::move(capture);
    capture = Capture{};
    if (done.invalidated) return CUDA_ERROR_STREAM_CAPTURE_INVALIDATED;  // frees its memory
    *out = new Graph{done.data};
    return CUDA_SUCCESS;
}

CUresult cuStreamIsCapturing(Stream* s, int* status) {
    std::lock_guard<std::recursive_mutex> g(big_lock);
    *status = !capturing(s) ? 0 : capture.invalidated ? 2 : 1;
    return CUDA_SUCCESS;
}

CUresult cuGraphInstantiateWithFlags(GraphExec** exec, Graph* graph, unsigned long long) {
    if (!graph) return CUDA_ERROR_INVALID_VALUE;
    *exec = new GraphExec{graph->data};
    return CUDA_SUCCESS;
}

CUresult cuGraphUpload(GraphExec* exec, Stream*) { return exec ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE; }

CUresult cuGraphLaunch(GraphExec* exec, Stream*) {
    if (!exec) return CUDA_ERROR_INVALID_VALUE;
    async_wait();
    std::lock_guard<std::recursive_mutex> g(big_lock);
    if (capturing_any()) return refuse_in_capture("cuGraphLaunch", "launching a graph (not captured here)");
    return run_graph(*exec->data);
}

CUresult cuGraphExecDestroy(GraphExec* exec) {
    std::lock_guard<std::recursive_mutex> g(big_lock);
    delete exec;
    return CUDA_SUCCESS;
}

CUresult cuGraphDestroy(Graph* graph) {
    std::lock_guard<std::recursive_mutex> g(big_lock);
    delete graph;
    return CUDA_SUCCESS;
}

// For the emulator's cuBLAS: records `fn(ctx)` (ctx copied) when `stream` is capturing and
// returns 1; returns 0 (the caller runs it now) otherwise.
int tessera_emu_capture_host(void* stream, void (*fn)(void*), const void* ctx, size_t bytes) {
    std::lock_guard<std::recursive_mutex> g(big_lock);
    if (!capturing((Stream*)stream)) return 0;
    Node node{Node::Host};
    node.host = fn;
    node.host_ctx.assign((const char*)ctx, (const char*)ctx + bytes);
    capture.data->nodes.push_back(std::move(node));
    return 1;
}

}  // extern "C"
