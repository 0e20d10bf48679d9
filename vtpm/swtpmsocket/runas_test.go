package swtpmsocket

import (
	"os/user"
	"slices"
	"strconv"
	"strings"
	"testing"
)

func TestLookupRunAs(t *testing.T) {
	root, err := user.Lookup("root")
	if err != nil {
		t.Skipf("no root in /etc/passwd: %v", err)
	}
	rootGroups, err := root.GroupIds()
	if err != nil {
		t.Fatal(err)
	}
	var wantRootGroups []int
	for _, g := range rootGroups {
		n, _ := strconv.Atoi(g)
		wantRootGroups = append(wantRootGroups, n)
	}
	tests := []struct {
		spec     string
		uid, gid int
		groups   []int
		wantErr  string
	}{
		{spec: "65534", uid: 65534, gid: 65534, groups: []int{}},
		{spec: "0", uid: 0, gid: 0, groups: []int{}},
		{spec: "+65534", uid: 65534, gid: 65534, groups: []int{}},
		{spec: " 65534", uid: 65534, gid: 65534, groups: []int{}},
		{spec: "+", wantErr: "unknown user +"},
		{spec: "root", uid: 0, gid: 0, groups: wantRootGroups},
		{spec: "4294967295", wantErr: `means "unchanged"`},
		{spec: "99999999999", wantErr: "uid outside the valid range"},
		{spec: "no-such-user-cvtpm", wantErr: "unknown user no-such-user-cvtpm"},
	}
	for _, tc := range tests {
		t.Run(tc.spec, func(t *testing.T) {
			uid, gid, groups, err := lookupRunAs(tc.spec)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("lookupRunAs(%q) = %d %d %v, %v; want an error with %q", tc.spec, uid, gid, groups, err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if uid != tc.uid || gid != tc.gid || !slices.Equal(groups, tc.groups) {
				t.Errorf("lookupRunAs(%q) = uid %d gid %d groups %v; want %d %d %v", tc.spec, uid, gid, groups, tc.uid, tc.gid, tc.groups)
			}
		})
	}
}
