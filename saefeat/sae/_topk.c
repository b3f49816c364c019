/* Row-wise top-k of SAE pre-activations on the CPU, fused with the ReLU.
 *
 * torch.topk copies every row into (value, index) pairs and partially sorts them; for k = 32 of 4,096
 * latents that costs more than the SAE's matmul. Here a row is read twice:
 *   1. the maximum of each of G >= k + 1 disjoint groups of values; the (k+1)-th largest of these maxima,
 *      tau, is a lower bound of the row's (k+1)-th largest value (k + 1 groups hold a value >= tau);
 *   2. the values >= tau (about 45 of 4,096 for k = 32) are collected, and a candidate is kept when fewer
 *      than k candidates beat it (everything that beats it is a candidate).
 *
 * The latents kept are the set torch.topk returns. Where that set is not unique (the k-th and (k+1)-th
 * largest values are equal) or a row holds a NaN, the row is flagged and left to torch.topk, so the choice
 * among ties stays torch's own. Selection counts instead of partitioning: a partition mispredicts a branch
 * per compare, while counting loops vectorise.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define HAVE_AVX512 1
#endif

enum { MAX_CANDIDATES = 512, LANES = 16 };

/* One row's work: the row, its group maxima, and its candidates' values and latent ids. */
typedef struct {
    const void *x;
    int64_t n, m; /* row length; m = k + 1 */
    int k;
    float *gmax, *cv; /* cv has LANES slots of room after the last candidate */
    int32_t *ci;
} Row;

static inline float bf16_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline float load(const Row *r, int64_t j, int is_bf16) {
    return is_bf16 ? bf16_to_float(((const uint16_t *)r->x)[j]) : ((const float *)r->x)[j];
}

/* ---- portable path ------------------------------------------------------------------------------------ */

/* The m-th largest of v[0..n), n >= m: the largest value that at least m values reach. */
static float mth_largest(const float *v, int64_t n, int64_t m) {
    float best = -INFINITY;
    for (int64_t j = 0; j < n; j++) {
        int32_t reach = 0;
        for (int64_t i = 0; i < n; i++) reach += v[i] >= v[j];
        best = reach >= m && v[j] > best ? v[j] : best;
    }
    return best;
}

/* Candidates of a row (every value >= tau, in latent order) from G = 2m contiguous groups; returns their
 * number, or -1 for a NaN. */
static int64_t candidates_portable(Row *r, int is_bf16) {
    const int64_t n = r->n, groups = 2 * r->m, gs = (n + groups - 1) / groups;
    int64_t g = 0;
    for (int64_t a = 0; a < n; a += gs, g++) {
        float mx = -INFINITY;
        for (int64_t j = a; j < a + gs && j < n; j++) {
            float v = load(r, j, is_bf16);
            if (v != v) return -1;
            mx = v > mx ? v : mx;
        }
        r->gmax[g] = mx;
    }
    const float tau = mth_largest(r->gmax, g, r->m);
    int64_t c = 0;
    for (int64_t j = 0; j < n; j++) {
        float v = load(r, j, is_bf16);
        if (v >= tau) {
            r->cv[c] = v;
            r->ci[c++] = (int32_t)j;
        }
    }
    return c;
}

/* How many of the c candidates are larger than each; kept when fewer than k. */
static int64_t count_kept_portable(const Row *r, int64_t c, uint8_t *keep) {
    int64_t kept = 0;
    for (int64_t j = 0; j < c; j++) {
        int32_t beaten = 0;
        for (int64_t i = 0; i < c; i++) beaten += r->cv[i] > r->cv[j];
        keep[j] = beaten < r->k;
        kept += keep[j];
    }
    return kept;
}

/* ---- AVX-512 path: rows whose length is a multiple of 16 ---------------------------------------------- */
#ifdef HAVE_AVX512
#define AVX512 __attribute__((target("avx512f")))

AVX512 static inline __m512 load16(const Row *r, int64_t j, int is_bf16) {
    if (!is_bf16) return _mm512_loadu_ps((const float *)r->x + j);
    __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)r->x + j));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* The groups are lanes: segment s's lane-wise maximum over its vectors gives 16 group maxima, with no
 * horizontal reduction. */
AVX512 static int64_t candidates_avx512(Row *r, int is_bf16) {
    const int64_t vectors = r->n / LANES, segments = (r->m + LANES - 1) / LANES * 2;
    __mmask16 nan = 0;
    for (int64_t s = 0; s < segments; s++) {
        const int64_t a = s * vectors / segments, b = (s + 1) * vectors / segments;
        __m512 mx = _mm512_set1_ps(-INFINITY);
        for (int64_t v = a; v < b; v++) {
            __m512 x = load16(r, v * LANES, is_bf16);
            nan |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
            mx = _mm512_max_ps(mx, x);
        }
        _mm512_storeu_ps(r->gmax + s * LANES, mx);
    }
    if (nan) return -1;
    /* the m-th largest group maximum: the largest that at least m maxima reach */
    float tau = -INFINITY;
    for (int64_t j = 0; j < segments * LANES; j++) {
        const __m512 gj = _mm512_set1_ps(r->gmax[j]);
        int reach = 0;
        for (int64_t s = 0; s < segments; s++)
            reach += __builtin_popcount(_mm512_cmp_ps_mask(_mm512_loadu_ps(r->gmax + s * LANES), gj, _CMP_GE_OQ));
        tau = reach >= r->m && r->gmax[j] > tau ? r->gmax[j] : tau;
    }
    const __m512 t = _mm512_set1_ps(tau);
    const __m512i step = _mm512_set1_epi32(LANES);
    __m512i ids = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    int64_t c = 0;
    for (int64_t v = 0; v < vectors; v++) {
        const __m512 x = load16(r, v * LANES, is_bf16);
        const __mmask16 hit = _mm512_cmp_ps_mask(x, t, _CMP_GE_OQ);
        /* compress into a register and store whole vectors: a compress straight to memory is slow */
        _mm512_storeu_ps(r->cv + c, _mm512_maskz_compress_ps(hit, x));
        _mm512_storeu_si512(r->ci + c, _mm512_maskz_compress_epi32(hit, ids));
        c += __builtin_popcount(hit);
        ids = _mm512_add_epi32(ids, step);
        if (c > MAX_CANDIDATES) return c;
    }
    _mm512_storeu_ps(r->cv + c, _mm512_set1_ps(-INFINITY)); /* the last vector's unused lanes beat nothing */
    return c;
}

AVX512 static int64_t count_kept_avx512(const Row *r, int64_t c, uint8_t *keep) {
    int64_t kept = 0;
    for (int64_t j = 0; j < c; j++) {
        const __m512 cj = _mm512_set1_ps(r->cv[j]);
        int beaten = 0;
        for (int64_t i = 0; i < c; i += LANES)
            beaten += __builtin_popcount(_mm512_cmp_ps_mask(_mm512_loadu_ps(r->cv + i), cj, _CMP_GT_OQ));
        keep[j] = beaten < r->k;
        kept += keep[j];
    }
    return kept;
}
#endif

static int has_avx512; /* set once when the module loads */

static int cpu_has_avx512(void) {
#ifdef HAVE_AVX512
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") != 0;
#else
    return 0;
#endif
}

/* ---- entry point -------------------------------------------------------------------------------------- */

/* Rows [first, last) of a matrix and where their codes go. */
typedef struct {
    const char *x;
    int64_t first, last, cols, stride;
    int k, is_bf16, vector, failed;
    int64_t *idx;
    char *val;
    uint8_t *flag;
} Job;

static void run_rows(Job *job) {
    const int k = job->k, is_bf16 = job->is_bf16;
    const size_t width = is_bf16 ? sizeof(uint16_t) : sizeof(float);
    Row r = {NULL, job->cols, (int64_t)k + 1, k, malloc(4 * (k + 1 + LANES) * sizeof(float)),
             malloc((job->cols + 2 * LANES) * sizeof(float)), malloc((job->cols + 2 * LANES) * sizeof(int32_t))};
    uint8_t *keep = malloc(job->cols + 2 * LANES);
    job->failed = !r.gmax || !r.cv || !r.ci || !keep;
    for (int64_t i = job->first; i < job->last && !job->failed; i++) {
        r.x = job->x + i * job->stride * width;
        int64_t c, kept = 0;
#ifdef HAVE_AVX512
        if (job->vector) {
            c = candidates_avx512(&r, is_bf16);
            if (c >= r.m && c <= MAX_CANDIDATES) kept = count_kept_avx512(&r, c, keep);
        } else
#endif
        {
            c = candidates_portable(&r, is_bf16);
            if (c >= r.m && c <= MAX_CANDIDATES) kept = count_kept_portable(&r, c, keep);
        }
        /* kept != k: a NaN (c < 0), many equal values (c > MAX_CANDIDATES) or a tie at the k-th value */
        job->flag[i] = kept != k;
        if (kept != k) continue;
        int64_t *idx = job->idx + i * k;
        char *val = job->val + i * k * width;
        for (int64_t j = 0, slot = 0; j < c; j++) {
            if (!keep[j]) continue;
            const int positive = r.cv[j] > 0.0f;
            idx[slot] = r.ci[j];
            if (is_bf16)
                ((uint16_t *)val)[slot] = positive ? ((const uint16_t *)r.x)[r.ci[j]] : 0;
            else
                ((float *)val)[slot] = positive ? r.cv[j] : 0.0f;
            slot++;
        }
    }
    free(r.gmax), free(r.cv), free(r.ci), free(keep);
}

static PyObject *topk_relu(PyObject *self, PyObject *args) {
    unsigned long long px, pidx, pval, pflag;
    long long rows, cols, stride;
    int k, is_bf16;
    (void)self;
    if (!PyArg_ParseTuple(args, "KLLLiiKKK", &px, &rows, &cols, &stride, &k, &is_bf16, &pidx, &pval, &pflag))
        return NULL;
    if (k < 1 || (int64_t)LANES * (k + 1) > cols) {
        PyErr_SetString(PyExc_ValueError, "topk_relu needs k >= 1 and 16 (k + 1) <= cols");
        return NULL;
    }
    Job job = {(const char *)(uintptr_t)px, 0, rows, cols, stride, k, is_bf16, has_avx512 && cols % LANES == 0,
               0, (int64_t *)(uintptr_t)pidx, (char *)(uintptr_t)pval, (uint8_t *)(uintptr_t)pflag};
    Py_BEGIN_ALLOW_THREADS
    run_rows(&job);
    Py_END_ALLOW_THREADS
    if (job.failed) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *vectorised(PyObject *self, PyObject *args) {
    (void)self, (void)args;
    return PyBool_FromLong(has_avx512);
}

static PyMethodDef methods[] = {
    {"topk_relu", topk_relu, METH_VARARGS,
     "topk_relu(x_ptr, rows, cols, row_stride, k, is_bf16, idx_ptr, val_ptr, flag_ptr): the ReLU'd top k of each "
     "row of a float32 or bfloat16 matrix into (rows, k) int64 ids and values, on the calling thread; rows it "
     "leaves to torch.topk are flagged 1."},
    {"vectorised", vectorised, METH_NOARGS, "True when this CPU takes the AVX-512 path."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_topk", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__topk(void) {
    has_avx512 = cpu_has_avx512();
    return PyModule_Create(&module);
}
