/* qora — everything the Cython layer includes. */
#ifndef QORA_H
#define QORA_H
#include "common.h"
#include "cpu_features.h"
#include "kernels.h"
#include "forward.h"
#include "bandwidth.h"
#endif
