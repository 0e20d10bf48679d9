package csv

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"
)

// DefaultCertDir is where HYGON tooling and trustee keep offline
// certificates: <dir>/hsk_cek/<chip serial>/hsk_cek.cert.
const DefaultCertDir = "/opt/hygon/csv"

// DefaultKDS is HYGON's key distribution service.
const DefaultKDS = "https://cert.hygon.cn"

// validSerial rejects serials that could escape a directory or a query.
func validSerial(sn string) error {
	if sn == "" || len(sn) > 64 {
		return fmt.Errorf("chip serial %q: want 1..64 characters", sn)
	}
	for _, c := range sn {
		if !(c >= '0' && c <= '9' || c >= 'A' && c <= 'Z' || c >= 'a' && c <= 'z' || c == '-' || c == '_') {
			return fmt.Errorf("chip serial %q: only letters, digits, '-' and '_' allowed", sn)
		}
	}
	return nil
}

// StaticSource returns one HSK+CEK pair for every chip (a bundle given on
// the command line or carried in the evidence).
type StaticSource struct {
	HSK *CACert
	CEK *CSVCert
}

// HSKCEK returns the fixed pair.
func (s StaticSource) HSKCEK(context.Context, string) (*CACert, *CSVCert, error) {
	if s.HSK == nil || s.CEK == nil {
		return nil, nil, errors.New("static source has no HSK/CEK")
	}
	return s.HSK, s.CEK, nil
}

// DirSource reads <Dir>/hsk_cek/<serial>/hsk_cek.cert, the offline layout
// used by HYGON tooling and trustee.
type DirSource struct{ Dir string }

// HSKCEK reads and parses the bundle for chipSerial.
func (d DirSource) HSKCEK(ctx context.Context, chipSerial string) (*CACert, *CSVCert, error) {
	if err := validSerial(chipSerial); err != nil {
		return nil, nil, err
	}
	p := filepath.Join(d.Dir, "hsk_cek", chipSerial, "hsk_cek.cert")
	b, err := os.ReadFile(p)
	if err != nil {
		return nil, nil, fmt.Errorf("offline HSK/CEK: %w", err)
	}
	hsk, cek, err := ParseHSKCEK(b)
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %w", p, err)
	}
	return hsk, cek, nil
}

// HTTPSource fetches <BaseURL>/hsk_cek?snumber=<serial> from a KDS.
type HTTPSource struct {
	BaseURL string        // DefaultKDS if empty
	Client  *http.Client  // http.DefaultClient if nil
	Timeout time.Duration // per fetch; 10s if zero
}

// HSKCEK fetches and parses the bundle for chipSerial.
func (h HTTPSource) HSKCEK(ctx context.Context, chipSerial string) (*CACert, *CSVCert, error) {
	if err := validSerial(chipSerial); err != nil {
		return nil, nil, err
	}
	base := h.BaseURL
	if base == "" {
		base = DefaultKDS
	}
	timeout := h.Timeout
	if timeout == 0 {
		timeout = 10 * time.Second
	}
	client := h.Client
	if client == nil {
		client = http.DefaultClient
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	u := strings.TrimRight(base, "/") + "/hsk_cek?snumber=" + url.QueryEscape(chipSerial)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, nil, fmt.Errorf("KDS request: %w", err)
	}
	resp, err := client.Do(req)
	if err != nil {
		return nil, nil, fmt.Errorf("KDS fetch %s: %w", u, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, nil, fmt.Errorf("KDS fetch %s: HTTP %s", u, resp.Status)
	}
	b, err := io.ReadAll(io.LimitReader(resp.Body, HSKCEKSize+1))
	if err != nil {
		return nil, nil, fmt.Errorf("KDS read %s: %w", u, err)
	}
	hsk, cek, err := ParseHSKCEK(b)
	if err != nil {
		return nil, nil, fmt.Errorf("KDS %s: %w", u, err)
	}
	return hsk, cek, nil
}

// CachedSource remembers successful lookups of Source for TTL, so a KDS is
// asked at most once per chip per TTL. Failures are not cached.
type CachedSource struct {
	Source CertSource
	TTL    time.Duration
	Now    func() time.Time // time.Now if nil; settable for tests

	mu      sync.Mutex
	entries map[string]cachedPair
}

type cachedPair struct {
	hsk     *CACert
	cek     *CSVCert
	expires time.Time
}

// HSKCEK returns a cached pair or asks Source.
func (c *CachedSource) HSKCEK(ctx context.Context, chipSerial string) (*CACert, *CSVCert, error) {
	now := time.Now
	if c.Now != nil {
		now = c.Now
	}
	c.mu.Lock()
	e, ok := c.entries[chipSerial]
	c.mu.Unlock()
	if ok && now().Before(e.expires) {
		return e.hsk, e.cek, nil
	}
	hsk, cek, err := c.Source.HSKCEK(ctx, chipSerial)
	if err != nil {
		slog.WarnContext(ctx, "csv: HSK/CEK lookup failed", "chip", chipSerial, "err", err)
		return nil, nil, err
	}
	slog.DebugContext(ctx, "csv: HSK/CEK fetched and cached", "chip", chipSerial, "ttl", c.TTL)
	c.mu.Lock()
	if c.entries == nil {
		c.entries = map[string]cachedPair{}
	}
	c.entries[chipSerial] = cachedPair{hsk, cek, now().Add(c.TTL)}
	c.mu.Unlock()
	return hsk, cek, nil
}

// ErrEvidenceCertsWithChipLists: chip allow/deny lists cannot be enforced
// with the HSK+CEK the evidence carries.
var ErrEvidenceCertsWithChipLists = errors.New("the policy's allow_chips/deny_chips need HSK+CEK looked up by chip serial (an offline directory or the KDS); with the pair the evidence carries, the serial is the evidence's own claim")

// SelectCertSource is where a relying party (the CA, the link's clients,
// the verifier) gets a reporting chip's HSK+CEK, one of:
//
//   - dir: the offline directory (DirSource), looked up by chip serial;
//   - kds: HYGON's KDS at that URL, looked up by chip serial, cached a day;
//   - fromEvidence: the pair the evidence carries (returned as nil: the
//     caller uses the evidence's pair).
//
// With neither dir nor fromEvidence it is the KDS (DefaultKDS if kds is
// empty). The chip serial in a report is not covered by the firmware's
// signature (only by a MAC whose key the report carries): with the pair
// taken from the evidence a forged serial passes, so a policy with chip
// allow/deny lists is refused in that mode. Looked up by serial, a forged
// one finds no CEK that signed the report.
func SelectCertSource(dir, kds string, fromEvidence bool, policy *AppraisalPolicy) (CertSource, error) {
	switch {
	case fromEvidence && (dir != "" || kds != ""):
		return nil, errors.New("the evidence's own HSK+CEK exclude an offline directory and a KDS")
	case dir != "" && kds != "":
		return nil, errors.New("an offline HSK+CEK directory and a KDS exclude each other")
	case fromEvidence:
		if policy != nil && (len(policy.AllowChips) > 0 || len(policy.DenyChips) > 0) {
			return nil, ErrEvidenceCertsWithChipLists
		}
		return nil, nil
	case dir != "":
		if fi, err := os.Stat(filepath.Join(dir, "hsk_cek")); err != nil || !fi.IsDir() {
			return nil, fmt.Errorf("offline HSK+CEK directory %s: no hsk_cek/<chip serial>/ in it", dir)
		}
		return DirSource{Dir: dir}, nil
	default:
		return &CachedSource{Source: HTTPSource{BaseURL: kds, Timeout: 15 * time.Second}, TTL: 24 * time.Hour}, nil
	}
}
