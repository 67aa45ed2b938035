#include "ql_config.h"
#include "qlora/qlora.h"

const char *ql_version(void) { return QL_VERSION; }
