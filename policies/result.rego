# Handrail's starter result checks: one verdict per tool answer, before the agent sees it.
#
# result := {"allow": bool, "reasons": [string], "redact": [string]}
#
# The input is the call's own input document plus
# "response": {"status": int, "headers": {...}, "body": parsed JSON or null}
# (for MCP the body is the tools/call result). An answer is withheld (502 result_blocked)
# when any rule adds to `answer_blocks`; `answer_flags` are noted while it passes;
# `answer_redact` names the body's fields (dotted paths, `*` for every element of an array)
# that the agent gets as "[REDACTED]". Settings live in data.handrail_settings.
package handrail

import rego.v1

default _answer_allowed := false

_answer_allowed if count(answer_blocks) == 0

answer_reasons := answer_blocks if count(answer_blocks) > 0

answer_reasons := answer_flags if count(answer_blocks) == 0

result := {
	"allow": _answer_allowed,
	"reasons": answer_reasons,
	"redact": answer_redact,
}

_answer_body := input.response.body

_answer_ok if {
	input.response.status >= 200
	input.response.status < 300
}

# --- no credentials in answers ----------------------------------------------------------

_answer_secret_patterns := {
	"an AWS access key": `(AKIA|ASIA)[0-9A-Z]{16}`,
	"a GitHub token": `gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,}`,
	"a Slack token": `xox[abpr]-[A-Za-z0-9-]{10,}`,
	"a live Stripe key": `[rs]k_live_[A-Za-z0-9]{16,}`,
	"an OpenAI API key": `sk-[A-Za-z0-9_-]{20,}`,
	"a Google API key": `AIza[0-9A-Za-z_-]{35}`,
	"a private key": `-----BEGIN [A-Z ]*PRIVATE KEY-----`,
}

# The body as text: every string in it, verbatim where a pattern can match (a credential
# is a run of letters, digits, "-", "_" and spaces, which printing never escapes). One
# regex over it costs less than one per string on rego-cpp, which compiles each per call.
_answer_text := sprintf("%v", [_answer_body])

_answer_printed if is_string(_answer_text)

# One screen first: a clean answer (nearly every one) costs one regex, not one per pattern.
_answer_screen := `AKIA|ASIA|gh[pousr]_|github_pat_|xox[abpr]-|k_live_|sk-|AIza|PRIVATE KEY|(4|5[1-5]|2[2-7]|3[0-8]|6[0-5])([ -]?[0-9]){12}`

_answer_suspect if regex.match(_answer_screen, _answer_text)

# Should printing fail (rego-cpp lets some builtins fail quietly), every string is checked.
_answer_suspect if not _answer_printed

_answer_holds(pattern) if {
	_answer_printed
	regex.match(pattern, _answer_text)
}

_answer_holds(pattern) if {
	not _answer_printed
	some value in _answer_strings
	regex.match(pattern, value)
}

_answer_strings := [value |
	walk(_answer_body, [_, value])
	is_string(value)
]

answer_blocks contains msg if {
	_answer_suspect
	some kind, pattern in _answer_secret_patterns
	_answer_holds(pattern)
	msg := sprintf("the answer carries %s; it was withheld", [kind])
}

# Card numbers are looked for in strings only (a JSON number is an amount or an id), and
# only when the text holds a run of digits that could be one.
_card_screen := `(4|5[1-5]|2[2-7]|3[0-8]|6[0-5])([ -]?[0-9]){12}`

answer_blocks contains "the answer carries a payment card number; it was withheld" if {
	_answer_suspect
	_answer_holds(_card_screen)
	some value in _answer_strings
	some run in regex.find_n(`[A-Za-z]?[0-9]([ -]?[0-9])*[A-Za-z]?`, value, -1)
	not regex.match(`^[A-Za-z]|[A-Za-z]$`, run) # digits inside a word (a hex id, a key) are not a card
	_card_number(regex.replace(run, `[^0-9]`, ""))
}

# A card number: 13 to 19 digits (spaces or dashes between them allowed) that start like
# a card (Visa, Mastercard, Amex, Discover, JCB, Diners, UnionPay) and pass the Luhn check.
# The prefix keeps ids, phone numbers and millisecond timestamps from being read as cards.
_card_prefixes := `^(4|5[1-5]|2[2-7]|3[47]|3[068]|35|6011|64[4-9]|65|62)`

_card_number(digits) if {
	count(digits) >= 13
	count(digits) <= 19
	regex.match(_card_prefixes, digits)
	_luhn_valid(digits)
}

# --- personal fields, redacted for agents not cleared to see them -----------------------

_personal_fields := {lower(name) |
	some name in object.get(_settings, "result_personal_fields", ["email", "e-mail", "phone", "phone_number", "mobile"])
}

_result_cleared if input.agent.id in object.get(_settings, "result_cleared_agents", [])

_personal_screen if {
	text := lower(_answer_text)
	some name in _personal_fields
	contains(text, name)
}

_personal_screen if not _answer_printed

# Every field whose name is personal, as a dotted path: `contacts.*.email`.
answer_redact contains path if {
	not _result_cleared
	_personal_screen
	walk(_answer_body, [where, value])
	is_object(value)
	some name, _ in value
	lower(name) in _personal_fields
	path := concat(".", [segment | part := array.concat(where, [name])[_]; segment := _path_segment(part)])
}

_path_segment(part) := "*" if is_number(part)

_path_segment(part) := part if is_string(part)

# --- writes the tool did not confirm ----------------------------------------------------

# An HTTP create or update answered 2xx with a JSON object that has no "id".
answer_flags contains "the tool did not confirm the write (no id in its answer)" if {
	not _mcp
	input.request.method in {"POST", "PUT", "PATCH"}
	_answer_ok
	is_object(_answer_body)
	not "id" in object.keys(_answer_body)
}

# An MCP write whose result has structured content without an "id" (a tool that answers
# only with text has nothing structured to check).
answer_flags contains "the tool did not confirm the write (no id in its answer)" if {
	_write
	_mcp
	_answer_ok
	not _answer_body.isError == true
	is_object(_answer_body.structuredContent)
	not "id" in object.keys(_answer_body.structuredContent)
}
