/* Keyed BLAKE3 of many equal 4 KiB blocks at once: the block fingerprints of
 * format version 2 (archive/delta.py).
 *
 * Why native code: hashing one 4 KiB block per call (blake3-py) fills only 4 SIMD
 * lanes (a block is 4 BLAKE3 chunks) and releases and retakes the GIL a thousand
 * times per 4 MiB window. Here the lanes run across blocks (16 with AVX-512, 8 with
 * AVX2): lane L hashes block L of a group, every lane at the same step of the
 * same tree. The GIL is released once per call.
 *
 * Written from the BLAKE3 specification (compression function, chunk and parent
 * flags, keyed mode). Only what a 4096-byte message needs is here: four chunks of
 * sixteen 64-byte blocks, two parents and the root; the caller hashes any other
 * length, and fewer blocks than a kernel's lanes, with blake3-py (crypto/blockhash.py).
 * x86-64 only (AVX2, AVX-512); elsewhere LANES is 0 and blake3-py does all of it.
 * tests/crypto/test_blockhash.py compares every kernel with blake3-py.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define HAVE_X86 1
#else
#define HAVE_X86 0
#endif

#define BLOCK_BYTES 4096u
#define CHUNK_BYTES 1024u
#define MAX_OUT 32u

enum { CHUNK_START = 1, CHUNK_END = 2, PARENT = 4, ROOT = 8, KEYED_HASH = 16 };

static const uint32_t IV[8] = {0x6A09E667u, 0xBB67AE85u, 0x3C6EF372u, 0xA54FF53Au,
                               0x510E527Fu, 0x9B05688Cu, 0x1F83D9ABu, 0x5BE0CD19u};

/* the message word order of each of the seven rounds: the specification's
 * permutation applied r times */
static const uint8_t SCHEDULE[7][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8},
    {3, 4, 10, 12, 13, 2, 7, 14, 6, 5, 9, 0, 11, 15, 8, 1},
    {10, 7, 12, 9, 14, 3, 13, 15, 4, 0, 11, 2, 5, 8, 1, 6},
    {12, 13, 9, 11, 15, 10, 14, 8, 7, 2, 5, 3, 0, 1, 6, 4},
    {9, 14, 11, 5, 8, 12, 15, 1, 13, 3, 0, 10, 2, 6, 4, 7},
    {11, 15, 5, 0, 1, 9, 8, 6, 14, 10, 2, 12, 3, 4, 7, 13},
};

static inline uint32_t load32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* One lane-parallel kernel, instantiated for each vector width. V is a GCC vector of
 * LANES uint32 words; LOAD(dst, base) puts word w of the 64-byte message block at
 * base + lane * BLOCK_BYTES into dst[w] for every lane. */
#define ROTR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))
#define G(v, a, b, c, d, x, y)                                                      \
    do {                                                                           \
        v[a] = v[a] + v[b] + (x); v[d] = ROTR(v[d] ^ v[a], 16);                    \
        v[c] = v[c] + v[d];       v[b] = ROTR(v[b] ^ v[c], 12);                    \
        v[a] = v[a] + v[b] + (y); v[d] = ROTR(v[d] ^ v[a], 8);                     \
        v[c] = v[c] + v[d];       v[b] = ROTR(v[b] ^ v[c], 7);                     \
    } while (0)

#define DEFINE_KERNEL(NAME, ATTR, V, LANES, LOAD)                                     \
    ATTR static inline void NAME##_compress(V cv[8], const V m[16], uint32_t counter, \
                                            uint32_t flags) {                        \
        V v[16];                                                                     \
        for (int i = 0; i < 8; i++) v[i] = cv[i];                                    \
        for (int i = 0; i < 4; i++) v[8 + i] = (V){0} + IV[i];                       \
        v[12] = (V){0} + counter; v[13] = (V){0};                                    \
        v[14] = (V){0} + 64u;     v[15] = (V){0} + flags;                            \
        _Pragma("GCC unroll 7")                                                      \
        for (int r = 0; r < 7; r++) {                                                \
            const uint8_t *s = SCHEDULE[r];                                          \
            G(v, 0, 4, 8, 12, m[s[0]], m[s[1]]);                                     \
            G(v, 1, 5, 9, 13, m[s[2]], m[s[3]]);                                     \
            G(v, 2, 6, 10, 14, m[s[4]], m[s[5]]);                                    \
            G(v, 3, 7, 11, 15, m[s[6]], m[s[7]]);                                    \
            G(v, 0, 5, 10, 15, m[s[8]], m[s[9]]);                                    \
            G(v, 1, 6, 11, 12, m[s[10]], m[s[11]]);                                  \
            G(v, 2, 7, 8, 13, m[s[12]], m[s[13]]);                                   \
            G(v, 3, 4, 9, 14, m[s[14]], m[s[15]]);                                   \
        }                                                                            \
        for (int i = 0; i < 8; i++) cv[i] = v[i] ^ v[i + 8];                         \
    }                                                                                \
    /* LANES whole blocks from ``in`` (consecutive); out gets outlen bytes each */   \
    ATTR static void NAME##_group(const uint32_t key[8], const uint8_t *in,          \
                                  uint8_t *out, size_t outlen) {                     \
        V kv[8], cvs[4][8], m[16];                                                   \
        for (int i = 0; i < 8; i++) kv[i] = (V){0} + key[i];                         \
        for (uint32_t c = 0; c < 4; c++) {                                           \
            V *cv = cvs[c];                                                          \
            for (int i = 0; i < 8; i++) cv[i] = kv[i];                               \
            for (uint32_t b = 0; b < 16; b++) {                                      \
                LOAD(m, in + c * CHUNK_BYTES + b * 64);                              \
                uint32_t f = KEYED_HASH | (b == 0 ? CHUNK_START : 0)                 \
                             | (b == 15 ? CHUNK_END : 0);                            \
                NAME##_compress(cv, m, c, f);                                        \
            }                                                                        \
        }                                                                            \
        /* the tree of four chunks: two parents, then the root over them */          \
        V left[8], right[8];                                                         \
        for (int i = 0; i < 8; i++) { m[i] = cvs[0][i]; m[8 + i] = cvs[1][i]; }      \
        for (int i = 0; i < 8; i++) left[i] = kv[i];                                 \
        NAME##_compress(left, m, 0, KEYED_HASH | PARENT);                            \
        for (int i = 0; i < 8; i++) { m[i] = cvs[2][i]; m[8 + i] = cvs[3][i]; }      \
        for (int i = 0; i < 8; i++) right[i] = kv[i];                                \
        NAME##_compress(right, m, 0, KEYED_HASH | PARENT);                           \
        for (int i = 0; i < 8; i++) { m[i] = left[i]; m[8 + i] = right[i]; }         \
        V root[8];                                                                   \
        for (int i = 0; i < 8; i++) root[i] = kv[i];                                 \
        NAME##_compress(root, m, 0, KEYED_HASH | PARENT | ROOT);                     \
        /* the root's first 32 bytes, little-endian words; the digest's prefix */    \
        uint32_t words[8][LANES];                                                    \
        memcpy(words, root, sizeof words);                                           \
        for (int l = 0; l < LANES; l++) {                                            \
            uint8_t digest[MAX_OUT];                                                 \
            for (int i = 0; i < 8; i++) {                                            \
                uint32_t w = words[i][l];                                            \
                digest[4 * i] = (uint8_t)w;                                          \
                digest[4 * i + 1] = (uint8_t)(w >> 8);                               \
                digest[4 * i + 2] = (uint8_t)(w >> 16);                              \
                digest[4 * i + 3] = (uint8_t)(w >> 24);                              \
            }                                                                        \
            memcpy(out + (size_t)l * outlen, digest, outlen);                        \
        }                                                                            \
    }

#if HAVE_X86
typedef uint32_t v8 __attribute__((vector_size(32)));
typedef uint32_t v16 __attribute__((vector_size(64)));

/* The message words of one 64-byte block of each lane's message (lane L at
 * p + L * BLOCK_BYTES), transposed so that m[w] holds word w of every lane. Each
 * lane's 64 bytes are loaded once, whole: the lanes lie 4 KiB apart, in one L1 cache
 * set, and per-word gathers would evict and refetch those lines sixteen times.
 *
 * First step, the same for both widths (P: the intrinsics' prefix): rows r[0..ROWS)
 * become s[g][j], whose 128-bit lane k holds word 4k+j of rows 4g..4g+3 — a 4x4
 * transpose inside every 128-bit lane. */
#define TRANSPOSE_IN_LANES(P, VEC, r, s, ROWS)                                       \
    do {                                                                             \
        VEC t_[ROWS];                                                                \
        for (int i = 0; i < (ROWS) / 2; i++) {                                       \
            t_[2 * i] = P##_unpacklo_epi32(r[2 * i], r[2 * i + 1]);                  \
            t_[2 * i + 1] = P##_unpackhi_epi32(r[2 * i], r[2 * i + 1]);              \
        }                                                                            \
        for (int g = 0; g < (ROWS) / 4; g++) {                                       \
            s[g][0] = P##_unpacklo_epi64(t_[4 * g], t_[4 * g + 2]);                  \
            s[g][1] = P##_unpackhi_epi64(t_[4 * g], t_[4 * g + 2]);                  \
            s[g][2] = P##_unpacklo_epi64(t_[4 * g + 1], t_[4 * g + 3]);              \
            s[g][3] = P##_unpackhi_epi64(t_[4 * g + 1], t_[4 * g + 3]);              \
        }                                                                            \
    } while (0)

__attribute__((target("avx2"))) static inline void load8(v8 m[16], const uint8_t *p) {
    for (int half = 0; half < 2; half++) {  /* words 0..7, then 8..15 */
        __m256i r[8], s[2][4];
        for (int l = 0; l < 8; l++)
            r[l] = _mm256_loadu_si256((const __m256i *)(p + l * BLOCK_BYTES + 32 * half));
        TRANSPOSE_IN_LANES(_mm256, __m256i, r, s, 8);
        /* then the two 128-bit lanes: word 4k+j of all rows = lane k of s[0..1][j] */
        for (int j = 0; j < 4; j++) {
            m[8 * half + j] = (v8)_mm256_permute2x128_si256(s[0][j], s[1][j], 0x20);
            m[8 * half + 4 + j] = (v8)_mm256_permute2x128_si256(s[0][j], s[1][j], 0x31);
        }
    }
}

__attribute__((target("avx512f"))) static inline void load16(v16 m[16], const uint8_t *p) {
    __m512i r[16], s[4][4];
    for (int l = 0; l < 16; l++) r[l] = _mm512_loadu_si512(p + l * BLOCK_BYTES);
    TRANSPOSE_IN_LANES(_mm512, __m512i, r, s, 16);
    /* then a 4x4 transpose of 128-bit lanes: word 4k+j of all rows = lane k of s[0..3][j] */
    for (int j = 0; j < 4; j++) {
        __m512i u0 = _mm512_shuffle_i32x4(s[0][j], s[1][j], 0x44);
        __m512i u1 = _mm512_shuffle_i32x4(s[0][j], s[1][j], 0xEE);
        __m512i u2 = _mm512_shuffle_i32x4(s[2][j], s[3][j], 0x44);
        __m512i u3 = _mm512_shuffle_i32x4(s[2][j], s[3][j], 0xEE);
        m[j] = (v16)_mm512_shuffle_i32x4(u0, u2, 0x88);
        m[4 + j] = (v16)_mm512_shuffle_i32x4(u0, u2, 0xDD);
        m[8 + j] = (v16)_mm512_shuffle_i32x4(u1, u3, 0x88);
        m[12 + j] = (v16)_mm512_shuffle_i32x4(u1, u3, 0xDD);
    }
}
DEFINE_KERNEL(k8, __attribute__((target("avx2"))), v8, 8, load8)
DEFINE_KERNEL(k16, __attribute__((target("avx512f"))), v16, 16, load16)
#endif

typedef void (*group_fn)(const uint32_t[8], const uint8_t *, uint8_t *, size_t);

/* the kernel of ``lanes`` lanes if this CPU can run it, else NULL */
static group_fn kernel(int lanes) {
#if HAVE_X86
    if (lanes == 16 && __builtin_cpu_supports("avx512f")) return k16_group;
    if (lanes == 8 && __builtin_cpu_supports("avx2")) return k8_group;
#else
    (void)lanes;
#endif
    return NULL;
}

static int widest = 0;

/* keyed_blocks(key, data, outlen, lanes=0) -> bytes: the first outlen bytes of the keyed
 * BLAKE3 of every whole 4096-byte block of data, concatenated. ``lanes`` picks a kernel
 * (8, 16: the tests run each), 0 the widest this CPU has. */
static PyObject *keyed_blocks(PyObject *self, PyObject *args) {
    Py_buffer key, data;
    Py_ssize_t outlen;
    int lanes = 0;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*y*n|i", &key, &data, &outlen, &lanes)) return NULL;
    PyObject *result = NULL;
    uint8_t *scratch = NULL;
    if (lanes == 0) lanes = widest;
    group_fn group = kernel(lanes);
    if (key.len != 32) {
        PyErr_SetString(PyExc_ValueError, "the key must be 32 bytes");
        goto done;
    }
    if (outlen < 1 || outlen > (Py_ssize_t)MAX_OUT) {
        PyErr_SetString(PyExc_ValueError, "outlen must be 1..32");
        goto done;
    }
    if (group == NULL) {
        PyErr_Format(PyExc_ValueError, "no %d-lane kernel on this CPU", lanes);
        goto done;
    }
    size_t n = (size_t)data.len / BLOCK_BYTES, olen = (size_t)outlen;
    size_t step = (size_t)lanes, rest = n % step;
    result = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(n * olen));
    if (result == NULL) goto done;
    /* the last blocks that do not fill the lanes: hashed from a copy padded with
     * zeros (one more group; the padding lanes' digests are dropped) */
    if (rest && (scratch = PyMem_RawCalloc(step, BLOCK_BYTES + MAX_OUT)) == NULL) {
        Py_CLEAR(result);
        PyErr_NoMemory();
        goto done;
    }
    uint32_t k[8];
    for (int i = 0; i < 8; i++) k[i] = load32((const uint8_t *)key.buf + 4 * i);
    uint8_t *out = (uint8_t *)PyBytes_AS_STRING(result);
    const uint8_t *in = (const uint8_t *)data.buf;
    Py_BEGIN_ALLOW_THREADS
    size_t i = 0;
    for (; i + step <= n; i += step) group(k, in + i * BLOCK_BYTES, out + i * olen, olen);
    if (rest) {
        uint8_t *digests = scratch + step * BLOCK_BYTES;
        memcpy(scratch, in + i * BLOCK_BYTES, rest * BLOCK_BYTES);
        group(k, scratch, digests, olen);
        memcpy(out + i * olen, digests, rest * olen);
    }
    Py_END_ALLOW_THREADS
done:
    PyMem_RawFree(scratch);
    PyBuffer_Release(&key);
    PyBuffer_Release(&data);
    return result;
}

static PyMethodDef methods[] = {
    {"keyed_blocks", keyed_blocks, METH_VARARGS,
     "keyed_blocks(key, data, outlen, lanes=0) -> bytes: keyed BLAKE3 of each whole "
     "4096-byte block of data, outlen bytes each (LANES > 0 only)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_blockhash", NULL, -1, methods};

PyMODINIT_FUNC PyInit__blockhash(void) {
#if HAVE_X86
    __builtin_cpu_init();
#endif
    widest = kernel(16) ? 16 : kernel(8) ? 8 : 0;
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddIntConstant(m, "LANES", widest) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
