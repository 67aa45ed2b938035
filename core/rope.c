#include "rope.h"

#include <jansson.h>
#include <math.h>
#include <string.h>

#include "qlora/error.h"

/* ---- config.json ---- */

static const char *const type_names[] = {
    [QL_ROPE_DEFAULT] = "default", [QL_ROPE_LINEAR] = "linear", [QL_ROPE_DYNAMIC] = "dynamic",
    [QL_ROPE_YARN] = "yarn",       [QL_ROPE_LLAMA3] = "llama3",
};

/* Every key transformers documents for a Llama rope dictionary that qlora
 * understands; a key of this list that the rope_type does not use is ignored,
 * as transformers ignores it.  Anything else (partial rotary embeddings,
 * longrope's factor lists, mrope sections, a misspelling) is refused. */
static const char *const known_keys[] = {
    "rope_type",       "type",          "rope_theta", "factor",    "original_max_position_embeddings",
    "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow", "mscale",
    "mscale_all_dim",  "attention_factor", "truncate", "partial_rotary_factor",
};

/* A number field of `p` (field names the dictionary): absent or null gives
 * QL_ENOTFOUND and leaves *out; not a finite number greater than `min` (or at
 * least it when `min_ok`) is an error naming the key. */
static int num(json_t *p, const char *field, const char *key, double min, int min_ok, double *out)
{
    json_t *v = p ? json_object_get(p, key) : NULL;
    if (!v || json_is_null(v)) return QL_ENOTFOUND;
    double x = json_is_number(v) ? json_number_value(v) : NAN;
    if (!isfinite(x) || x < min || (!min_ok && x == min) || x > 1e300)
        return ql_error(QL_EFORMAT, "config.json: %s%s%s must be a number %s %g", field ? field : "", field ? "." : "", key,
                        min_ok ? "at least" : "above", min);
    *out = x;
    return QL_OK;
}

static int required_num(json_t *p, const char *field, const char *key, const char *type, double min, double *out)
{
    int rc = num(p, field, key, min, 0, out);
    if (rc == QL_ENOTFOUND)
        return ql_error(QL_EFORMAT, "config.json: %s.%s is missing (rope_type %s needs it)", field, key, type);
    return rc;
}

/* A positive integer at most 2^30 (JSON integer; a big one reads as a real and is refused). */
static int pos_int(json_t *v, const char *where, const char *key, int *out)
{
    if (!json_is_integer(v) || json_integer_value(v) <= 0 || json_integer_value(v) > (1 << 30))
        return ql_error(QL_EFORMAT, "config.json: %s%s must be a positive integer (at most 2^30)", where, key);
    *out = (int)json_integer_value(v);
    return QL_OK;
}

/* transformers' YaRN magnitude correction: 0.1 m ln(s) + 1 for s > 1 */
static double yarn_mscale(double scale, double m) { return scale <= 1 ? 1.0 : 0.1 * m * log(scale) + 1.0; }

/* One rope dictionary `p` (NULL: the plain default), read as transformers
 * reads it after moving the top-level rope_theta and
 * original_max_position_embeddings into it. */
static int parse_params(json_t *p, const char *field, double top_theta, json_t *top_omp, int max_positions,
                        int head_dim, ql_rope_config *r)
{
    int rc;
    memset(r, 0, sizeof *r);
    r->type = QL_ROPE_DEFAULT;
    r->theta = top_theta;
    r->factor = 1;
    r->attention_factor = 1;
    if (p && !json_is_object(p)) return ql_error(QL_EFORMAT, "config.json: %s must be an object or null", field);
    const char *key;
    json_t *v;
    json_object_foreach(p, key, v)
    {
        size_t k = 0;
        while (k < sizeof known_keys / sizeof known_keys[0] && strcmp(key, known_keys[k])) k++;
        if (k == sizeof known_keys / sizeof known_keys[0])
            return ql_error(QL_ENOTSUP, "config.json: %s.%s is not understood; it may change the rotary embedding, so "
                                        "qlora refuses it",
                            field, key);
    }
    /* rope_type, or its old name type; rope_type wins in transformers, so they must agree */
    const char *tname = "default";
    json_t *t1 = p ? json_object_get(p, "rope_type") : NULL, *t2 = p ? json_object_get(p, "type") : NULL;
    if (t1 && json_is_null(t1)) t1 = NULL;
    if (t2 && json_is_null(t2)) t2 = NULL;
    if ((t1 && !json_is_string(t1)) || (t2 && !json_is_string(t2)))
        return ql_error(QL_EFORMAT, "config.json: %s.%s must be a string", field, t1 && !json_is_string(t1) ? "rope_type" : "type");
    if (t1 && t2 && strcmp(json_string_value(t1), json_string_value(t2)))
        return ql_error(QL_EFORMAT, "config.json: %s.rope_type '%s' and %s.type '%s' disagree", field,
                        json_string_value(t1), field, json_string_value(t2));
    if (t1 || t2) tname = json_string_value(t1 ? t1 : t2);
    size_t ti = 0;
    while (ti < sizeof type_names / sizeof type_names[0] && strcmp(tname, type_names[ti])) ti++;
    if (ti == sizeof type_names / sizeof type_names[0])
        return ql_error(QL_ENOTSUP, "config.json: %s.rope_type '%s' is not supported (qlora supports default, linear, "
                                    "dynamic, yarn and llama3)",
                        field, tname);
    r->type = (ql_rope_type)ti;
    double prf = 1;
    if ((rc = num(p, field, "partial_rotary_factor", 0, 0, &prf)) && rc != QL_ENOTFOUND) return rc;
    if (prf != 1)
        return ql_error(QL_ENOTSUP, "config.json: %s.partial_rotary_factor %g is not supported (only 1: the whole head "
                                    "rotates)",
                        field, prf);
    if ((rc = num(p, field, "rope_theta", 0, 0, &r->theta)) && rc != QL_ENOTFOUND) return rc;
    if (r->theta > 3.0e38 || !((float)r->theta > 0))
        return ql_error(QL_EFORMAT, "config.json: %s.rope_theta %g is outside float32's range", field, r->theta);
    if (r->type == QL_ROPE_DEFAULT) return QL_OK;
    /* original_max_position_embeddings: a top-level one overrides the
     * dictionary's when transformers computes yarn and llama3 frequencies */
    r->original_max_positions = max_positions;
    if (r->type == QL_ROPE_YARN || r->type == QL_ROPE_LLAMA3) {
        json_t *o = p ? json_object_get(p, "original_max_position_embeddings") : NULL;
        if (o && !json_is_null(o) && (rc = pos_int(o, field, ".original_max_position_embeddings", &r->original_max_positions)))
            return rc;
        if (top_omp && (rc = pos_int(top_omp, "", "original_max_position_embeddings", &r->original_max_positions)))
            return rc;
    }
    if (r->type == QL_ROPE_YARN) {
        /* a null factor is max_position_embeddings / original_max_position_embeddings */
        json_t *f = p ? json_object_get(p, "factor") : NULL;
        if (!f) return ql_error(QL_EFORMAT, "config.json: %s.factor is missing (rope_type yarn needs it)", field);
        if (json_is_null(f)) r->factor = (double)max_positions / r->original_max_positions;
        else if ((rc = num(p, field, "factor", 0, 0, &r->factor))) return rc;
    } else if ((rc = required_num(p, field, "factor", tname, 0, &r->factor))) {
        return rc;
    }
    if (r->type == QL_ROPE_DYNAMIC) {
        r->original_max_positions = max_positions;
        if (head_dim <= 2)
            return ql_error(QL_EFORMAT, "config.json: rope_type dynamic needs a head dimension above 2 (it is %d)", head_dim);
    }
    if (r->type == QL_ROPE_LLAMA3) {
        if ((rc = required_num(p, field, "low_freq_factor", tname, 0, &r->low_freq_factor)) ||
            (rc = required_num(p, field, "high_freq_factor", tname, 0, &r->high_freq_factor)))
            return rc;
        if (r->high_freq_factor <= r->low_freq_factor)
            return ql_error(QL_EFORMAT, "config.json: %s.high_freq_factor %g must be above low_freq_factor %g", field,
                            r->high_freq_factor, r->low_freq_factor);
    }
    if (r->type == QL_ROPE_YARN) {
        /* beta_fast, beta_slow: a missing, null or zero value takes the default */
        r->beta_fast = 32;
        r->beta_slow = 1;
        double b;
        if ((rc = num(p, field, "beta_fast", 0, 1, &b)) == QL_OK) r->beta_fast = b ? b : 32;
        else if (rc != QL_ENOTFOUND) return rc;
        if ((rc = num(p, field, "beta_slow", 0, 1, &b)) == QL_OK) r->beta_slow = b ? b : 1;
        else if (rc != QL_ENOTFOUND) return rc;
        /* truncate: absent is true; null is false (transformers tests its value) */
        json_t *tr = json_object_get(p, "truncate");
        r->truncate = 1;
        if (tr && json_is_null(tr)) r->truncate = 0;
        else if (tr && !json_is_boolean(tr))
            return ql_error(QL_EFORMAT, "config.json: %s.truncate must be true or false", field);
        else if (tr) r->truncate = json_is_true(tr);
        double af, ms = 0, msa = 0;
        if ((rc = num(p, field, "attention_factor", 0, 0, &af)) == QL_OK) {
            r->attention_factor = af;
        } else if (rc != QL_ENOTFOUND) {
            return rc;
        } else {
            if ((rc = num(p, field, "mscale", -1e300, 1, &ms)) && rc != QL_ENOTFOUND) return rc;
            if ((rc = num(p, field, "mscale_all_dim", -1e300, 1, &msa)) && rc != QL_ENOTFOUND) return rc;
            r->attention_factor = ms != 0 && msa != 0 ? yarn_mscale(r->factor, ms) / yarn_mscale(r->factor, msa)
                                                      : yarn_mscale(r->factor, 1);
            if (!(r->attention_factor > 0) || !isfinite(r->attention_factor))
                return ql_error(QL_EFORMAT, "config.json: %s.mscale and mscale_all_dim give attention factor %g", field,
                                r->attention_factor);
        }
    }
    return QL_OK;
}

static int same_rope(const ql_rope_config *a, const ql_rope_config *b)
{
    return a->type == b->type && a->theta == b->theta && a->factor == b->factor &&
           a->original_max_positions == b->original_max_positions && a->low_freq_factor == b->low_freq_factor &&
           a->high_freq_factor == b->high_freq_factor && a->beta_fast == b->beta_fast && a->beta_slow == b->beta_slow &&
           a->truncate == b->truncate && a->attention_factor == b->attention_factor;
}

int ql_rope_config_parse(const void *config_json, int max_positions, int head_dim, ql_rope_config *out)
{
    json_t *cfg = (json_t *)config_json;
    int rc;
    memset(out, 0, sizeof *out);
    json_t *th = json_object_get(cfg, "rope_theta"), *rs = json_object_get(cfg, "rope_scaling"),
           *rp = json_object_get(cfg, "rope_parameters"), *omp = json_object_get(cfg, "original_max_position_embeddings"),
           *prf = json_object_get(cfg, "partial_rotary_factor");
    if (th && json_is_null(th)) th = NULL;
    if (rs && json_is_null(rs)) rs = NULL;
    if (rp && json_is_null(rp)) rp = NULL;
    if (omp && json_is_null(omp)) omp = NULL;
    double theta = 10000;
    if ((rc = num(cfg, NULL, "rope_theta", 0, 0, &theta)) && rc != QL_ENOTFOUND) return rc;
    if (prf && !json_is_null(prf) && !(json_is_number(prf) && json_number_value(prf) == 1))
        return ql_error(QL_ENOTSUP, "config.json: partial_rotary_factor other than 1 is not supported (the whole head "
                                    "rotates)");
    ql_rope_config a, b;
    if (rp && (rc = parse_params(rp, "rope_parameters", theta, omp, max_positions, head_dim, &b))) return rc;
    if ((rs || !rp) && (rc = parse_params(rs, "rope_scaling", theta, omp, max_positions, head_dim, &a))) return rc;
    /* a top-level rope_theta beside rope_parameters only fills in a missing rope_theta */
    if (rp && !rs && th && b.theta != theta)
        return ql_error(QL_EFORMAT, "config.json: rope_parameters.rope_theta %g and the top-level rope_theta %g disagree",
                        b.theta, theta);
    if (rp && rs && !same_rope(&a, &b))
        return ql_error(QL_EFORMAT, "config.json: rope_parameters (rope_type %s, rope_theta %g, factor %g) and the 4.x "
                                    "rope_theta/rope_scaling (rope_type %s, rope_theta %g, factor %g) disagree",
                        type_names[b.type], b.theta, b.factor, type_names[a.type], a.theta, a.factor);
    *out = rp ? b : a;
    return QL_OK;
}

/* ---- inverse frequencies ----
 *
 * transformers builds these from torch.arange(0, d, 2) / d in float32 and
 * raises the (float32-rounded) base to that power; Python numbers meet
 * float32 tensors as float32, and `s / t` of a tensor is its reciprocal times
 * s.  Each step below rounds where that does. */

static void default_inv_freq(float *inv, float base, int d)
{
    for (int i = 0; i < d / 2; i++) inv[i] = 1.0f / powf(base, (float)(2 * i) / (float)d);
}

void ql_rope_inv_freq(float *inv, float *attn_scale, const ql_rope_config *r, int d, int64_t seq_len)
{
    const int half = d / 2;
    *attn_scale = 1.0f;
    switch (r->type) {
    case QL_ROPE_DEFAULT: default_inv_freq(inv, (float)r->theta, d); break;
    case QL_ROPE_LINEAR:
        default_inv_freq(inv, (float)r->theta, d);
        for (int i = 0; i < half; i++) inv[i] /= (float)r->factor;
        break;
    case QL_ROPE_DYNAMIC:
        if (seq_len <= r->original_max_positions) {
            /* the initial frequencies: the base is unchanged (computed in doubles, (f s / m - (f - 1)) is 1) */
            double base = r->theta * pow(r->factor * r->original_max_positions / r->original_max_positions - (r->factor - 1),
                                         (double)d / (d - 2));
            default_inv_freq(inv, (float)base, d);
        } else {
            /* recomputed from a tensor seq_len: the base is a float32 scalar (torch raises it to the
             * Python exponent in double precision, then rounds) */
            float s = (float)r->factor * (float)seq_len / (float)r->original_max_positions - (float)(r->factor - 1);
            float base = (float)r->theta * (float)pow((double)s, (double)d / (d - 2));
            default_inv_freq(inv, base, d);
        }
        break;
    case QL_ROPE_YARN: {
        const double two_pi = 2 * M_PI, lb = 2 * log(r->theta);
        double low = d * log(r->original_max_positions / (r->beta_fast * two_pi)) / lb;
        double high = d * log(r->original_max_positions / (r->beta_slow * two_pi)) / lb;
        if (r->truncate) {
            low = floor(low);
            high = ceil(high);
        }
        if (low < 0) low = 0;
        if (high > d - 1) high = d - 1;
        if (low == high) high += 0.001;
        const float lowf = (float)low, span = (float)(high - low), factor = (float)r->factor;
        for (int i = 0; i < half; i++) {
            float pf = powf((float)r->theta, (float)(2 * i) / (float)d);
            float extrap = 1.0f / pf, interp = 1.0f / (factor * pf);
            float ramp = ((float)i - lowf) / span;
            ramp = ramp < 0 ? 0 : ramp > 1 ? 1 : ramp;
            float ef = 1.0f - ramp;
            inv[i] = interp * (1.0f - ef) + extrap * ef;
        }
        *attn_scale = (float)r->attention_factor;
        break;
    }
    case QL_ROPE_LLAMA3: {
        default_inv_freq(inv, (float)r->theta, d);
        const float old = (float)r->original_max_positions, factor = (float)r->factor, lo = (float)r->low_freq_factor;
        const float low_wl = (float)(r->original_max_positions / r->low_freq_factor);
        const float high_wl = (float)(r->original_max_positions / r->high_freq_factor);
        const float span = (float)(r->high_freq_factor - r->low_freq_factor);
        for (int i = 0; i < half; i++) {
            float wl = (1.0f / inv[i]) * (float)(2 * M_PI);
            float f = wl > low_wl ? inv[i] / factor : inv[i];
            if (!(wl < high_wl) && !(wl > low_wl)) {
                float smooth = ((1.0f / wl) * old - lo) / span;
                f = (1.0f - smooth) * f / factor + smooth * f;
            }
            inv[i] = f;
        }
        break;
    }
    }
}

int64_t ql_rope_dynamic_len(int64_t *cached, const ql_rope_config *r, int64_t seq_len)
{
    const int64_t orig = r->original_max_positions;
    int64_t was = *cached < orig ? orig : *cached, now = was;
    if (seq_len > was) now = seq_len; /* growth: recompute */
    if (seq_len < orig && was > orig) now = orig; /* back in the original range: reset */
    *cached = now;
    return now;
}
