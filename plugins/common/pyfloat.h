/* Python's repr() of a double, which json.dumps writes: shared by the
 * plugins (quant_state JSON) and the core (config.json) (internal). */
#ifndef QLP_PYFLOAT_H
#define QLP_PYFLOAT_H

#include <stddef.h>

void qlp_format_pyfloat(double v, char *buf, size_t cap);

#endif
