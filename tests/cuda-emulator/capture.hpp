// Stream capture and graphs for the emulated driver: part of driver.cpp's translation unit
// (included inside its anonymous namespace, after the allocation and launch helpers).
//
// While a stream captures, work queued on it is recorded instead of run: kernel launches (their
// arguments copied by value, as cuLaunchKernel does), memsets, device-to-device copies, stream-
// ordered allocations and, through a hook, cuBLAS calls. A graph launch runs the recorded work
// in order. What CUDA refuses during a capture is refused here too, and invalidates the capture
// (cuStreamEndCapture then fails): copies to or from host memory, synchronising, synchronous
// allocation. On top of that, the emulator refuses what would silently go wrong in a replayed
// graph: freeing memory allocated outside the capture (the free would run at every launch).
// Memory allocated during the capture belongs to the graph, keeps its address across launches
// (as a GPU graph's memory nodes do), and is refilled with 0xff bytes at every launch, so a
// replay that reads memory no node of it wrote gets visibly wrong results.

enum : int {
    CUDA_ERROR_ILLEGAL_STATE = 401,
    CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED = 900,
    CUDA_ERROR_STREAM_CAPTURE_INVALIDATED = 901,
};

// One recorded piece of work.
struct Node {
    enum Kind { Kernel, Memset, Copy, Alloc, Host } kind;
    explicit Node(Kind k) : kind(k) {}
    Function* f = nullptr;
    unsigned grid[3] = {0, 0, 0}, block[3] = {0, 0, 0}, shared = 0;
    std::vector<std::vector<char>> args;
    CUdeviceptr dst = 0, src = 0;
    size_t n = 0;
    unsigned char value = 0;
    void (*host)(void*) = nullptr;
    std::vector<char> host_ctx;
};

struct GraphData {
    std::vector<Node> nodes;
    std::vector<CUdeviceptr> owned;  // allocated during the capture
    ~GraphData() {
        for (CUdeviceptr p : owned) release(p);
    }
};

struct Graph {
    std::shared_ptr<GraphData> data;
};

struct GraphExec {
    std::shared_ptr<GraphData> data;
};

// The capture in progress (one at a time), under big_lock.
struct Capture {
    Stream* stream = nullptr;
    std::shared_ptr<GraphData> data;
    bool invalidated = false;
};
Capture capture;

bool capturing(Stream* s) { return capture.data && capture.stream == s; }
bool capturing_any() { return capture.data != nullptr; }

// Refuses `op` during a capture, invalidating it, as CUDA does for work a graph cannot hold.
CUresult refuse_in_capture(const char* op, const char* why) {
    capture.invalidated = true;
    return fail(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, op,
                std::string("not allowed while a stream is being captured: ") + why);
}

// Records a launch of `f` with its arguments copied (their sizes from the module).
CUresult record_launch(Function* f, const unsigned* grid, const unsigned* block, unsigned shared,
                       void** params) {
    if (!f->param_sizes) return refuse_in_capture("cuLaunchKernel", "kernel without sizes");
    size_t sizes[64];
    const unsigned n = f->param_sizes(sizes, 64);
    if (n > 64) return refuse_in_capture("cuLaunchKernel", "more than 64 parameters");
    Node node{Node::Kernel};
    node.f = f;
    for (int i = 0; i < 3; i++) {
        node.grid[i] = grid[i];
        node.block[i] = block[i];
    }
    node.shared = shared;
    for (unsigned i = 0; i < n; i++) {
        const char* p = (const char*)params[i];
        node.args.emplace_back(p, p + sizes[i]);
    }
    capture.data->nodes.push_back(std::move(node));
    return CUDA_SUCCESS;
}

// Records a memset (`value`) or a device-to-device copy (from `src`) of `n` bytes at `dst`, its
// ranges checked now as the eager call would.
CUresult record_memory(Node::Kind kind, CUdeviceptr dst, CUdeviceptr src, unsigned char value,
                       size_t n) {
    const char* op = kind == Node::Copy ? "cuMemcpyDtoDAsync" : "cuMemsetD8Async";
    if (CUresult r = check_range(op, dst, n)) return r;
    if (kind == Node::Copy) {
        if (CUresult r = check_range(op, src, n)) return r;
    }
    Node node{kind};
    node.dst = dst;
    node.src = src;
    node.value = value;
    node.n = n;
    capture.data->nodes.push_back(node);
    return CUDA_SUCCESS;
}

CUresult run_kernel(Function* f, const unsigned* grid, const unsigned* block, unsigned shared,
                    void** params) {
    char err[512] = {0};
    if (f->module->launch(f->entry, grid, block, shared, params, err, sizeof err) != 0) {
        return fail(CUDA_ERROR_LAUNCH_FAILED, ("kernel " + f->name).c_str(), err);
    }
    return CUDA_SUCCESS;
}

// Runs a graph's nodes in order.
CUresult run_graph(GraphData& g) {
    count("graph_launch");
    for (Node& node : g.nodes) {
        switch (node.kind) {
            case Node::Kernel: {
                count("launch:" + node.f->name);
                std::vector<void*> params;
                for (auto& a : node.args) params.push_back(a.data());
                if (CUresult r = run_kernel(node.f, node.grid, node.block, node.shared,
                                            params.data())) {
                    return r;
                }
                break;
            }
            case Node::Memset:
                count("memset");
                memset((void*)node.dst, node.value, node.n);
                break;
            case Node::Copy:
                count("copy_on_device");
                memmove((void*)node.dst, (const void*)node.src, node.n);
                break;
            case Node::Alloc:
                memset((void*)node.dst, 0xff, node.n);
                break;
            case Node::Host:
                node.host(node.host_ctx.data());
                break;
        }
    }
    return CUDA_SUCCESS;
}
