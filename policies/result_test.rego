# Tests for result.rego: `handrail policy test` (embedded) or `opa test policies/`.
# They rely on the settings shipped in policies/data.json (result_cleared_agents).
package handrail_result_test

import rego.v1

_get := {
	"version": 1,
	"tool": {"name": "crm", "kind": "http"},
	"request": {"method": "GET", "path": "/contacts", "query": {}, "headers": {}, "body": null},
	"call": null,
	"agent": {"id": "report-bot"},
	"run": {"id": "r-1", "calls": 0, "writes": 0, "denied": 0, "repeats": 0},
	"idempotency_key": null,
	"time": "2026-11-23T10:00:00Z",
}

_post := object.union(_get, {
	"request": {"method": "POST", "body": {"name": "Ada"}},
	"agent": {"id": "sales-bot"},
})

_mcp_call(annotations) := object.union(_get, {
	"tool": {"name": "crm", "kind": "mcp"},
	"request": {"method": "POST", "path": "/mcp"},
	"call": {"name": "create_contact", "arguments": {"name": "Ada"}, "annotations": annotations},
	"agent": {"id": "sales-bot"},
})

# The call's input plus the tool's answer.
_answered(call, status, body) := object.union(call, {"response": {"status": status, "headers": {"content-type": "application/json"}, "body": body}})

_read(body) := _answered(_get, 200, body)

# --- credentials ------------------------------------------------------------------------

test_clean_answer_is_allowed if {
	r := data.handrail.result with input as _read({"contacts": [{"id": 1, "name": "Ada"}], "total": 1})
	r.allow == true
	count(r.reasons) == 0
	count(r.redact) == 0
}

test_aws_access_key_is_withheld if {
	r := data.handrail.result with input as _read({"items": [{"note": "creds AKIAIOSFODNN7EXAMPLE"}]})
	r.allow == false
	r.reasons == {"the answer carries an AWS access key; it was withheld"}
}

test_aws_session_key_is_withheld if {
	r := data.handrail.result with input as _read({"key": "ASIAIOSFODNN7EXAMPLE"})
	r.reasons == {"the answer carries an AWS access key; it was withheld"}
}

test_github_tokens_are_withheld if {
	r := data.handrail.result with input as _read({
		"classic": "ghp_0123456789abcdefghijABCDEFGHIJ012345",
		"fine": "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz",
	})
	r.allow == false
	r.reasons == {"the answer carries a GitHub token; it was withheld"}
}

test_slack_token_is_withheld if {
	r := data.handrail.result with input as _read({"hook": "xoxb-123456789012-abcdefABCDEF"})
	r.reasons == {"the answer carries a Slack token; it was withheld"}
}

test_live_stripe_key_is_withheld if {
	r := data.handrail.result with input as _read({"stripe": "rk_live_0123456789abcdefABCDEF"})
	r.reasons == {"the answer carries a live Stripe key; it was withheld"}
}

test_openai_key_is_withheld if {
	r := data.handrail.result with input as _read({"config": {"openai": "sk-proj-abcdefghijklmnopqrstuvwxyz012345"}})
	r.reasons == {"the answer carries an OpenAI API key; it was withheld"}
}

test_google_api_key_is_withheld if {
	r := data.handrail.result with input as _read({"maps": "AIzaSyA-0123456789abcdefghijklmnopqrstu"})
	r.reasons == {"the answer carries a Google API key; it was withheld"}
}

test_private_key_is_withheld if {
	r := data.handrail.result with input as _read("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXk=\n")
	r.reasons == {"the answer carries a private key; it was withheld"}
}

test_card_number_is_withheld if {
	r := data.handrail.result with input as _read({"orders": [{"memo": "paid with 4111 1111 1111 1111"}]})
	r.allow == false
	r.reasons == {"the answer carries a payment card number; it was withheld"}
}

test_card_number_with_dashes_is_withheld if {
	r := data.handrail.result with input as _read({"pan": "5555-5555-5555-4444"})
	r.reasons == {"the answer carries a payment card number; it was withheld"}
}

test_number_failing_luhn_is_not_a_card if {
	r := data.handrail.result with input as _read({"ref": "4111 1111 1111 1112"})
	r.allow == true
}

test_ids_and_timestamps_are_not_cards if {
	r := data.handrail.result with input as _read({"id": "1234567890123456789", "at": "1733011200000"})
	r.allow == true
}

test_digits_inside_a_hex_id_are_not_a_card if {
	# A trace id or a key whose digits happen to pass Luhn with a card's prefix.
	r := data.handrail.result with input as _read({"trace": "00-ab4111111111111111cd-01", "key": "hr-4111111111111111f"})
	r.allow == true
}

test_a_card_beside_punctuation_is_still_a_card if {
	r := data.handrail.result with input as _read({"memo": "card:4111111111111111, thanks"})
	r.reasons == {"the answer carries a payment card number; it was withheld"}
}

test_json_number_is_not_a_card if {
	r := data.handrail.result with input as _read({"amount": 4111111111111111})
	r.allow == true
}

test_blocked_write_gives_only_the_block if {
	r := data.handrail.result with input as _answered(_post, 201, {"token": "AKIAIOSFODNN7EXAMPLE"})
	r.allow == false
	r.reasons == {"the answer carries an AWS access key; it was withheld"}
}

# --- personal fields --------------------------------------------------------------------

test_personal_fields_are_redacted_for_an_agent_not_cleared if {
	r := data.handrail.result with input as _read({
		"contacts": [
			{"id": 1, "email": "ada@example.com", "Phone": "+44 20 7946 0000"},
			{"id": 2, "email": "bob@example.com", "e-mail": "b@example.org"},
		],
		"owner": {"mobile": "+44 7700 900000", "name": "Eve"},
	})
	r.allow == true
	r.redact == {"contacts.*.email", "contacts.*.Phone", "contacts.*.e-mail", "owner.mobile"}
}

test_cleared_agent_sees_personal_fields if {
	r := data.handrail.result with input as _answered(_post, 201, {"id": 7, "email": "ada@example.com"})
	r.allow == true
	count(r.redact) == 0
}

test_personal_field_of_an_mcp_result_is_redacted if {
	r := data.handrail.result with input as object.union(
		_answered(_mcp_call({"readOnlyHint": true}), 200, {
			"content": [{"type": "text", "text": "found Ada"}],
			"structuredContent": {"contact": {"name": "Ada", "phone_number": "+1 555 0100"}},
		}),
		{"agent": {"id": "report-bot"}},
	)
	r.redact == {"structuredContent.contact.phone_number"}
}

test_top_level_array_redacts_every_element if {
	r := data.handrail.result with input as _read([{"email": "a@example.com"}, {"name": "b"}])
	r.redact == {"*.email"}
}

test_value_mentioning_email_is_not_redacted if {
	r := data.handrail.result with input as _read({"subject": "your email and phone were updated"})
	count(r.redact) == 0
}

# --- writes the tool did not confirm ----------------------------------------------------

test_write_without_id_is_flagged_but_allowed if {
	r := data.handrail.result with input as _answered(_post, 200, {"status": "queued"})
	r.allow == true
	r.reasons == {"the tool did not confirm the write (no id in its answer)"}
}

test_write_with_id_is_confirmed if {
	r := data.handrail.result with input as _answered(_post, 201, {"id": "c_42", "name": "Ada"})
	r.allow == true
	count(r.reasons) == 0
}

test_failed_write_is_not_flagged if {
	r := data.handrail.result with input as _answered(_post, 422, {"error": "name taken"})
	count(r.reasons) == 0
}

test_read_without_id_is_not_flagged if {
	r := data.handrail.result with input as _read({"total": 0})
	count(r.reasons) == 0
}

test_mcp_write_without_id_is_flagged if {
	r := data.handrail.result with input as _answered(_mcp_call({}), 200, {
		"content": [{"type": "text", "text": "ok"}],
		"structuredContent": {"status": "queued"},
	})
	r.allow == true
	r.reasons == {"the tool did not confirm the write (no id in its answer)"}
}

test_mcp_write_with_id_is_confirmed if {
	r := data.handrail.result with input as _answered(_mcp_call({}), 200, {
		"content": [{"type": "text", "text": "ok"}],
		"structuredContent": {"id": "c_42"},
	})
	count(r.reasons) == 0
}

test_mcp_text_only_answer_is_not_flagged if {
	r := data.handrail.result with input as _answered(_mcp_call({}), 200, {"content": [{"type": "text", "text": "created"}]})
	count(r.reasons) == 0
}

test_mcp_read_only_call_is_not_flagged if {
	r := data.handrail.result with input as _answered(_mcp_call({"readOnlyHint": true}), 200, {"structuredContent": {"n": 1}})
	count(r.reasons) == 0
}

test_mcp_error_result_is_not_flagged if {
	r := data.handrail.result with input as _answered(_mcp_call({}), 200, {"isError": true, "structuredContent": {"why": "x"}})
	count(r.reasons) == 0
}

# --- the call's own input, without an answer --------------------------------------------

test_input_without_a_response_allows if {
	r := data.handrail.result with input as _get
	r.allow == true
	count(r.reasons) == 0
	count(r.redact) == 0
}
