package freshreport

import (
	"encoding/binary"
	"testing"
)

func getCap(capability, property, count uint32) []byte {
	b := []byte{0x80, 0x01, 0, 0, 0, 22, 0, 0, 0x01, 0x7a}
	for _, v := range []uint32{capability, property, count} {
		b = binary.BigEndian.AppendUint32(b, v)
	}
	return b
}

func capResp(moreData byte, capability uint32, items ...uint32) []byte {
	b := []byte{0x80, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, moreData}
	b = binary.BigEndian.AppendUint32(b, capability)
	n := len(items)
	if capability == capTPMProperties {
		n /= 2
	}
	b = binary.BigEndian.AppendUint32(b, uint32(n))
	for _, v := range items {
		b = binary.BigEndian.AppendUint32(b, v)
	}
	binary.BigEndian.PutUint32(b[2:], uint32(len(b)))
	return b
}

func TestAmendCapability(t *testing.T) {
	for _, tc := range []struct {
		name      string
		cmd, resp []byte
		want      []byte
	}{
		{"the whole list, as the kernel asks", getCap(capCommands, 0x11f, 3), capResp(0, capCommands, 0x11f, 0x120),
			capResp(0, capCommands, 0x11f, 0x120, CommandAttributes)},
		{"a page with more to come", getCap(capCommands, 0x11f, 2), capResp(1, capCommands, 0x11f, 0x120),
			capResp(1, capCommands, 0x11f, 0x120)},
		{"no room", getCap(capCommands, 0x11f, 2), capResp(0, capCommands, 0x11f, 0x120),
			capResp(0, capCommands, 0x11f, 0x120)},
		{"asked from past it", getCap(capCommands, 0x20000102, 8), capResp(0, capCommands),
			capResp(0, capCommands)},
		{"total commands", getCap(capTPMProperties, 0x128, 2), capResp(0, capTPMProperties, 0x128, 7, ptTotalCommands, 112),
			capResp(0, capTPMProperties, 0x128, 7, ptTotalCommands, 113)},
		{"another capability", getCap(0x5, 0, 1), capResp(0, 0x5, 1), capResp(0, 0x5, 1)},
		{"an error response", getCap(capCommands, 0x11f, 3), []byte{0x80, 0x01, 0, 0, 0, 10, 0, 0, 0x01, 0x01}, []byte{0x80, 0x01, 0, 0, 0, 10, 0, 0, 0x01, 0x01}},
		{"a truncated response", getCap(capCommands, 0x11f, 3), capResp(0, capCommands, 0x11f)[:16], capResp(0, capCommands, 0x11f)[:16]},
	} {
		if got := AmendCapability(tc.cmd, tc.resp); string(got) != string(tc.want) {
			t.Errorf("%s:\n got %x\nwant %x", tc.name, got, tc.want)
		}
	}
}

func FuzzAmendCapability(f *testing.F) {
	f.Add(getCap(capCommands, 0x11f, 3), capResp(0, capCommands, 0x11f, 0x120))
	f.Add(getCap(capTPMProperties, 0x128, 2), capResp(0, capTPMProperties, 0x128, 7, ptTotalCommands, 112))
	f.Fuzz(func(t *testing.T, cmd, resp []byte) {
		out := AmendCapability(cmd, resp)
		if len(out) != len(resp) && len(out) != len(resp)+4 {
			t.Fatalf("length %d from %d", len(out), len(resp))
		}
	})
}
