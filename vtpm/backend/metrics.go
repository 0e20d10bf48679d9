package backend

import (
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promauto"
)

// The backend's metrics (all supervisors of the process together).
var (
	instancesGauge = promauto.NewGauge(prometheus.GaugeOpts{
		Name: "cvtpm_backend_instances",
		Help: "vTPM instances this backend holds.",
	})
	workerRestarts = promauto.NewCounter(prometheus.CounterOpts{
		Name: "cvtpm_backend_worker_restarts_total",
		Help: "Instance workers restarted after they died.",
	})
	workersStarted = promauto.NewCounter(prometheus.CounterOpts{
		Name: "cvtpm_backend_worker_processes_started_total",
		Help: "Worker processes started: for instances' starts and restarts, and spares started ahead of need.",
	})
	calls = promauto.NewHistogramVec(prometheus.HistogramOpts{
		Name:    "cvtpm_backend_call_seconds",
		Help:    "Calls to instances by operation (execute, the swtpm control operations), with their latency.",
		Buckets: []float64{25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 0.1, 0.5, 2.5},
	}, []string{"op"})
	directSessions = promauto.NewGauge(prometheus.GaugeOpts{
		Name: "cvtpm_backend_direct_sessions",
		Help: "Attested link sessions handed to instances' workers (direct sessions) and still open.",
	})
	directCalls = promauto.NewCounter(prometheus.CounterOpts{
		Name: "cvtpm_backend_direct_calls_total",
		Help: "Calls that instances' workers answered on direct sessions (reported by each worker every second; the supervisor does not see them).",
	})
	directCallSeconds = promauto.NewCounter(prometheus.CounterOpts{
		Name: "cvtpm_backend_direct_call_seconds_total",
		Help: "Time instances' workers spent answering calls on direct sessions, from a whole record received to its answer written: divided by cvtpm_backend_direct_calls_total, their mean latency in the backend.",
	})
	refusedCalls = promauto.NewCounterVec(prometheus.CounterOpts{
		Name: "cvtpm_backend_calls_refused_total",
		Help: "Calls refused for the caller's capabilities, by operation.",
	}, []string{"op"})
)
