// The CPU emulator's NCCL (libnccl.so.2): the calls Tessera's NCCL module makes
// (kernels/src/cuda/nccl/), over loopback TCP between processes.
//
// ncclGetUniqueId starts, once per process, a hub that plays NCCL's bootstrap root and moves
// the data: the id holds its port and a random group key. Each communicator connects to the hub,
// joins its group, and runs its operations in order on its own thread: a collective sends the
// rank's contribution and waits for the result (the hub combines once every rank has sent the
// same operation), a send is handed to the hub, a receive waits for the matching send. Data is
// read from and written to "device" memory, which is host memory under the emulated driver
// (driver.cpp), and each operation holds one of the driver's async tickets until it is done, so
// the stream's later work and events wait for it as on a GPU. Buffers are range-checked against
// the driver's allocations.
//
// Semantics kept from NCCL, since Tessera's code depends on them: nonblocking communicators
// (config.blocking = 0) return ncclInProgress from init and report progress through
// ncclCommGetAsyncError; a rank that never joins or never calls a collective leaves the others
// waiting (no timeout of our own: the caller's deadline and ncclCommAbort end it); a peer whose
// connection drops (its process died or aborted) is ncclRemoteError for the others, but their
// stalled operation stays "running" until they abort, as a GPU kernel would; ranks that disagree
// on an operation's type, count or root get ncclInvalidUsage; and, as NCCL before 2.30 does, two
// ranks of a group on one device are refused ("Duplicate GPU detected"). The version reported is
// 2.27.3.

#include <arpa/inet.h>
#include <dlfcn.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <condition_variable>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace {

enum : int {
    SUCCESS = 0,
    SYSTEM_ERROR = 2,
    INTERNAL_ERROR = 3,
    INVALID_ARGUMENT = 4,
    INVALID_USAGE = 5,
    REMOTE_ERROR = 6,
    IN_PROGRESS = 7,
};

const char MAGIC[8] = {'T', 'E', 'S', 'S', 'E', 'M', 'U', '1'};

// ncclUniqueId (128 bytes): MAGIC, the hub's port, the group key.
struct Id {
    char magic[8];
    uint16_t port;
    uint64_t key;
};

enum Kind : uint32_t { JOIN = 1, ALL_REDUCE, ALL_GATHER, BROADCAST, SEND, RECV, REPLY, FAIL };

struct Msg {
    uint32_t kind, rank, world, peer;  // peer: the root of a broadcast, the other rank of a p2p
    uint64_t key, count, bytes;        // count: elements; bytes: of the payload that follows
    int32_t dtype, device;
};

size_t elem_bytes(int dtype) {
    switch (dtype) {
        case 0: case 1: return 1;           // int8, uint8
        case 2: case 3: case 7: return 4;   // int32, uint32, float32
        case 4: case 5: case 8: return 8;   // int64, uint64, float64
        case 6: case 9: return 2;           // float16, bfloat16
        default: return 0;
    }
}

bool write_all(int fd, const void* p, size_t n) {
    const char* c = (const char*)p;
    while (n > 0) {
        const ssize_t w = send(fd, c, n, MSG_NOSIGNAL);
        if (w <= 0) return false;
        c += w;
        n -= (size_t)w;
    }
    return true;
}

bool read_all(int fd, void* p, size_t n) {
    char* c = (char*)p;
    while (n > 0) {
        const ssize_t r = recv(fd, c, n, 0);
        if (r <= 0) return false;
        c += r;
        n -= (size_t)r;
    }
    return true;
}

bool send_msg(int fd, Msg m, const void* payload) {
    return write_all(fd, &m, sizeof m) && (m.bytes == 0 || write_all(fd, payload, m.bytes));
}

bool recv_msg(int fd, Msg* m, std::vector<char>* payload) {
    if (!read_all(fd, m, sizeof *m)) return false;
    payload->resize(m->bytes);
    return m->bytes == 0 || read_all(fd, payload->data(), m->bytes);
}

void reply(int fd, uint32_t kind, const std::vector<char>& data) {
    Msg m{};
    m.kind = kind;
    m.bytes = data.size();
    send_msg(fd, m, data.data());
}

std::vector<char> text(const std::string& s) { return std::vector<char>(s.begin(), s.end()); }

// ---- the hub

struct Contribution {
    Msg msg;
    std::vector<char> data;
};

struct Group {
    uint32_t world = 0;
    std::vector<int> fds;     // by rank; -1 until joined or after leaving
    std::vector<int> devices;
    uint32_t joined = 0;
    bool failed = false;
    // Collectives by sequence number (each rank counts its own), then the contributions.
    std::map<uint64_t, std::vector<Contribution>> pending;
    std::vector<uint64_t> next_seq;
    // Point to point: sends not yet received, and receives waiting, by (from, to).
    std::map<std::pair<uint32_t, uint32_t>, std::deque<std::vector<char>>> sent;
    std::map<std::pair<uint32_t, uint32_t>, int> waiting;
};

// Never destroyed: the hub's threads may still be serving when the process exits, and must not
// find these torn down by static destructors.
std::mutex& hub_mu = *new std::mutex;
std::map<uint64_t, Group>& groups = *new std::map<uint64_t, Group>;
uint16_t hub_port = 0;

void fail_group(Group& g, const std::string& why, int except_fd) {
    if (g.failed) return;
    g.failed = true;
    for (int fd : g.fds) {
        if (fd >= 0 && fd != except_fd) reply(fd, FAIL, text(why));
    }
}

// Combines the contributions of every rank to one collective; an empty result and a message on
// a mismatch.
std::vector<char> combine(const std::vector<Contribution>& c, uint32_t world, std::string* err) {
    const Msg& first = c[0].msg;
    for (const Contribution& x : c) {
        if (x.msg.kind != first.kind || x.msg.count != first.count ||
            x.msg.dtype != first.dtype || x.msg.peer != first.peer) {
            *err = "ranks called different collectives (kind " + std::to_string(first.kind) +
                   " count " + std::to_string(first.count) + " vs kind " +
                   std::to_string(x.msg.kind) + " count " + std::to_string(x.msg.count) + ")";
            return {};
        }
    }
    const size_t eb = elem_bytes(first.dtype), n = first.count;
    if (first.kind == ALL_GATHER) {
        std::vector<char> out;
        for (uint32_t r = 0; r < world; r++) out.insert(out.end(), c[r].data.begin(), c[r].data.end());
        return out;
    }
    if (first.kind == BROADCAST) {
        if (first.peer >= world) {
            *err = "broadcast root " + std::to_string(first.peer) + " outside the group";
            return {};
        }
        return c[first.peer].data;
    }
    std::vector<char> out = c[0].data;
    for (uint32_t r = 1; r < world; r++) {
        const char* in = c[r].data.data();
        for (size_t i = 0; i < n; i++) {
            char* o = out.data() + i * eb;
            switch (first.dtype) {
                case 7: { float a, b; memcpy(&a, o, 4); memcpy(&b, in + i * 4, 4); a += b; memcpy(o, &a, 4); break; }
                case 8: { double a, b; memcpy(&a, o, 8); memcpy(&b, in + i * 8, 8); a += b; memcpy(o, &a, 8); break; }
                case 2: case 3: { uint32_t a, b; memcpy(&a, o, 4); memcpy(&b, in + i * 4, 4); a += b; memcpy(o, &a, 4); break; }
                case 4: case 5: { uint64_t a, b; memcpy(&a, o, 8); memcpy(&b, in + i * 8, 8); a += b; memcpy(o, &a, 8); break; }
                default: *err = "all-reduce of data type " + std::to_string(first.dtype); return {};
            }
        }
    }
    return out;
}

// One rank's connection: serves its messages until it closes.
void serve(int fd) {
    uint64_t key = 0;
    uint32_t rank = 0;
    bool member = false;
    Msg m;
    std::vector<char> data;
    while (recv_msg(fd, &m, &data)) {
        std::lock_guard<std::mutex> lock(hub_mu);
        if (m.kind == JOIN) {
            Group& g = groups[m.key];
            if (g.world == 0) {
                g.world = m.world;
                g.fds.assign(m.world, -1);
                g.devices.assign(m.world, -1);
                g.next_seq.assign(m.world, 0);
            }
            std::string err;
            if (m.world != g.world) err = "world size " + std::to_string(m.world) + " for a group of " + std::to_string(g.world);
            else if (m.rank >= g.world) err = "rank " + std::to_string(m.rank) + " outside a group of " + std::to_string(g.world);
            else if (g.fds[m.rank] != -1) err = "rank " + std::to_string(m.rank) + " joined twice";
            for (uint32_t r = 0; err.empty() && r < g.world; r++) {
                if (g.fds[r] >= 0 && g.devices[r] == m.device) {
                    err = "Duplicate GPU detected: rank " + std::to_string(m.rank) + " and rank " +
                          std::to_string(r) + " both on device " + std::to_string(m.device);
                }
            }
            if (!err.empty()) {
                reply(fd, FAIL, text(err));
                fail_group(g, err, fd);
                continue;
            }
            key = m.key;
            rank = m.rank;
            member = true;
            g.fds[rank] = fd;
            g.devices[rank] = m.device;
            if (++g.joined == g.world) {
                for (int f : g.fds) reply(f, REPLY, {});
            }
            continue;
        }
        if (!member) break;
        Group& g = groups[key];
        if (g.failed) continue;
        if (m.kind == SEND) {
            const auto route = std::make_pair(rank, m.peer);
            auto w = g.waiting.find(route);
            if (w != g.waiting.end() && w->second > 0) {
                w->second--;
                reply(g.fds[m.peer], REPLY, data);
            } else {
                g.sent[route].push_back(std::move(data));
            }
        } else if (m.kind == RECV) {
            const auto route = std::make_pair(m.peer, rank);
            auto& q = g.sent[route];
            if (!q.empty()) {
                reply(fd, REPLY, q.front());
                q.pop_front();
            } else {
                g.waiting[route]++;
            }
        } else {
            const uint64_t seq = g.next_seq[rank]++;
            auto& c = g.pending[seq];
            c.resize(g.world);
            c[rank] = Contribution{m, std::move(data)};
            c[rank].msg.rank = rank + 1;  // marks the slot filled
            bool all = true;
            for (const Contribution& x : c) all = all && x.msg.rank != 0;
            if (!all) continue;
            std::string err;
            std::vector<char> out = combine(c, g.world, &err);
            if (!err.empty()) {
                fail_group(g, err, -1);
            } else {
                for (int f : g.fds) reply(f, REPLY, out);
            }
            g.pending.erase(seq);
        }
    }
    std::lock_guard<std::mutex> lock(hub_mu);
    if (member) {
        Group& g = groups[key];
        g.fds[rank] = -1;
        fail_group(g, "rank " + std::to_string(rank) + " left the group (its process exited or aborted)", fd);
    }
    close(fd);
}

bool start_hub() {
    std::lock_guard<std::mutex> lock(hub_mu);
    if (hub_port) return true;
    const int fd = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof a;
    if (fd < 0 || bind(fd, (sockaddr*)&a, sizeof a) != 0 || listen(fd, 64) != 0 ||
        getsockname(fd, (sockaddr*)&a, &len) != 0) {
        if (fd >= 0) close(fd);
        return false;
    }
    hub_port = ntohs(a.sin_port);
    std::thread([fd] {
        for (;;) {
            const int c = accept(fd, nullptr, nullptr);
            if (c < 0) continue;
            const int one = 1;
            setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
            std::thread(serve, c).detach();
        }
    }).detach();
    return true;
}

// ---- the driver's hooks

template <class F>
F driver_fn(const char* name) {
    void* d = dlopen("libcuda.so", RTLD_NOW | RTLD_NOLOAD);
    return d ? (F)dlsym(d, name) : nullptr;
}

unsigned long long async_begin() {
    static auto f = driver_fn<unsigned long long (*)()>("tessera_emu_async_begin");
    return f ? f() : 0;
}
void async_end(unsigned long long t) {
    static auto f = driver_fn<void (*)(unsigned long long)>("tessera_emu_async_end");
    if (f && t) f(t);
}
bool in_device_memory(const char* op, const void* p, size_t n) {
    static auto f = driver_fn<int (*)(const char*, unsigned long long, size_t)>("tessera_emu_check_range");
    return n == 0 || !f || f(op, (unsigned long long)p, n) == 0;
}
int current_device() {
    static auto f = driver_fn<int (*)(int*)>("cuCtxGetDevice");
    int d = -1;
    if (f) f(&d);
    return d;
}

// ---- communicators

struct Op {
    uint32_t kind;
    const void* send;
    void* recv;
    size_t count;
    int dtype, peer;
};

struct Batch {
    std::vector<Op> ops;
    unsigned long long ticket;
};

struct Comm {
    int rank = 0, world = 0, device = -1;
    Id id{};
    int fd = -1;
    std::mutex mu;
    std::condition_variable cv;
    int state = IN_PROGRESS;  // what ncclCommGetAsyncError reports
    std::string last_error;
    std::deque<Batch> queue;
    bool busy = false, stopping = false, finalizing = false;
    std::vector<unsigned long long> tickets;  // not yet finished
};

void set_error(Comm& c, int code, const std::string& why) {
    std::lock_guard<std::mutex> g(c.mu);
    if (c.state == SUCCESS || c.state == IN_PROGRESS) {
        c.state = code;
        c.last_error = why;
    }
    c.cv.notify_all();
}

// Runs one operation; false (with the communicator failed) when it could not complete.
bool run(Comm& c, const Op& op) {
    const size_t eb = elem_bytes(op.dtype);
    Msg m{};
    m.kind = op.kind;
    m.rank = c.rank;
    m.peer = (uint32_t)op.peer;
    m.count = op.count;
    m.dtype = op.dtype;
    const bool sends = op.kind != RECV && (op.kind != BROADCAST || op.peer == c.rank);
    m.bytes = sends ? op.count * eb : 0;
    if (!send_msg(c.fd, m, op.send)) {
        set_error(c, REMOTE_ERROR, "the connection to the group closed");
        return false;
    }
    if (op.kind == SEND) return true;
    Msg r;
    std::vector<char> data;
    if (!recv_msg(c.fd, &r, &data)) {
        set_error(c, REMOTE_ERROR, "the connection to the group closed");
        return false;
    }
    if (r.kind == FAIL) {
        const std::string why(data.begin(), data.end());
        set_error(c, why.find("different") != std::string::npos ? INVALID_USAGE : REMOTE_ERROR, why);
        return false;
    }
    const size_t want = (op.kind == ALL_GATHER ? op.count * c.world : op.count) * eb;
    if (data.size() != want) {
        set_error(c, INVALID_USAGE, "received " + std::to_string(data.size()) + " bytes for a buffer of " + std::to_string(want));
        return false;
    }
    memcpy(op.recv, data.data(), want);
    return true;
}

// The communicator's thread: joins the group, then runs batches in order.
void comm_main(std::shared_ptr<Comm> c) {
    Msg m{};
    m.kind = JOIN;
    m.rank = c->rank;
    m.world = c->world;
    m.key = c->id.key;
    m.device = c->device;
    Msg r;
    std::vector<char> data;
    if (!send_msg(c->fd, m, nullptr) || !recv_msg(c->fd, &r, &data)) {
        set_error(*c, REMOTE_ERROR, "the group's bootstrap closed while joining");
        return;
    }
    if (r.kind == FAIL) {
        set_error(*c, INVALID_USAGE, std::string(data.begin(), data.end()));
        return;
    }
    {
        std::lock_guard<std::mutex> g(c->mu);
        if (c->state == IN_PROGRESS) c->state = SUCCESS;
    }
    for (;;) {
        Batch b;
        {
            std::unique_lock<std::mutex> g(c->mu);
            c->cv.wait(g, [&] { return c->stopping || !c->queue.empty(); });
            if (c->stopping) return;
            b = std::move(c->queue.front());
            c->queue.pop_front();
            c->busy = true;
        }
        // Sends first: the hub keeps them, so a rank never waits on a receive its peer has not
        // reached yet because of the order inside a group.
        bool ok = true;
        for (const Op& op : b.ops) ok = ok && (op.kind != SEND || run(*c, op));
        for (const Op& op : b.ops) ok = ok && (op.kind == SEND || run(*c, op));
        if (!ok) return;  // the batch's ticket stays taken until the communicator is aborted
        std::lock_guard<std::mutex> g(c->mu);
        c->busy = false;
        std::erase(c->tickets, b.ticket);
        async_end(b.ticket);
        c->cv.notify_all();
    }
}

struct Handle {
    std::shared_ptr<Comm> comm;
    std::thread thread;
};

void shut(Handle* h, bool release_tickets) {
    {
        std::lock_guard<std::mutex> g(h->comm->mu);
        h->comm->stopping = true;
        if (release_tickets) {
            for (unsigned long long t : h->comm->tickets) async_end(t);
            h->comm->tickets.clear();
        }
    }
    h->comm->cv.notify_all();
    if (h->comm->fd >= 0) shutdown(h->comm->fd, SHUT_RDWR);
    if (h->thread.joinable()) h->thread.join();
    if (h->comm->fd >= 0) close(h->comm->fd);
    delete h;
}

thread_local int group_depth = 0;
thread_local std::vector<std::pair<Handle*, Op>> grouped;
std::string& process_error = *new std::string;  // never destroyed, as the hub's state

int submit(Handle* h, std::vector<Op> ops) {
    Comm& c = *h->comm;
    std::lock_guard<std::mutex> g(c.mu);
    if (c.stopping) return INVALID_USAGE;
    Batch b{std::move(ops), async_begin()};
    c.tickets.push_back(b.ticket);
    c.queue.push_back(std::move(b));
    c.cv.notify_all();
    return SUCCESS;
}

int enqueue(Handle* h, Op op, const char* what) {
    if (!h) return INVALID_ARGUMENT;
    const size_t eb = elem_bytes(op.dtype);
    if (eb == 0) {
        process_error = std::string(what) + ": unknown data type " + std::to_string(op.dtype);
        return INVALID_ARGUMENT;
    }
    const size_t in = op.kind == RECV || (op.kind == BROADCAST && op.peer != h->comm->rank) ? 0 : op.count * eb;
    const size_t out = op.kind == SEND ? 0 : (op.kind == ALL_GATHER ? op.count * h->comm->world : op.count) * eb;
    if (!in_device_memory(what, op.send, in) || !in_device_memory(what, op.recv, out)) {
        process_error = std::string(what) + ": a buffer outside device memory";
        return INVALID_ARGUMENT;
    }
    if (op.kind != ALL_REDUCE && op.kind != ALL_GATHER && (op.peer < 0 || op.peer >= h->comm->world)) {
        process_error = std::string(what) + ": rank " + std::to_string(op.peer) + " outside the group";
        return INVALID_ARGUMENT;
    }
    if (group_depth > 0) {
        grouped.emplace_back(h, op);
        return SUCCESS;
    }
    return submit(h, {op});
}

}  // namespace

extern "C" {

typedef void* ncclComm_t;

int ncclGetVersion(int* v) {
    *v = 22703;
    return SUCCESS;
}

int ncclGetUniqueId(Id* id) {
    if (!start_hub()) {
        process_error = "could not listen on loopback for the group's bootstrap";
        return SYSTEM_ERROR;
    }
    memset((void*)id, 0, 128);
    memcpy(id->magic, MAGIC, 8);
    id->port = hub_port;
    static std::mt19937_64 rng(std::random_device{}());
    std::lock_guard<std::mutex> lock(hub_mu);
    id->key = rng();
    return SUCCESS;
}

// ncclConfig_t: size, magic, version, then blocking (the one field read here).
struct ConfigHead {
    size_t size;
    unsigned magic, version;
    int blocking;
};

// ncclUniqueId, passed by value.
struct RawId {
    char internal[128];
};

int ncclCommInitRankConfig(ncclComm_t* out, int nranks, RawId raw, int rank, ConfigHead* config) {
    Id id;
    memcpy(&id, raw.internal, sizeof id);
    if (memcmp(id.magic, MAGIC, 8) != 0) {
        process_error = "the unique id was not made by this emulator's ncclGetUniqueId";
        return INVALID_ARGUMENT;
    }
    if (nranks < 1 || rank < 0 || rank >= nranks) {
        process_error = "rank " + std::to_string(rank) + " of " + std::to_string(nranks);
        return INVALID_ARGUMENT;
    }
    const bool blocking = !(config && config->magic == 0xcafebeef && config->blocking == 0);
    auto c = std::make_shared<Comm>();
    c->rank = rank;
    c->world = nranks;
    c->id = id;
    c->device = current_device();
    c->fd = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons(id.port);
    if (c->fd < 0 || connect(c->fd, (sockaddr*)&a, sizeof a) != 0) {
        if (c->fd >= 0) close(c->fd);
        process_error = "cannot reach the group's bootstrap at 127.0.0.1:" + std::to_string(id.port);
        return REMOTE_ERROR;
    }
    const int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    auto* h = new Handle{c, std::thread(comm_main, c)};
    *out = h;
    if (!blocking) return IN_PROGRESS;
    std::unique_lock<std::mutex> g(c->mu);
    c->cv.wait(g, [&] { return c->state != IN_PROGRESS; });
    return c->state;
}

int ncclCommGetAsyncError(ncclComm_t comm, int* state) {
    if (!comm) return INVALID_ARGUMENT;
    Comm& c = *((Handle*)comm)->comm;
    std::lock_guard<std::mutex> g(c.mu);
    // A finalize is in progress until the queued work has run.
    *state = c.state == SUCCESS && c.finalizing && (c.busy || !c.queue.empty()) ? IN_PROGRESS : c.state;
    return SUCCESS;
}

int ncclCommFinalize(ncclComm_t comm) {
    if (!comm) return INVALID_ARGUMENT;
    Comm& c = *((Handle*)comm)->comm;
    std::lock_guard<std::mutex> g(c.mu);
    c.finalizing = true;
    return c.state == SUCCESS && (c.busy || !c.queue.empty()) ? IN_PROGRESS : c.state;
}

// Work still queued on a destroyed communicator can never finish; its tickets are released so
// the stream does not wait for it forever.
int ncclCommDestroy(ncclComm_t comm) {
    if (!comm) return INVALID_ARGUMENT;
    shut((Handle*)comm, true);
    return SUCCESS;
}

int ncclCommAbort(ncclComm_t comm) {
    if (!comm) return SUCCESS;
    shut((Handle*)comm, true);
    return SUCCESS;
}

const char* ncclGetErrorString(int code) {
    switch (code) {
        case SUCCESS: return "no error";
        case SYSTEM_ERROR: return "unhandled system error";
        case INTERNAL_ERROR: return "internal error";
        case INVALID_ARGUMENT: return "invalid argument";
        case INVALID_USAGE: return "invalid usage";
        case REMOTE_ERROR: return "remote process exited or there was a network error";
        case IN_PROGRESS: return "NCCL operation in progress";
        default: return "unknown result code";
    }
}

const char* ncclGetLastError(ncclComm_t comm) {
    if (!comm) return process_error.c_str();
    Comm& c = *((Handle*)comm)->comm;
    std::lock_guard<std::mutex> g(c.mu);
    return c.last_error.c_str();
}

int ncclAllReduce(const void* send, void* recv, size_t count, int dtype, int op, ncclComm_t comm, void*) {
    if (op != 0) {
        process_error = "ncclAllReduce: only ncclSum is emulated";
        return INVALID_ARGUMENT;
    }
    return enqueue((Handle*)comm, Op{ALL_REDUCE, send, recv, count, dtype, 0}, "ncclAllReduce");
}

int ncclAllGather(const void* send, void* recv, size_t count, int dtype, ncclComm_t comm, void*) {
    return enqueue((Handle*)comm, Op{ALL_GATHER, send, recv, count, dtype, 0}, "ncclAllGather");
}

int ncclBroadcast(const void* send, void* recv, size_t count, int dtype, int root, ncclComm_t comm, void*) {
    return enqueue((Handle*)comm, Op{BROADCAST, send, recv, count, dtype, root}, "ncclBroadcast");
}

int ncclSend(const void* send, size_t count, int dtype, int peer, ncclComm_t comm, void*) {
    return enqueue((Handle*)comm, Op{SEND, send, nullptr, count, dtype, peer}, "ncclSend");
}

int ncclRecv(void* recv, size_t count, int dtype, int peer, ncclComm_t comm, void*) {
    return enqueue((Handle*)comm, Op{RECV, nullptr, recv, count, dtype, peer}, "ncclRecv");
}

int ncclGroupStart() {
    group_depth++;
    return SUCCESS;
}

int ncclGroupEnd() {
    if (group_depth == 0) return INVALID_USAGE;
    if (--group_depth > 0) return SUCCESS;
    // One batch per communicator, its operations in call order.
    std::vector<std::pair<Handle*, std::vector<Op>>> batches;
    for (auto& [h, op] : grouped) {
        auto it = std::find_if(batches.begin(), batches.end(), [&](auto& b) { return b.first == h; });
        if (it == batches.end()) batches.push_back({h, {op}});
        else it->second.push_back(op);
    }
    grouped.clear();
    int ret = SUCCESS;
    for (auto& [h, ops] : batches) {
        const int r = submit(h, std::move(ops));
        if (r != SUCCESS) ret = r;
    }
    return ret;
}

}  // extern "C"
