package ca

import (
	"context"
	"fmt"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promauto"
)

// decisions counts every audited decision: kind is enroll, ak, identity or
// revoke; decision issued, refused or revoked; reason the refusal code
// (a fixed set, so the series stay few).
var decisions = promauto.NewCounterVec(prometheus.CounterOpts{
	Name: "cvtpm_ca_decisions_total",
	Help: "EK CA decisions by kind (enroll, ak, identity, revoke), decision and reason.",
}, []string{"kind", "decision", "reason"})

func countDecision(kind string, e AuditEntry) {
	reason := e.Reason
	if e.Decision == "issued" {
		reason = ""
	}
	decisions.WithLabelValues(kind, e.Decision, reason).Inc()
}

// preAppraisal are the refusals of requests that never reached a decision
// about an instance (malformed, or answering no challenge this CA gave):
// anyone can send them, so they are audited within a rate per source.
var preAppraisal = map[string]bool{ReasonBadRequest: true, ReasonNonce: true, ReasonNonceExpired: true}

// audit counts a decision and records it. Every appraisal is recorded;
// pre-appraisal refusals beyond 10 per 10 s from one source are counted
// into the next one recorded, so the audit log cannot be grown at an
// unauthenticated client's request rate.
func (a *Authority) audit(ctx context.Context, kind string, e AuditEntry) error {
	countDecision(kind, e)
	if e.Decision == "refused" && preAppraisal[e.Reason] {
		ok, held := a.requestAudit.Allow(sourceOf(ctx) + " " + e.Reason)
		if !ok {
			return nil
		}
		if held > 0 {
			e.Detail += fmt.Sprintf(" (and %d such refusals from this source before, not recorded one by one)", held)
		}
	}
	return a.Audit.Record(ctx, e)
}
