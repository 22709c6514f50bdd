// The CPU emulator's cuBLAS (libcublas.so): handles and cublasGemmEx, which is all Tessera calls.
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

int fail(int status, const char* why) {
    fprintf(stderr, "tessera CUDA emulator: cublasGemmEx: %s\n", why);
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
    if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (m < 0 || n < 0 || k < 0) return fail(CUBLAS_STATUS_INVALID_VALUE, "negative size");
    if ((transa != OP_N && transa != OP_T) || (transb != OP_N && transb != OP_T)) {
        return fail(CUBLAS_STATUS_INVALID_VALUE, "transpose other than N or T");
    }
    // Stored shapes (rows x cols, column-major) of A and B.
    const int a_rows = transa == OP_N ? m : k, a_cols = transa == OP_N ? k : m;
    const int b_rows = transb == OP_N ? k : n, b_cols = transb == OP_N ? n : k;
    char why[160];
    if (lda < (a_rows > 1 ? a_rows : 1) || ldb < (b_rows > 1 ? b_rows : 1) ||
        ldc < (m > 1 ? m : 1)) {
        snprintf(why, sizeof why, "leading dimensions lda=%d ldb=%d ldc=%d for m=%d n=%d k=%d", lda,
                 ldb, ldc, m, n, k);
        return fail(CUBLAS_STATUS_INVALID_VALUE, why);
    }
    if (a_type != b_type || element_bytes(a_type) == 0 || c_type != R_32F) {
        snprintf(why, sizeof why, "types A=%d B=%d C=%d", a_type, b_type, c_type);
        return fail(CUBLAS_STATUS_NOT_SUPPORTED, why);
    }
    if (compute != 68 && compute != 75 && compute != 77) {  // 32F, 32F_FAST_16BF, 32F_FAST_TF32
        snprintf(why, sizeof why, "compute type %d", compute);
        return fail(CUBLAS_STATUS_NOT_SUPPORTED, why);
    }
    if (m == 0 || n == 0) return CUBLAS_STATUS_SUCCESS;
    const int eb = element_bytes(a_type);
    auto extent = [](int rows, int cols, int ld) {
        return cols == 0 ? 0 : ((size_t)ld * (cols - 1) + rows);
    };
    if ((k > 0 && (!in_device_memory("cublasGemmEx A", A, extent(a_rows, a_cols, lda) * eb) ||
                   !in_device_memory("cublasGemmEx B", B, extent(b_rows, b_cols, ldb) * eb))) ||
        !in_device_memory("cublasGemmEx C", C, extent(m, n, ldc) * 4)) {
        return fail(CUBLAS_STATUS_EXECUTION_FAILED, "an operand outside device memory");
    }
    static auto count = [] {
        void* driver = dlopen("libcuda.so", RTLD_NOW | RTLD_NOLOAD);
        return driver ? (void (*)(const char*))dlsym(driver, "tessera_emu_count") : nullptr;
    }();
    if (count) count("launch:cublasGemmEx");
    static auto wait = [] {
        void* driver = dlopen("libcuda.so", RTLD_NOW | RTLD_NOLOAD);
        return driver ? (void (*)())dlsym(driver, "tessera_emu_async_wait") : nullptr;
    }();
    if (wait) wait();
    const float al = *(const float*)alpha, be = *(const float*)beta;
    const Gemm g{transa, transb, m, n, k, A, lda, B, ldb, (float*)C, ldc, al, be};
    if (a_type == R_32F) run<R_32F>(g);
    else if (a_type == R_16F) run<R_16F>(g);
    else run<R_16BF>(g);
    return CUBLAS_STATUS_SUCCESS;
}

}  // extern "C"
