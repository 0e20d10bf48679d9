package bench

import (
	"bytes"
	"strings"
	"testing"
)

func TestReadResponse(t *testing.T) {
	ok := []byte{0x80, 0x01, 0, 0, 0, 12, 0, 0, 0, 0, 0xaa, 0xbb}
	tests := []struct {
		name    string
		in      []byte
		want    []byte
		wantErr string
	}{
		{name: "whole response", in: ok, want: ok},
		{name: "trailing bytes of the next response stay unread", in: append(append([]byte{}, ok...), 0x80), want: ok},
		{name: "header only", in: []byte{0x80, 0x01, 0, 0, 0, 10, 0, 0, 0x01, 0x01}, want: []byte{0x80, 0x01, 0, 0, 0, 10, 0, 0, 0x01, 0x01}},
		{name: "short header", in: ok[:9], wantErr: "response header"},
		{name: "short body", in: ok[:11], wantErr: "response body"},
		{name: "size below header", in: []byte{0x80, 0x01, 0, 0, 0, 9, 0, 0, 0, 0}, wantErr: "size 9 outside"},
		{name: "size above limit", in: []byte{0x80, 0x01, 0, 1, 0, 1, 0, 0, 0, 0}, wantErr: "outside [10, 65536]"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := readResponse(bytes.NewReader(tt.in), make([]byte, 4))
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err = %v, want one containing %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, tt.want) {
				t.Fatalf("got % x, want % x", got, tt.want)
			}
		})
	}
}

// FuzzReadResponse: whatever a server sends, readResponse returns either an
// error or exactly one response whose length matches its header.
func FuzzReadResponse(f *testing.F) {
	f.Add([]byte{0x80, 0x01, 0, 0, 0, 12, 0, 0, 0, 0, 0xaa, 0xbb})
	f.Add([]byte{0x80, 0x01, 0, 0, 0, 10, 0, 0, 0x09, 0x22})
	f.Add([]byte{0x80, 0x01, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0})
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, in []byte) {
		got, err := readResponse(bytes.NewReader(in), make([]byte, 16))
		if err != nil {
			return
		}
		if len(got) < 10 || len(got) > len(in) || !bytes.Equal(got, in[:len(got)]) {
			t.Fatalf("readResponse returned % x for input % x", got, in)
		}
		if size := int(got[2])<<24 | int(got[3])<<16 | int(got[4])<<8 | int(got[5]); size != len(got) {
			t.Fatalf("returned %d bytes, header says %d", len(got), size)
		}
	})
}

func TestMedians(t *testing.T) {
	tests := []struct {
		in   []float64
		want float64
	}{
		{[]float64{3}, 3},
		{[]float64{5, 1, 3}, 3},
		{[]float64{100, 1, 2, 3}, 3}, // upper median; one outlier block does not move it far
	}
	for _, tt := range tests {
		if got := medianFloat(tt.in); got != tt.want {
			t.Errorf("medianFloat(%v) = %v, want %v", tt.in, got, tt.want)
		}
	}
	if plainRatio(1, 0) != 0 || plainRatio(3, 2) != 1.5 {
		t.Errorf("plainRatio wrong: %v %v", plainRatio(1, 0), plainRatio(3, 2))
	}
}
