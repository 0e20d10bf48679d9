package csv

import (
	"bytes"
	"testing"
)

// TestReportRequest checks the request page against csv-rs's ReportReq test
// vector (src/api/guest/types.rs, test_new).
func TestReportRequest(t *testing.T) {
	data := []byte{103, 198, 105, 115, 81, 255, 74, 236, 41, 205, 186, 171, 242, 251, 227, 70, 124,
		194, 84, 248, 27, 232, 231, 141, 118, 90, 46, 99, 51, 159, 201, 154, 102, 50, 13,
		183, 49, 88, 163, 90, 37, 93, 5, 23, 88, 233, 94, 212, 171, 178, 205, 198, 155,
		180, 84, 17, 14, 130, 116, 65, 33, 61, 220, 135}
	mnonce := [16]byte{112, 233, 62, 161, 65, 225, 252, 103, 62, 1, 126, 151, 234, 220, 107, 150}
	hash := []byte{19, 76, 8, 98, 33, 246, 247, 155, 28, 21, 245, 185, 118, 74, 162, 128, 82, 15, 160,
		233, 212, 130, 106, 177, 89, 6, 119, 243, 130, 21, 3, 153}
	page := reportRequest(data, mnonce)
	if len(page) != ReportPage || !bytes.Equal(page[:64], data) || !bytes.Equal(page[64:80], mnonce[:]) || !bytes.Equal(page[80:112], hash) {
		t.Fatalf("request page %x", page[:112])
	}
	if !zero(page[112:]) {
		t.Error("request page is not zero after the header")
	}
}
