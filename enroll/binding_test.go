package enroll

import "testing"

func TestReportDataBindsEveryField(t *testing.T) {
	base := ReportData([]byte("nonce"), []byte("ek"), "vm-1")
	for name, other := range map[string][64]byte{
		"nonce":           ReportData([]byte("nonce2"), []byte("ek"), "vm-1"),
		"ek":              ReportData([]byte("nonce"), []byte("ek2"), "vm-1"),
		"instance":        ReportData([]byte("nonce"), []byte("ek"), "vm-2"),
		"field boundary":  ReportData([]byte("nonce"), []byte("e"), "kvm-1"),
		"empty vs absent": ReportData([]byte("nonceek"), nil, "vm-1"),
	} {
		if other == base {
			t.Errorf("changing the %s does not change report_data", name)
		}
	}
	if ReportData([]byte("nonce"), []byte("ek"), "vm-1") != base {
		t.Fatal("ReportData is not deterministic")
	}
}
