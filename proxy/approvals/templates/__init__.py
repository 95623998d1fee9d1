"""The approval page's HTML (pure): the ``*.html`` templates beside this module, filled by
``string.Template`` with values escaped here; the stylesheet is inlined, nothing is loaded
from elsewhere. Only values wrapped in ``Html`` (markup built here) go in unescaped.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Iterable, Sequence
from html import escape
from importlib import resources
from string import Template
from typing import Any

from proxy.approvals.model import Approval, Kind, State

MAX_REASON = 2000
SHOWN_RUNS = 10


@functools.cache
def _asset(name: str) -> str:
    return (resources.files("proxy.approvals") / name).read_text(encoding="utf-8")


def _fill(template: str, **values: object) -> str:
    return Template(_asset(f"templates/{template}.html")).substitute(values)


def esc(value: object) -> str:
    return escape("" if value is None else str(value), quote=True)


class Html(str):
    """Markup built here from escaped parts: a table cell puts it in as it is."""


# -- whole pages and their parts -------------------------------------------------------


def page(title: str, content: str, *, nav: str = "", flash: str = "") -> str:
    style = _asset("static/ui.css")
    return _fill("page", title=esc(title), style=style, nav=nav, flash=flash, content=content)


def problem(status: int, message: str) -> str:
    content = f"<h1>{status}</h1>{flash(message, 'bad')}"
    return page(str(status), content + '<p><a href="/ui">Go to the approvals</a></p>')


def flash(message: str, kind: str) -> str:
    role = "alert" if kind == "bad" else "status"
    return f'<p class="flash {esc(kind)}" role="{role}">{esc(message)}</p>'


def login(csrf: str, error: str) -> str:
    return _fill("login", csrf=esc(csrf), error=flash(error, "bad") if error else "")


def nav(csrf: str) -> str:
    """The signed-in person's sign-out button."""
    return _fill("nav", csrf=esc(csrf))


def index(
    waiting: list[Approval], decided: list[Approval], calls: list[dict[str, Any]], csrf: str
) -> str:
    """Pending approvals, each with its form; the recently decided; the recent runs."""
    cards = "".join(
        card(a, decide_form(a, csrf, f"/ui/approvals/{a.id}", back=True)) for a in waiting
    )
    return _fill(
        "index",
        count=len(waiting),
        cards=cards or '<p class="empty">Nothing is waiting for a person.</p>',
        decided=decided_table(decided),
        runs=runs_table(calls),
    )


def detail(approval: Approval, csrf: str, action: str, calls: list[dict[str, Any]]) -> str:
    """One approval in full, with the recent calls of its run."""
    content = card(approval, decide_form(approval, csrf, action, back=False), full=True)
    if approval.run_id:
        content += f"<h2>Run {esc(approval.run_id)}: recent calls</h2>" + calls_table(calls)
    return content


# -- one approval ----------------------------------------------------------------------


def heading(approval: Approval) -> str:
    if approval.kind is Kind.TOOL_DEFINITION:
        name = approval.extra.get("name") or "a tool"
        return f"{approval.tool}: the definition of {name} changed"
    shown = approval.input
    what = shown.get("call") or f"{shown.get('method') or ''} {shown.get('path') or ''}".strip()
    return f"{approval.tool}: {what}" if what else approval.tool


def card(approval: Approval, form: str, *, full: bool = False) -> str:
    """The approval's facts, why it was held, what it would do; ``form`` while pending."""
    state = approval.shown_state()
    link = f'<a href="/ui/approvals/{esc(approval.id)}">{esc(approval.id)}</a>'
    facts: list[tuple[str, object]] = [
        ("Approval", approval.id if full else Html(link)),
        ("Tool", approval.tool),
        ("Agent", approval.agent or "(anonymous)"),
        ("Run", approval.run_id),
        ("Requested", when(approval.created)),
    ]
    if state in (State.PENDING, State.APPROVED, State.EXPIRED):
        facts.append(("Expires", when(approval.expires)))
    if full:
        facts += [
            (label, value)
            for label, value in (
                ("Idempotency key", approval.idempotency_key),
                ("Trace", approval.trace_id),
                ("Fingerprint", approval.fingerprint),
                ("Decided by", approval.decided_by),
                ("Decided", when(approval.decided_at)),
                ("Approver's reason", approval.reason),
                ("Used", when(approval.used_at)),
            )
            if value
        ]
    reasons = "".join(f"<li>{esc(r)}</li>" for r in approval.reasons)
    if approval.kind is Kind.TOOL_DEFINITION:
        old, new = approval.input.get("old"), approval.input.get("new")
        details = _fill("definitions", old=pretty(old), new=pretty(new))
    else:
        details = "<h3>Input (redacted)</h3>" + pretty(approval.input.get("input"))
    return _fill(
        "approval",
        kind=esc(approval.kind.value),
        id=esc(approval.id),
        heading=esc(heading(approval)),
        state=esc(state.value),
        facts="\n".join(f"<dt>{esc(label)}</dt><dd>{_cell(value)}</dd>" for label, value in facts),
        reasons=f'<h3>Why it was held</h3><ul class="reasons">{reasons}</ul>' if reasons else "",
        details=details,
        form=form if state is State.PENDING else "",
    )


def decide_form(approval: Approval, csrf: str, action: str, *, back: bool) -> str:
    """Approve or reject with a reason; ``back``: return to the list, not the approval."""
    return _fill(
        "decide",
        action=esc(action),
        csrf=esc(csrf),
        id=esc(approval.id),
        hidden='<input type="hidden" name="back" value="list">' if back else "",
        max_reason=MAX_REASON,
    )


def pretty(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, indent=2, ensure_ascii=False)
    return f"<pre>{esc(text)}</pre>"


def when(seconds: float | None) -> str:
    if seconds is None:
        return ""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))
    delta = seconds - time.time()
    span = abs(delta)
    ago = f"{span:.0f} s" if span < 120 else f"{span / 60:.0f} min"
    ago = f"{span / 3600:.0f} h" if span >= 7200 else ago
    return f"{stamp} ({'in ' + ago if delta > 0 else ago + ' ago'})"


# -- tables ----------------------------------------------------------------------------


def _cell(value: object) -> str:
    return value if isinstance(value, Html) else esc(value)


def _table(headings: str, rows: Iterable[Sequence[object]], empty: str) -> str:
    cells = ["".join(f"<td>{_cell(c)}</td>" for c in row) for row in rows]
    if not cells:
        return f'<p class="empty">{esc(empty)}</p>'
    head = "".join(f"<th>{esc(h)}</th>" for h in headings.split("|"))
    body = "".join(f"<tr>{row}</tr>" for row in cells)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def decided_table(decided: list[Approval]) -> str:
    rows = [
        (
            Html(f'<a href="/ui/approvals/{esc(a.id)}">{esc(a.id)}</a>'),
            heading(a),
            a.agent,
            Html(f'<span class="state state-{esc(a.shown_state())}">{esc(a.shown_state())}</span>'),
            a.decided_by,
            a.reason,
            when(a.decided_at),
        )
        for a in decided
    ]
    return _table("Approval|What|Agent|State|By|Reason|Decided", rows, "Nothing decided yet.")


def calls_table(calls: list[dict[str, Any]]) -> str:
    """The journal's rows (``/calls``), newest first: time, tool, call, decision, status."""
    rows = (
        (c["time"], c["tool"], _call_name(c), c["decision"], c["status"], c["error"]) for c in calls
    )
    return _table("Time|Tool|Call|Decision|Status|Error", rows, "No calls of this run yet.")


def _call_name(c: dict[str, Any]) -> str:
    return str(c.get("call") or f"{c.get('method') or ''} {c.get('path') or ''}".strip())


def runs_table(calls: list[dict[str, Any]]) -> str:
    """The newest runs in the journal's recent calls: who ran them, how many calls, held."""
    runs: dict[str, list[Any]] = {}
    for c in calls:  # newest first
        run = runs.setdefault(c["run"] or "(none)", [c["agent"], 0, 0, c["time"]])
        run[1] += 1
        run[2] += c["decision"] in ("approval", "deny")
    rows = [(run_id, *r) for run_id, r in list(runs.items())[:SHOWN_RUNS]]
    return _table("Run|Agent|Calls|Held or denied|Last call", rows, "No calls yet.")
