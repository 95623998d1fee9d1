# Tests for handrail.rego: `handrail policy test` (embedded) or `opa test policies/`.
# They rely on the example settings shipped in policies/data.json.
package handrail_test

import rego.v1

_read := {
	"version": 1,
	"tool": {"name": "crm", "kind": "http"},
	"request": {"method": "GET", "path": "/contacts/42", "query": {}, "headers": {}, "body": null},
	"call": null,
	"agent": {"id": "sales-bot"},
	"run": {"id": "r-1", "calls": 0, "writes": 0, "denied": 0, "repeats": 0},
	"idempotency_key": null,
	"time": "2026-11-23T10:00:00Z",
}

_write(body) := object.union(_read, {"request": {"method": "POST", "path": "/contacts", "body": body}})

_mcp(tool, name, arguments, annotations, agent) := object.union(_read, {
	"tool": {"name": tool, "kind": "mcp"},
	"request": {"method": "POST", "path": "/mcp", "body": null},
	"call": {"name": name, "arguments": arguments, "annotations": annotations},
	"agent": {"id": agent},
})

_anonymous := {"agent": {"id": ""}}

test_anonymous_read_is_allowed if {
	d := data.handrail.decision with input as object.union(_read, _anonymous)
	d.allow == true
	d.require_approval == false
	count(d.reasons) == 0
}

test_anonymous_write_is_denied if {
	d := data.handrail.decision with input as object.union(_write({"name": "Ada"}), _anonymous)
	d.allow == false
	d.reasons == {"agent (anonymous) may not write (write_budget 0): name it in handrail_settings.agents"}
}

test_unknown_agent_write_is_denied if {
	d := data.handrail.decision with input as object.union(_write({"name": "Ada"}), {"agent": {"id": "Sales-Bot"}})
	d.allow == false
}

test_named_agent_write_within_budget_is_allowed if {
	d := data.handrail.decision with input as _write({"name": "Ada"})
	d.allow == true
}

test_write_past_budget_is_denied if {
	d := data.handrail.decision with input as object.union(_write({}), {"run": {"writes": 50}})
	d.allow == false
	d.reasons == {"run write budget spent: 50 of 50 writes"}
}

test_a_write_in_a_closed_run_is_denied if {
	d := data.handrail.decision with input as object.union(_write({"name": "Ada"}), {"run": {"closed": true}})
	d.allow == false
	d.reasons == {"run closed"}
}

test_a_read_in_a_closed_run_is_allowed if {
	d := data.handrail.decision with input as object.union(_read, {"run": {"closed": true}})
	d.allow == true
}

test_read_past_write_budget_is_allowed if {
	d := data.handrail.decision with input as object.union(_read, {"run": {"writes": 50}})
	d.allow == true
}

test_repeated_call_is_denied_as_loop if {
	d := data.handrail.decision with input as object.union(_read, {"run": {"repeats": 5}})
	d.allow == false
	d.reasons == {"loop suspected: this run already made the same call 5 times (limit 5)"}
}

test_a_few_retries_are_not_a_loop if {
	d := data.handrail.decision with input as object.union(_read, {"run": {"repeats": 2}})
	d.allow == true
}

test_delete_of_a_collection_is_denied if {
	d := data.handrail.decision with input as object.union(_read, {"request": {"method": "DELETE", "path": "/contacts"}})
	d.allow == false
	d.reasons == {"DELETE /contacts would delete a whole collection"}
}

test_delete_of_one_item_is_allowed if {
	d := data.handrail.decision with input as object.union(_read, {"request": {"method": "DELETE", "path": "/contacts/42"}})
	d.allow == true
}

test_destructive_mcp_tool_is_denied if {
	d := data.handrail.decision with input as _mcp("crm", "purge", {}, {"destructiveHint": true}, "sales-bot")
	d.allow == false
	d.reasons == {"crm.purge is marked destructive and is not allowed for agent sales-bot"}
}

test_destructive_mcp_tool_is_hidden if {
	not data.handrail.visible with input as _mcp("crm", "purge", {}, {"destructiveHint": true}, "")
}

test_api_key_in_body_is_denied if {
	d := data.handrail.decision with input as _write({"note": "use sk-abcdefghijklmnopqrstuv please"})
	d.allow == false
	d.reasons == {"argument note looks like an API secret key (sk-...); secrets must not be sent to tools"}
}

test_aws_key_in_mcp_arguments_is_denied if {
	d := data.handrail.decision with input as _mcp("crm", "note", {"text": ["x", "AKIAABCDEFGHIJKLMNOP"]}, {}, "sales-bot")
	d.allow == false
	d.reasons == {"argument text looks like an AWS access key id; secrets must not be sent to tools"}
}

test_private_key_is_denied if {
	d := data.handrail.decision with input as _write({"pem": "-----BEGIN RSA PRIVATE KEY-----\nMIIE"})
	d.allow == false
}

test_card_number_is_denied if {
	d := data.handrail.decision with input as _write({"memo": "card 4111 1111 1111 1111"})
	d.allow == false
	d.reasons == {"argument memo looks like a payment card number"}
}

test_card_number_deep_in_the_body_is_denied if {
	d := data.handrail.decision with input as _write({"order": {"lines": [{"memo": "4111-1111-1111-1111"}]}})
	d.allow == false
	d.reasons == {"argument order looks like a payment card number"}
}

test_long_json_number_is_not_a_card_number if {
	d := data.handrail.decision with input as _write({"id": 4111111111111111, "memo": "fine"})
	d.allow == true
}

test_number_failing_luhn_is_allowed if {
	d := data.handrail.decision with input as _write({"memo": "order 4111 1111 1111 1112"})
	d.allow == true
}

test_small_refund_is_allowed if {
	d := data.handrail.decision with input as _mcp("payments", "refund", {"amount": 50}, {}, "support-bot")
	d.allow == true
}

test_large_refund_needs_approval if {
	d := data.handrail.decision with input as _mcp("payments", "refund", {"amount": 250}, {}, "support-bot")
	d.allow == false
	d.require_approval == true
	d.reasons == {"payments.refund amount=250 is over 100: needs a human's approval"}
}

test_huge_refund_is_denied if {
	d := data.handrail.decision with input as _mcp("payments", "refund", {"amount": 9000}, {}, "support-bot")
	d.allow == false
	d.require_approval == false
	d.reasons == {"payments.refund amount=9000 is over the limit 5000"}
}

test_agent_cannot_call_unlisted_tool if {
	d := data.handrail.decision with input as _mcp("billing", "charge", {}, {}, "support-bot")
	d.allow == false
	d.reasons == {"agent support-bot may not call billing.charge"}
}

test_unlisted_tool_is_hidden if {
	not data.handrail.visible with input as _mcp("billing", "charge", {}, {}, "support-bot")
}

test_listed_tool_is_visible if {
	data.handrail.visible with input as _mcp("payments", "refund", {}, {}, "support-bot")
}

test_agent_with_zero_budget_cannot_write if {
	d := data.handrail.decision with input as object.union(_write({}), {"agent": {"id": "report-bot"}})
	d.allow == false
}

test_read_only_mcp_call_is_not_a_write if {
	d := data.handrail.decision with input as _mcp("crm", "search", {}, {"readOnlyHint": true}, "report-bot")
	d.allow == true
}

test_unknown_annotations_are_treated_as_destructive if {
	d := data.handrail.decision with input as _mcp("crm", "purge", {}, null, "sales-bot")
	d.allow == false
	d.reasons == {"crm.purge has unknown annotations (no tools/list answer) and is treated as destructive for agent sales-bot"}
}

test_listed_tool_without_annotations_is_not_unknown if {
	d := data.handrail.decision with input as _mcp("crm", "note", {}, {}, "sales-bot")
	d.allow == true
}

test_amount_sent_as_a_string_is_denied if {
	d := data.handrail.decision with input as _mcp("payments", "refund", {"amount": "10000"}, {}, "support-bot")
	d.allow == false
	d.reasons == {"payments.refund amount must be a number to be checked against its limits, not a string"}
}
