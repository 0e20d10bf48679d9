package confine

import "fmt"

// int80getpid is getpid through the 32-bit ABI (int80_amd64.s).
func int80getpid() uint64

// int80Getpid fails unless the 32-bit ABI answered with this process's
// pid; under the filter it never returns (SIGSYS).
func int80Getpid() error {
	if r := int64(int32(int80getpid())); r < 0 {
		return fmt.Errorf("int $0x80 getpid: errno %d", -r)
	}
	return nil
}
