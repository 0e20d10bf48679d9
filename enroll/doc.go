// Package enroll is the enrollment protocol between a vTPM backend and the
// EK CA: what the CSV report's report_data commits to (ReportData), so the
// CA can tell that this EK of this instance lives in the attested CVM.
//
// Landed so far: the binding. The client (EK creation, CA call, NV writes)
// is tracked in issue 5.
package enroll
