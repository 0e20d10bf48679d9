package csv

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/big"
	"os"
	"path/filepath"
	"sync"

	"github.com/emmansun/gmsm/sm2"
)

// VMConfig is what the simulated firmware reports about the guest.
type VMConfig struct {
	Version          int         `json:"version"` // 1 or 2
	Measure          [32]byte    `json:"measure"`
	Policy           uint32      `json:"policy"`
	VMID             [16]byte    `json:"vm_id"`
	VMVersion        [16]byte    `json:"vm_version"`
	UserPubKeyDigest [32]byte    `json:"user_pubkey_digest"`
	Build            uint32      `json:"build"`        // v2
	RTMRVersion      uint16      `json:"rtmr_version"` // v2
	RTMRs            [5][32]byte `json:"rtmrs"`        // v2
}

// Simulator is a software HYGON secure processor: its own root (never the
// real HRK; its key id starts with "CVTPM-SIM-"), HSK, one chip's CEK and a
// PEK, and one guest's measurement and policy. It produces reports in exactly
// the real byte formats; verifiers mark results from its root Simulated.
type Simulator struct {
	HRK, HSK   *CACert
	CEK, PEK   *CSVCert
	ChipSerial string

	mu   sync.Mutex
	vm   VMConfig
	keys [4]*sm2.PrivateKey // hrk, hsk, cek, pek
}

var simKeyIDPrefix = []byte("CVTPM-SIM-")

// NewSimulator creates a chip with fresh keys and a default v1 guest.
func NewSimulator(chipSerial string) (*Simulator, error) {
	if err := validSerial(chipSerial); err != nil {
		return nil, err
	}
	s := &Simulator{ChipSerial: chipSerial, vm: VMConfig{Version: 1, Policy: 0x1}}
	for i := range s.keys {
		k, err := sm2.GenerateKey(randReader)
		if err != nil {
			return nil, fmt.Errorf("simulator key: %w", err)
		}
		s.keys[i] = k
	}
	if err := s.issue(); err != nil {
		return nil, err
	}
	return s, nil
}

func simKeyID() ([16]byte, error) {
	var id [16]byte
	copy(id[:], simKeyIDPrefix)
	_, err := io.ReadFull(randReader, id[len(simKeyIDPrefix):])
	return id, err
}

func setUID(field []byte, s string) uint16 {
	copy(field, s)
	return uint16(len(s))
}

// issue builds and signs the certificate chain from the keys.
func (s *Simulator) issue() error {
	hrkID, err := simKeyID()
	if err != nil {
		return err
	}
	hskID, err := simKeyID()
	if err != nil {
		return err
	}
	hrk := &CACert{Version: 1, KeyID: hrkID, SigKeyID: hrkID, Usage: UsageHRK, PubKey: PubKeyFromECDSA(&s.keys[0].PublicKey)}
	hrk.UIDSize = setUID(hrk.UserID[:], "HYGON-SSD-HRK")
	if hrk.Sig, err = signSM2(s.keys[0], []byte("HYGON-SSD-HRK"), hrk.Marshal()[:caSignedLen]); err != nil {
		return err
	}
	hsk := &CACert{Version: 1, KeyID: hskID, SigKeyID: hrkID, Usage: UsageHSK, PubKey: PubKeyFromECDSA(&s.keys[1].PublicKey)}
	hsk.UIDSize = setUID(hsk.UserID[:], "HYGON-SSD-HSK")
	if hsk.Sig, err = signSM2(s.keys[0], []byte("HYGON-SSD-HRK"), hsk.Marshal()[:caSignedLen]); err != nil {
		return err
	}
	cek, err := newCSVCert(UsageCEK, "HYGON-SSD-CEK", s.keys[2], s.keys[1], UsageHSK, "HYGON-SSD-HSK")
	if err != nil {
		return err
	}
	pek, err := newCSVCert(UsagePEK, "HYGON-SSD-PEK", s.keys[3], s.keys[2], UsageCEK, "HYGON-SSD-CEK")
	if err != nil {
		return err
	}
	s.HRK, s.HSK, s.CEK, s.PEK = hrk, hsk, cek, pek
	return nil
}

func newCSVCert(usage uint32, id string, key, signer *sm2.PrivateKey, signerUsage uint32, signerUID string) (*CSVCert, error) {
	c := &CSVCert{Version: 1, FirmwareMajor: 1, FirmwareMinor: 3, KeyUsage: usage, KeyAlgo: AlgoSM2SA, PubKey: PubKeyFromECDSA(&key.PublicKey)}
	c.UIDSize = setUID(c.UserID[:], id)
	c.Sigs[1].Usage = 0x1000 // csv-rs's "invalid" marker for an unused slot
	sig, err := signSM2(signer, []byte(signerUID), c.Marshal()[:csvSignedLen])
	if err != nil {
		return nil, err
	}
	c.Sigs[0] = SigSlot{Usage: signerUsage, Algo: AlgoSM2SA, Sig: sig}
	return c, nil
}

// SetVM replaces the guest the simulator reports on.
func (s *Simulator) SetVM(vm VMConfig) error {
	if vm.Version != 1 && vm.Version != 2 {
		return fmt.Errorf("report version %d: want 1 or 2", vm.Version)
	}
	s.mu.Lock()
	s.vm = vm
	s.mu.Unlock()
	return nil
}

// VM returns the guest configuration.
func (s *Simulator) VM() VMConfig {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.vm
}

// Report produces a signed report whose report_data is reportData (at most
// 64 bytes, zero padded), with a fresh mnonce, like the firmware does.
func (s *Simulator) Report(ctx context.Context, reportData []byte) ([]byte, error) {
	var mn [16]byte
	if _, err := io.ReadFull(randReader, mn[:]); err != nil {
		return nil, fmt.Errorf("mnonce: %w", err)
	}
	return s.ReportWithMNonce(ctx, reportData, mn)
}

// ReportWithMNonce is Report with the caller's mnonce, as the guest driver
// passes it.
func (s *Simulator) ReportWithMNonce(ctx context.Context, reportData []byte, mnonce [16]byte) ([]byte, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if len(reportData) > 64 {
		return nil, fmt.Errorf("report_data is %d bytes, at most 64", len(reportData))
	}
	vm := s.VM()
	r := &Report{
		Version: vm.Version, UserPubKeyDigest: vm.UserPubKeyDigest, VMID: vm.VMID, VMVersion: vm.VMVersion,
		MNonce: mnonce, Measure: vm.Measure, Policy: vm.Policy, SigUsage: UsagePEK, SigAlgo: AlgoSM2SA,
		PEK: s.PEK,
	}
	copy(r.ReportData[:], reportData)
	copy(r.SN[:], s.ChipSerial)
	if vm.Version == 2 {
		r.Build, r.RTMRVersion, r.RTMR = vm.Build, vm.RTMRVersion, vm.RTMRs
		r.Wrapped, r.WrapperMagic, r.WrapperFlags, r.PageLen = true, ExtMagic, 1, ReportPage
	} else {
		var a [4]byte
		if _, err := io.ReadFull(randReader, a[:]); err != nil {
			return nil, fmt.Errorf("anonce: %w", err)
		}
		r.Anonce = uint32(a[0]) | uint32(a[1])<<8 | uint32(a[2])<<16 | uint32(a[3])<<24
		r.PageLen = ReportV1Size
	}
	sig, err := signSM2(s.keys[3], []byte("HYGON-SSD-PEK"), r.SignedBytes())
	if err != nil {
		return nil, err
	}
	r.Sig = sig
	r.MAC = r.ComputeMAC()
	return r.Marshal(), nil
}

// Simulator directory layout, readable by `cvtpm csv verify`:
//
//	hrk.cert      the simulator's root (pass with --root)
//	hsk_cek.cert  the chip's HSK || CEK
//	sim.json      private keys, chip serial and guest config (mode 0600)
const (
	SimRootFile   = "hrk.cert"
	SimHSKCEKFile = "hsk_cek.cert"
	simStateFile  = "sim.json"
)

type simState struct {
	ChipSerial string    `json:"chip_serial"`
	HRK        string    `json:"hrk"`
	HSK        string    `json:"hsk"`
	CEK        string    `json:"cek"`
	PEK        string    `json:"pek_cert"`
	Keys       [4]string `json:"keys"` // hex private scalars: hrk, hsk, cek, pek
	VM         VMConfig  `json:"vm"`
}

// Save writes the simulator to dir so that later runs reuse the same chip.
func (s *Simulator) Save(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("simulator dir: %w", err)
	}
	st := simState{ChipSerial: s.ChipSerial, VM: s.VM(),
		HRK: hex.EncodeToString(s.HRK.Marshal()), HSK: hex.EncodeToString(s.HSK.Marshal()),
		CEK: hex.EncodeToString(s.CEK.Marshal()), PEK: hex.EncodeToString(s.PEK.Marshal())}
	for i, k := range s.keys {
		st.Keys[i] = hex.EncodeToString(k.D.FillBytes(make([]byte, 32)))
	}
	js, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return fmt.Errorf("simulator state: %w", err)
	}
	files := []struct {
		name string
		data []byte
		mode os.FileMode
	}{
		{simStateFile, js, 0o600},
		{SimRootFile, s.HRK.Marshal(), 0o644},
		{SimHSKCEKFile, MarshalHSKCEK(s.HSK, s.CEK), 0o644},
	}
	for _, f := range files {
		if err := os.WriteFile(filepath.Join(dir, f.name), f.data, f.mode); err != nil {
			return fmt.Errorf("simulator: %w", err)
		}
	}
	return nil
}

// LoadSimulator reads a simulator saved by Save.
func LoadSimulator(dir string) (*Simulator, error) {
	js, err := os.ReadFile(filepath.Join(dir, simStateFile))
	if err != nil {
		return nil, fmt.Errorf("simulator state: %w", err)
	}
	var st simState
	if err := json.Unmarshal(js, &st); err != nil {
		return nil, fmt.Errorf("simulator state %s: %w", dir, err)
	}
	s := &Simulator{ChipSerial: st.ChipSerial, vm: st.VM}
	for i, h := range st.Keys {
		d, err := hex.DecodeString(h)
		if err != nil {
			return nil, fmt.Errorf("simulator key %d: %w", i, err)
		}
		if s.keys[i], err = sm2.NewPrivateKeyFromInt(new(big.Int).SetBytes(d)); err != nil {
			return nil, fmt.Errorf("simulator key %d: %w", i, err)
		}
	}
	dec := func(what, h string, n int) ([]byte, error) {
		b, err := hex.DecodeString(h)
		if err == nil && len(b) != n {
			err = fmt.Errorf("%d bytes, want %d", len(b), n)
		}
		if err != nil {
			return nil, fmt.Errorf("simulator %s in %s: %w", what, dir, err)
		}
		return b, nil
	}
	b, err := dec("hrk", st.HRK, CACertSize)
	if err != nil {
		return nil, err
	}
	s.HRK, _ = ParseCACert(b)
	if b, err = dec("hsk", st.HSK, CACertSize); err != nil {
		return nil, err
	}
	s.HSK, _ = ParseCACert(b)
	if b, err = dec("cek", st.CEK, CSVCertSize); err != nil {
		return nil, err
	}
	s.CEK, _ = ParseCSVCert(b)
	if b, err = dec("pek", st.PEK, CSVCertSize); err != nil {
		return nil, err
	}
	s.PEK, _ = ParseCSVCert(b)
	want := PubKeyFromECDSA(&s.keys[3].PublicKey)
	if want != s.PEK.PubKey {
		return nil, errors.New("simulator state: PEK key does not match PEK certificate")
	}
	return s, s.SetVM(st.VM)
}
