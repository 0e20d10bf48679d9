package ca

import (
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
