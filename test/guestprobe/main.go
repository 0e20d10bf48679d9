// Command guestprobe runs inside the QEMU test guest (static, no cgo): it
// sends the fresh-report vendor command (attest/freshreport) to /dev/tpm0 —
// through QEMU, the frontend and the backend — and prints the response in
// hex on the console for the test to check.
package main

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

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
	printEKCert(f)
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
	// The same through the kernel's resource manager, which passes only
	// commands the TPM lists in TPM_CAP_COMMANDS.
	rm, err := os.OpenFile("/dev/tpmrm0", os.O_RDWR, 0)
	if err != nil {
		fmt.Println("CVTPM-FRESHRM: open-failed")
		return
	}
	defer rm.Close()
	cmd := freshreport.Command(freshreport.Request{Nonce: []byte(Nonce), EKHandle: 0x81010001, Part: freshreport.PartReport})
	if _, err := rm.Write(cmd); err != nil {
		fmt.Println("CVTPM-FRESHRM: write-failed")
		return
	}
	buf := make([]byte, 8192)
	n, err := rm.Read(buf)
	if err != nil || n < 10 {
		fmt.Println("CVTPM-FRESHRM: read-failed")
		return
	}
	fmt.Printf("CVTPM-FRESHRM: rc%x\n", buf[6:10])
}

// printEKCert prints the SHA-256 of the RSA EK certificate in NV 0x01c00002
// (CVTPM-EKCERT: none if there is none): the test compares it across boots
// to see the TPM's NV data kept.
func printEKCert(f *os.File) {
	tpm := transport.FromReadWriter(f)
	const idx = tpm2.TPMHandle(0x01c00002)
	rp, err := (tpm2.NVReadPublic{NVIndex: idx}).Execute(tpm)
	if err != nil {
		fmt.Println("CVTPM-EKCERT: none")
		return
	}
	pub, err := rp.NVPublic.Contents()
	if err != nil {
		fmt.Println("CVTPM-EKCERT: none")
		return
	}
	var data []byte
	for off := uint16(0); off < pub.DataSize; {
		n := min(pub.DataSize-off, 512)
		r, err := (tpm2.NVRead{AuthHandle: tpm2.AuthHandle{Handle: idx, Name: rp.NVName, Auth: tpm2.PasswordAuth(nil)},
			NVIndex: tpm2.NamedHandle{Handle: idx, Name: rp.NVName}, Size: n, Offset: off}).Execute(tpm)
		if err != nil {
			fmt.Printf("CVTPM-EKCERT: read-failed\n")
			return
		}
		data = append(data, r.Data.Buffer...)
		off += n
	}
	sum := sha256.Sum256(data)
	fmt.Printf("CVTPM-EKCERT: %x\n", sum)
}
