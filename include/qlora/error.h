/* Status codes and the per-thread error message. */
#ifndef QLORA_ERROR_H
#define QLORA_ERROR_H

#include <stdarg.h>

#include "quantizer.h" /* QL_OK, QL_EINVAL, ... */

#ifdef __cplusplus
extern "C" {
#endif

/* Record `code` and a message for this thread; returns `code`. */
int ql_error(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
int ql_errorv(int code, const char *fmt, va_list ap);
/* Prefix the current message with context ("reading X: " + old message). */
int ql_error_context(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
const char *ql_error_message(void);
int ql_error_code(void);
void ql_error_clear(void);
/* Short name of a status code ("EINVAL", ...). */
const char *ql_status_name(int code);

#ifdef __cplusplus
}
#endif
#endif
