/* The qlora command. */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "qlora/qlora.h"

static const char usage_text[] =
    "usage: qlora COMMAND [OPTIONS]\n"
    "\n"
    "commands:\n"
    "  quantizers                          list the quantizer plugins found\n"
    "  quantize --quantizer=Q MODEL_DIR -o OUT_DIR [--force]\n"
    "                                      quantize a Hugging Face checkpoint (bitsandbytes layout)\n"
    "  inspect FILE.safetensors [--json]   tensors, dtypes, shapes, quantization, bits/param\n"
    "  compare --quantizers=Q1,Q2,... MODEL_DIR [--json FILE] [--summary-only]\n"
    "                                      bits/param, bytes, error and time per quantizer and layer\n"
    "  version                             print the version\n"
    "\n"
    "Q is a plugin name (nf4, fp4, int8, ...) or a path to a plugin .so, optionally\n"
    "followed by :key=value,... options, e.g. nf4:double_quant=0,blocksize=64.\n"
    "Plugins are searched in $" QL_PLUGIN_PATH_ENV ", then the installed plugin folder, then the build tree.\n"
    "Progress goes to stderr: a live line on a terminal, JSON lines otherwise (--quiet turns it off).\n";

static int fail(int rc)
{
    fprintf(stderr, "qlora: error: %s\n", ql_error_message()[0] ? ql_error_message() : ql_status_name(rc));
    return rc ? rc : 1;
}

static int usage_error(const char *fmt, const char *arg)
{
    fprintf(stderr, "qlora: ");
    fprintf(stderr, fmt, arg);
    fprintf(stderr, "\n(see 'qlora help')\n");
    return 2;
}

static int cmd_quantizers(int argc, char **argv)
{
    int as_json = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--json") == 0) as_json = 1;
        else return usage_error("quantizers: unknown argument '%s'", argv[i]);
    }
    char **paths;
    size_t n;
    int rc = ql_plugin_scan(&paths, &n);
    if (rc) return fail(rc);
    if (!as_json) printf("%-10s %-10s %-5s %-8s %-s\n", "name", "bits/param", "ABI", "version", "description / file");
    else printf("[");
    int bad = 0;
    for (size_t i = 0; i < n; i++) {
        ql_qz *q;
        if (ql_qz_open(paths[i], &q) != QL_OK) {
            fprintf(stderr, "qlora: warning: %s\n", ql_error_message());
            bad++;
            continue;
        }
        const ql_quantizer_desc *d = q->desc;
        /* bits/param of a 4096 x 4096 matrix with default options */
        double bpp = d->bits_per_param(q->inst, 4096, 4096);
        if (as_json)
            printf("%s\n  {\"name\": \"%s\", \"description\": \"%s\", \"bits_per_param\": %.4f, \"abi\": \"%u.%u\", "
                   "\"version\": \"%s\", \"options\": \"%s\", \"file\": \"%s\"}",
                   i - (size_t)bad ? "," : "", d->name, d->description, bpp, d->abi_major, d->abi_minor,
                   d->version ? d->version : "", q->options, ql_plugin_path(q->plugin));
        else
            printf("%-10s %-10.3f %u.%-3u %-8s %s\n%-37s defaults: %s\n%-37s %s\n", d->name, bpp, d->abi_major,
                   d->abi_minor, d->version ? d->version : "", d->description, "", q->options[0] ? q->options : "(none)",
                   "", ql_plugin_path(q->plugin));
        ql_qz_close(q);
    }
    if (as_json) printf("\n]\n");
    if (n == 0) {
        char **dirs;
        size_t nd;
        if (ql_plugin_search_dirs(&dirs, &nd) == QL_OK) {
            fprintf(stderr, "qlora: no plugins found in:");
            for (size_t i = 0; i < nd; i++) fprintf(stderr, " %s", dirs[i]);
            fprintf(stderr, "\n");
            ql_string_list_free(dirs, nd);
        }
        ql_string_list_free(paths, n);
        return 1;
    }
    ql_string_list_free(paths, n);
    return bad ? 1 : 0;
}

enum { OPT_FORCE = 1000, OPT_JSON, OPT_QUIET, OPT_SUMMARY_ONLY };

static int cmd_quantize(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"quantizer", required_argument, NULL, 'q'}, {"output", required_argument, NULL, 'o'},
        {"force", no_argument, NULL, OPT_FORCE},     {"quiet", no_argument, NULL, OPT_QUIET},
        {NULL, 0, NULL, 0},
    };
    const char *spec = "nf4", *out = NULL;
    ql_quantize_opts opts = {.force = 0, .progress = 1};
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "q:o:", longopts, NULL)) != -1) {
        switch (c) {
        case 'q': spec = optarg; break;
        case 'o': out = optarg; break;
        case OPT_FORCE: opts.force = 1; break;
        case OPT_QUIET: opts.progress = 0; break;
        default: return 2;
        }
    }
    if (optind != argc - 1) return usage_error("quantize: expected one MODEL_DIR%s", "");
    if (!out) return usage_error("quantize: -o OUT_DIR is required%s", "");
    int rc = ql_quantize_model(argv[optind], spec, out, &opts);
    return rc ? fail(rc) : 0;
}

static int cmd_inspect(int argc, char **argv)
{
    int as_json = 0;
    const char *path = NULL;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--json") == 0) as_json = 1;
        else if (argv[i][0] == '-') return usage_error("inspect: unknown option '%s'", argv[i]);
        else if (path) return usage_error("inspect: one file at a time ('%s')", argv[i]);
        else path = argv[i];
    }
    if (!path) return usage_error("inspect: FILE.safetensors is required%s", "");
    /* a model folder is inspected through its single file */
    char *file = NULL;
    if (ql_is_dir(path)) {
        file = ql_path_join(path, "model.safetensors");
        path = file;
    }
    int rc = ql_inspect_file(path, as_json, stdout);
    free(file);
    return rc ? fail(rc) : 0;
}

static int cmd_compare(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"quantizers", required_argument, NULL, 'q'},     {"json", required_argument, NULL, OPT_JSON},
        {"summary-only", no_argument, NULL, OPT_SUMMARY_ONLY}, {"quiet", no_argument, NULL, OPT_QUIET},
        {NULL, 0, NULL, 0},
    };
    const char *specs = "nf4,fp4,int8";
    ql_compare_opts opts = {.json_path = NULL, .per_layer = 1, .progress = 1};
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "q:", longopts, NULL)) != -1) {
        switch (c) {
        case 'q': specs = optarg; break;
        case OPT_JSON: opts.json_path = optarg; break;
        case OPT_SUMMARY_ONLY: opts.per_layer = 0; break;
        case OPT_QUIET: opts.progress = 0; break;
        default: return 2;
        }
    }
    if (optind != argc - 1) return usage_error("compare: expected one MODEL_DIR%s", "");
    int rc = ql_compare_model(argv[optind], specs, &opts, stdout);
    if (rc == QL_OK && opts.json_path) fprintf(stderr, "wrote %s\n", opts.json_path);
    return rc ? fail(rc) : 0;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fputs(usage_text, stderr);
        return 2;
    }
    const char *cmd = argv[1];
    if (!strcmp(cmd, "help") || !strcmp(cmd, "--help") || !strcmp(cmd, "-h")) {
        fputs(usage_text, stdout);
        return 0;
    }
    if (!strcmp(cmd, "version") || !strcmp(cmd, "--version")) {
        printf("qlora %s (quantizer ABI %d.%d)\n", ql_version(), QL_QUANTIZER_ABI_MAJOR, QL_QUANTIZER_ABI_MINOR);
        return 0;
    }
    if (!strcmp(cmd, "quantizers")) return cmd_quantizers(argc - 1, argv + 1);
    if (!strcmp(cmd, "quantize")) return cmd_quantize(argc - 1, argv + 1);
    if (!strcmp(cmd, "inspect")) return cmd_inspect(argc - 1, argv + 1);
    if (!strcmp(cmd, "compare")) return cmd_compare(argc - 1, argv + 1);
    return usage_error("unknown command '%s'", cmd);
}
