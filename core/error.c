#include "qlora/error.h"

#include <stdio.h>
#include <string.h>

enum { ERROR_CAP = 4096 };

static _Thread_local char error_message[ERROR_CAP];
static _Thread_local int error_code;

int ql_errorv(int code, const char *fmt, va_list ap)
{
    vsnprintf(error_message, sizeof error_message, fmt, ap);
    error_code = code;
    return code;
}

int ql_error(int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    ql_errorv(code, fmt, ap);
    va_end(ap);
    return code;
}

int ql_error_context(const char *fmt, ...)
{
    char prefix[1024];
    char old[ERROR_CAP];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof prefix, fmt, ap);
    va_end(ap);
    memcpy(old, error_message, sizeof old);
    if (snprintf(error_message, sizeof error_message, "%s: %s", prefix, old) < 0) error_message[0] = '\0';
    return error_code;
}

const char *ql_error_message(void) { return error_message; }
int ql_error_code(void) { return error_code; }

void ql_error_clear(void)
{
    error_message[0] = '\0';
    error_code = QL_OK;
}

const char *ql_status_name(int code)
{
    static const char *const names[] = {
        [QL_OK] = "OK",           [QL_EINVAL] = "EINVAL",     [QL_ENOMEM] = "ENOMEM",
        [QL_EIO] = "EIO",         [QL_EFORMAT] = "EFORMAT",   [QL_ENOTSUP] = "ENOTSUP",
        [QL_ENOTFOUND] = "ENOTFOUND", [QL_EABI] = "EABI",     [QL_ENUMERIC] = "ENUMERIC",
        [QL_EEXIST] = "EEXIST",   [QL_ECUDA] = "ECUDA",       [QL_EINTERNAL] = "EINTERNAL",
        [QL_EINTR] = "EINTR",
    };
    if (code < 0 || (size_t)code >= sizeof names / sizeof names[0] || !names[code]) return "E?";
    return names[code];
}
