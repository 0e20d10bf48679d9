package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"path/filepath"
	"strings"
	"testing"
)

const csvVectors = "../../attest/csv/testdata/hygon"

func runCSVArgs(args ...string) (stdout, stderr string, code int) {
	var out, errb bytes.Buffer
	err := csvMain(context.Background(), args, &out, &errb)
	var ee exitError
	switch {
	case err == nil:
	case errors.As(err, &ee):
		code = ee.code
	default:
		code, errb = 1, *bytes.NewBufferString(err.Error())
	}
	return out.String(), errb.String(), code
}

func TestCSVCommand(t *testing.T) {
	dir := t.TempDir()
	real := func(f string) string { return filepath.Join(csvVectors, f) }
	sim := func(f string) string { return filepath.Join(dir, f) }
	if _, e, c := runCSVArgs("simulate", "--out", dir, "--report-data", "abcd", "--measure", strings.Repeat("11", 32), "--policy", "0x21"); c != 0 {
		t.Fatalf("simulate: %d %s", c, e)
	}
	tests := []struct {
		name     string
		args     []string
		wantCode int
		wantOut  string // substring of stdout (or stderr on failure)
	}{
		{"real report", []string{"verify", "--report", real("report.cert"), "--hsk-cek", real("hsk_cek.cert"), "--report-data", "757365722064617461"}, 0, "genuine HYGON root"},
		{"real report json", []string{"verify", "--report", real("report.cert"), "--hsk-cek", real("hsk_cek.cert"), "--json"}, 0, `"chip_serial": "NZA9T14052605"`},
		{"real report wrong data", []string{"verify", "--report", real("report.cert"), "--hsk-cek", real("hsk_cek.cert"), "--report-data", "00"}, 1, `check "report_data"`},
		{"simulated with its root", []string{"verify", "--report", sim("report.cert"), "--hsk-cek", sim("hsk_cek.cert"), "--root", sim("hrk.cert"), "--report-data", "abcd"}, 0, "SIMULATED"},
		{"simulated without root", []string{"verify", "--report", sim("report.cert"), "--hsk-cek", sim("hsk_cek.cert")}, 1, `check "hsk signed by root"`},
		{"simulated with real chain", []string{"verify", "--report", sim("report.cert"), "--hsk-cek", real("hsk_cek.cert")}, 1, `check "pek signed by cek"`},
		{"missing report flag", []string{"verify", "--hsk-cek", real("hsk_cek.cert")}, 2, "--report is required"},
		{"two sources", []string{"verify", "--report", "x", "--hsk-cek", "y", "--cert-dir", "z"}, 2, "exactly one"},
		{"help", []string{"verify", "--help"}, 0, "Usage: cvtpm csv verify"},
		{"unknown subcommand", []string{"frob"}, 2, "unknown subcommand"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			out, errs, code := runCSVArgs(tc.args...)
			if code != tc.wantCode || !strings.Contains(out+errs, tc.wantOut) {
				t.Fatalf("exit %d (want %d), stdout %q stderr %q, want %q", code, tc.wantCode, out, errs, tc.wantOut)
			}
		})
	}
	out, _, _ := runCSVArgs("verify", "--report", sim("report.cert"), "--hsk-cek", sim("hsk_cek.cert"), "--root", sim("hrk.cert"), "--json")
	var claims struct {
		Measure   string `json:"measure"`
		Simulated bool   `json:"simulated"`
		Policy    struct {
			CSV bool `json:"csv"`
		} `json:"policy"`
	}
	if err := json.Unmarshal([]byte(out), &claims); err != nil || claims.Measure != strings.Repeat("11", 32) || !claims.Simulated || !claims.Policy.CSV {
		t.Errorf("simulated claims JSON %q: %v", out, err)
	}
}
