/* A stand-in for the legacy cloning tool's own djtypes.h, written for this
 * test from the facts its users depend on (the names, and what each is):
 * the legacy sources include it before cow.h/vddr.h, so our headers must
 * compile after it and use its types as they are. Not the legacy file. */
#ifndef DJTYPES_H
#define DJTYPES_H

#define PUBLIC
#define PRIVATE static

typedef unsigned char UI08;
typedef unsigned short UI16;
typedef unsigned int UI32;
typedef unsigned long long UI64;
typedef signed char CHAR;
typedef CHAR *PSTR;
typedef unsigned char BYTE;
typedef long long HUGE; /* signed 64-bit */
typedef unsigned int UINT;
typedef unsigned int BOOL;
#define TRUE 1
#define FALSE 0

/* File names are bytes. */
typedef unsigned char FNCHAR;
typedef FNCHAR *PFN;
typedef const FNCHAR *CPFN;

/* Object-oriented C: a class is a struct tag, a method a function pointer. */
#define CLASS(n) struct t_##n
#define PUBLIC_METHOD(name) (*name)

/* The UUID as VirtualBox holds it: an anonymous union. */
typedef union {
    UI08 au8[16];
    UI16 au16[8];
    UI32 au32[4];
    UI64 au64[2];
    struct {
        UI32 u32TimeLow;
        UI16 u16TimeMid;
        UI16 u16TimeHiAndVersion;
        UI08 u8ClockSeqHiAndReserved;
        UI08 u8ClockSeqLow;
        UI08 au8Node[6];
    } Gen;
} S_UUID;

#endif
