package csv

import (
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// vectors is the shared folder of real HYGON evidence (see its README).
const vectors = "testdata/hygon"

func readVector(t testing.TB, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(vectors, name))
	if err != nil {
		t.Fatalf("test vector: %v", err)
	}
	return b
}

func realVerifier(t testing.TB) *Verifier {
	hsk, cek, err := ParseHSKCEK(readVector(t, "hsk_cek.cert"))
	if err != nil {
		t.Fatal(err)
	}
	return NewVerifier(VerifierOptions{Certs: StaticSource{hsk, cek}})
}

func TestRealReportVerifies(t *testing.T) {
	v := realVerifier(t)
	var rd [64]byte
	copy(rd[:], "user data")
	c, err := v.Verify(context.Background(), readVector(t, "report.cert"), rd[:])
	if err != nil {
		t.Fatal(err)
	}
	wantMN, _ := hex.DecodeString("67c6697351ff4aec29cdbaabf2fbe346")
	wantMeasure, _ := hex.DecodeString("1178dadbf826ec7a07444ba358376d81c312cb53d703f9da83b26c1eee2ea052")
	switch {
	case c.Version != 1:
		t.Errorf("version %d", c.Version)
	case c.Policy.Raw != 0x40000001 || !c.Policy.NoDebug || c.Policy.APIMinor != 0x40:
		t.Errorf("policy %+v", c.Policy)
	case c.ChipSerial != "NZA9T14052605":
		t.Errorf("chip serial %q", c.ChipSerial)
	case !bytes.Equal(c.ReportData, rd[:]):
		t.Errorf("report_data %x", c.ReportData)
	case !bytes.Equal(c.MNonce, wantMN):
		t.Errorf("mnonce %x", c.MNonce)
	case !bytes.Equal(c.Measure, wantMeasure):
		t.Errorf("measure %x", c.Measure)
	case c.Simulated || c.Root.Name != "HYGON HRK":
		t.Errorf("root %+v simulated %v", c.Root, c.Simulated)
	}
	t.Logf("claims: %+v", c)
}

func checkOf(err error) string {
	var ce *CheckError
	if errors.As(err, &ce) {
		return ce.Check
	}
	return ""
}

func TestRoundTrip(t *testing.T) {
	for _, name := range []string{"hrk.cert", "hsk.cert", "cek.cert", "hsk_cek.cert", "report.cert"} {
		b := readVector(t, name)
		var got []byte
		switch len(b) {
		case CACertSize:
			c, err := ParseCACert(b)
			if err != nil {
				t.Fatal(err)
			}
			got = c.Marshal()
		case CSVCertSize:
			c, err := ParseCSVCert(b)
			if err != nil {
				t.Fatal(err)
			}
			got = c.Marshal()
		case HSKCEKSize:
			h, c, err := ParseHSKCEK(b)
			if err != nil {
				t.Fatal(err)
			}
			got = MarshalHSKCEK(h, c)
		default:
			r, err := ParseReport(b)
			if err != nil {
				t.Fatal(err)
			}
			got = r.Marshal()
		}
		if !bytes.Equal(got, b) {
			t.Errorf("%s: Marshal(Parse(b)) != b", name)
		}
	}
	if !bytes.Equal(readVector(t, "hrk.cert"), builtinHRK) {
		t.Error("embedded hrk.cert differs from the shared vector")
	}
}

// TestMutations flips every byte of every signed or MAC-covered region of the
// real report and of each certificate; each change must be refused.
func TestMutations(t *testing.T) {
	report := readVector(t, "report.cert")
	hskcek := readVector(t, "hsk_cek.cert")
	hrkBytes := readVector(t, "hrk.cert")
	hrk, _ := ParseCACert(hrkBytes)
	tee := teeV1Len
	regions := []struct {
		name       string
		target     string // "report", "hsk_cek" or "hrk"
		start, end int
	}{
		{"report tee_info signed+xor", "report", 0, v1XORLen},
		{"report anonce", "report", 188, 192},
		{"report signature", "report", 192, 336},
		{"report pek/sn/reserved (mac)", "report", tee, tee + signerMACCovers},
		{"report mac", "report", tee + signerMACCovers, tee + signerLen},
		{"hsk signed body", "hsk_cek", 0, caSignedLen},
		{"hsk signature", "hsk_cek", caSignedLen, caSignedLen + sigSize},
		{"cek signed body", "hsk_cek", CACertSize, CACertSize + csvSignedLen},
		{"cek slot 0 usage/algo/sig", "hsk_cek", CACertSize + csvSignedLen, CACertSize + csvSignedLen + 8 + sigSize},
		{"hrk signed body", "hrk", 0, caSignedLen},
		{"hrk signature", "hrk", caSignedLen, caSignedLen + sigSize},
		// PEK changed and the MAC recomputed (anyone can: the mnonce is in
		// the report), so the PEK's signature by the CEK must catch it.
		{"pek signed body, mac recomputed", "pek", 0, csvSignedLen},
		{"pek slot 0, mac recomputed", "pek", csvSignedLen, csvSignedLen + 8 + sigSize},
	}
	ctx := context.Background()
	cases := 0
	for _, rg := range regions {
		for i := rg.start; i < rg.end; i++ {
			rep, hc, root := report, hskcek, hrkBytes
			switch rg.target {
			case "report":
				rep = bytes.Clone(report)
				rep[i] ^= 0x01
			case "hsk_cek":
				hc = bytes.Clone(hskcek)
				hc[i] ^= 0x01
			case "hrk":
				root = bytes.Clone(hrkBytes)
				root[i] ^= 0x01
			case "pek":
				r, _ := ParseReport(report)
				pb := r.PEK.Marshal()
				pb[i] ^= 0x01
				r.PEK, _ = ParseCSVCert(pb)
				r.MAC = r.ComputeMAC()
				rep = r.Marshal()
			}
			hsk, cek, err := ParseHSKCEK(hc)
			if err != nil {
				t.Fatal(err)
			}
			r, _ := ParseCACert(root)
			v := NewVerifier(VerifierOptions{TrustedRoots: []*CACert{r}, Certs: StaticSource{hsk, cek}})
			if _, err := v.Verify(ctx, rep, nil); err == nil {
				t.Errorf("%s: flipping byte %d was accepted", rg.name, i)
			} else if rg.target == "pek" && checkOf(err) != CheckPEK {
				t.Errorf("%s: byte %d failed at %q, want %q", rg.name, i, checkOf(err), CheckPEK)
			} else if checkOf(err) == "" {
				t.Errorf("%s: byte %d: error is not a *CheckError: %v", rg.name, i, err)
			}
			cases++
		}
	}
	t.Logf("%d single-byte mutations refused", cases)
	_ = hrk
}

func TestRefusals(t *testing.T) {
	ctx := context.Background()
	report := readVector(t, "report.cert")
	hsk, cek, _ := ParseHSKCEK(readVector(t, "hsk_cek.cert"))
	sim, err := NewSimulator("SIMCHIP1")
	if err != nil {
		t.Fatal(err)
	}
	// A PEK signed by another CEK: re-sign the real PEK with the simulator's CEK key.
	r, _ := ParseReport(report)
	otherPEK := *r.PEK
	otherPEK.Sigs[0].Sig, _ = signSM2(sim.keys[2], []byte("HYGON-SSD-CEK"), otherPEK.Marshal()[:csvSignedLen])
	r.PEK = &otherPEK
	r.MAC = r.ComputeMAC()
	pekByOtherCEK := r.Marshal()

	tests := []struct {
		name      string
		roots     []*CACert
		src       CertSource
		report    []byte
		rd        []byte
		wantCheck string
	}{
		{"wrong root", []*CACert{sim.HRK}, StaticSource{hsk, cek}, report, nil, CheckHSK},
		{"swapped hsk/cek source (simulator's CEK)", nil, StaticSource{hsk, sim.CEK}, report, nil, CheckCEK},
		{"simulator HSK under real root", nil, StaticSource{sim.HSK, cek}, report, nil, CheckHSK},
		{"pek signed by another cek", nil, StaticSource{hsk, cek}, pekByOtherCEK, nil, CheckPEK},
		{"wrong report_data", nil, StaticSource{hsk, cek}, report, []byte("other data"), CheckReportData},
		{"report_data too long", nil, StaticSource{hsk, cek}, report, make([]byte, 65), CheckReportData},
		{"truncated report", nil, StaticSource{hsk, cek}, report[:2000], nil, CheckParse},
		{"no cert source", nil, nil, report, nil, CheckFetch},
		{"chip unknown offline", nil, DirSource{Dir: t.TempDir()}, report, nil, CheckFetch},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			v := NewVerifier(VerifierOptions{TrustedRoots: tc.roots, Certs: tc.src})
			_, err := v.Verify(ctx, tc.report, tc.rd)
			if got := checkOf(err); got != tc.wantCheck {
				t.Fatalf("check %q (err %v), want %q", got, err, tc.wantCheck)
			}
		})
	}
}

func TestSimulatorReports(t *testing.T) {
	ctx := context.Background()
	sim, err := NewSimulator("SIMCHIP2")
	if err != nil {
		t.Fatal(err)
	}
	for _, version := range []int{1, 2} {
		vm := VMConfig{Version: version, Policy: 0x00010021, Build: 2337, RTMRVersion: 1}
		vm.Measure[0], vm.VMID[1], vm.RTMRs[4][31] = 0xaa, 0xbb, 0xcc
		if err := sim.SetVM(vm); err != nil {
			t.Fatal(err)
		}
		rep, err := sim.Report(ctx, []byte("nonce"))
		if err != nil {
			t.Fatal(err)
		}
		wantLen := map[int]int{1: ReportV1Size, 2: WrapperSize}[version]
		if len(rep) != wantLen {
			t.Errorf("v%d report is %d bytes, want %d", version, len(rep), wantLen)
		}
		r, err := ParseReport(rep)
		if err != nil || !bytes.Equal(r.Marshal(), rep) {
			t.Fatalf("v%d round trip: %v", version, err)
		}
		simV := NewVerifier(VerifierOptions{TrustedRoots: []*CACert{sim.HRK}, Certs: StaticSource{sim.HSK, sim.CEK}})
		c, err := simV.Verify(ctx, rep, []byte("nonce"))
		if err != nil {
			t.Fatalf("v%d against simulator root: %v", version, err)
		}
		if !c.Simulated || c.Version != version || c.Measure[0] != 0xaa || c.VMID[1] != 0xbb || c.Policy.Raw != 0x00010021 || !c.Policy.CSV || c.Policy.APIMajor != 1 || c.ChipSerial != "SIMCHIP2" {
			t.Errorf("v%d claims %+v", version, c)
		}
		if version == 2 && (c.Build != 2337 || len(c.RTMRs) != 5 || c.RTMRs[4][31] != 0xcc) {
			t.Errorf("v2 build/rtmrs %+v", c)
		}
		realV := NewVerifier(VerifierOptions{Certs: StaticSource{sim.HSK, sim.CEK}})
		if _, err := realV.Verify(ctx, rep, nil); checkOf(err) != CheckHSK {
			t.Errorf("v%d against real HRK: %v, want %q failure", version, err, CheckHSK)
		}
		// Every byte of the signed region, flipped, is refused (v2 is not XORed).
		signed := v1SignedLen
		off := 0
		if version == 2 {
			signed, off = v2SignedLen, 20
		}
		for i := 0; i < signed; i += 7 {
			m := bytes.Clone(rep)
			m[off+i] ^= 0x80
			if _, err := simV.Verify(ctx, m, nil); err == nil {
				t.Fatalf("v%d: flipped byte %d accepted", version, i)
			}
		}
	}
}

func TestSimulatorSaveLoad(t *testing.T) {
	dir := t.TempDir()
	sim, err := NewSimulator("SIMCHIP3")
	if err != nil {
		t.Fatal(err)
	}
	if err := sim.Save(dir); err != nil {
		t.Fatal(err)
	}
	loaded, err := LoadSimulator(dir)
	if err != nil {
		t.Fatal(err)
	}
	rep, err := loaded.Report(context.Background(), nil)
	if err != nil {
		t.Fatal(err)
	}
	root, _ := os.ReadFile(filepath.Join(dir, SimRootFile))
	hrk, err := ParseCACert(root)
	if err != nil {
		t.Fatal(err)
	}
	// The offline directory layout: <dir>/hsk_cek/<serial>/hsk_cek.cert.
	certDir := t.TempDir()
	bundle, _ := os.ReadFile(filepath.Join(dir, SimHSKCEKFile))
	os.MkdirAll(filepath.Join(certDir, "hsk_cek", "SIMCHIP3"), 0o755)
	os.WriteFile(filepath.Join(certDir, "hsk_cek", "SIMCHIP3", "hsk_cek.cert"), bundle, 0o644)
	v := NewVerifier(VerifierOptions{TrustedRoots: []*CACert{hrk}, Certs: DirSource{Dir: certDir}})
	if _, err := v.Verify(context.Background(), rep, nil); err != nil {
		t.Fatalf("loaded simulator's report: %v", err)
	}
	if _, err := OpenProvider(ProviderOptions{DevicePath: filepath.Join(dir, "no-device")}); !errors.Is(err, ErrNoDevice) {
		t.Errorf("OpenProvider without device or simulator: %v, want ErrNoDevice", err)
	}
	p, err := OpenProvider(ProviderOptions{DevicePath: filepath.Join(dir, "no-device"), SimulatorDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	if s, ok := p.(*Simulator); !ok || s.ChipSerial != "SIMCHIP3" {
		t.Errorf("OpenProvider gave %T, want the saved simulator", p)
	}
	// A directory with no simulator (a typo) is an error, not a new chip.
	typo := filepath.Join(t.TempDir(), "csv-simm")
	if _, err := OpenProvider(ProviderOptions{DevicePath: filepath.Join(dir, "no-device"), SimulatorDir: typo}); err == nil || !strings.Contains(err.Error(), "cvtpm csv simulate") {
		t.Errorf("OpenProvider with an empty simulator directory: %v", err)
	}
	if _, err := os.Stat(typo); err == nil {
		t.Errorf("OpenProvider created %s", typo)
	}
}

func TestOpenProviderPrefersDevice(t *testing.T) {
	dev := filepath.Join(t.TempDir(), "csv-guest")
	os.WriteFile(dev, nil, 0o600) // a regular file: exists, but ioctl fails
	p, err := OpenProvider(ProviderOptions{DevicePath: dev, SimulatorDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	d, ok := p.(*Device)
	if !ok {
		t.Fatalf("got %T, want *Device when the device node exists", p)
	}
	if _, err := d.Report(context.Background(), []byte("x")); err == nil {
		t.Fatal("ioctl on a regular file succeeded")
	}
	if _, err := d.Report(context.Background(), make([]byte, 65)); err == nil {
		t.Fatal("65-byte report_data accepted")
	}
}

// A root to trust must be a self-signed HRK: the real one and a
// simulator's load, an HSK, a flipped byte or garbage of the right size are
// refused at load.
func TestParseRoot(t *testing.T) {
	hrk, hsk := readVector(t, "hrk.cert"), readVector(t, "hsk.cert")
	if _, err := ParseRoot(hrk); err != nil {
		t.Fatalf("real HRK: %v", err)
	}
	sim, err := NewSimulator("SIMROOT01")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ParseRoot(sim.HRK.Marshal()); err != nil {
		t.Fatalf("simulator HRK: %v", err)
	}
	flipped := append([]byte(nil), hrk...)
	flipped[100] ^= 1
	for name, b := range map[string][]byte{"HSK": hsk, "flipped byte": flipped, "garbage": make([]byte, CACertSize), "short": hrk[:100]} {
		if _, err := ParseRoot(b); err == nil {
			t.Errorf("%s accepted as a root", name)
		}
	}
}
