# cvtpm's default appraisal policy. Input: the verified facts (see
# verifier.Facts); data.reference: reference values from a JSON file, e.g.
#   {"pcrs": {"sha256": {"16": "ab12..."}}}
# The result is one entry per EAR submodule, with a status and reasons:
# cvtpm-vtpm (the quote), csv-platform (the backend hosting the vTPM) and,
# when present or required, csv-workload (the workload VM itself).
package cvtpm

nonce_reasons contains r if {
	not input.nonce.ok
	r := input.nonce.reason
}

vtpm_reasons contains r if some r in nonce_reasons

vtpm_reasons contains r if {
	not input.tpm.ek_trusted
	r := input.tpm.ek_reason
}

vtpm_reasons contains "ek-certificate-revoked" if input.tpm.ek_revoked

vtpm_reasons contains r if {
	not input.tpm.ak_bound
	r := input.tpm.ak_reason
}

vtpm_reasons contains r if {
	not input.tpm.quote_ok
	r := input.tpm.quote_reason
}

# A reference PCR that differs, or is missing from the quote, is a reason.
vtpm_reasons contains sprintf("pcr-%s-not-reference", [i]) if {
	input.tpm.quote_ok
	some i, want in data.reference.pcrs.sha256
	not pcr_matches(i, want)
}

pcr_matches(i, want) if lower(input.tpm.pcrs[i]) == lower(want)

csv_reasons contains r if some r in nonce_reasons

csv_reasons contains r if {
	not input.csv.report_ok
	r := input.csv.reason
}

# The fresh report must come from the chip and CVM image that the EK
# certificate's CSV claims record.
csv_reasons contains ek_claims_reason if {
	input.csv.report_ok
	not input.csv.matches_ek_claims
}

default ek_claims_reason := "csv-report-from-another-backend"

ek_claims_reason := input.csv.ek_claims_reason if input.csv.ek_claims_reason != ""

csv_warnings contains "simulated-csv-evidence" if input.csv.simulated

status(reasons, warnings) := "contraindicated" if count(reasons) > 0

status(reasons, warnings) := "warning" if {
	count(reasons) == 0
	count(warnings) > 0
}

status(reasons, warnings) := "affirming" if {
	count(reasons) == 0
	count(warnings) == 0
}

# The workload leg: the workload VM's own CSV report, when it sent one or
# the verifier requires one.
workload_reasons contains r if {
	workload_leg
	some r in nonce_reasons
}

workload_reasons contains r if {
	workload_leg
	not input.workload.report_ok
	r := input.workload.reason
}

workload_warnings contains "simulated-csv-evidence" if {
	input.workload.report_ok
	input.workload.simulated
}

workload_leg if input.workload.present

workload_leg if input.workload.required

base := {
	"cvtpm-vtpm": {"status": status(vtpm_reasons, set()), "reasons": vtpm_reasons},
	"csv-platform": {"status": status(csv_reasons, csv_warnings), "reasons": csv_reasons | csv_warnings},
}

result := object.union(base, {"csv-workload": {
	"status": status(workload_reasons, workload_warnings),
	"reasons": workload_reasons | workload_warnings,
}}) if workload_leg

result := base if not workload_leg
