package freshreport

import (
	"bytes"
	"errors"
	"strings"
	"testing"
)

func TestCommandRoundTrip(t *testing.T) {
	r := Request{Nonce: []byte("n0nce"), EKHandle: 0x8101000a, Part: PartChipCerts}
	got, err := ParseCommand(Command(r))
	if err != nil || !bytes.Equal(got.Nonce, r.Nonce) || got.EKHandle != r.EKHandle || got.Part != r.Part {
		t.Fatalf("ParseCommand = %+v, %v", got, err)
	}
	res := Result{Instance: "vm1", EKPublic: []byte{1, 2}, Payload: []byte("report")}
	back, err := ParseResponse(AppendResponse(nil, res))
	if err != nil || back.Instance != "vm1" || !bytes.Equal(back.EKPublic, res.EKPublic) || !bytes.Equal(back.Payload, res.Payload) {
		t.Fatalf("ParseResponse = %+v, %v", back, err)
	}
}

func TestParseCommandRefuses(t *testing.T) {
	good := Command(Request{Nonce: []byte("abc"), EKHandle: 1})
	long := Command(Request{Nonce: make([]byte, 65)})
	for _, tc := range []struct {
		name string
		in   []byte
		want string
	}{
		{"other command", []byte{0x80, 1, 0, 0, 0, 12, 0, 0, 1, 0x7b, 0, 8}, "not a CSV report command"},
		{"bad size", append(bytes.Clone(good), 0), "size field"},
		{"long nonce", long, "nonce of 65 bytes"},
		{"bad part", append(bytes.Clone(good[:len(good)-1]), 9), "part 9"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ParseCommand(tc.in)
			if !errors.Is(err, ErrMalformed) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want %q", err, tc.want)
			}
		})
	}
	if _, err := ParseResponse([]byte{0x80, 1, 0, 0, 0, 10, 0, 0, 0, 0x84}); !strings.Contains(err.Error(), "0x84") {
		t.Fatalf("error response: %v", err)
	}
}

func TestReportDataBindsEverything(t *testing.T) {
	base := ReportData([]byte("n"), []byte("ek"), "vm1")
	for _, other := range [][64]byte{
		ReportData([]byte("m"), []byte("ek"), "vm1"),
		ReportData([]byte("n"), []byte("ek2"), "vm1"),
		ReportData([]byte("n"), []byte("ek"), "vm2"),
		ReportData([]byte("ne"), []byte("k"), "vm1"), // length prefixes keep fields apart
	} {
		if other == base {
			t.Fatal("report_data does not change with its inputs")
		}
	}
}

func FuzzParse(f *testing.F) {
	f.Add(Command(Request{Nonce: []byte("abc"), EKHandle: 0x81010001}))
	f.Add(AppendResponse(nil, Result{Instance: "vm1", EKPublic: []byte{1}, Payload: []byte{2}}))
	f.Fuzz(func(t *testing.T, b []byte) {
		if r, err := ParseCommand(b); err == nil && !bytes.Equal(Command(r), b) {
			t.Fatal("command does not re-encode to its input")
		}
		if r, err := ParseResponse(b); err == nil && !bytes.Equal(AppendResponse(nil, r), b) {
			t.Fatal("response does not re-encode to its input")
		}
	})
}
