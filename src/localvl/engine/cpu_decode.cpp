// Decode attention on the CPU that reads the paged KV pool in place (cpu_decode.py builds and calls it).
//
// One task per (row, KV head): the group's query heads against the row's context, 16 tokens at a
// time. Two passes instead of an online softmax: every score first (kept, with an elementwise
// running maximum), then one exponentiation and the weighted sum of values, so no block waits on
// the previous block's maximum. Written with GCC/Clang vector extensions, not intrinsics, so one
// source serves AVX2, AVX-512 and NEON. float32 or bfloat16 pools; head dims that are multiples
// of 16 up to 256; up to 16 query heads per KV head; block sizes that are multiples of 16.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t i16v __attribute__((vector_size(64)));
typedef uint32_t u16v __attribute__((vector_size(64)));
typedef uint16_t h16v __attribute__((vector_size(32)));

// Clang's shuffle builtin, or GCC's (GCC has __builtin_shufflevector only from version 12).
#if defined(__clang__)
#define SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUFFLE(a, b, ...) __builtin_shuffle(a, b, (i16v){__VA_ARGS__})
#endif

constexpr int MAX_GROUP = 16;
constexpr float LOWEST = -3.0e38f;  // a masked score: exp(LOWEST - max) is 0, with no infinities involved

inline v16 load(const float* p) { v16 r; std::memcpy(&r, p, sizeof r); return r; }

inline v16 load(const uint16_t* p) {  // bfloat16: the upper half of a float32
    h16v h; std::memcpy(&h, p, sizeof h);
    u16v w = __builtin_convertvector(h, u16v) << 16;
    v16 r; std::memcpy(&r, &w, sizeof r); return r;
}

inline void store(float* p, v16 x) { std::memcpy(p, &x, sizeof x); }

inline void store(uint16_t* p, v16 x) {  // to bfloat16, rounding to nearest even
    u16v w; std::memcpy(&w, &x, sizeof w);
    w = (w + 0x7FFFu + ((w >> 16) & 1u)) >> 16;
    h16v h = __builtin_convertvector(w, h16v);
    std::memcpy(p, &h, sizeof h);
}

// Lane t of the result: the sum of a[t]'s lanes (a transpose-and-add tree: 15 steps for 16 sums).
inline v16 sums16(const v16* a) {
    v16 x[8], y[4], z[2];
    for (int i = 0; i < 8; ++i)
        x[i] = SHUFFLE(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23)
             + SHUFFLE(a[2 * i], a[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    for (int i = 0; i < 4; ++i)
        y[i] = SHUFFLE(x[2 * i], x[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27)
             + SHUFFLE(x[2 * i], x[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    for (int i = 0; i < 2; ++i)
        z[i] = SHUFFLE(y[2 * i], y[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29)
             + SHUFFLE(y[2 * i], y[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
    return SHUFFLE(z[0], z[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30)
         + SHUFFLE(z[0], z[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

inline float hmax(v16 a) {
    v16 b = SHUFFLE(a, a, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7); a = a > b ? a : b;
    b = SHUFFLE(a, a, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11); a = a > b ? a : b;
    b = SHUFFLE(a, a, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13); a = a > b ? a : b;
    b = SHUFFLE(a, a, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14); a = a > b ? a : b;
    return a[0];
}

inline float hsum(v16 a) {
    a += SHUFFLE(a, a, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
    a += SHUFFLE(a, a, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
    a += SHUFFLE(a, a, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
    a += SHUFFLE(a, a, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
    return a[0];
}

// e^x for x <= 0 (a score minus the maximum): 2^n * p(r), r = x - n ln 2 in [-ln2/2, ln2/2], with
// Cephes' degree-6 polynomial (relative error ~2e-7, as libm's expf); below -87, 0.
inline v16 exp_nonpositive(v16 x) {
    const v16 zero = {};
    const i16v under = x < -87.0f;
    x = under ? zero - 87.0f : x;
    const i16v n = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, i16v);  // round half down, x <= 0
    const v16 nf = __builtin_convertvector(n, v16);
    const v16 r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
    v16 p = zero + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const i16v bits = (n + 127) << 23;
    v16 scale; std::memcpy(&scale, &bits, sizeof scale);
    return under ? zero : p * scale;
}

template <typename T, int C>  // C: head dim / 16
void attend(const T* q, int64_t q_head, const T* k, const T* v, int64_t kv_block, int64_t kv_slot,
            const int64_t* table, int block_size, int len, T* out, int64_t out_head, int group, float scale) {
    const v16 zero = {};
    const i16v lanes = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    const int chunks = (len + 15) / 16;
    static thread_local std::vector<v16> scores;  // [group][chunk]: every score of the context
    if (scores.size() < static_cast<size_t>(group) * chunks) scores.resize(static_cast<size_t>(group) * chunks);
    v16 qs[MAX_GROUP][C], top[MAX_GROUP];
    for (int g = 0; g < group; ++g) {
        for (int c = 0; c < C; ++c) qs[g][c] = load(q + g * q_head + 16 * c) * scale;
        top[g] = zero + LOWEST;
    }
    for (int b = 0; b < chunks; ++b) {  // scores, 16 tokens at a time
        const int n = std::min(16, len - 16 * b);
        const int first = 16 * b;
        const T* kb = k + table[first / block_size] * kv_block + (first % block_size) * kv_slot;
        v16 keys[16][C];
        for (int t = 0; t < 16; ++t)  // past the row's end too: still its block, and those scores are masked
            for (int c = 0; c < C; ++c) keys[t][c] = load(kb + t * kv_slot + 16 * c);
        for (int g = 0; g < group; ++g) {
            v16 products[16];
            for (int t = 0; t < 16; ++t) {
                v16 a = qs[g][0] * keys[t][0];
                for (int c = 1; c < C; ++c) a += qs[g][c] * keys[t][c];
                products[t] = a;
            }
            v16 s = sums16(products);
            if (n < 16) s = lanes < n ? s : zero + LOWEST;
            scores[static_cast<size_t>(g) * chunks + b] = s;
            top[g] = top[g] > s ? top[g] : s;
        }
    }
    float norm[MAX_GROUP];
    for (int g = 0; g < group; ++g) {  // probabilities, unnormalised
        const float highest = hmax(top[g]);
        v16* sg = scores.data() + static_cast<size_t>(g) * chunks;
        v16 total = zero;
        for (int b = 0; b < chunks; ++b) {
            sg[b] = exp_nonpositive(sg[b] - highest);
            total += sg[b];
        }
        norm[g] = 1.0f / hsum(total);
    }
    v16 acc[MAX_GROUP][C][2];  // two accumulators a head: consecutive tokens' sums do not wait on each other
    for (int g = 0; g < group; ++g)
        for (int c = 0; c < C; ++c) acc[g][c][0] = acc[g][c][1] = zero;
    for (int b = 0; b < chunks; ++b) {
        const int n = std::min(16, len - 16 * b);
        const int first = 16 * b;
        const T* vb = v + table[first / block_size] * kv_block + (first % block_size) * kv_slot;
        for (int t = 0; t < n; ++t) {
            v16 values[C];
            for (int c = 0; c < C; ++c) values[c] = load(vb + t * kv_slot + 16 * c);
            for (int g = 0; g < group; ++g) {
                const float p = scores[static_cast<size_t>(g) * chunks + b][t];
                for (int c = 0; c < C; ++c) acc[g][c][t & 1] += p * values[c];
            }
        }
    }
    for (int g = 0; g < group; ++g)
        for (int c = 0; c < C; ++c) store(out + g * out_head + 16 * c, (acc[g][c][0] + acc[g][c][1]) * norm[g]);
}

template <typename T, int C>
void run(const T* q, int64_t q_row, int64_t q_head, const T* k, const T* v, int64_t kv_block, int64_t kv_slot,
         int64_t kv_head, const int64_t* tables, int64_t table_row, const int32_t* lengths, T* out, int64_t out_row,
         int64_t out_head, int rows, int kv_heads, int group, int block_size, float scale, int threads) {
#pragma omp parallel for collapse(2) schedule(dynamic) num_threads(threads) if (threads > 1)
    for (int r = 0; r < rows; ++r)
        for (int h = 0; h < kv_heads; ++h)
            attend<T, C>(q + r * q_row + h * group * q_head, q_head, k + h * kv_head, v + h * kv_head, kv_block,
                         kv_slot, tables + r * table_row, block_size, lengths[r], out + r * out_row + h * group * out_head,
                         out_head, group, scale);
}

template <typename T>
int dispatch(const void* q, int64_t q_row, int64_t q_head, const void* k, const void* v, int64_t kv_block,
             int64_t kv_slot, int64_t kv_head, const int64_t* tables, int64_t table_row, const int32_t* lengths,
             void* out, int64_t out_row, int64_t out_head, int rows, int kv_heads, int group, int dim, int block_size,
             float scale, int threads) {
#define LOCALVL_CASE(C)                                                                                                \
    case C:                                                                                                            \
        run<T, C>(static_cast<const T*>(q), q_row, q_head, static_cast<const T*>(k), static_cast<const T*>(v),        \
                  kv_block, kv_slot, kv_head, tables, table_row, lengths, static_cast<T*>(out), out_row, out_head,    \
                  rows, kv_heads, group, block_size, scale, threads);                                                  \
        return 0;
    switch (dim / 16) {
#ifdef LOCALVL_HEAD_DIM  // one head dim: a build of ~0.5 s instead of ~5 s for all sixteen
        LOCALVL_CASE(LOCALVL_HEAD_DIM / 16)
#else
        LOCALVL_CASE(1) LOCALVL_CASE(2) LOCALVL_CASE(3) LOCALVL_CASE(4) LOCALVL_CASE(5) LOCALVL_CASE(6)
        LOCALVL_CASE(7) LOCALVL_CASE(8) LOCALVL_CASE(9) LOCALVL_CASE(10) LOCALVL_CASE(11) LOCALVL_CASE(12)
        LOCALVL_CASE(13) LOCALVL_CASE(14) LOCALVL_CASE(15) LOCALVL_CASE(16)
#endif
    }
#undef LOCALVL_CASE
    return 2;
}

}  // namespace

// dtype 0: float32, 1: bfloat16. Strides are in elements; the head dim of q, k, v and out is contiguous.
// Returns 0, or a nonzero code for a shape this kernel does not take (nothing is written then).
extern "C" int localvl_paged_decode(int dtype, const void* q, int64_t q_row, int64_t q_head, const void* k,
                                    const void* v, int64_t kv_block, int64_t kv_slot, int64_t kv_head,
                                    const int64_t* tables, int64_t table_row, int64_t table_width,
                                    const int32_t* lengths, int64_t num_blocks, void* out, int64_t out_row,
                                    int64_t out_head, int rows, int heads, int kv_heads, int dim, int block_size,
                                    float scale, int threads) {
    if (kv_heads <= 0 || heads % kv_heads || heads / kv_heads > MAX_GROUP) return 1;
    if (dim <= 0 || dim % 16 || dim > 256 || block_size <= 0 || block_size % 16) return 2;
#ifdef LOCALVL_HEAD_DIM
    if (dim != LOCALVL_HEAD_DIM) return 2;
#endif
    // Every block a row will read exists: a wrong table is an error for the step, not a crash.
    for (int r = 0; r < rows; ++r) {
        if (lengths[r] <= 0 || lengths[r] > table_width * block_size) return 3;
        for (int64_t b = 0; b < (lengths[r] + block_size - 1) / block_size; ++b)
            if (tables[r * table_row + b] < 0 || tables[r * table_row + b] >= num_blocks) return 3;
    }
    const int group = heads / kv_heads;
    if (dtype == 0)
        return dispatch<float>(q, q_row, q_head, k, v, kv_block, kv_slot, kv_head, tables, table_row, lengths, out,
                               out_row, out_head, rows, kv_heads, group, dim, block_size, scale, threads);
    if (dtype == 1)
        return dispatch<uint16_t>(q, q_row, q_head, k, v, kv_block, kv_slot, kv_head, tables, table_row, lengths, out,
                                  out_row, out_head, rows, kv_heads, group, dim, block_size, scale, threads);
    return 4;
}
