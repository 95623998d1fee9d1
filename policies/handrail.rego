# Handrail's starter policy: one decision per tool call.
#
# decision := {"allow": bool, "reasons": [string], "require_approval": bool}
#
# A call is denied when any rule adds to `violations`; it is held for a human when no rule
# denies it but some rule adds to `holds`; otherwise it is allowed. Everything tunable lives
# in data.handrail_settings (policies/data.json); see policies/README.md.
package handrail

import rego.v1

default allow := false

default require_approval := false

default visible := false

allow if {
	count(violations) == 0
	count(holds) == 0
}

require_approval if {
	count(violations) == 0
	count(holds) > 0
}

reasons := violations if count(violations) > 0

reasons := holds if count(violations) == 0

decision := {
	"allow": allow,
	"reasons": reasons,
	"require_approval": require_approval,
}

# tools/list: an agent sees the tools it may call, minus destructive ones it may not run.
visible if {
	_tool_allowed
	not _destructive_blocked
}

# --- settings (data.handrail_settings), with built-in defaults --------------------------

default _settings := {}

_settings := data.handrail_settings

# An agent's own settings win over default_agent's, which win over the built-ins. Each
# setting is looked up on its own (cheaper on rego-cpp than object.union per decision).
_default_agent := object.get(_settings, "default_agent", {})

_own_agent := object.get(object.get(_settings, "agents", {}), input.agent.id, {})

_agent_setting(key, builtin) := object.get(_own_agent, key, object.get(_default_agent, key, builtin))

_agent_tools := _agent_setting("tools", ["*"])

_write_budget := _agent_setting("write_budget", 50)

_agent_allow_destructive := _agent_setting("allow_destructive", [])

_agent_label := input.agent.id if input.agent.id != ""

_agent_label := "(anonymous)" if input.agent.id == ""

_max_repeats := object.get(_settings, "max_repeats", 5)

_limits := object.get(object.get(_settings, "limits", {}), _call_name, {})

# --- what is being called ---------------------------------------------------------------

_mcp if is_object(input.call)

# "crm" for plain HTTP, "crm.update_contact" for an MCP tools/call.
_call_name := input.tool.name if not _mcp

_call_name := sprintf("%s.%s", [input.tool.name, input.call.name]) if _mcp

# The payload the tool acts on: the MCP arguments, or the HTTP JSON body.
_payload := input.call.arguments if _mcp

_payload := input.request.body if not _mcp

_write if {
	not _mcp
	input.request.method in {"POST", "PUT", "PATCH", "DELETE"}
}

_write if {
	_mcp
	not input.call.annotations.readOnlyHint
}

# --- tool allowlist per agent -----------------------------------------------------------

# One chain, first match wins: most agents have "*" and stop at the first test.
_tool_allowed := true if {
	"*" in _agent_tools
} else := true if {
	input.tool.name in _agent_tools
} else := true if {
	_call_name in _agent_tools
}

violations contains msg if {
	not _tool_allowed
	msg := sprintf("agent %s may not call %s", [_agent_label, _call_name])
}

# --- per-run write budget ---------------------------------------------------------------

# The cheap, usually false comparison first: most calls are within budget and stop there.
violations contains msg if {
	input.run.writes >= _write_budget
	_write
	_write_budget > 0
	msg := sprintf("run write budget spent: %v of %v writes", [input.run.writes, _write_budget])
}

# An agent no setting names (no X-Agent-Id, or one spelled otherwise) gets default_agent:
# the least privileged, reads only. Name your agents in handrail_settings.agents.
violations contains msg if {
	_write_budget == 0
	_write
	msg := sprintf("agent %s may not write (write_budget 0): name it in handrail_settings.agents", [_agent_label])
}

# --- a run's finish line ----------------------------------------------------------------

# Once a run is closed (handrail runs close ID, POST /runs/{id}/close) nothing writes in it:
# its task was declared finished. Reads stay allowed.
violations contains "run closed" if {
	input.run.closed
	_write
}

# --- loop detection ---------------------------------------------------------------------

violations contains msg if {
	input.run.repeats >= _max_repeats
	msg := sprintf(
		"loop suspected: this run already made the same call %v times (limit %v)",
		[input.run.repeats, _max_repeats],
	)
}

# --- destructive calls ------------------------------------------------------------------

_destructive_allowed if _call_name in _agent_allow_destructive

_destructive_allowed if input.tool.name in _agent_allow_destructive

_path_segments := [s | some s in split(input.request.path, "/"); s != ""]

# An id segment is the last path segment holding a digit: /contacts/42, /orders/ord_9f2.
_targets_one_item if regex.match(`[0-9]`, _path_segments[count(_path_segments) - 1])

_destructive_blocked if {
	input.call.annotations.destructiveHint == true
	not _destructive_allowed
}

# No listing could be had: the annotations are unknown, which is read as the riskiest case.
_destructive_blocked if {
	_unknown_annotations
	not _destructive_allowed
}

_unknown_annotations if {
	_mcp
	not is_object(input.call.annotations)
}

violations contains msg if {
	input.request.method == "DELETE"
	not _mcp
	not _targets_one_item
	not _destructive_allowed
	msg := sprintf("DELETE %s would delete a whole collection", [input.request.path])
}

violations contains msg if {
	_destructive_blocked
	not _unknown_annotations
	msg := sprintf("%s is marked destructive and is not allowed for agent %s", [_call_name, _agent_label])
}

violations contains msg if {
	_destructive_blocked
	_unknown_annotations
	msg := sprintf("%s has unknown annotations (no tools/list answer) and is treated as destructive for agent %s", [_call_name, _agent_label])
}

# --- argument limits --------------------------------------------------------------------

# A limited field must be a number: "10000" as a string would pass every numeric test.
violations contains msg if {
	some field, _ in _limits
	value := _payload[field]
	not is_number(value)
	msg := sprintf("%s %s must be a number to be checked against its limits, not a %s", [_call_name, field, type_name(value)])
}

holds contains msg if {
	some field, limit in _limits
	value := _payload[field]
	is_number(value)
	value > limit.approval_over
	msg := sprintf("%s %s=%v is over %v: needs a human's approval", [_call_name, field, value, limit.approval_over])
}

violations contains msg if {
	some field, limit in _limits
	value := _payload[field]
	is_number(value)
	value > limit.deny_over
	msg := sprintf("%s %s=%v is over the limit %v", [_call_name, field, value, limit.deny_over])
}

# --- no secrets in arguments ------------------------------------------------------------

_secret_patterns := {
	"an API secret key (sk-...)": `sk-[A-Za-z0-9_-]{16,}`,
	"a live payment key": `[rs]k_live_[A-Za-z0-9]{16,}`,
	"an AWS access key id": `AKIA[0-9A-Z]{16}`,
	"a GitHub token": `gh[pousr]_[A-Za-z0-9]{30,}`,
	"a private key": `-----BEGIN [A-Z ]*PRIVATE KEY-----`,
}

# Screens, cheapest first. rego-cpp compiles a regex on every call, so one screen runs over
# the whole payload as JSON text: any string value holding a secret or a card number holds a
# run of letters, digits, spaces, "-" and "_" that JSON keeps verbatim, so a clean payload
# holds none. Otherwise (or when json.marshal fails: regopy cannot marshal arrays from the
# input) the strings are walked, each screened again, and checked.
_payload_screen := `sk-|k_live_|AKIA|gh[pousr]_|PRIVATE KEY|[0-9 -]{13}`

_screen := `sk-|[rs]k_live_|AKIA|gh[pousr]_|PRIVATE KEY|[0-9](?:[ -]?[0-9]){12}`

# Clean only on a positive answer: rego-cpp lets a failed json.marshal through `not`.
_clean_payload if {
	text := json.marshal(_payload)
	is_string(text)
	regex.match(_payload_screen, text) == false
}

_strings contains [path, value] if {
	not _clean_payload
	walk(_payload, [path, value])
	is_string(value)
	regex.match(_screen, value)
}

_field(path) := "(whole body)" if count(path) == 0

# The top-level argument (or body field) holding the value.
_field(path) := sprintf("%v", [path[0]]) if count(path) > 0

violations contains msg if {
	some entry in _strings
	[path, value] := entry
	some kind, pattern in _secret_patterns
	regex.match(pattern, value)
	msg := sprintf("argument %s looks like %s; secrets must not be sent to tools", [_field(path), kind])
}

violations contains msg if {
	some entry in _strings
	[path, value] := entry
	some candidate in regex.find_n(`[0-9](?:[ -]?[0-9]){12,18}`, value, -1)
	_luhn_valid(regex.replace(candidate, `[^0-9]`, ""))
	msg := sprintf("argument %s looks like a payment card number", [_field(path)])
}

# Luhn checksum over a string of digits: catches card numbers, not order ids or phone numbers.
# Counting from the right (from 1), every second digit is doubled (minus 9 past 9): the
# table holds each digit's term, plain and doubled.
_luhn_terms := [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [0, 2, 4, 6, 8, 1, 3, 5, 7, 9]]

_luhn_valid(digits) if {
	chars := split(digits, "")
	n := count(chars)
	terms := [t | d := chars[i]; p := (n - i + 1) % 2; t := _luhn_terms[p][to_number(d)]]
	sum(terms) % 10 == 0
}
