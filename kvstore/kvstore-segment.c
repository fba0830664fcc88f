/*
 * kvstore-segment.c — segments: layout, create / open / validate / close / destroy, the
 * robust segment lock, owner (process) registration and liveness, and kvs_rebuild, the
 * fsck that both repairs the segment after a process died holding the lock and checks it.
 *
 * See kvstore-impl.h for the on-segment layout and the memory-ordering argument.
 */
#define _POSIX_C_SOURCE 200809L
#include "kvstore-impl.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

_Static_assert(sizeof(struct kvs_imm) <= KVS_LOCK_OFFSET, "immutable header too large");
_Static_assert(sizeof(pthread_mutex_t) <= 128, "mutex does not fit its slot");
_Static_assert(sizeof(struct kvs_hdr) <= KVS_HEADER_SIZE, "header too large");
_Static_assert(ATOMIC_LLONG_LOCK_FREE == 2, "64-bit atomics must be lock-free to be shared");
_Static_assert(ATOMIC_INT_LOCK_FREE == 2, "32-bit atomics must be lock-free to be shared");

/* ---- small helpers ---------------------------------------------------------------------------- */

const char *kvstore_strerror(int code)
{
    switch (-code) {
    case KVSTORE_EFULL: return "kvstore full (retry later)";
    case KVSTORE_ECORRUPT: return "kvstore segment is corrupt";
    case KVSTORE_EGEOMETRY: return "kvstore geometry mismatch";
    case KVSTORE_ESTALE: return "kvstore sequence or lease no longer exists";
    case KVSTORE_ESTATE: return "kvstore operation not allowed in this state";
    case KVSTORE_EVERSION: return "kvstore segment version unsupported";
    case KVSTORE_ELOCK: return "kvstore segment lock timed out";
    case KVSTORE_EINCOMPLETE: return "kvstore sequence incomplete";
    case KVSTORE_ENOTFOUND: return "kvstore not found";
    default: return cm_strerror(code);
    }
}

const char *kvstore_seq_state_name(uint32_t state)
{
    switch (state) {
    case KVSTORE_SEQ_FREE: return "free";
    case KVSTORE_SEQ_WRITING: return "writing";
    case KVSTORE_SEQ_READY: return "ready";
    case KVSTORE_SEQ_FREEING: return "freeing";
    default: return "invalid";
    }
}

kvstore_params kvstore_default_params(void)
{
    kvstore_params p;
    memset(&p, 0, sizeof(p));
    p.dir = "/dev/shm";
    p.spill_dir = NULL;
    p.n_ram_blocks = 1024;
    p.n_spill_blocks = 0;
    p.max_seqs = 256;
    p.max_blocks_per_seq = 65536;
    p.max_leases = 4096;
    p.max_owners = 256;
    p.lease_ttl_ms = 60000;
    p.lock_timeout_ms = 5000;
    p.spill_batch = 32;
    p.io_queue_depth = 64;
    p.io_backend = KVSTORE_IO_AUTO;
    p.heartbeat_thread = true;
    p.gc_on_pressure = true;
    return p;
}

static uint32_t dtype_size(uint32_t dt)
{
    switch (dt) {
    case KVSTORE_DTYPE_F32: return 4;
    case KVSTORE_DTYPE_F16: return 2;
    case KVSTORE_DTYPE_BF16: return 2;
    case KVSTORE_DTYPE_F8_E4M3: return 1;
    default: return 0;
    }
}

int kvstore_geometry_finish(kvstore_geometry *g, cm_err *err)
{
    if (!g->n_layers || !g->n_kv_heads || !g->head_dim || !g->tokens_per_block)
        return cm_err_set(err, -EINVAL, "kvstore: geometry needs layers, kv heads, head dim and "
                                        "tokens per block > 0");
    if (g->bytes_per_block) return 0;
    uint32_t es = dtype_size(g->dtype);
    if (!es)
        return cm_err_set(err, -EINVAL, "kvstore: dtype %u needs an explicit bytes_per_block",
                          g->dtype);
    g->bytes_per_block = 2ull * g->n_kv_heads * g->tokens_per_block * g->head_dim * es;
    return 0;
}

uint64_t kvs_fnv1a(const void *p, size_t n, uint64_t h)
{
    const uint8_t *b = p;
    for (size_t i = 0; i < n; i++) {
        h ^= b[i];
        h *= UINT64_C(0x100000001b3);
    }
    return h;
}

uint64_t kvs_now_ns(void) { return cm_time_ns(); }

static uint64_t round_up(uint64_t x, uint64_t a) { return (x + a - 1) / a * a; }

static int check_name(const char *name, cm_err *err)
{
    size_t n = name ? strlen(name) : 0;
    if (n == 0 || n > KVS_NAME_MAX)
        return cm_err_set(err, -EINVAL, "kvstore: segment name must be 1..%d characters",
                          KVS_NAME_MAX);
    for (size_t i = 0; i < n; i++) {
        char c = name[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '.' || c == '_' || c == '-') ||
            (i == 0 && c == '.'))
            return cm_err_set(err, -EINVAL, "kvstore: bad segment name '%s' (use [A-Za-z0-9._-])",
                              name);
    }
    return 0;
}

static int seg_path(char *out, size_t cap, const char *dir, const char *name, const char *suffix,
                    cm_err *err)
{
    int n = snprintf(out, cap, "%s/ihip-%s%s", dir && *dir ? dir : "/dev/shm", name, suffix);
    if (n < 0 || (size_t)n >= cap) return cm_err_set(err, -ENAMETOOLONG, "kvstore: path too long");
    return 0;
}

/* ---- layout ----------------------------------------------------------------------------------- */

/* Fill strides, offsets and total_size of imm from its geometry and counts. */
int kvs_layout(struct kvs_imm *imm, cm_err *err)
{
    const kvstore_geometry *g = &imm->geom;
    if (!g->n_layers || !g->n_kv_heads || !g->head_dim || !g->tokens_per_block ||
        !g->bytes_per_block)
        return cm_err_set(err, -KVSTORE_ECORRUPT, "kvstore: geometry has a zero field");
    if (g->bytes_per_block > KVS_MAX_BLOCK_BYTES)
        return cm_err_set(err, -KVSTORE_ECORRUPT, "kvstore: bytes_per_block %llu too large",
                          (unsigned long long)g->bytes_per_block);
    if (g->n_layers > 65536 || g->tokens_per_block > (1u << 20))
        return cm_err_set(err, -KVSTORE_ECORRUPT, "kvstore: layers %u / tokens per block %u out "
                          "of range", g->n_layers, g->tokens_per_block);
    if (imm->n_ram == 0 || (uint64_t)imm->n_ram + imm->n_spill > KVS_MAX_BLOCKS)
        return cm_err_set(err, -KVSTORE_ECORRUPT, "kvstore: block counts ram %u spill %u out of "
                          "range (1..2^30 total, ram ≥ 1)", imm->n_ram, imm->n_spill);
    if (imm->n_blocks != imm->n_ram + imm->n_spill)
        return cm_err_set(err, -KVSTORE_ECORRUPT, "kvstore: n_blocks %u != ram + spill",
                          imm->n_blocks);
    if (!imm->max_seqs || imm->max_seqs > KVS_MAX_SEQS || !imm->max_leases ||
        imm->max_leases > KVS_MAX_LEASES || !imm->max_owners || imm->max_owners > KVS_MAX_OWNERS)
        return cm_err_set(err, -KVSTORE_ECORRUPT, "kvstore: table sizes out of range (seqs %u, "
                          "leases %u, owners %u)", imm->max_seqs, imm->max_leases,
                          imm->max_owners);
    if (imm->max_blocks_per_seq < g->n_layers || imm->max_blocks_per_seq > KVS_MAX_MANIFEST)
        return cm_err_set(err, -KVSTORE_ECORRUPT, "kvstore: max_blocks_per_seq %u must be in "
                          "[layers=%u, 2^26]", imm->max_blocks_per_seq, g->n_layers);
    imm->slot_stride = round_up(g->bytes_per_block, g->bytes_per_block >= KVS_PAGE ? KVS_PAGE : 64);
    imm->spill_stride = round_up(g->bytes_per_block, KVS_PAGE);
    uint64_t off = KVS_HEADER_SIZE;
    imm->off_blocks = off;
    off = round_up(off + (uint64_t)imm->n_blocks * sizeof(struct kvs_block), 64);
    imm->off_seqs = off;
    off = round_up(off + (uint64_t)imm->max_seqs * sizeof(struct kvs_seq), 64);
    imm->off_leases = off;
    off = round_up(off + (uint64_t)imm->max_leases * sizeof(struct kvs_lease), 64);
    imm->off_owners = off;
    off = round_up(off + (uint64_t)imm->max_owners * sizeof(struct kvs_owner), 64);
    imm->off_free_blocks = off;
    off = round_up(off + (uint64_t)imm->n_blocks * 4, 64);
    imm->off_free_ram = off;
    off = round_up(off + (uint64_t)imm->n_ram * 4, 64);
    imm->off_free_spill = off;
    off = round_up(off + (uint64_t)imm->n_spill * 4, KVS_PAGE);
    imm->off_manifests = off;
    off = round_up(off + (uint64_t)imm->max_seqs * imm->max_blocks_per_seq * 4, KVS_PAGE);
    imm->off_pool = off;
    off += (uint64_t)imm->n_ram * imm->slot_stride; /* < 2^30 * 2^32: no overflow */
    imm->total_size = off;
    return 0;
}

static uint64_t imm_hash(const struct kvs_imm *imm)
{
    return kvs_fnv1a(imm, offsetof(struct kvs_imm, layout_hash), UINT64_C(0xcbf29ce484222325));
}

int kvs_validate_imm(const struct kvs_imm *imm, uint64_t file_size, cm_err *err)
{
    if (imm->magic != KVS_MAGIC)
        return cm_err_set(err, -KVSTORE_ECORRUPT, "kvstore: bad magic (not a kvstore segment)");
    if (imm->version != KVS_VERSION)
        return cm_err_set(err, -KVSTORE_EVERSION, "kvstore: segment version %u, this build "
                          "reads %u", imm->version, KVS_VERSION);
    if (imm->header_size != KVS_HEADER_SIZE)
        return cm_err_set(err, -KVSTORE_ECORRUPT, "kvstore: header size %u != %u",
                          imm->header_size, KVS_HEADER_SIZE);
    if (imm->layout_hash != imm_hash(imm))
        return cm_err_set(err, -KVSTORE_ECORRUPT, "kvstore: header checksum mismatch (header "
                          "was overwritten)");
    struct kvs_imm re = *imm;
    int rc = kvs_layout(&re, err);
    if (rc) {
        cm_err_prefix(err, "header: ");
        return rc;
    }
    if (re.slot_stride != imm->slot_stride || re.spill_stride != imm->spill_stride ||
        re.off_blocks != imm->off_blocks || re.off_seqs != imm->off_seqs ||
        re.off_leases != imm->off_leases || re.off_owners != imm->off_owners ||
        re.off_free_blocks != imm->off_free_blocks || re.off_free_ram != imm->off_free_ram ||
        re.off_free_spill != imm->off_free_spill || re.off_manifests != imm->off_manifests ||
        re.off_pool != imm->off_pool || re.total_size != imm->total_size)
        return cm_err_set(err, -KVSTORE_ECORRUPT, "kvstore: header offsets disagree with its "
                          "geometry");
    if (imm->total_size > file_size)
        return cm_err_set(err, -KVSTORE_ECORRUPT, "kvstore: segment needs %llu bytes, file has "
                          "%llu (truncated?)", (unsigned long long)imm->total_size,
                          (unsigned long long)file_size);
    if (!memchr(imm->spill_path, 0, sizeof(imm->spill_path)))
        return cm_err_set(err, -KVSTORE_ECORRUPT, "kvstore: spill path not terminated");
    if (imm->n_spill && !imm->spill_path[0])
        return cm_err_set(err, -KVSTORE_ECORRUPT, "kvstore: spill blocks but no spill path");
    if (!imm->lease_ttl_ns)
        return cm_err_set(err, -KVSTORE_ECORRUPT, "kvstore: zero lease TTL");
    return 0;
}

static int mutex_init(pthread_mutex_t *m, bool pshared)
{
    pthread_mutexattr_t a;
    int rc = pthread_mutexattr_init(&a);
    if (rc) return -rc;
    if (pshared) {
        rc = pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED);
        if (!rc) rc = pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
    }
    if (!rc) rc = pthread_mutex_init(m, &a);
    pthread_mutexattr_destroy(&a);
    return -rc;
}

/* Write a fresh segment image (zeroed memory of imm->total_size bytes). */
void kvs_format(void *base, const struct kvs_imm *imm_in, bool pshared_lock)
{
    struct kvs_hdr *h = base;
    h->imm = *imm_in;
    h->imm.layout_hash = imm_hash(&h->imm);
    int rc = mutex_init(&h->lock.m, pshared_lock);
    CM_ASSERT(rc == 0);
    uint8_t *b = base;
    struct kvs_block *blocks = (struct kvs_block *)(b + imm_in->off_blocks);
    uint32_t *fb = (uint32_t *)(b + imm_in->off_free_blocks);
    uint32_t *fr = (uint32_t *)(b + imm_in->off_free_ram);
    uint32_t *fs = (uint32_t *)(b + imm_in->off_free_spill);
    /* stacks pop from the top: put id 0 on top so allocation order is 0, 1, 2, ... */
    for (uint32_t i = 0; i < imm_in->n_blocks; i++) {
        atomic_init(&blocks[i].locw, kvs_locw_make(0, KVS_TIER_NONE, 0));
        fb[i] = imm_in->n_blocks - 1 - i;
    }
    for (uint32_t i = 0; i < imm_in->n_ram; i++) fr[i] = imm_in->n_ram - 1 - i;
    for (uint32_t i = 0; i < imm_in->n_spill; i++) fs[i] = imm_in->n_spill - 1 - i;
    h->mut.free_blocks_top = imm_in->n_blocks;
    h->mut.free_ram_top = imm_in->n_ram;
    h->mut.free_spill_top = imm_in->n_spill;
}

/* Build the immutable header for a new segment. */
static int imm_from_params(struct kvs_imm *imm, const char *name, const kvstore_geometry *g_in,
                           const kvstore_params *p, cm_err *err)
{
    memset(imm, 0, sizeof(*imm));
    imm->magic = KVS_MAGIC;
    imm->version = KVS_VERSION;
    imm->header_size = KVS_HEADER_SIZE;
    imm->geom = *g_in;
    int rc = kvstore_geometry_finish(&imm->geom, err);
    if (rc) return rc;
    bool spill = p->spill_dir && p->spill_dir[0] && p->n_spill_blocks;
    imm->n_ram = p->n_ram_blocks;
    imm->n_spill = spill ? p->n_spill_blocks : 0;
    if ((uint64_t)imm->n_ram + imm->n_spill > KVS_MAX_BLOCKS || !imm->n_ram)
        return cm_err_set(err, -EINVAL, "kvstore: n_ram_blocks must be ≥ 1 and ram + spill ≤ "
                          "2^30");
    imm->n_blocks = imm->n_ram + imm->n_spill;
    imm->max_seqs = p->max_seqs;
    imm->max_blocks_per_seq = p->max_blocks_per_seq;
    imm->max_leases = p->max_leases;
    imm->max_owners = p->max_owners;
    imm->lease_ttl_ns = (p->lease_ttl_ms ? p->lease_ttl_ms : 1) * UINT64_C(1000000);
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    imm->created_unix_ns = (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
    if (spill) {
        int n = snprintf(imm->spill_path, sizeof(imm->spill_path), "%s/ihip-%s.spill",
                         p->spill_dir, name);
        if (n < 0 || (size_t)n >= sizeof(imm->spill_path))
            return cm_err_set(err, -ENAMETOOLONG, "kvstore: spill path longer than %d",
                              KVS_SPILL_PATH_MAX - 1);
    }
    rc = kvs_layout(imm, err);
    if (rc) {
        /* limits of a new segment are the caller's mistake */
        if (err) err->code = -EINVAL;
        return -EINVAL;
    }
    return 0;
}

int kvstore_create(const char *name, const kvstore_geometry *g, const kvstore_params *p_in,
                   cm_err *err)
{
    kvstore_params p = p_in ? *p_in : kvstore_default_params();
    int rc = check_name(name, err);
    if (rc) return rc;
    struct kvs_imm imm;
    rc = imm_from_params(&imm, name, g, &p, err);
    if (rc) return rc;

    char path[PATH_MAX], tmp[PATH_MAX], spill_tmp[PATH_MAX + 32];
    char sfx[64];
    snprintf(sfx, sizeof(sfx), ".tmp.%ld", (long)getpid());
    if ((rc = seg_path(path, sizeof(path), p.dir, name, "", err))) return rc;
    if ((rc = seg_path(tmp, sizeof(tmp), p.dir, name, sfx, err))) return rc;
    spill_tmp[0] = 0;

    int fd = open(tmp, O_RDWR | O_CREAT | O_EXCL, 0660);
    if (fd < 0) return cm_err_set(err, -errno, "kvstore: create %s: %s", tmp, strerror(errno));
    void *base = MAP_FAILED;
    int sfd = -1;
    if (ftruncate(fd, (off_t)imm.total_size) != 0) {
        rc = cm_err_set(err, -errno, "kvstore: size %s to %llu bytes: %s", tmp,
                        (unsigned long long)imm.total_size, strerror(errno));
        goto fail;
    }
    base = mmap(NULL, imm.total_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (base == MAP_FAILED) {
        rc = cm_err_set(err, -errno, "kvstore: mmap %s: %s", tmp, strerror(errno));
        goto fail;
    }
    kvs_format(base, &imm, true);
    munmap(base, imm.total_size);
    base = MAP_FAILED;

    if (imm.n_spill) {
        snprintf(spill_tmp, sizeof(spill_tmp), "%s%s", imm.spill_path, sfx);
        sfd = open(spill_tmp, O_RDWR | O_CREAT | O_TRUNC, 0660);
        if (sfd < 0) {
            rc = cm_err_set(err, -errno, "kvstore: create spill file %s: %s", spill_tmp,
                            strerror(errno));
            goto fail;
        }
        if (ftruncate(sfd, (off_t)(imm.spill_stride * imm.n_spill)) != 0) {
            rc = cm_err_set(err, -errno, "kvstore: size spill file: %s", strerror(errno));
            goto fail;
        }
        close(sfd);
        sfd = -1;
    }
    /* publish: link() fails with EEXIST instead of replacing a live segment */
    if (link(tmp, path) != 0) {
        rc = cm_err_set(err, -errno, "kvstore: create %s: %s", path, strerror(errno));
        goto fail;
    }
    unlink(tmp);
    close(fd);
    if (imm.n_spill && rename(spill_tmp, imm.spill_path) != 0) {
        rc = cm_err_set(err, -errno, "kvstore: rename spill file: %s", strerror(errno));
        unlink(path);
        unlink(spill_tmp);
        return rc;
    }
    CM_LOG_INFO("kvstore: created %s (%llu bytes, %u RAM blocks of %llu bytes, %u spill)", path,
                (unsigned long long)imm.total_size, imm.n_ram,
                (unsigned long long)imm.geom.bytes_per_block, imm.n_spill);
    return 0;
fail:
    if (sfd >= 0) close(sfd);
    if (spill_tmp[0]) unlink(spill_tmp);
    if (base != MAP_FAILED) munmap(base, imm.total_size);
    close(fd);
    unlink(tmp);
    return rc;
}

/* Point the handle's table pointers into the mapping described by the validated kv->L. */
int kvs_attach(kvstore *kv, void *base, size_t size, cm_err *err)
{
    struct kvs_imm imm;
    if (size < KVS_HEADER_SIZE)
        return cm_err_set(err, -KVSTORE_ECORRUPT, "kvstore: segment of %zu bytes is smaller "
                          "than its header", size);
    memcpy(&imm, base, sizeof(imm));
    int rc = kvs_validate_imm(&imm, size, err);
    if (rc) return rc;
    kv->L = imm;
    kv->geom_pub = imm.geom;
    kv->base = base;
    kv->size = size;
    uint8_t *b = base;
    kv->hdr = base;
    kv->blocks = (struct kvs_block *)(b + imm.off_blocks);
    kv->seqs = (struct kvs_seq *)(b + imm.off_seqs);
    kv->leases = (struct kvs_lease *)(b + imm.off_leases);
    kv->owners = (struct kvs_owner *)(b + imm.off_owners);
    kv->free_blocks = (uint32_t *)(b + imm.off_free_blocks);
    kv->free_ram = (uint32_t *)(b + imm.off_free_ram);
    kv->free_spill = (uint32_t *)(b + imm.off_free_spill);
    kv->manifests = (_Atomic uint32_t *)(b + imm.off_manifests);
    kv->pool = b + imm.off_pool;
    kv->max_tblocks = imm.max_blocks_per_seq / imm.geom.n_layers;
    return 0;
}

/* ---- process identity ------------------------------------------------------------------------- */

/* Start time (field 22) and state (field 3) of /proc/PID/stat; -errno if unreadable. */
static int proc_stat(pid_t pid, uint64_t *starttime, char *state)
{
    char path[64], buf[1024];
    snprintf(path, sizeof(path), "/proc/%ld/stat", (long)pid);
    int fd = open(path, O_RDONLY);
    if (fd < 0) return -errno;
    ssize_t n = read(fd, buf, sizeof(buf) - 1);
    int e = errno;
    close(fd);
    if (n <= 0) return n < 0 ? -e : -EIO;
    buf[n] = 0;
    char *p = strrchr(buf, ')'); /* comm may hold spaces and parentheses */
    if (!p || p[1] != ' ') return -EIO;
    p += 2;
    *state = *p;
    /* fields after comm: 3=state ... 22=starttime → skip 19 spaces after state */
    for (int f = 3; f < 22; f++) {
        p = strchr(p, ' ');
        if (!p) return -EIO;
        p++;
    }
    *starttime = strtoull(p, NULL, 10);
    return 0;
}

static uint64_t my_pidns(void)
{
    struct stat st;
    return stat("/proc/self/ns/pid", &st) == 0 ? (uint64_t)st.st_ino : 0;
}

/* Is the process an owner record describes gone? Heartbeat first (works across pid
 * namespaces), then pid + start time when we share its pid namespace. */
static bool owner_dead(const kvstore *kv, int32_t pid, uint64_t starttime, uint64_t pidns,
                       uint64_t heartbeat_ns, uint64_t now)
{
    if (now > heartbeat_ns && now - heartbeat_ns > kv->L.lease_ttl_ns) return true;
    if (pid <= 0) return false;
    if (pidns == 0 || pidns != kv->pidns) return false;
    if (pid == kv->pid) return starttime != kv->starttime;
    uint64_t st;
    char state;
    int rc = proc_stat(pid, &st, &state);
    if (rc == -ENOENT || rc == -ESRCH) return true;
    if (rc < 0) return false; /* cannot tell: rely on the heartbeat */
    if (state == 'Z' || state == 'X') return true;
    return st != starttime;
}

/* ---- the segment lock -------------------------------------------------------------------------- */

int kvs_lock(kvstore *kv, cm_err *err)
{
    if (kv->mem_mode) {
        pthread_mutex_lock(&kv->mem_lock);
        return 0;
    }
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    uint64_t add = (uint64_t)kv->p.lock_timeout_ms * 1000000u + (uint64_t)ts.tv_nsec;
    ts.tv_sec += (time_t)(add / 1000000000u);
    ts.tv_nsec = (long)(add % 1000000000u);
    int rc = pthread_mutex_timedlock(&kv->hdr->lock.m, &ts);
    if (rc == 0) return 0;
    if (rc == EOWNERDEAD) {
        /* A process died inside a critical section: repair from the primary records, then
         * mark the mutex consistent. If we die during the repair the next locker sees
         * EOWNERDEAD again and repeats it. */
        atomic_fetch_add_explicit(&kv->hdr->mut.n_lock_recoveries, 1, memory_order_relaxed);
        cm_err tmp = {0};
        int r2 = kvs_rebuild(kv, true, &tmp);
        if (r2)
            CM_LOG_ERROR("kvstore %s: repair after a dead lock holder failed: %s", kv->name,
                         tmp.msg);
        else
            CM_LOG_WARN("kvstore %s: a process died holding the segment lock; repaired",
                        kv->name);
        pthread_mutex_consistent(&kv->hdr->lock.m);
        if (r2) {
            pthread_mutex_unlock(&kv->hdr->lock.m);
            if (err) *err = tmp;
            return r2;
        }
        return 0;
    }
    if (rc == ETIMEDOUT)
        return cm_err_set(err, -KVSTORE_ELOCK, "kvstore %s: segment lock not obtained in %u ms",
                          kv->name, kv->p.lock_timeout_ms);
    if (rc == ENOTRECOVERABLE)
        return cm_err_set(err, -KVSTORE_ELOCK, "kvstore %s: segment lock unrecoverable; destroy "
                          "and recreate the segment", kv->name);
    return cm_err_set(err, -KVSTORE_ECORRUPT, "kvstore %s: segment lock: %s", kv->name,
                      strerror(rc));
}

void kvs_unlock(kvstore *kv)
{
    if (kv->mem_mode)
        pthread_mutex_unlock(&kv->mem_lock);
    else
        pthread_mutex_unlock(&kv->hdr->lock.m);
}

/* ---- owners ----------------------------------------------------------------------------------- */

bool kvs_owner_alive_locked(kvstore *kv, uint32_t o, uint32_t gen)
{
    return o < kv->L.max_owners && kv->owners[o].state == 1 && kv->owners[o].gen == gen;
}

static void *hb_main(void *arg)
{
    kvstore *kv = arg;
    uint64_t period_ns = kv->L.lease_ttl_ns / 4;
    if (period_ns < 10000000u) period_ns = 10000000u;
    if (period_ns > 5000000000u) period_ns = 5000000000u;
    pthread_mutex_lock(&kv->hb_mu);
    while (!kv->hb_quit) {
        pthread_mutex_unlock(&kv->hb_mu);
        kvstore_heartbeat(kv);
        pthread_mutex_lock(&kv->hb_mu);
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        uint64_t add = period_ns + (uint64_t)ts.tv_nsec;
        ts.tv_sec += (time_t)(add / 1000000000u);
        ts.tv_nsec = (long)(add % 1000000000u);
        if (!kv->hb_quit) pthread_cond_timedwait(&kv->hb_cv, &kv->hb_mu, &ts);
    }
    pthread_mutex_unlock(&kv->hb_mu);
    return NULL;
}

void kvstore_heartbeat(kvstore *kv)
{
    int32_t o = kv->owner;
    if (o < 0 || (uint32_t)o >= kv->L.max_owners) return;
    atomic_store_explicit(&kv->owners[o].heartbeat_ns, kvs_now_ns(), memory_order_relaxed);
}

/* Register this handle as an owner (once). Leases and sequences name it. */
int kvs_owner_ensure(kvstore *kv, cm_err *err)
{
    pthread_mutex_lock(&kv->local_mu);
    if (kv->owner >= 0) {
        pthread_mutex_unlock(&kv->local_mu);
        return 0;
    }
    int rc = 0;
    for (int attempt = 0; attempt < 2; attempt++) {
        if ((rc = kvs_lock(kv, err))) break;
        uint32_t found = UINT32_MAX;
        for (uint32_t i = 0; i < kv->L.max_owners; i++)
            if (kv->owners[i].state == 0) {
                found = i;
                break;
            }
        if (found != UINT32_MAX) {
            struct kvs_owner *ow = &kv->owners[found];
            ow->gen++;
            ow->pid = (int32_t)kv->pid;
            ow->starttime = kv->starttime;
            ow->pidns = kv->pidns;
            atomic_store_explicit(&ow->heartbeat_ns, kvs_now_ns(), memory_order_relaxed);
            ow->attached_ns = kvs_now_ns();
            memset(ow->comm, 0, sizeof(ow->comm));
            ow->state = 1; /* last: a half-filled record stays free */
            kv->owner = (int32_t)found;
            kv->owner_gen = ow->gen;
            kvs_unlock(kv);
            break;
        }
        kvs_unlock(kv);
        rc = cm_err_set(err, -KVSTORE_EFULL, "kvstore %s: all %u owner slots are taken",
                        kv->name, kv->L.max_owners);
        if (attempt == 0 && kv->p.gc_on_pressure) {
            pthread_mutex_unlock(&kv->local_mu); /* gc does not need local_mu */
            kvstore_gc_result gr;
            bool any = false;
            int r2 = kvs_gc_reap(kv, &gr, &any, err);
            pthread_mutex_lock(&kv->local_mu);
            if (kv->owner >= 0) {
                rc = 0;
                break;
            }
            if (r2 || !any) break;
        }
    }
    if (rc == 0 && kv->p.heartbeat_thread && !kv->hb_running && !kv->mem_mode) {
        kv->hb_quit = false;
        if (pthread_create(&kv->hb_thread, NULL, hb_main, kv) == 0) kv->hb_running = true;
        else CM_LOG_WARN("kvstore %s: no heartbeat thread; call kvstore_heartbeat", kv->name);
    }
    pthread_mutex_unlock(&kv->local_mu);
    return rc;
}

/* ---- open / close / destroy -------------------------------------------------------------------- */

static kvstore *handle_new(const char *name, const kvstore_params *p)
{
    kvstore *kv = calloc(1, sizeof(*kv));
    if (!kv) return NULL;
    kv->p = p ? *p : kvstore_default_params();
    snprintf(kv->dir, sizeof(kv->dir), "%s", kv->p.dir && *kv->p.dir ? kv->p.dir : "/dev/shm");
    kv->p.dir = kv->dir;
    kv->p.spill_dir = NULL; /* the spill path comes from the segment */
    if (!kv->p.lock_timeout_ms) kv->p.lock_timeout_ms = 1;
    snprintf(kv->name, sizeof(kv->name), "%s", name);
    kv->fd = -1;
    kv->owner = -1;
    kv->spill_fd = kv->spill_fd_direct = -1;
    pthread_mutex_init(&kv->local_mu, NULL);
    pthread_mutex_init(&kv->hb_mu, NULL);
    pthread_cond_init(&kv->hb_cv, NULL);
    pthread_mutex_init(&kv->mem_lock, NULL);
    kv->pid = getpid();
    char st;
    if (proc_stat(kv->pid, &kv->starttime, &st) != 0) kv->starttime = 0;
    kv->pidns = my_pidns();
    return kv;
}

static void handle_free(kvstore *kv)
{
    pthread_mutex_destroy(&kv->local_mu);
    pthread_mutex_destroy(&kv->hb_mu);
    pthread_cond_destroy(&kv->hb_cv);
    pthread_mutex_destroy(&kv->mem_lock);
    free(kv);
}

static bool geom_equal(const kvstore_geometry *a, const kvstore_geometry *b)
{
    return a->model_fingerprint == b->model_fingerprint && a->n_layers == b->n_layers &&
           a->n_kv_heads == b->n_kv_heads && a->head_dim == b->head_dim &&
           a->tokens_per_block == b->tokens_per_block && a->dtype == b->dtype &&
           a->bytes_per_block == b->bytes_per_block;
}

int kvstore_open(const char *name, const kvstore_params *p, const kvstore_geometry *expect,
                 kvstore **out, cm_err *err)
{
    *out = NULL;
    int rc = check_name(name, err);
    if (rc) return rc;
    kvstore *kv = handle_new(name, p);
    if (!kv) return cm_err_set(err, -ENOMEM, "kvstore: out of memory");
    if ((rc = seg_path(kv->path, sizeof(kv->path), kv->dir, name, "", err))) goto fail;
    kv->fd = open(kv->path, O_RDWR);
    if (kv->fd < 0) {
        rc = errno == ENOENT ? -KVSTORE_ENOTFOUND : -errno;
        cm_err_set(err, rc, "kvstore: open %s: %s", kv->path, strerror(errno));
        goto fail;
    }
    struct stat st;
    if (fstat(kv->fd, &st) != 0) {
        rc = cm_err_set(err, -errno, "kvstore: stat %s: %s", kv->path, strerror(errno));
        goto fail;
    }
    if ((uint64_t)st.st_size < KVS_HEADER_SIZE) {
        rc = cm_err_set(err, -KVSTORE_ECORRUPT, "kvstore: %s is %lld bytes, smaller than a "
                        "header", kv->path, (long long)st.st_size);
        goto fail;
    }
    void *base = mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, kv->fd, 0);
    if (base == MAP_FAILED) {
        rc = cm_err_set(err, -errno, "kvstore: mmap %s: %s", kv->path, strerror(errno));
        goto fail;
    }
    kv->base = base;
    kv->size = (size_t)st.st_size;
    if ((rc = kvs_attach(kv, base, (size_t)st.st_size, err))) {
        cm_err_prefix(err, "%s: ", kv->path);
        goto fail;
    }
    if (expect) {
        kvstore_geometry e = *expect;
        if (!e.bytes_per_block) kvstore_geometry_finish(&e, NULL);
        if (!geom_equal(&e, &kv->L.geom)) {
            rc = cm_err_set(err, -KVSTORE_EGEOMETRY, "kvstore %s: geometry differs (segment: fp "
                            "%016llx layers %u kv heads %u head dim %u tpb %u dtype %u bytes "
                            "%llu)", name, (unsigned long long)kv->L.geom.model_fingerprint,
                            kv->L.geom.n_layers, kv->L.geom.n_kv_heads, kv->L.geom.head_dim,
                            kv->L.geom.tokens_per_block, kv->L.geom.dtype,
                            (unsigned long long)kv->L.geom.bytes_per_block);
            goto fail;
        }
    }
    if (kv->L.n_spill && (rc = kvs_spill_open(kv, err))) goto fail;
    *out = kv;
    return 0;
fail:
    if (kv->base) munmap(kv->base, kv->size);
    if (kv->fd >= 0) close(kv->fd);
    handle_free(kv);
    return rc;
}

/* An in-memory segment (tests and the fuzz target): `base` holds `size` bytes of segment
 * image, caller-owned and valid until kvs_close_mem. Locking is process-local. */
int kvs_open_mem(void *base, size_t size, const kvstore_params *p, kvstore **out, cm_err *err)
{
    *out = NULL;
    kvstore *kv = handle_new("mem", p);
    if (!kv) return cm_err_set(err, -ENOMEM, "kvstore: out of memory");
    kv->mem_mode = true;
    kv->p.heartbeat_thread = false;
    int rc = kvs_attach(kv, base, size, err);
    if (rc) {
        handle_free(kv);
        return rc;
    }
    *out = kv;
    return 0;
}

/* Drop everything this handle owns in the segment. */
static void owner_detach(kvstore *kv)
{
    if (kv->owner < 0) return;
    if (kvs_lock(kv, NULL) != 0) return; /* gc will reap us later */
    uint32_t o = (uint32_t)kv->owner, og = kv->owner_gen;
    if (kvs_owner_alive_locked(kv, o, og)) {
        kvstore_gc_result r = {0};
        kvs_reap_owner_locked(kv, o, &r);
    }
    kvs_unlock(kv);
    kv->owner = -1;
}

void kvstore_close(kvstore *kv)
{
    if (!kv) return;
    if (kv->hb_running) {
        pthread_mutex_lock(&kv->hb_mu);
        kv->hb_quit = true;
        pthread_cond_signal(&kv->hb_cv);
        pthread_mutex_unlock(&kv->hb_mu);
        pthread_join(kv->hb_thread, NULL);
        kv->hb_running = false;
    }
    owner_detach(kv);
    kvs_spill_close(kv);
    if (!kv->mem_mode && kv->base) munmap(kv->base, kv->size);
    if (kv->fd >= 0) close(kv->fd);
    handle_free(kv);
}

int kvstore_destroy(const char *name, const kvstore_params *p_in, cm_err *err)
{
    kvstore_params p = p_in ? *p_in : kvstore_default_params();
    int rc = check_name(name, err);
    if (rc) return rc;
    char path[PATH_MAX];
    if ((rc = seg_path(path, sizeof(path), p.dir, name, "", err))) return rc;
    /* learn the spill file from the header if it is readable; destroy the segment anyway */
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        return cm_err_set(err, errno == ENOENT ? -KVSTORE_ENOTFOUND : -errno,
                          "kvstore: open %s: %s", path, strerror(errno));
    struct kvs_imm imm;
    char spill[KVS_SPILL_PATH_MAX] = "";
    struct stat st;
    if (fstat(fd, &st) == 0 && pread(fd, &imm, sizeof(imm), 0) == (ssize_t)sizeof(imm) &&
        kvs_validate_imm(&imm, (uint64_t)st.st_size, NULL) == 0)
        memcpy(spill, imm.spill_path, sizeof(spill));
    close(fd);
    if (unlink(path) != 0)
        return cm_err_set(err, -errno, "kvstore: unlink %s: %s", path, strerror(errno));
    if (spill[0] && unlink(spill) != 0 && errno != ENOENT)
        return cm_err_set(err, -errno, "kvstore: unlink %s: %s", spill, strerror(errno));
    return 0;
}

const kvstore_geometry *kvstore_get_geometry(const kvstore *kv) { return &kv->geom_pub; }

uint64_t kvstore_spill_count(kvstore *kv)
{
    /* incremented under the lock once a block's location has switched to the spill file and
     * before its RAM slot can be reused (kvstore-spill.c) */
    return atomic_load_explicit(&kv->hdr->mut.n_spill_out, memory_order_acquire);
}

uint64_t kvstore_segment_id(const kvstore *kv)
{
    uint64_t id = kv->L.created_unix_ns;
    return id ? id : (kv->L.layout_hash | 1u);
}

const char *kvstore_io_name(const kvstore *kv) { return kv->io ? kvs_io_name(kv->io) : "none"; }

/* ---- rebuild / check ---------------------------------------------------------------------------- */

#define BAD(...) cm_err_set(err, -KVSTORE_ECORRUPT, __VA_ARGS__)

/* Inconsistency that rebuild repairs: fix it, or report it in check mode. */
#define MISMATCH(...)                                                                            \
    do {                                                                                           \
        if (!fix) {                                                                                \
            rc = cm_err_set(err, -KVSTORE_ECORRUPT, __VA_ARGS__);                                  \
            goto out;                                                                              \
        }                                                                                          \
    } while (0)

/* Zero the manifest row of s (rows at or past n_tblocks are already zero) and mark it FREE. */
static void seq_clear_locked(kvstore *kv, uint32_t s)
{
    struct kvs_seq *q = &kv->seqs[s];
    uint32_t n = q->n_tblocks <= kv->max_tblocks ? q->n_tblocks : kv->max_tblocks;
    _Atomic uint32_t *row = kvs_row(kv, s);
    for (uint64_t i = 0; i < (uint64_t)n * kv->L.geom.n_layers; i++) kvs_st32(&row[i], 0);
    q->n_tblocks = 0;
    q->n_tokens = 0;
    q->n_leases = 0;
    q->n_prefix_tblocks = 0;
    atomic_store_explicit(&q->state, KVSTORE_SEQ_FREE, memory_order_release);
}

/*
 * Recompute what is derived from the primary records and compare it with the segment (check
 * mode), or overwrite it (fix mode). Caller holds the lock. Primary: owners; leases; sequence
 * states, owners and manifests; block locations and move reservations. Derived: lease counts,
 * block reference counts, the three free stacks. Fix mode also finishes what a dead process
 * left half done: FREEING sequences, WRITING sequences without a live owner, READY sequences
 * without a lease, leases of dead owners or freed sequences, unreferenced blocks that still
 * hold a slot, moves by dead owners.
 */
int kvs_rebuild(kvstore *kv, bool fix, cm_err *err)
{
    const struct kvs_imm *L = &kv->L;
    const uint32_t nl = L->geom.n_layers;
    int rc = 0;
    uint32_t *lease_cnt = calloc(L->max_seqs, sizeof(uint32_t));
    uint32_t *ref = calloc(L->n_blocks, sizeof(uint32_t));
    uint8_t *ram_used = calloc(L->n_ram ? L->n_ram : 1, 1);
    uint8_t *spill_used = calloc(L->n_spill ? L->n_spill : 1, 1);
    uint8_t *seen = calloc(L->n_blocks > L->n_ram ? L->n_blocks : L->n_ram, 1);
    uint8_t *held = calloc(L->n_blocks ? L->n_blocks : 1, 1); /* orphaned moving blocks */
    if (!lease_cnt || !ref || !ram_used || !spill_used || !seen || !held) {
        rc = cm_err_set(err, -ENOMEM, "kvstore: out of memory in rebuild");
        goto out;
    }

    for (uint32_t o = 0; o < L->max_owners; o++)
        if (kv->owners[o].state > 1) {
            if (!fix) {
                rc = BAD("kvstore: owner %u has state %u", o, kv->owners[o].state);
                goto out;
            }
            kv->owners[o].state = 0;
        }

    /* sequences: finish FREEING, validate the rest (before leases: their validity needs it) */
    for (uint32_t s = 0; s < L->max_seqs; s++) {
        struct kvs_seq *q = &kv->seqs[s];
        uint32_t st = atomic_load_explicit(&q->state, memory_order_relaxed);
        if (st > KVSTORE_SEQ_FREEING) {
            rc = BAD("kvstore: sequence %u has state %u", s, st);
            goto out;
        }
        if (st == KVSTORE_SEQ_FREE) continue;
        if (q->n_tblocks > kv->max_tblocks) {
            rc = BAD("kvstore: sequence %u has %u token blocks, max %u", s, q->n_tblocks,
                     kv->max_tblocks);
            goto out;
        }
        if (q->n_prefix_tblocks > q->n_tblocks) {
            rc = BAD("kvstore: sequence %u shares %u token blocks of %u", s, q->n_prefix_tblocks,
                     q->n_tblocks);
            goto out;
        }
        if (st == KVSTORE_SEQ_FREEING) {
            MISMATCH("kvstore: sequence %u left FREEING", s);
            seq_clear_locked(kv, s);
            continue;
        }
        if (st == KVSTORE_SEQ_WRITING && !kvs_owner_alive_locked(kv, q->owner, q->owner_gen)) {
            MISMATCH("kvstore: WRITING sequence %u has no live owner", s);
            seq_clear_locked(kv, s);
        }
    }

    /* leases */
    for (uint32_t i = 0; i < L->max_leases; i++) {
        struct kvs_lease *l = &kv->leases[i];
        uint32_t st = atomic_load_explicit(&l->state, memory_order_relaxed);
        if (st > 1) {
            rc = BAD("kvstore: lease %u has state %u", i, st);
            goto out;
        }
        if (st == 0) continue;
        if (l->seq >= L->max_seqs) {
            rc = BAD("kvstore: lease %u names sequence %u of %u", i, l->seq, L->max_seqs);
            goto out;
        }
        struct kvs_seq *q = &kv->seqs[l->seq];
        bool ok = atomic_load_explicit(&q->state, memory_order_relaxed) == KVSTORE_SEQ_READY &&
                  q->gen == l->seq_gen && kvs_owner_alive_locked(kv, l->owner, l->owner_gen);
        if (!ok) {
            MISMATCH("kvstore: lease %u names a freed sequence or a gone owner", i);
            atomic_store_explicit(&l->state, 0, memory_order_release);
            continue;
        }
        lease_cnt[l->seq]++;
    }

    /* READY without leases is freed; lease counts; block references */
    for (uint32_t s = 0; s < L->max_seqs; s++) {
        struct kvs_seq *q = &kv->seqs[s];
        uint32_t st = atomic_load_explicit(&q->state, memory_order_relaxed);
        if (st == KVSTORE_SEQ_FREE) continue;
        if (st == KVSTORE_SEQ_READY && lease_cnt[s] == 0) {
            MISMATCH("kvstore: READY sequence %u has no lease", s);
            seq_clear_locked(kv, s);
            continue;
        }
        if (q->n_leases != lease_cnt[s]) {
            MISMATCH("kvstore: sequence %u counts %u leases, table holds %u", s, q->n_leases,
                     lease_cnt[s]);
            q->n_leases = lease_cnt[s];
        }
        _Atomic uint32_t *row = kvs_row(kv, s);
        for (uint64_t i = 0; i < (uint64_t)q->n_tblocks * nl; i++) {
            uint32_t e = kvs_ld32(&row[i]);
            if (!e) continue;
            if (e > L->n_blocks) {
                rc = BAD("kvstore: sequence %u entry %llu names block %u of %u", s,
                         (unsigned long long)i, e - 1, L->n_blocks);
                goto out;
            }
            ref[e - 1]++;
        }
    }

    /* blocks: locations, moves, reference counts */
    uint32_t n_free_blocks = 0;
    for (uint32_t b = 0; b < L->n_blocks; b++) {
        struct kvs_block *k = &kv->blocks[b];
        uint64_t w = atomic_load_explicit(&k->locw, memory_order_relaxed);
        uint32_t tier = kvs_locw_tier(w), slot = kvs_locw_slot(w);
        if (tier == 3 || (tier == KVS_TIER_RAM && slot >= L->n_ram) ||
            (tier == KVS_TIER_SPILL && slot >= L->n_spill)) {
            rc = BAD("kvstore: block %u has location tier %u slot %u", b, tier, slot);
            goto out;
        }
        if (k->flags & ~3u) {
            rc = BAD("kvstore: block %u has flags %#x", b, k->flags);
            goto out;
        }
        if (k->flags & KVS_BLOCK_MOVING) {
            bool alive = k->move_slot < L->n_spill &&
                         kvs_owner_alive_locked(kv, k->move_owner, k->move_owner_gen);
            /* orphaned: freed while its mover writes it out; record and slot wait for the mover */
            bool orphan = alive && ref[b] == 0 && tier == KVS_TIER_NONE;
            bool live = (alive && ref[b] && tier == KVS_TIER_RAM) || orphan;
            if (orphan) held[b] = 1;
            if (!live) {
                MISMATCH("kvstore: block %u has a stale spill move", b);
                k->flags &= ~(uint32_t)KVS_BLOCK_MOVING;
            }
        }
        if (ref[b] == 0 && tier != KVS_TIER_NONE) {
            MISMATCH("kvstore: block %u is unreferenced but holds a slot", b);
            atomic_store_explicit(&k->locw, kvs_locw_make(kvs_locw_version(w) + 1, KVS_TIER_NONE, 0),
                                  memory_order_release);
            k->flags = 0;
            tier = KVS_TIER_NONE;
        }
        if (ref[b] && tier == KVS_TIER_NONE) {
            rc = BAD("kvstore: block %u is referenced %u times but holds no data", b, ref[b]);
            goto out;
        }
        if (k->ref != ref[b]) {
            MISMATCH("kvstore: block %u counts %u references, manifests hold %u", b, k->ref,
                     ref[b]);
            k->ref = ref[b];
        }
        if (tier == KVS_TIER_RAM) {
            if (ram_used[slot]++) {
                rc = BAD("kvstore: RAM slot %u holds two blocks", slot);
                goto out;
            }
        } else if (tier == KVS_TIER_SPILL) {
            if (spill_used[slot]++) {
                rc = BAD("kvstore: spill slot %u holds two blocks", slot);
                goto out;
            }
        } else {
            n_free_blocks++;
        }
        if (k->flags & KVS_BLOCK_MOVING) {
            if (spill_used[k->move_slot]++) {
                rc = BAD("kvstore: spill slot %u reserved twice", k->move_slot);
                goto out;
            }
        }
    }

    /* free stacks */
    struct {
        uint32_t *stack, *top, cap;
        const uint8_t *used;
        const char *what;
    } st[3] = {
        {kv->free_blocks, &kv->hdr->mut.free_blocks_top, L->n_blocks, NULL, "block"},
        {kv->free_ram, &kv->hdr->mut.free_ram_top, L->n_ram, ram_used, "RAM slot"},
        {kv->free_spill, &kv->hdr->mut.free_spill_top, L->n_spill, spill_used, "spill slot"},
    };
    for (int t = 0; t < 3; t++) {
        uint32_t n_free = 0;
        for (uint32_t i = 0; i < st[t].cap; i++) {
            bool is_free = st[t].used ? !st[t].used[i] : (ref[i] == 0 && !held[i]);
            n_free += is_free;
        }
        if (fix) {
            uint32_t top = 0;
            for (uint32_t i = st[t].cap; i-- > 0;) {
                bool is_free = st[t].used ? !st[t].used[i] : (ref[i] == 0 && !held[i]);
                if (is_free) st[t].stack[top++] = i;
            }
            *st[t].top = top;
            continue;
        }
        uint32_t top = *st[t].top;
        if (top != n_free) {
            rc = BAD("kvstore: free %s stack holds %u entries, %u are free", st[t].what, top,
                     n_free);
            goto out;
        }
        memset(seen, 0, st[t].cap ? st[t].cap : 1);
        for (uint32_t i = 0; i < top; i++) {
            uint32_t x = st[t].stack[i];
            bool is_free = x < st[t].cap && (st[t].used ? !st[t].used[x] : (ref[x] == 0 && !held[x]));
            if (!is_free || seen[x]) {
                rc = BAD("kvstore: free %s stack entry %u (%u) is not a distinct free one",
                         st[t].what, i, x);
                goto out;
            }
            seen[x] = 1;
        }
    }
    (void)n_free_blocks;
    if (fix) kv->hdr->mut.rebuilds++;
out:
    free(lease_cnt);
    free(ref);
    free(ram_used);
    free(spill_used);
    free(seen);
    free(held);
    return rc;
}

int kvstore_check(kvstore *kv, cm_err *err)
{
    int rc = kvs_lock(kv, err);
    if (rc) return rc;
    rc = kvs_rebuild(kv, false, err);
    kvs_unlock(kv);
    return rc;
}

/* ---- gc ------------------------------------------------------------------------------------------ */

int kvs_gc_reap(kvstore *kv, kvstore_gc_result *res, bool *any_dead, cm_err *err)
{
    memset(res, 0, sizeof(*res));
    *any_dead = false;
    uint32_t n = kv->L.max_owners;
    struct snap {
        int32_t pid;
        uint32_t gen;
        uint64_t starttime, pidns, hb;
        bool used;
    } *sn = calloc(n, sizeof(*sn));
    if (!sn) return cm_err_set(err, -ENOMEM, "kvstore: out of memory");
    /* snapshot under the lock, judge liveness outside it (reads /proc) */
    int rc = kvs_lock(kv, err);
    if (rc) {
        free(sn);
        return rc;
    }
    for (uint32_t o = 0; o < n; o++) {
        struct kvs_owner *ow = &kv->owners[o];
        sn[o].used = ow->state == 1;
        sn[o].pid = ow->pid;
        sn[o].gen = ow->gen;
        sn[o].starttime = ow->starttime;
        sn[o].pidns = ow->pidns;
        sn[o].hb = atomic_load_explicit(&ow->heartbeat_ns, memory_order_relaxed);
    }
    kvs_unlock(kv);
    uint64_t now = kvs_now_ns();
    uint32_t n_dead = 0;
    for (uint32_t o = 0; o < n; o++) {
        if (!sn[o].used) continue;
        if (kv->owner == (int32_t)o && kv->owner_gen == sn[o].gen) {
            sn[o].used = false; /* never reap ourselves */
            continue;
        }
        /* a heartbeat can be renewed between the snapshot and now: re-read it at reap */
        sn[o].used = owner_dead(kv, sn[o].pid, sn[o].starttime, sn[o].pidns, sn[o].hb, now);
        n_dead += sn[o].used;
    }
    if ((rc = kvs_lock(kv, err))) {
        free(sn);
        return rc;
    }
    for (uint32_t o = 0; o < n && n_dead; o++) {
        if (!sn[o].used || !kvs_owner_alive_locked(kv, o, sn[o].gen)) continue;
        uint64_t hb = atomic_load_explicit(&kv->owners[o].heartbeat_ns, memory_order_relaxed);
        if (hb != sn[o].hb &&
            !owner_dead(kv, sn[o].pid, sn[o].starttime, sn[o].pidns, hb, kvs_now_ns()))
            continue; /* it heartbeat in the meantime */
        CM_LOG_INFO("kvstore %s: reaping dead process %d (owner %u)", kv->name, sn[o].pid, o);
        kvs_reap_owner_locked(kv, o, res);
        res->owners_reaped++;
        *any_dead = true;
    }
    atomic_fetch_add_explicit(&kv->hdr->mut.n_owners_reaped, res->owners_reaped,
                              memory_order_relaxed);
    rc = kvs_rebuild(kv, true, err);
    kvs_unlock(kv);
    free(sn);
    return rc;
}

int kvstore_gc(kvstore *kv, kvstore_gc_result *res, cm_err *err)
{
    kvstore_gc_result tmp;
    bool any;
    return kvs_gc_reap(kv, res ? res : &tmp, &any, err);
}

/* ---- stats ----------------------------------------------------------------------------------------- */

int kvstore_get_stats(kvstore *kv, kvstore_stats *s, cm_err *err)
{
    memset(s, 0, sizeof(*s));
    const struct kvs_imm *L = &kv->L;
    s->geom = L->geom;
    s->n_ram_blocks = L->n_ram;
    s->n_spill_blocks = L->n_spill;
    s->max_seqs = L->max_seqs;
    s->max_leases = L->max_leases;
    s->max_owners = L->max_owners;
    s->max_blocks_per_seq = L->max_blocks_per_seq;
    s->lease_ttl_ms = L->lease_ttl_ns / 1000000u;
    s->segment_bytes = L->total_size;
    int rc = kvs_lock(kv, err);
    if (rc) return rc;
    for (uint32_t b = 0; b < L->n_blocks; b++) {
        const struct kvs_block *k = &kv->blocks[b];
        uint64_t w = atomic_load_explicit(&k->locw, memory_order_relaxed);
        if (k->ref) {
            s->blocks_used++;
            if (k->ref > 1) s->blocks_shared++;
            if (kvs_locw_tier(w) == KVS_TIER_RAM) s->blocks_ram++;
            if (kvs_locw_tier(w) == KVS_TIER_SPILL) s->blocks_spilled++;
            if (k->flags & KVS_BLOCK_MOVING) s->blocks_moving++;
        } else if (k->flags & KVS_BLOCK_MOVING) {
            s->blocks_moving++; /* orphaned: freed while its mover writes it out */
        }
    }
    s->ram_free = kv->hdr->mut.free_ram_top;
    s->spill_free = kv->hdr->mut.free_spill_top;
    for (uint32_t i = 0; i < L->max_seqs; i++) {
        uint32_t st = atomic_load_explicit(&kv->seqs[i].state, memory_order_relaxed);
        s->seqs_writing += st == KVSTORE_SEQ_WRITING;
        s->seqs_ready += st == KVSTORE_SEQ_READY;
        s->seqs_freeing += st == KVSTORE_SEQ_FREEING;
    }
    for (uint32_t i = 0; i < L->max_leases; i++)
        s->leases += atomic_load_explicit(&kv->leases[i].state, memory_order_relaxed) == 1;
    for (uint32_t i = 0; i < L->max_owners; i++) s->owners += kv->owners[i].state == 1;
    const struct kvs_mut *m = &kv->hdr->mut;
    s->n_alloc = atomic_load_explicit(&m->n_alloc, memory_order_relaxed);
    s->n_free = atomic_load_explicit(&m->n_free, memory_order_relaxed);
    s->n_spill_out = atomic_load_explicit(&m->n_spill_out, memory_order_relaxed);
    s->n_spill_in = atomic_load_explicit(&m->n_spill_in, memory_order_relaxed);
    s->n_lock_recoveries = atomic_load_explicit(&m->n_lock_recoveries, memory_order_relaxed);
    s->n_owners_reaped = atomic_load_explicit(&m->n_owners_reaped, memory_order_relaxed);
    s->n_published = atomic_load_explicit(&m->n_published, memory_order_relaxed);
    s->n_prefix_hits = atomic_load_explicit(&m->n_prefix_hits, memory_order_relaxed);
    kvs_unlock(kv);
    return 0;
}
