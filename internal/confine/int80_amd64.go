package confine

// static long cvtpm_int80_getpid(void) {
// 	long r;
// 	__asm__ volatile("int $0x80" : "=a"(r) : "a"(20L) : "memory");
// 	return r;
// }
import "C"

import "fmt"

// int80Getpid calls getpid through the 32-bit system-call ABI (int $0x80,
// i386 number 20), for the tests that check the filter refuses the other
// ABI; it fails unless that ABI answered. Under the filter it never
// returns (SIGSYS).
func int80Getpid() error {
	if r := int64(int32(C.cvtpm_int80_getpid())); r < 0 {
		return fmt.Errorf("int $0x80 getpid: errno %d", -r)
	}
	return nil
}
