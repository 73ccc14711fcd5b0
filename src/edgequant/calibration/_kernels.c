/* The histogram observer's update, in C: one pass over a float32 tensor.
 *
 * observe(x, counts, radius, pending) -> (radius, pending, min, max, finite)
 *
 * The same state change as ``HistogramObserver.update`` in numpy (observers.py), bit for bit:
 * ``counts`` (int64, ``bins`` entries, the two around zero kept as one at ``bins/2 - 1``) over
 * ``[-radius, radius)``, where ``radius`` is the smallest power of two strictly above every
 * finite |x| seen (0 while only zeros came; ``pending`` counts those zeros). Each finite value
 * goes to ``floor(x * bins / (2 * radius)) + bins/2``: the scale is a power of two, so the
 * product and the floor are exact. NaN and +-inf are skipped; ``min``/``max``/``finite``
 * describe the finite values of ``x``.
 *
 * The tensor is read once, in chunks of 4096 values: once a radius is known, one loop counts a
 * chunk and takes its extremes; values it finds beyond the radius (rare) make the radius grow,
 * merging bin pairs as the observer does, and are counted at the new radius. Before any radius
 * (the first non-zero chunk) a chunk is scanned for its extremes first. The GIL is released,
 * so observers of several tensors count side by side. Optional: when this extension is not
 * built, observers use numpy and give the same bytes.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define CHUNK 4096

/* floor(y) for |y| < 2^62: truncate, then step down where truncation went up (y < 0). */
static inline Py_ssize_t floor_index(float y) {
    Py_ssize_t t = (Py_ssize_t)y;
    return t - (y < (float)t);
}

/* counts[floor(x * scale) + half]++ over a chunk; ``finite_only`` skips NaN and +-inf. */
#define COUNT_CHUNK(FLOOR)                                                              \
    for (Py_ssize_t i = 0; i < n; i++) {                                                \
        float v = x[i];                                                                 \
        Py_ssize_t j = (!finite_only || isfinite(v)) ? (Py_ssize_t)(FLOOR) + half : -1; \
        if ((size_t)j < (size_t)bins) /* |x| < radius: always (a guard, not a filter) */ \
            counts[j]++;                                                                \
    }

static void count_chunk_generic(const float *x, Py_ssize_t n, float scale, int64_t *counts,
                                Py_ssize_t bins, Py_ssize_t half, int finite_only) {
    COUNT_CHUNK(floor_index(v * scale))
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
/* The same with SSE4.1, where floorf is one instruction (roundss): chosen at run time. */
__attribute__((target("sse4.1"))) static void count_chunk_sse41(const float *x, Py_ssize_t n, float scale,
                                                               int64_t *counts, Py_ssize_t bins,
                                                               Py_ssize_t half, int finite_only) {
    COUNT_CHUNK(floorf(v * scale))
}
#define HAVE_SSE41_VARIANT 1
#endif

/* One pass over a chunk at a known radius: counts the values inside it, takes min and max
 * (NaN skipped) and returns how many values fell outside [-radius, radius) or were not finite
 * (those are not counted: the caller widens and counts them, or drops NaN/inf). */
#define FUSED_CHUNK(FLOOR)                                                       \
    float lo = INFINITY, hi = -INFINITY;                                         \
    Py_ssize_t outside = 0;                                                      \
    for (Py_ssize_t i = 0; i < n; i++) {                                         \
        float v = x[i];                                                          \
        lo = v < lo ? v : lo;                                                    \
        hi = v > hi ? v : hi;                                                    \
        Py_ssize_t j = isfinite(v) ? (Py_ssize_t)(FLOOR) + half : -1;            \
        if ((size_t)j < (size_t)bins)                                            \
            counts[j]++;                                                         \
        else                                                                     \
            outside++;                                                           \
    }                                                                            \
    *lo_out = lo;                                                                \
    *hi_out = hi;                                                                \
    return outside;

static Py_ssize_t fused_chunk_generic(const float *x, Py_ssize_t n, float scale, int64_t *counts, Py_ssize_t bins,
                                      Py_ssize_t half, float *lo_out, float *hi_out) {
    FUSED_CHUNK(floor_index(v * scale))
}

#ifdef HAVE_SSE41_VARIANT
__attribute__((target("sse4.1"))) static Py_ssize_t fused_chunk_sse41(const float *x, Py_ssize_t n, float scale,
                                                                     int64_t *counts, Py_ssize_t bins,
                                                                     Py_ssize_t half, float *lo_out,
                                                                     float *hi_out) {
    FUSED_CHUNK(floorf(v * scale))
}
#endif

typedef Py_ssize_t (*fused_fn)(const float *, Py_ssize_t, float, int64_t *, Py_ssize_t, Py_ssize_t, float *, float *);

static fused_fn pick_fused(void) {
#ifdef HAVE_SSE41_VARIANT
    __builtin_cpu_init();
    if (__builtin_cpu_supports("sse4.1"))
        return fused_chunk_sse41;
#endif
    return fused_chunk_generic;
}

typedef void (*count_fn)(const float *, Py_ssize_t, float, int64_t *, Py_ssize_t, Py_ssize_t, int);

static count_fn pick_count(void) {
#ifdef HAVE_SSE41_VARIANT
    __builtin_cpu_init();
    if (__builtin_cpu_supports("sse4.1"))
        return count_chunk_sse41;
#endif
    return count_chunk_generic;
}

/* The histogram at twice the radius, in place: pair i (bins 2i, 2i+1) goes to bin q + i
 * (q = bins/4), the centre folded. Upper pairs go ascending and lower pairs descending, so
 * every bin is read before it is overwritten. */
static void coarsen(int64_t *counts, Py_ssize_t bins) {
    Py_ssize_t q = bins / 4, half = bins / 2;
    for (Py_ssize_t i = q; i < half; i++)
        counts[q + i] = counts[2 * i] + counts[2 * i + 1];
    for (Py_ssize_t i = q - 1; i >= 0; i--)
        counts[q + i] = counts[2 * i] + counts[2 * i + 1];
    memset(counts, 0, (size_t)q * sizeof(int64_t));
    memset(counts + 3 * q, 0, (size_t)q * sizeof(int64_t));
    counts[half - 1] += counts[half];
    counts[half] = 0;
}

/* Min and max of x[0..n) in eight lanes (the compiler vectorises it); returns 0 when every
 * value is finite (0 * x is NaN for NaN and +-inf), else the extremes are left unset. */
static int chunk_extremes(const float *x, Py_ssize_t n, float *lo_out, float *hi_out) {
    float lo[8], hi[8], z[8];
    for (int u = 0; u < 8; u++) {
        lo[u] = INFINITY;
        hi[u] = -INFINITY;
        z[u] = 0.0f;
    }
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int u = 0; u < 8; u++) {
            float v = x[i + u];
            lo[u] = v < lo[u] ? v : lo[u];
            hi[u] = v > hi[u] ? v : hi[u];
            z[u] += v * 0.0f;
        }
    for (; i < n; i++) {
        float v = x[i];
        lo[0] = v < lo[0] ? v : lo[0];
        hi[0] = v > hi[0] ? v : hi[0];
        z[0] += v * 0.0f;
    }
    float a = INFINITY, b = -INFINITY, zz = 0.0f;
    for (int u = 0; u < 8; u++) {
        a = lo[u] < a ? lo[u] : a;
        b = hi[u] > b ? hi[u] : b;
        zz += z[u];
    }
    *lo_out = a;
    *hi_out = b;
    return zz != 0.0f;
}

/* Min and max of the finite values of x[0..n); returns how many there are. */
static Py_ssize_t finite_extremes(const float *x, Py_ssize_t n, float *lo_out, float *hi_out) {
    float lo = INFINITY, hi = -INFINITY;
    Py_ssize_t k = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        float v = x[i];
        if (isfinite(v)) {
            lo = v < lo ? v : lo;
            hi = v > hi ? v : hi;
            k++;
        }
    }
    *lo_out = lo;
    *hi_out = hi;
    return k;
}

/* The smallest power of two strictly above a > 0. */
static double radius_for(double a) {
    int e;
    frexp(a, &e);  /* a = m * 2^e, m in [0.5, 1) */
    double r = ldexp(1.0, e);
    return r < 0x1p-100 ? 0x1p-100 : r;
}

static PyObject *observe(PyObject *self, PyObject *args) {
    PyObject *xobj, *cobj;
    double radius;
    long long pending;
    Py_buffer xv, cv;
    if (!PyArg_ParseTuple(args, "OOdL", &xobj, &cobj, &radius, &pending))
        return NULL;
    if (PyObject_GetBuffer(xobj, &xv, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0)
        return NULL;
    if (xv.itemsize != 4 || xv.format == NULL || strcmp(xv.format, "f") != 0) {
        PyErr_SetString(PyExc_TypeError, "x must be a C-contiguous float32 array");
        PyBuffer_Release(&xv);
        return NULL;
    }
    if (PyObject_GetBuffer(cobj, &cv, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&xv);
        return NULL;
    }
    if (cv.itemsize != 8 || cv.format == NULL || (strcmp(cv.format, "l") != 0 && strcmp(cv.format, "q") != 0)
        || cv.len / 8 < 4) {
        PyErr_SetString(PyExc_TypeError, "counts must be a C-contiguous int64 array of at least 4 bins");
        PyBuffer_Release(&xv);
        PyBuffer_Release(&cv);
        return NULL;
    }
    const float *x = (const float *)xv.buf;
    int64_t *counts = (int64_t *)cv.buf;
    const Py_ssize_t n = xv.len / 4, bins = cv.len / 8, half = bins / 2;
    float lo = INFINITY, hi = -INFINITY;
    Py_ssize_t finite = 0;
    const count_fn count = pick_count();
    const fused_fn fused = pick_fused();
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t start = 0; start < n; start += CHUNK) {
        const Py_ssize_t stop = start + CHUNK < n ? start + CHUNK : n;
        Py_ssize_t k = stop - start;
        float clo, chi, scale = 0.0f;
        int odd = 0, partly = 0;  /* partly: the values inside the old radius are counted */
        if (radius > 0.0) {  /* the common case: one pass, counting and taking the extremes */
            scale = (float)((double)bins / (2.0 * radius));
            partly = fused(x + start, k, scale, counts, bins, half, &clo, &chi) != 0;
            if (partly)  /* values beyond the radius, or NaN/inf */
                k = finite_extremes(x + start, k, &clo, &chi);
        } else {
            odd = chunk_extremes(x + start, k, &clo, &chi);
            if (odd)  /* NaN or +-inf in this chunk: extremes and counts of the finite values only */
                k = finite_extremes(x + start, k, &clo, &chi);
        }
        if (k == 0)
            continue;
        finite += k;
        lo = clo < lo ? clo : lo;
        hi = chi > hi ? chi : hi;
        if (radius > 0.0 && !partly)
            continue;  /* counted in the one pass */
        double amax = -(double)clo > (double)chi ? -(double)clo : (double)chi;
        if (radius == 0.0) {
            if (amax == 0.0) {  /* zeros before any other value: no radius yet */
                pending += k;
                continue;
            }
            radius = radius_for(amax);
            counts[half - 1] += pending;
            pending = 0;
        }
        while (amax >= radius) {
            coarsen(counts, bins);
            radius *= 2.0;
        }
        const float wide = (float)((double)bins / (2.0 * radius));
        if (!partly) {
            count(x + start, stop - start, wide, counts, bins, half, odd);
            continue;
        }
        for (Py_ssize_t i = start; i < stop; i++) {  /* the finite values the one pass left */
            float v = x[i];
            Py_ssize_t before = isfinite(v) ? floor_index(v * scale) + half : 0;
            if ((size_t)before >= (size_t)bins) {
                Py_ssize_t j = floor_index(v * wide) + half;
                if ((size_t)j < (size_t)bins)
                    counts[j]++;
            }
        }
    }
    counts[half - 1] += counts[half];
    counts[half] = 0;
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&xv);
    PyBuffer_Release(&cv);
    return Py_BuildValue("dLddn", radius, pending, (double)lo, (double)hi, finite);
}

static PyMethodDef methods[] = {
    {"observe", observe, METH_VARARGS,
     "observe(x, counts, radius, pending) -> (radius, pending, min, max, finite): one histogram update."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", "Calibration kernels.", -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
