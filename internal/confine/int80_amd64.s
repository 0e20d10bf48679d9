#include "textflag.h"

// func int80getpid() uint64
// getpid through the 32-bit system-call ABI (int $0x80, i386 number 20):
// the tests check that the filter refuses the other ABI.
TEXT ·int80getpid(SB),NOSPLIT,$0-8
	MOVL $20, AX
	INT $0x80
	MOVQ AX, ret+0(FP)
	RET
