// The CPU emulator's NVRTC (libnvrtc.so): "compiles" a CUDA source into a host shared object.
//
// nvrtcCompileProgram prepends device.hpp, applies the two rewrites host C++ needs, appends an
// entry point per `extern "C" __global__` kernel, and runs the host C++ compiler
// ($TESSERA_EMU_CXX, default g++). The result is cached by the text's hash in
// $TESSERA_EMU_CACHE (default: the `modules` folder beside this library), so concurrent test
// processes compile once. The "PTX" handed back is one line naming that object, which only the
// emulator's driver (driver.cpp) understands; a real driver rejects it as an invalid image.
// With TESSERA_EMU_ASAN=1 the module is built with -fsanitize=address (the process must have
// libasan preloaded: asan-runner.sh), so kernel accesses outside an allocation are reported.
//
// The rewrites:
// - `extern __shared__ T name[];` becomes a pointer to the launch's dynamic shared memory;
// - nothing else: kernels compile as written, with the CUDA keywords and intrinsics that
//   device.hpp defines.

#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fstream>
#include <functional>
#include <regex>
#include <sstream>
#include <string>

namespace {

enum : int {
    NVRTC_SUCCESS = 0,
    NVRTC_ERROR_INVALID_INPUT = 3,
    NVRTC_ERROR_INVALID_PROGRAM = 4,
    NVRTC_ERROR_COMPILATION = 6,
    NVRTC_ERROR_INTERNAL_ERROR = 11,
};

struct Program {
    std::string source, name, log, ptx;
};

// The folder this library was loaded from.
std::string own_dir() {
    Dl_info info;
    if (dladdr((void*)&own_dir, &info) == 0 || !info.dli_fname) return ".";
    std::string path = info.dli_fname;
    const size_t slash = path.rfind('/');
    return slash == std::string::npos ? "." : path.substr(0, slash);
}

std::string host_source(const std::string& cuda, const std::string& name) {
    static const std::regex dynamic_shared(
        R"(extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([A-Za-z_]\w*)\s+(\w+)\s*\[\s*\]\s*;)");
    static const std::regex kernel(
        R"(extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?(\w+)\s*\()");
    std::string body =
        std::regex_replace(cuda, dynamic_shared, "$1* $2 = ($1*)emu::dynamic_shared();");
    std::ostringstream out;
    out << "#include \"" << TESSERA_EMU_DIR << "/device.hpp\"\n";
    out << "#line 1 \"" << name << "\"\n" << body << "\n";
    for (std::sregex_iterator it(cuda.begin(), cuda.end(), kernel), end; it != end; ++it) {
        out << "TESSERA_EMU_KERNEL(" << (*it)[1] << ")\n";
    }
    return out.str();
}

bool exists(const std::string& path) {
    struct stat st;
    return stat(path.c_str(), &st) == 0;
}

// Compiles `src` into a cached shared object; returns its path, or "" with `log` set.
std::string compile(const std::string& src, std::string& log) {
    const char* cache_env = getenv("TESSERA_EMU_CACHE");
    const std::string cache = cache_env && *cache_env ? cache_env : own_dir() + "/modules";
    mkdir(cache.c_str(), 0755);
    char hash[32];
    snprintf(hash, sizeof hash, "%016zx", std::hash<std::string>{}(src));
    const char* asan_env = getenv("TESSERA_EMU_ASAN");
    const bool asan = asan_env && strcmp(asan_env, "1") == 0;
    const std::string so = cache + "/" + hash + "-" + std::to_string(src.size()) +
                           (asan ? "-asan" : "") + ".so";
    if (exists(so)) return so;
    const std::string tmp = so + "." + std::to_string(getpid());
    const std::string cpp = tmp + ".cpp", err = tmp + ".log";
    {
        std::ofstream f(cpp);
        f << src;
        if (!f) {
            log = "cannot write " + cpp;
            return "";
        }
    }
    const char* cxx_env = getenv("TESSERA_EMU_CXX");
    const std::string cxx = cxx_env && *cxx_env ? cxx_env : "g++";
    const std::string cmd = cxx + " -std=c++20 -O2 -march=native -g -fPIC -shared -w " +
                            (asan ? "-fsanitize=address -fno-omit-frame-pointer " : "") + "-o '" + tmp + "' '" + cpp +
                            "' 2> '" + err + "'";
    const int rc = system(cmd.c_str());
    std::ifstream e(err);
    std::stringstream text;
    text << e.rdbuf();
    unlink(err.c_str());
    if (rc != 0) {
        log = "host compile failed (" + cmd + "):\n" + text.str();
        unlink(tmp.c_str());
        return "";
    }
    unlink(cpp.c_str());
    if (rename(tmp.c_str(), so.c_str()) != 0) {
        log = "cannot move the compiled module to " + so;
        return "";
    }
    return so;
}

}  // namespace

extern "C" {

int nvrtcVersion(int* major, int* minor) {
    *major = 13;
    *minor = 0;
    return NVRTC_SUCCESS;
}

const char* nvrtcGetErrorString(int result) {
    switch (result) {
        case NVRTC_SUCCESS: return "NVRTC_SUCCESS";
        case NVRTC_ERROR_INVALID_INPUT: return "NVRTC_ERROR_INVALID_INPUT";
        case NVRTC_ERROR_INVALID_PROGRAM: return "NVRTC_ERROR_INVALID_PROGRAM";
        case NVRTC_ERROR_COMPILATION: return "NVRTC_ERROR_COMPILATION";
        default: return "NVRTC_ERROR_INTERNAL_ERROR";
    }
}

int nvrtcCreateProgram(Program** prog, const char* src, const char* name, int num_headers,
                       const char* const*, const char* const*) {
    if (!prog || !src) return NVRTC_ERROR_INVALID_INPUT;
    if (num_headers != 0) return NVRTC_ERROR_INVALID_INPUT;  // not needed by Tessera
    *prog = new Program{src, name ? name : "program.cu", "", ""};
    return NVRTC_SUCCESS;
}

int nvrtcDestroyProgram(Program** prog) {
    if (!prog || !*prog) return NVRTC_ERROR_INVALID_PROGRAM;
    delete *prog;
    *prog = nullptr;
    return NVRTC_SUCCESS;
}

int nvrtcCompileProgram(Program* p, int num_options, const char* const* options) {
    if (!p) return NVRTC_ERROR_INVALID_PROGRAM;
    for (int i = 0; i < num_options; i++) {
        // Architectures are accepted and ignored: the host runs every one.
        if (!options[i]) return NVRTC_ERROR_INVALID_INPUT;
    }
    const std::string so = compile(host_source(p->source, p->name), p->log);
    if (so.empty()) return NVRTC_ERROR_COMPILATION;
    p->ptx = "TESSERA-EMU-MODULE " + so;
    return NVRTC_SUCCESS;
}

int nvrtcGetPTXSize(Program* p, size_t* size) {
    if (!p || p->ptx.empty()) return NVRTC_ERROR_INVALID_PROGRAM;
    *size = p->ptx.size() + 1;
    return NVRTC_SUCCESS;
}

int nvrtcGetPTX(Program* p, char* out) {
    if (!p || p->ptx.empty()) return NVRTC_ERROR_INVALID_PROGRAM;
    memcpy(out, p->ptx.c_str(), p->ptx.size() + 1);
    return NVRTC_SUCCESS;
}

int nvrtcGetProgramLogSize(Program* p, size_t* size) {
    if (!p) return NVRTC_ERROR_INVALID_PROGRAM;
    *size = p->log.size() + 1;
    return NVRTC_SUCCESS;
}

int nvrtcGetProgramLog(Program* p, char* out) {
    if (!p) return NVRTC_ERROR_INVALID_PROGRAM;
    memcpy(out, p->log.c_str(), p->log.size() + 1);
    return NVRTC_SUCCESS;
}

}  // extern "C"
