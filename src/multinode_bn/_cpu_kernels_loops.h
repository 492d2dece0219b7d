/* The loops of _cpu_kernels.c for element type T, FN(name) naming them: one
 * inline pass, whose kind the entry loops fix by constants, at no cost. */

/* Adds u and u * d to the sums: d = x - origin in float64, u = w or d. */
static inline __attribute__((always_inline)) void
FN(add_sums)(int weighted, T x, T w, double origin, double *s1, double *s2)
{
    const double d = (double)x - origin;
    const double u = weighted ? (double)w : d;
    *s1 += u;
    *s2 += u * d;
}

/* In T: q * (x - centre) + r, with p * w added before r when weighted. */
static inline __attribute__((always_inline)) T
FN(affine)(int weighted, T x, T w, T centre, T p, T q, T r)
{
    const T e = q * (x - centre);
    return (weighted ? p * w + e : e) + r;
}

/* One pass of the kind (sums, weighted) over x and w (w = x if not weighted):
 * the (2, C) sums s of FN(add_sums) around origin[c] over channel c, or out of
 * FN(affine) with the rows centre, p (read only if weighted), q and r. */
static inline __attribute__((always_inline)) void
FN(pass)(int sums, int weighted, const T *x, const T *w, Py_ssize_t A,
         Py_ssize_t C, Py_ssize_t B, const double *origin, double *s, T *out,
         const T *centre, const T *p, const T *q, const T *r)
{
    double *s1 = s, *s2 = sums ? s + C : NULL;
    if (sums)
        memset(s, 0, 2 * C * sizeof(double));
    if (A == 0 || B == 0 || C == 0)
        return;
    if (B == 1) {
        /* Channels innermost: blocks of channels whose terms (or the sums)
         * stay in registers over all rows, then the rest row by row. */
        Py_ssize_t c0 = 0;
        for (; (sums || C <= MNBN_BLOCKED_MAX) && c0 + MNBN_BLOCK <= C;
             c0 += MNBN_BLOCK) {
            double t1[MNBN_BLOCK] = {0}, t2[MNBN_BLOCK] = {0};
            T kc[MNBN_BLOCK], kp[MNBN_BLOCK], kq[MNBN_BLOCK], kr[MNBN_BLOCK];
            for (int c = 0; c < MNBN_BLOCK; ++c) {
                kc[c] = sums ? 0 : centre[c0 + c];
                kp[c] = sums ? 0 : p[c0 + c];
                kq[c] = sums ? 0 : q[c0 + c];
                kr[c] = sums ? 0 : r[c0 + c];
            }
            for (Py_ssize_t a = 0; a < A; ++a) {
                const Py_ssize_t at = a * C + c0;
                MNBN_SIMD
                for (int c = 0; c < MNBN_BLOCK; ++c) {
                    if (sums)
                        FN(add_sums)(weighted, x[at + c], w[at + c],
                                     origin[c0 + c], &t1[c], &t2[c]);
                    else
                        out[at + c] = FN(affine)(weighted, x[at + c],
                                                 w[at + c], kc[c], kp[c],
                                                 kq[c], kr[c]);
                }
            }
            for (int c = 0; sums && c < MNBN_BLOCK; ++c) {
                s1[c0 + c] = t1[c];
                s2[c0 + c] = t2[c];
            }
        }
        for (Py_ssize_t a = 0; a < A && c0 < C; ++a) {
            const Py_ssize_t at = a * C;
            MNBN_SIMD
            for (Py_ssize_t c = c0; c < C; ++c) {
                if (sums)
                    FN(add_sums)(weighted, x[at + c], w[at + c], origin[c],
                                 &s1[c], &s2[c]);
                else
                    out[at + c] = FN(affine)(weighted, x[at + c], w[at + c],
                                             centre[c], p[c], q[c], r[c]);
            }
        }
        return;
    }
    if (sums && B < MNBN_SHORT_RUN) {
        /* Short runs (small images): sums per position over the rows for a
         * block of channels, folded per channel at the end, not per run. */
        const Py_ssize_t K = MNBN_SHORT_BLOCK / B;
        double t1[MNBN_SHORT_BLOCK], t2[MNBN_SHORT_BLOCK], m[MNBN_SHORT_BLOCK];
        for (Py_ssize_t c0 = 0; c0 < C; c0 += K) {
            const Py_ssize_t E = (C - c0 < K ? C - c0 : K) * B;
            for (Py_ssize_t i = 0; i < E; ++i) {
                t1[i] = t2[i] = 0.0;
                m[i] = origin[c0 + i / B];
            }
            for (Py_ssize_t a = 0; a < A; ++a) {
                const Py_ssize_t at = (a * C + c0) * B;
                MNBN_SIMD
                for (Py_ssize_t i = 0; i < E; ++i)
                    FN(add_sums)(weighted, x[at + i], w[at + i], m[i], &t1[i],
                                 &t2[i]);
            }
            for (Py_ssize_t i = 0; i < E; ++i) {
                s1[c0 + i / B] += t1[i];
                s2[c0 + i / B] += t2[i];
            }
        }
        return;
    }
    /* Runs of one channel, each read in order. */
    for (Py_ssize_t a = 0; a < A; ++a) {
        for (Py_ssize_t c = 0; c < C; ++c) {
            const Py_ssize_t at = (a * C + c) * B;
            if (sums) {
                const double m = origin[c];
                double t1 = 0.0, t2 = 0.0;
                MNBN_SIMD_SUMS
                for (Py_ssize_t b = 0; b < B; ++b)
                    FN(add_sums)(weighted, x[at + b], w[at + b], m, &t1, &t2);
                s1[c] += t1;
                s2[c] += t2;
            } else {
                const T kc = centre[c], kp = p[c], kq = q[c], kr = r[c];
                MNBN_SIMD
                for (Py_ssize_t b = 0; b < B; ++b)
                    out[at + b] = FN(affine)(weighted, x[at + b], w[at + b],
                                             kc, kp, kq, kr);
            }
        }
    }
}

/* sums = (sum gy, sum gy * (x - mean[c])) per channel, as (2, C). */
MNBN_CLONES static void
FN(backward_sums)(const void *x, const void *gy, Py_ssize_t A, Py_ssize_t C,
                  Py_ssize_t B, const double *mean, double *sums)
{
    FN(pass)(1, 1, x, gy, A, C, B, mean, sums, NULL, NULL, NULL, NULL, NULL);
}

/* y = (x - centre[c]) * scale[c] + offset[c]; coef: the rows, (3, C). */
MNBN_CLONES static void
FN(normalize)(const void *x, Py_ssize_t A, Py_ssize_t C, Py_ssize_t B,
              const void *coef, void *y)
{
    const T *k = coef;
    FN(pass)(0, 0, x, x, A, C, B, NULL, NULL, y, k, k, k + C, k + 2 * C);
}

/* gx = p[c] * gy + q[c] * (x - centre[c]) + r[c]; coef: the rows, (4, C). */
MNBN_CLONES static void
FN(input_gradient)(const void *x, const void *gy, Py_ssize_t A, Py_ssize_t C,
                   Py_ssize_t B, const void *coef, void *gx)
{
    const T *k = coef;
    FN(pass)(0, 1, x, gy, A, C, B, NULL, NULL, gx, k, k + C, k + 2 * C,
             k + 3 * C);
}

/* moments (C, 3) = (count, mean, m2) from the sums s1 of d, s2 of d * d (in s,
 * 2 C values), d = x - shift[c]; shift: the mean of a channel's first values,
 * or, if that lies over tolerance deviations away, the mean (summed again). */
MNBN_CLONES static void
FN(local_moments)(const void *data, Py_ssize_t A, Py_ssize_t C, Py_ssize_t B,
                  double tolerance, double *shift, double *moments, double *s)
{
    const T *x = data;
    const double *s1 = s, *s2 = s + C;
    const Py_ssize_t run = B < MNBN_SHIFT_SAMPLE ? B : MNBN_SHIFT_SAMPLE;
    const Py_ssize_t most = (MNBN_SHIFT_SAMPLE + run - 1) / run;
    const Py_ssize_t rows = most < A ? most : A;
    const double n = (double)A * (double)B, tol2 = tolerance * tolerance;
    int redo = 0;
    memset(shift, 0, C * sizeof(double));
    for (Py_ssize_t a = 0; a < rows; ++a)
        for (Py_ssize_t c = 0; c < C; ++c)
            for (Py_ssize_t b = 0; b < run; ++b)
                shift[c] += (double)x[(a * C + c) * B + b];
    for (Py_ssize_t c = 0; c < C; ++c)
        shift[c] /= (double)(rows * run);
    FN(pass)(1, 0, x, x, A, C, B, shift, s, NULL, NULL, NULL, NULL, NULL);
    for (Py_ssize_t c = 0; c < C; ++c)
        /* (s1 / n)^2 > tol^2 * m2 / n, with m2 = s2 - s1^2 / n */
        redo |= s1[c] * s1[c] * (1.0 + tol2) > s2[c] * (tol2 * n);
    if (redo) {
        for (Py_ssize_t c = 0; c < C; ++c)
            shift[c] += s1[c] / n;
        FN(pass)(1, 0, x, x, A, C, B, shift, s, NULL, NULL, NULL, NULL, NULL);
    }
    for (Py_ssize_t c = 0; c < C; ++c) {
        const double m2 = s2[c] - s1[c] * s1[c] / n;
        moments[3 * c] = n;
        moments[3 * c + 1] = shift[c] + s1[c] / n;
        /* NaN stays NaN (a non-finite batch must not look like var 0). */
        moments[3 * c + 2] = m2 < 0.0 ? 0.0 : m2;
    }
}

#undef T
#undef FN
