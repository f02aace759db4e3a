"""Replaying a recorded session (`sae-mcp ledger replay`): every recorded call again, against the model and SAEs
loaded now (by default the recorded ones), and which results differ: by digest, with the first differing field.

Use it after upgrading a library, re-training or swapping an SAE, or changing sae-mcp: what changed in the setup is
listed first (weights hashes, package versions), then each run. By default the calls run against a scratch data dir
(no cached scan, no index, no label from outside the session; the session's own labels are written again there, in
order), so a result depends on the model, the SAEs, the corpus and the code alone; `--in-place` uses the real data
dir instead (its index and cached scans answer, and a tool whose replay rule says skip_in_place, the one that
writes labels, is skipped). A recorded failure replays as 'same' when it fails again with the same message; one
whose arguments the ledger cut (a rejected call's, ledger/bounds.py) is skipped. Each tool's replay rule (in its
module) adjusts what it is sent again: the seed a blind set was drawn with, so that the same set is drawn; a blind
set's id and submit secret, which is never recorded, so that the runs answering it answer the set drawn again.
The replaying server records nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sae_mcp.ledger.bounds import MAX_RESULT_CHARS, fit, scrub, secrets_in
from sae_mcp.ledger.export.rules import Handed, replay_rule
from sae_mcp.ledger.export.session import SessionData
from sae_mcp.ledger.recording import digest_of, without_volatile
from sae_mcp.ledger.records import Run
from sae_mcp.ledger.rule import rule_of

if TYPE_CHECKING:  # the SDK is imported when a replay runs
    from mcp.server.mcpserver import MCPServer
    from mcp.types import CallToolResult

ARGS_CUT = "its arguments were cut in the ledger (a rejected call's are): it cannot be sent again as it was"
SHOWN = 80  # characters of a differing value shown
FLOAT_RTOL = 1e-3  # 'close': every number within this of the recorded one, all else equal. Measured: the same
# session replayed with 2 threads instead of 1 moved an exact contribution 0.795124 -> 0.795123 and a Cohen's d of
# two-prompt sets (tiny spread) -16.976 -> -16.97; a changed SAE or model moves numbers by far more


@dataclass(frozen=True)
class Replayed:
    run_id: str
    tool: str
    status: str  # same | close (numbers within FLOAT_RTOL, the rest equal) | differs | skipped
    detail: str = ""


def _show(v: object) -> str:
    text = repr(v)
    return text if len(text) <= SHOWN else text[:SHOWN] + "..."


def close(a: Any, b: Any, rtol: float) -> bool:
    """Two JSON numbers within rtol of each other (relative to the larger, or 1e-6 absolute near 0)."""
    numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b))
    return numbers and abs(a - b) <= max(rtol * max(abs(a), abs(b)), 1e-6)


def first_difference(a: Any, b: Any, path: str = "", rtol: float = 0.0) -> str | None:
    """Where two JSON values first differ ('positions[2].top[0].activation: recorded 1.5, now 1.25'), or None;
    numbers within rtol count as equal. A field the recorded result lacks and now null is no difference: an
    optional field a later version added, saying nothing for this call."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            where = f"{path}.{k}" if path else k
            if k not in a and b[k] is None:
                continue
            if k not in a or k not in b:
                return f"{where}: {'new' if k not in a else 'gone'} (now {_show(b.get(k))}, recorded {_show(a.get(k))})"
            found = first_difference(a[k], b[k], where, rtol)
            if found:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list):
        for i, (x, y) in enumerate(zip(a, b)):
            found = first_difference(x, y, f"{path}[{i}]", rtol)
            if found:
                return found
        return None if len(a) == len(b) else f"{path}: {len(a)} items recorded, {len(b)} now"
    if a == b or (rtol and close(a, b, rtol)):
        return None
    if isinstance(a, str) and isinstance(b, str):  # show where two long texts part, not their common start
        at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        a, b, path = a[max(0, at - 20):], b[max(0, at - 20):], f"{path} (from character {max(0, at - 20)})"
    return f"{path or 'result'}: recorded {_show(a)}, now {_show(b)}"


def _view(volatile: tuple[str, ...], result: dict | None, cut: bool) -> dict:
    """The part of a result that is compared: without volatile fields, run_id and secrets, cut as the recorded
    copy was."""
    body = scrub(without_volatile(volatile, result))
    return fit(body, MAX_RESULT_CHARS, size=MAX_RESULT_CHARS + 1)[0] if cut else body


def compare(run: Run, result: CallToolResult, volatile: tuple[str, ...]) -> Replayed:
    """A recorded run against the CallToolResult its call gives now (`volatile`: its tool's volatile fields, left
    out of the comparison)."""
    text = " ".join(getattr(c, "text", "") for c in getattr(result, "content", []))
    if result.is_error or not run.ok:
        if result.is_error and not run.ok:
            same = " ".join(text.split()) == run.error
            return Replayed(run.id, run.tool, "same" if same else "differs",
                            "" if same else f"error: recorded {_show(run.error)}, now {_show(text)}")
        return Replayed(run.id, run.tool, "differs", f"now fails: {_show(text)}" if result.is_error else
                        f"now succeeds (recorded error {_show(run.error)})")
    structured = result.structured_content
    if digest_of(volatile, structured) == run.digest:
        return Replayed(run.id, run.tool, "same")
    recorded, now = _view(volatile, run.result, run.truncated), _view(volatile, structured, run.truncated)
    where = first_difference(recorded, now)
    if where is None and not run.truncated:  # the same fields and values, serialised in another order
        return Replayed(run.id, run.tool, "same")
    if where is not None and first_difference(recorded, now, rtol=FLOAT_RTOL) is None:
        return Replayed(run.id, run.tool, "close", where)  # another thread count or device: last digits moved
    return Replayed(run.id, run.tool, "differs", where or "beyond the part of the result the ledger kept")


def replay(server: MCPServer, data: SessionData, in_place: bool = False) -> list[Replayed]:
    """Every run of the session through one in-memory client connection to `server`, in the recorded order, sent
    as its tool's replay rule says; with `in_place` (the real data dir), the tools whose rule says so skipped."""
    import anyio
    from mcp import Client

    async def go() -> list[Replayed]:
        out, handed = [], Handed()
        async with Client(server) as client:
            for run in data.runs:
                rule = replay_rule(data.tools, run.tool)
                if (in_place and rule.skip_in_place) or run.args_cut:
                    out.append(Replayed(run.id, run.tool, "skipped", ARGS_CUT if run.args_cut else
                                        rule.skip_in_place or ""))
                    continue
                given = dict(run.given)
                args = rule.arguments(given, run.resolved or {}, handed) if rule.arguments is not None else given
                result = await client.call_tool(run.tool, args)
                if rule.hands_out is not None and not result.is_error:
                    found = secrets_in(result.structured_content)
                    handed.add(rule.hands_out(run.result or {}), rule.hands_out(result.structured_content or {}),
                               found[0] if found else None)
                out.append(compare(run, result, rule_of(data.tools, run.tool).volatile))
        return out

    return anyio.run(go)


def env_changes(recorded: dict, now: dict) -> list[str]:
    """What differs between the recorded environment and the current one: weights, processing, packages."""
    out = []
    rm, nm = recorded.get("model", {}), now.get("model", {})
    for field in ("source", "weights", "processing", "dtype"):
        if rm.get(field) != nm.get(field):
            out.append(f"model {field}: {_show(rm.get(field))} -> {_show(nm.get(field))}")
    r_saes, n_saes = {s["key"]: s for s in recorded.get("saes", [])}, {s["key"]: s for s in now.get("saes", [])}
    for key in sorted(set(r_saes) | set(n_saes)):
        a, b = r_saes.get(key, {}), n_saes.get(key, {})
        for field in ("source", "weights_id", "d_sae", "hook_name"):
            if a.get(field) != b.get(field):
                out.append(f"SAE {key} {field}: {_show(a.get(field))} -> {_show(b.get(field))}")
    rv, nv = recorded.get("versions", {}), now.get("versions", {})
    out += [f"{pkg}: {rv.get(pkg)} -> {nv.get(pkg)}" for pkg in sorted(set(rv) | set(nv)) if rv.get(pkg) != nv.get(pkg)]
    return out
