package engine

import (
	"bytes"
	"encoding/binary"
	"errors"
	"testing"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"cvtpm/vtpm/engine/memstore"
)

func newMem() *memstore.Store { return memstore.New() }

// tpmTransport lets go-tpm drive the engine directly.
type tpmTransport struct{ t *TPM }

func (tt tpmTransport) Send(cmd []byte) ([]byte, error) { return tt.t.Execute(nil, cmd), nil }

func transportOf(t *TPM) transport.TPM { return tpmTransport{t} }

func rcOf(resp []byte) uint32 { return binary.BigEndian.Uint32(resp[6:10]) }

// startTPM creates, initializes and starts up a TPM on store.
func startTPM(t *testing.T, store Storage) *TPM {
	t.Helper()
	tpm, err := New(store, nil)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(tpm.Close)
	if rc := tpm.Init(0); rc != 0 {
		t.Fatalf("Init: rc 0x%x", rc)
	}
	if _, err := (tpm2.Startup{StartupType: tpm2.TPMSUClear}).Execute(transportOf(tpm)); err != nil {
		t.Fatalf("Startup: %v", err)
	}
	return tpm
}

func TestStoppedTPMAnswersFailure(t *testing.T) {
	tpm, err := New(newMem(), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer tpm.Close()
	getRandom := []byte{0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x7b, 0, 8}
	tests := []struct {
		name string
		cmd  []byte
		want []byte
	}{
		{"stopped", getRandom, []byte{0x80, 0x01, 0, 0, 0, 10, 0, 0, 0x01, 0x01}},
	}
	for _, tc := range tests {
		if got := tpm.Execute(nil, tc.cmd); !bytes.Equal(got, tc.want) {
			t.Errorf("%s: got % x, want % x", tc.name, got, tc.want)
		}
	}
	if _, rc := tpm.Established(); rc != RCBadOrdinal {
		t.Errorf("Established while stopped: rc %d, want %d", rc, RCBadOrdinal)
	}
	if rc := tpm.Init(0); rc != 0 {
		t.Fatalf("Init: %x", rc)
	}
	if got := tpm.Execute(nil, []byte{0x80, 0x01, 0, 0}); rcOf(got) != tpm2RCInsufficient {
		t.Errorf("short command: got % x, want TPM_RC_INSUFFICIENT", got)
	}
	if got := tpm.Execute(nil, getRandom); rcOf(got) != 0x100 { // TPM_RC_INITIALIZE: no Startup yet
		t.Errorf("GetRandom before Startup: got % x, want TPM_RC_INITIALIZE", got)
	}
}

func TestOneTPMPerProcess(t *testing.T) {
	tpm, err := New(newMem(), nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := New(newMem(), nil); !errors.Is(err, ErrInUse) {
		t.Errorf("second New: err %v, want ErrInUse", err)
	}
	tpm.Close()
	again, err := New(newMem(), nil)
	if err != nil {
		t.Fatalf("New after Close: %v", err)
	}
	again.Close()
}

func TestCommands(t *testing.T) {
	tpm := startTPM(t, newMem())
	tr := transportOf(tpm)
	rnd, err := (tpm2.GetRandom{BytesRequested: 16}).Execute(tr)
	if err != nil || len(rnd.RandomBytes.Buffer) != 16 {
		t.Fatalf("GetRandom: %v, %d bytes", err, len(rnd.RandomBytes.Buffer))
	}
	digest := bytes.Repeat([]byte{1}, 32)
	if _, err := (tpm2.PCRExtend{
		PCRHandle: tpm2.AuthHandle{Handle: tpm2.TPMHandle(0), Auth: tpm2.PasswordAuth(nil)},
		Digests:   tpm2.TPMLDigestValues{Digests: []tpm2.TPMTHA{{HashAlg: tpm2.TPMAlgSHA256, Digest: digest}}},
	}).Execute(tr); err != nil {
		t.Fatalf("PCR_Extend: %v", err)
	}
	rd, err := (tpm2.PCRRead{PCRSelectionIn: tpm2.TPMLPCRSelection{PCRSelections: []tpm2.TPMSPCRSelection{
		{Hash: tpm2.TPMAlgSHA256, PCRSelect: tpm2.PCClientCompatible.PCRs(0)}}}}).Execute(tr)
	if err != nil {
		t.Fatalf("PCR_Read: %v", err)
	}
	// PCR0 = SHA256(zeros(32) || digest)
	want := sha256Of(append(make([]byte, 32), digest...))
	if got := rd.PCRValues.Digests[0].Buffer; !bytes.Equal(got, want) {
		t.Errorf("PCR0 = %x, want %x", got, want)
	}
}

func TestLocality(t *testing.T) {
	tpm := startTPM(t, newMem())
	extend17 := func(loc uint8) uint32 {
		cmd, err := commandBytes(tpm2.PCRExtend{
			PCRHandle: tpm2.AuthHandle{Handle: tpm2.TPMHandle(17), Auth: tpm2.PasswordAuth(nil)},
			Digests:   tpm2.TPMLDigestValues{Digests: []tpm2.TPMTHA{{HashAlg: tpm2.TPMAlgSHA256, Digest: make([]byte, 32)}}},
		})
		if err != nil {
			t.Fatal(err)
		}
		return rcOf(tpm.ExecuteAt(nil, cmd, loc))
	}
	tests := []struct {
		loc    uint8
		wantOK bool
	}{
		{0, false}, // PCR 17 is a DRTM PCR: not extendable at locality 0
		{4, true},
	}
	for _, tc := range tests {
		rc := extend17(tc.loc)
		if (rc == 0) != tc.wantOK {
			t.Errorf("PCR_Extend(17) at locality %d: rc 0x%x, want ok=%v", tc.loc, rc, tc.wantOK)
		}
		if got := tpm.Locality(); got != tc.loc {
			t.Errorf("locality after ExecuteAt(%d) = %d", tc.loc, got)
		}
	}
	if rc := tpm.SetLocality(5); rc != RCBadLocality {
		t.Errorf("SetLocality(5): rc %d, want %d", rc, RCBadLocality)
	}
}

func TestEstablishedFlagAndHash(t *testing.T) {
	tpm := startTPM(t, newMem())
	if est, rc := tpm.Established(); rc != 0 || est {
		t.Fatalf("fresh TPM: established=%v rc=%d, want false", est, rc)
	}
	for _, step := range []func() uint32{tpm.HashStart, func() uint32 { return tpm.HashData([]byte("dl")) }, tpm.HashEnd} {
		if rc := step(); rc != 0 {
			t.Fatalf("hash sequence: rc 0x%x", rc)
		}
	}
	if est, _ := tpm.Established(); !est {
		t.Errorf("after _TPM_Hash_End: established=false, want true")
	}
	if rc := tpm.ResetEstablished(3); rc != 0 {
		t.Fatalf("ResetEstablished(3): rc 0x%x", rc)
	}
	if est, _ := tpm.Established(); est {
		t.Errorf("after ResetEstablished: established=true")
	}
}

func TestBufferSize(t *testing.T) {
	tpm := startTPM(t, newMem())
	if _, _, _, err := tpm.SetBufferSize(3000); !errors.Is(err, ErrRunning) {
		t.Errorf("SetBufferSize while running: err %v, want ErrRunning", err)
	}
	cur, lo, hi, err := tpm.SetBufferSize(0)
	if err != nil || cur != hi || lo == 0 || lo > hi {
		t.Fatalf("query: cur=%d min=%d max=%d err=%v", cur, lo, hi, err)
	}
	tpm.Stop()
	tests := []struct{ wanted, want uint32 }{
		{1, lo},
		{hi + 100000, hi},
		{lo + 1, lo + 1},
		{0, lo + 1}, // a query keeps the size
	}
	for _, tc := range tests {
		got, _, _, err := tpm.SetBufferSize(tc.wanted)
		if err != nil || got != tc.want {
			t.Errorf("SetBufferSize(%d) = %d, %v; want %d", tc.wanted, got, err, tc.want)
		}
	}
	tpm.SetBufferSize(hi)
}

func TestStateRoundTripAndDeleteVolatile(t *testing.T) {
	src := newMem()
	tpm := startTPM(t, src)
	tr := transportOf(tpm)
	const idx = tpm2.TPMHandle(0x01500016)
	value := []byte("cvtpm-NV")
	if _, err := (tpm2.NVDefineSpace{
		AuthHandle: tpm2.TPMRHOwner,
		PublicInfo: tpm2.New2B(tpm2.TPMSNVPublic{NVIndex: idx, NameAlg: tpm2.TPMAlgSHA256,
			Attributes: tpm2.TPMANV{OwnerWrite: true, OwnerRead: true, AuthRead: true, AuthWrite: true, NT: tpm2.TPMNTOrdinary},
			DataSize:   uint16(len(value))}),
	}).Execute(tr); err != nil {
		t.Fatalf("NV_DefineSpace: %v", err)
	}
	pub, err := (tpm2.NVReadPublic{NVIndex: idx}).Execute(tr)
	if err != nil {
		t.Fatal(err)
	}
	nv := tpm2.NamedHandle{Handle: idx, Name: pub.NVName}
	if _, err := (tpm2.NVWrite{AuthHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)},
		NVIndex: nv, Data: tpm2.TPM2BMaxNVBuffer{Buffer: value}}).Execute(tr); err != nil {
		t.Fatalf("NV_Write: %v", err)
	}
	perm, rc := tpm.GetState(StatePermanent)
	if rc != 0 || len(perm) == 0 {
		t.Fatalf("GetState(permanent): rc 0x%x, %d bytes", rc, len(perm))
	}
	vol, rc := tpm.GetState(StateVolatile)
	if rc != 0 || len(vol) == 0 {
		t.Fatalf("GetState(volatile): rc 0x%x, %d bytes", rc, len(vol))
	}
	if src.Has(BlobVolatile) {
		t.Errorf("volatile state left in storage after GetState")
	}
	if _, rc := tpm.GetState(StateSaveState); rc != uint32(0x800) {
		t.Errorf("GetState(savestate) with none: rc 0x%x, want TPM_RETRY", rc)
	}
	if rc := tpm.SetState(StatePermanent, perm); rc != RCBadOrdinal {
		t.Errorf("SetState while running: rc %d, want %d", rc, RCBadOrdinal)
	}
	if rc := tpm.StoreVolatile(); rc != 0 || !src.Has(BlobVolatile) {
		t.Fatalf("StoreVolatile: rc 0x%x", rc)
	}
	if rc := tpm.Init(InitDeleteVolatile); rc != 0 || src.Has(BlobVolatile) {
		t.Errorf("Init(delete-volatile): rc 0x%x, volatile still stored=%v", rc, src.Has(BlobVolatile))
	}
	tpm.Close()

	// A second TPM gets the first one's permanent and volatile state.
	dst := newMem()
	tpm2nd, err := New(dst, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer tpm2nd.Close()
	// Garbage is refused and not stored: the state stays as it was.
	garbage := bytes.Repeat([]byte{0xa5}, 1000)
	if rc := tpm2nd.SetState(StatePermanent, garbage); rc == 0 {
		t.Errorf("SetState(permanent, garbage) accepted")
	}
	if dst.Has(BlobPermanent) {
		t.Errorf("a refused permanent blob was stored")
	}
	if rc := tpm2nd.SetState(StatePermanent, perm); rc != 0 {
		t.Fatalf("SetState(permanent): rc 0x%x", rc)
	}
	if rc := tpm2nd.SetState(StateVolatile, vol); rc != 0 {
		t.Fatalf("SetState(volatile): rc 0x%x", rc)
	}
	if rc := tpm2nd.Init(0); rc != 0 {
		t.Fatalf("Init: rc 0x%x", rc)
	}
	// The volatile state resumes the started TPM: no Startup needed.
	rd, err := (tpm2.NVRead{AuthHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)},
		NVIndex: nv, Size: uint16(len(value))}).Execute(transportOf(tpm2nd))
	if err != nil {
		t.Fatalf("NV_Read on the second TPM: %v", err)
	}
	if !bytes.Equal(rd.Data.Buffer, value) {
		t.Errorf("NV value = %q, want %q", rd.Data.Buffer, value)
	}
}

func TestInfo(t *testing.T) {
	tpm := startTPM(t, newMem())
	tests := []struct {
		flags uint64
		want  string
	}{
		{1, `"TPMSpecification"`},
		{2, `"TPMAttributes"`},
		{4, `"RSAKeySizes"`},
	}
	for _, tc := range tests {
		got, err := tpm.Info(tc.flags)
		if err != nil || !bytes.Contains([]byte(got), []byte(tc.want)) {
			t.Errorf("Info(%d) = %q, %v; want it to contain %s", tc.flags, got, err, tc.want)
		}
	}
}

// Execute appends to dst: into its spare capacity when the response fits,
// growing it (the response waits under the lock) when it does not; the
// bytes before len(dst) are kept either way.
func TestExecuteAppends(t *testing.T) {
	tpm := startTPM(t, newMem())
	getRandom := []byte{0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x7b, 0, 32} // a 44-byte answer
	tests := []struct {
		name string
		dst  []byte
	}{
		{"nil", nil},
		{"no room", []byte("prefix")},
		{"room for an error only", append(make([]byte, 0, 16), "pre"...)},
		{"room", append(make([]byte, 0, 4096), "prefix"...)},
	}
	for _, tc := range tests {
		pre := bytes.Clone(tc.dst)
		got := tpm.Execute(tc.dst, getRandom)
		if !bytes.Equal(got[:len(pre)], pre) || len(got) != len(pre)+44 || rcOf(got[len(pre):]) != 0 {
			t.Errorf("%s: got % x", tc.name, got)
		}
	}
	// The lock was released every time.
	if _, rc := tpm.Established(); rc != 0 {
		t.Errorf("Established after the appends: rc %d", rc)
	}
}
