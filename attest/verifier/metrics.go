package verifier

import (
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promauto"
)

// verdicts counts appraisals per EAR submodule (leg) by status and first
// reason (reason codes are a fixed set, PCR indices at most 24).
var verdicts = promauto.NewCounterVec(prometheus.CounterOpts{
	Name: "cvtpm_verifier_verdicts_total",
	Help: "Verifier verdicts by submodule (cvtpm-vtpm, csv-platform, csv-workload), status and first reason.",
}, []string{"submodule", "status", "reason"})

func countVerdicts(submods map[string]Submod) {
	for name, s := range submods {
		reason := ""
		if len(s.Reasons) > 0 {
			reason = s.Reasons[0]
		}
		verdicts.WithLabelValues(name, s.Status, reason).Inc()
	}
}
