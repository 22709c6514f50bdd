// The CPU emulator's cuBLAS (libcublas.so): handles, cublasGemmEx and cublasGemmStridedBatchedEx,
// which is all Tessera calls.
//
// GemmEx follows cuBLAS's documented contract, column-major: C[m,n] = alpha * op(A)[m,k] *
// op(B)[k,n] + beta * C, with op = transpose for CUBLAS_OP_T. It checks the leading dimensions as
// cuBLAS does (CUBLAS_STATUS_INVALID_VALUE) and, through the emulator's driver, that each operand
// lies inside one device allocation, so a wrong transpose or leading dimension in the caller fails
// instead of reading the wrong numbers. A and B may be f32, f16 or bf16 (the same type); C is f32;
// products accumulate in f32, as CUBLAS_COMPUTE_32F does.

#include <dlfcn.h>
#include <stdio.h>
#include <string.h>

namespace {

enum : int {
    CUBLAS_STATUS_SUCCESS = 0,
    CUBLAS_STATUS_NOT_INITIALIZED = 1,
    CUBLAS_STATUS_INVALID_VALUE = 7,
    CUBLAS_STATUS_EXECUTION_FAILED = 13,
    CUBLAS_STATUS_NOT_SUPPORTED = 15,
};
enum : int { R_32F = 0, R_16F = 2, R_16BF = 14 };
enum : int { OP_N = 0, OP_T = 1 };

struct Handle {
    void* stream;
    int pointer_mode;
};

int element_bytes(int type) { return type == R_32F ? 4 : (type == R_16F || type == R_16BF) ? 2 : 0; }

template <int T>
inline float load(const void* p, long long i) {
    if constexpr (T == R_32F) return ((const float*)p)[i];
    unsigned short bits;
    memcpy(&bits, (const char*)p + 2 * i, 2);
    if constexpr (T == R_16F) {
        _Float16 h;
        memcpy(&h, &bits, 2);
        return (float)h;
    }
    const unsigned u = (unsigned)bits << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

struct Gemm {
    int transa, transb, m, n, k;
    const void* a;
    int lda;
    const void* b;
    int ldb;
    float* c;
    int ldc;
    float alpha, beta;
};

// C = alpha op(A) op(B) + beta C, one output at a time, accumulating over k in order.
template <int T>
void run(const Gemm& g) {
    for (int j = 0; j < g.n; j++) {
        for (int i = 0; i < g.m; i++) {
            float acc = 0.0f;
            for (int p = 0; p < g.k; p++) {
                const long long ai = g.transa == OP_N ? i + (long long)p * g.lda : p + (long long)i * g.lda;
                const long long bi = g.transb == OP_N ? p + (long long)j * g.ldb : j + (long long)p * g.ldb;
                acc += load<T>(g.a, ai) * load<T>(g.b, bi);
            }
            float& out = g.c[i + (long long)j * g.ldc];
            out = g.beta == 0.0f ? g.alpha * acc : g.alpha * acc + g.beta * out;
        }
    }
}

int fail(const char* fn, int status, const char* why) {
    fprintf(stderr, "tessera CUDA emulator: %s: %s\n", fn, why);
    return status;
}

// Asks the emulator's driver whether `bytes` at `p` lie inside one allocation.
bool in_device_memory(const char* what, const void* p, size_t bytes) {
    typedef int (*Check)(const char*, unsigned long long, size_t);
    static Check check = [] {
        void* driver = dlopen("libcuda.so", RTLD_NOW | RTLD_NOLOAD);
        return driver ? (Check)dlsym(driver, "tessera_emu_check_range") : (Check) nullptr;
    }();
    return !check || check(what, (unsigned long long)p, bytes) == 0;
}

// A validated call, ready to run (now, or at every launch of the graph that captured it).
struct Batched {
    const char* fn;
    int type, batch;
    long long stride_a, stride_b, stride_c;
    Gemm g;  // batch 0
};

void run_batched(void* p) {
    const Batched& r = *(const Batched*)p;
    static auto count = [] {
        void* driver = dlopen("libcuda.so", RTLD_NOW | RTLD_NOLOAD);
        return driver ? (void (*)(const char*))dlsym(driver, "tessera_emu_count") : nullptr;
    }();
    if (count) {
        char what[80];
        snprintf(what, sizeof what, "launch:%s", r.fn);
        count(what);
    }
    static auto wait = [] {
        void* driver = dlopen("libcuda.so", RTLD_NOW | RTLD_NOLOAD);
        return driver ? (void (*)())dlsym(driver, "tessera_emu_async_wait") : nullptr;
    }();
    if (wait) wait();
    const int eb = element_bytes(r.type);
    for (int i = 0; i < r.batch; i++) {
        Gemm g = r.g;
        g.a = (const char*)r.g.a + r.stride_a * i * eb;
        g.b = (const char*)r.g.b + r.stride_b * i * eb;
        g.c = r.g.c + r.stride_c * i;
        if (r.type == R_32F) run<R_32F>(g);
        else if (r.type == R_16F) run<R_16F>(g);
        else run<R_16BF>(g);
    }
}

// The arguments of GemmEx, plus the strides and count of the strided-batched form (one batch,
// zero strides, for GemmEx).
struct Call {
    const char* fn;
    Handle* h;
    int transa, transb, m, n, k;
    const void* alpha;
    const void* A;
    int a_type, lda;
    long long stride_a;
    const void* B;
    int b_type, ldb;
    long long stride_b;
    const void* beta;
    void* C;
    int c_type, ldc;
    long long stride_c;
    int batch, compute;
};

// Both entry points: cuBLAS's argument checks, then every batch's operands checked against the
// device allocations before anything runs, then the products.
int gemm(const Call& c) {
    if (!c.h) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (c.m < 0 || c.n < 0 || c.k < 0 || c.batch < 0) {
        return fail(c.fn, CUBLAS_STATUS_INVALID_VALUE, "negative size");
    }
    if ((c.transa != OP_N && c.transa != OP_T) || (c.transb != OP_N && c.transb != OP_T)) {
        return fail(c.fn, CUBLAS_STATUS_INVALID_VALUE, "transpose other than N or T");
    }
    // Stored shapes (rows x cols, column-major) of A and B.
    const int a_rows = c.transa == OP_N ? c.m : c.k, a_cols = c.transa == OP_N ? c.k : c.m;
    const int b_rows = c.transb == OP_N ? c.k : c.n, b_cols = c.transb == OP_N ? c.n : c.k;
    char why[200];
    if (c.lda < (a_rows > 1 ? a_rows : 1) || c.ldb < (b_rows > 1 ? b_rows : 1) ||
        c.ldc < (c.m > 1 ? c.m : 1)) {
        snprintf(why, sizeof why, "leading dimensions lda=%d ldb=%d ldc=%d for m=%d n=%d k=%d",
                 c.lda, c.ldb, c.ldc, c.m, c.n, c.k);
        return fail(c.fn, CUBLAS_STATUS_INVALID_VALUE, why);
    }
    if (c.a_type != c.b_type || element_bytes(c.a_type) == 0 || c.c_type != R_32F) {
        snprintf(why, sizeof why, "types A=%d B=%d C=%d", c.a_type, c.b_type, c.c_type);
        return fail(c.fn, CUBLAS_STATUS_NOT_SUPPORTED, why);
    }
    if (c.compute != 68 && c.compute != 75 && c.compute != 77) {  // 32F, 32F_FAST_16BF, _TF32
        snprintf(why, sizeof why, "compute type %d", c.compute);
        return fail(c.fn, CUBLAS_STATUS_NOT_SUPPORTED, why);
    }
    if (c.m == 0 || c.n == 0 || c.batch == 0) return CUBLAS_STATUS_SUCCESS;
    const int eb = element_bytes(c.a_type);
    auto extent = [](int rows, int cols, int ld) {
        return cols == 0 ? 0 : ((size_t)ld * (cols - 1) + rows);
    };
    for (int i = 0; i < c.batch; i++) {
        const char* a = (const char*)c.A + c.stride_a * i * eb;
        const char* b = (const char*)c.B + c.stride_b * i * eb;
        const char* out = (const char*)c.C + c.stride_c * i * 4;
        if ((c.k > 0 && (!in_device_memory("cuBLAS operand A", a, extent(a_rows, a_cols, c.lda) * eb) ||
                         !in_device_memory("cuBLAS operand B", b, extent(b_rows, b_cols, c.ldb) * eb))) ||
            !in_device_memory("cuBLAS operand C", out, extent(c.m, c.n, c.ldc) * 4)) {
            snprintf(why, sizeof why, "an operand of batch %d outside device memory", i);
            return fail(c.fn, CUBLAS_STATUS_EXECUTION_FAILED, why);
        }
    }
    const Batched run{c.fn, c.a_type, c.batch, c.stride_a, c.stride_b, c.stride_c,
                      Gemm{c.transa, c.transb, c.m, c.n, c.k, c.A, c.lda, c.B, c.ldb,
                           (float*)c.C, c.ldc, *(const float*)c.alpha, *(const float*)c.beta}};
    // Captured into a graph (scalars read now, as cuBLAS does in host pointer mode), or run.
    static auto record = [] {
        void* driver = dlopen("libcuda.so", RTLD_NOW | RTLD_NOLOAD);
        return driver ? (int (*)(void*, void (*)(void*), const void*, size_t))dlsym(
                            driver, "tessera_emu_capture_host")
                      : nullptr;
    }();
    if (!record || record(c.h->stream, run_batched, &run, sizeof run) == 0) run_batched((void*)&run);
    return CUBLAS_STATUS_SUCCESS;
}

}  // namespace

extern "C" {

int cublasCreate_v2(Handle** h) {
    *h = new Handle{nullptr, 0};
    return CUBLAS_STATUS_SUCCESS;
}

int cublasDestroy_v2(Handle* h) {
    delete h;
    return CUBLAS_STATUS_SUCCESS;
}

int cublasSetStream_v2(Handle* h, void* stream) {
    if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
    h->stream = stream;
    return CUBLAS_STATUS_SUCCESS;
}

int cublasGetStream_v2(Handle* h, void** stream) {
    *stream = h->stream;
    return CUBLAS_STATUS_SUCCESS;
}

int cublasSetPointerMode_v2(Handle* h, int mode) {
    h->pointer_mode = mode;
    return CUBLAS_STATUS_SUCCESS;
}

int cublasGetPointerMode_v2(Handle* h, int* mode) {
    *mode = h->pointer_mode;
    return CUBLAS_STATUS_SUCCESS;
}

int cublasSetMathMode(Handle*, int) { return CUBLAS_STATUS_SUCCESS; }

int cublasGemmEx(Handle* h, int transa, int transb, int m, int n, int k, const void* alpha,
                 const void* A, int a_type, int lda, const void* B, int b_type, int ldb,
                 const void* beta, void* C, int c_type, int ldc, int compute, int) {
    const Call c{"cublasGemmEx", h, transa, transb, m, n, k, alpha, A, a_type, lda, 0,
                 B, b_type, ldb, 0, beta, C, c_type, ldc, 0, 1, compute};
    return gemm(c);
}

int cublasGemmStridedBatchedEx(Handle* h, int transa, int transb, int m, int n, int k,
                               const void* alpha, const void* A, int a_type, int lda,
                               long long stride_a, const void* B, int b_type, int ldb,
                               long long stride_b, const void* beta, void* C, int c_type,
                               int ldc, long long stride_c, int batch, int compute, int) {
    const Call c{"cublasGemmStridedBatchedEx", h, transa, transb, m, n, k, alpha, A, a_type,
                 lda, stride_a, B, b_type, ldb, stride_b, beta, C, c_type, ldc, stride_c,
                 batch, compute};
    return gemm(c);
}

}  // extern "C"
