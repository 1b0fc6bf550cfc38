/*
 * fastlstm C core: fused multi-layer LSTM forward and backward (BPTT) kernels.
 *
 * Dimension letters:
 *   L  stacked layers            T  time steps in one call     B  batch (independent streams)
 *   I  input width of layer 0    H  hidden units per layer     G  4H gate pre-activations
 *   C  output classes of the softmax head
 * Layer l > 0 has input width H. Every array is C-contiguous (row-major), the rightmost index fastest.
 *
 * The cell is TensorFlow's BasicLSTMCell: z = [x_t, h_{t-1}] @ W + b with column blocks i, j, f, o;
 * c_t = c_{t-1} * sigmoid(f + forget_bias) + sigmoid(i) * tanh(j); h_t = tanh(c_t) * sigmoid(o).
 *
 * Parameters are one flat vector: per layer its kernel [I_l + H, G] (rows 0..I_l-1 multiply x, the
 * next H rows multiply h) and then its bias [G]. Gradients use the same layout and are accumulated
 * (+=) unless a function states otherwise; zeroing them is the caller's step.
 *
 * Every function returns FL_OK or an error code. Nothing here exits, aborts or asserts: the caller
 * (the Cython binding) checks buffers, and the kernels re-check the sizes they depend on.
 */
#ifndef FASTLSTM_H
#define FASTLSTM_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum fl_status {
    FL_OK = 0,
    FL_EINVAL_SIZE = 1,   /* a dimension is < 1 (or < 0 for T), or a product overflows int */
    FL_EINVAL_LABEL = 2,  /* a label is outside [0, C) */
    FL_EINVAL_OPTIMIZER = 3,
    FL_ENOMEM = 4,
    FL_EINVAL_ID = 5      /* an input id is outside [0, I) */
};

/* Returns a static English description of a status code. */
const char *fl_status_message(int status);

/* Fortran BLAS gemm, as exported by scipy.linalg.cython_blas. */
typedef void (*fl_sgemm_fn)(char *transa, char *transb, int *m, int *n, int *k, float *alpha,
                            float *a, int *lda, float *b, int *ldb, float *beta, float *c, int *ldc);
typedef void (*fl_dgemm_fn)(char *transa, char *transb, int *m, int *n, int *k, double *alpha,
                            double *a, int *lda, double *b, int *ldb, double *beta, double *c,
                            int *ldc);

/* Installs the BLAS that multiplies a large weight matrix when no memory is left for its packed copy
 * (every other large product runs in a packed kernel, below); NULL pointers mean direct loops then. */
void fl_set_blas(fl_sgemm_fn sgemm, fl_dgemm_fn dgemm);

/* A weight matrix with at least this many elements is packed and multiplied by the row kernel or the
 * portable kernel (below), a smaller one by direct loops. The choice depends only on weight sizes,
 * never on B or T, and every path sums each output element in the same order, so that one sample's
 * result does not depend on the batch it is in. */
#define FL_BLAS_MIN_WEIGHTS 4096

/* On CPUs with AVX-512F, every product with a weight matrix of at least FL_BLAS_MIN_WEIGHTS elements
 * runs in fastlstm's own row kernel, the weight gradients included. Elsewhere it runs in the slower
 * portable kernel, which multiplies and adds where the row kernel fuses the two. In both, the result
 * for a row does not depend on the other rows or on the thread count. fl_row_kernel_available returns
 * whether this CPU has the row kernel. fl_set_row_kernel(0) turns it off (the portable kernel takes
 * over) and fl_set_row_kernel(1) back on where available; both return the setting now in force. */
int fl_row_kernel_available(void);
int fl_set_row_kernel(int enable);

/* Threads of the row kernel, the cell and the softmax, the calling thread included: 1 (the default)
 * to FL_MAX_THREADS. Threads split a product by columns and the cell by rows, so results do not
 * depend on the count.
 * fl_set_num_threads returns 0, or -1 for a count out of range (the setting is then unchanged). */
#define FL_MAX_THREADS 64
int fl_set_num_threads(int threads);
int fl_get_num_threads(void);

typedef struct {
    int64_t layers;  /* L */
    int64_t steps;   /* T */
    int64_t batch;   /* B */
    int64_t input;   /* I */
    int64_t hidden;  /* H */
} fl_dims;

enum fl_optimizer_kind { FL_SGD = 0, FL_ADAGRAD = 1, FL_ADAM = 2 };

typedef struct {
    int kind;              /* enum fl_optimizer_kind */
    double learning_rate;
    double beta_1;         /* Adam only */
    double beta_2;         /* Adam only */
    double epsilon;        /* Adam only */
    double clip_norm;      /* <= 0: no clipping by global norm */
    int64_t step;          /* Adam's update count, including this update */
} fl_optimizer;

/* Number of optimizer slots per parameter: 0 for SGD, 1 for Adagrad, 2 for Adam; -1 if unknown. */
int fl_optimizer_slots(int kind);

/* out[k] = tanh(x[k]) with the float32 tanh of the cell kernels (fastlstm_math.h), for tests. */
void fl_tanh_array_f32(int64_t n, const float *x, float *out);

/* Sets (enable 1) or clears (0) the calling thread's flags that flush subnormal results to zero
 * and read subnormal inputs as zero, as other libraries may, for tests. Returns whether both were
 * set before, or -1 where the CPU has no such flags. */
int fl_set_flush_subnormals(int enable);

/* out[k] = sigmoid(x[k]) with the float32 sigmoid of the cell kernels (fastlstm_math.h), for tests. */
void fl_sigmoid_array_f32(int64_t n, const float *x, float *out);

/* out[k] = exp(x[k]) for x[k] <= 0 with the float32 exp of the softmax (fastlstm_math.h), for tests. */
void fl_exp_negative_array_f32(int64_t n, const float *x, float *out);

/* Number of elements of the flat parameter vector. */
int64_t fl_num_params(const fl_dims *dims);

/*
 * Entry points, for float (suffix _f32) and double (_f64). Buffers, with their shapes:
 *
 * Integer inputs: fl_forward, fl_backward, fl_step and fl_train_window take ids, either NULL (layer 0
 *   reads x) or token ids [T, B] ([B] for fl_step) in [0, I), in which case x is not read and may be
 *   NULL. An id stands for a one-hot row of width I, whose product with W_x is row id of W_x: the
 *   input projection is z = b + W_x[id] and backward adds dz into row id of dW_x (dW_x[id] += dz)
 *   and writes no input gradient, so d_x is not written and may be NULL. An id outside [0, I)
 *   returns FL_EINVAL_ID before any buffer is written.
 *
 * fl_forward: runs all layers over T steps.
 *   params [P] read; x [T, B, I] read; state [L, 2, B, H] read as the initial state (0 = c, 1 = h)
 *   and overwritten with the final state. Tape, written: gates [S, T, B, G] (activations i, j, f, o),
 *   cs and hs [S, T + 1, B, H] (time index 0 = initial state), where S = L with keep_tape and S = 1
 *   without (the layers then share one slot). The top layer's outputs end in hs[S - 1, 1:].
 * fl_backward: back-propagates through the tape of a keep_tape forward.
 *   d_y [T, B, H] read (gradient of the top outputs); d_final_state [L, 2, B, H] read, or NULL for
 *   zero; grad [P] accumulated; d_state [L, 2, B, H] written (gradient of the initial state);
 *   d_x [T, B, I] written; dz [T, B, G] and d_hidden [T, B, H] scratch. No buffer may alias another.
 * fl_step: one time step through all layers.
 *   x_t [B, I] read; state [L, 2, B, H] updated in place; gates [B, G] scratch.
 * fl_softmax_xent: dense layer plus softmax cross-entropy over N = rows rows.
 *   inputs [N, H] read; head_params [H * C + C] read (kernel [H, C], then bias [C]); labels [N] read;
 *   probs [N, C] written; d_inputs [N, H] written with the gradient of the mean loss; head_grad
 *   [H * C + C] accumulated; *loss written with the mean loss.
 * fl_train_window: fl_forward with the tape, fl_softmax_xent on the top outputs (labels [T, B]),
 *   fl_backward, then clipping and the optimizer update of params and head_params in place.
 *   grad [P] and head_grad [H * C + C] are overwritten with this window's unclipped gradients;
 *   probs [T, B, C] written; d_y [T, B, H], d_state, d_x, dz and d_hidden are scratch; slots
 *   [S, P] and head_slots [S, H * C + C] are the optimizer's state (S from fl_optimizer_slots);
 *   *loss is the mean loss before the update.
 */
int fl_forward_f32(const fl_dims *dims, const float *params, const float *x, const int64_t *ids,
                   float *state, float *gates, float *cs, float *hs, double forget_bias,
                   int keep_tape);
int fl_backward_f32(const fl_dims *dims, const float *params, const float *x, const int64_t *ids,
                    const float *gates, const float *cs, const float *hs, const float *d_y,
                    const float *d_final_state, float *grad, float *d_state, float *d_x, float *dz,
                    float *d_hidden);
int fl_step_f32(const fl_dims *dims, const float *params, const float *x_t, const int64_t *ids,
                float *state, float *gates, double forget_bias);
int fl_softmax_xent_f32(int64_t rows, int64_t hidden, int64_t classes, const float *inputs,
                        const float *head_params, const int64_t *labels, float *probs,
                        float *d_inputs, float *head_grad, double *loss);
int fl_train_window_f32(const fl_dims *dims, int64_t classes, float *params, float *head_params,
                        const float *x, const int64_t *ids, const int64_t *labels, float *state,
                        float *gates, float *cs, float *hs, float *probs, float *d_y, float *grad,
                        float *head_grad, float *d_state, float *d_x, float *dz, float *d_hidden,
                        double forget_bias, const fl_optimizer *optimizer, float *slots,
                        float *head_slots, double *loss);

int fl_forward_f64(const fl_dims *dims, const double *params, const double *x, const int64_t *ids,
                   double *state, double *gates, double *cs, double *hs, double forget_bias,
                   int keep_tape);
int fl_backward_f64(const fl_dims *dims, const double *params, const double *x, const int64_t *ids,
                    const double *gates, const double *cs, const double *hs, const double *d_y,
                    const double *d_final_state, double *grad, double *d_state, double *d_x,
                    double *dz, double *d_hidden);
int fl_step_f64(const fl_dims *dims, const double *params, const double *x_t, const int64_t *ids,
                double *state, double *gates, double forget_bias);
int fl_softmax_xent_f64(int64_t rows, int64_t hidden, int64_t classes, const double *inputs,
                        const double *head_params, const int64_t *labels, double *probs,
                        double *d_inputs, double *head_grad, double *loss);
int fl_train_window_f64(const fl_dims *dims, int64_t classes, double *params,
                        double *head_params, const double *x, const int64_t *ids,
                        const int64_t *labels, double *state, double *gates, double *cs,
                        double *hs, double *probs, double *d_y, double *grad, double *head_grad,
                        double *d_state, double *d_x, double *dz, double *d_hidden,
                        double forget_bias, const fl_optimizer *optimizer, double *slots,
                        double *head_slots, double *loss);

#ifdef __cplusplus
}
#endif

#endif /* FASTLSTM_H */
