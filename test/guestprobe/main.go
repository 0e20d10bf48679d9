// Command guestprobe runs inside the QEMU test guest (static, no cgo): it
// sends the fresh-report vendor command (attest/freshreport) to /dev/tpm0 —
// through QEMU, the frontend and the backend — and prints the response in
// hex on the console for the test to check.
package main

import (
	"encoding/hex"
	"fmt"
	"os"

	"cvtpm/attest/freshreport"
)

// Nonce is what the test expects the report to be bound to.
const Nonce = "qemu-guest-probe-nonce"

func main() {
	f, err := os.OpenFile("/dev/tpm0", os.O_RDWR, 0)
	if err != nil {
		fmt.Println("CVTPM-FRESH: open-failed")
		return
	}
	defer f.Close()
	for _, part := range []freshreport.Part{freshreport.PartReport, freshreport.PartChipCerts} {
		cmd := freshreport.Command(freshreport.Request{Nonce: []byte(Nonce), EKHandle: 0x81010001, Part: part})
		if _, err := f.Write(cmd); err != nil {
			fmt.Println("CVTPM-FRESH: write-failed")
			return
		}
		buf := make([]byte, 8192)
		n, err := f.Read(buf)
		if err != nil {
			fmt.Println("CVTPM-FRESH: read-failed")
			return
		}
		fmt.Printf("CVTPM-FRESH%d: %s\n", part, hex.EncodeToString(buf[:n]))
	}
}
