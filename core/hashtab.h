/* The hash table is part of the public module API. */
#ifndef XD_CORE_HASHTAB_H
#define XD_CORE_HASHTAB_H

#include <xmppd/hashtab.h>

#endif
