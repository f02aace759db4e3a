"""Blind sets only their owner can answer, and scores that say when they are not blind (issue 20, item 2): a submit
secret handed out once with the blind set, stored only as its hash; a conversation that looked up the activations
of a blind context before answering gets a score marked not blind. On the real stories260K model over a 60k-token
index, through real MCP client connections (each Client is one conversation), and the real `sae-mcp call` CLI."""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import sqlite3
import subprocess
import sys
import time

import anyio
import pytest
from mcp import Client

from sae_mcp.cards.data import gather_card
from sae_mcp.pages.feature import gather_page
from sae_mcp.scoring.store import ScoreStore
from sae_mcp.server.app import build_server

from helpers.models import STORIES_CORPUS, STORIES_HF
from helpers.servers import indexed_stories_services
from mcp_client import call_many, text_of

pytestmark = [pytest.mark.usefixtures("lexical_only")]
INDEX_TOKENS = 60_000
ENV_CLI = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def setup(stories_engine, stories_sae_dir, tmp_path_factory):
    services = indexed_stories_services(stories_engine, stories_sae_dir, tmp_path_factory.mktemp("scoring_secret"),
                                        INDEX_TOKENS)
    _, row, _, _ = services.examples.feature_row(None, 0)
    density = row.n_fired / row.tokens
    features = [f for f in range(len(density)) if 0.005 < density[f] < 0.03][:2]  # fire beyond their kept windows
    return build_server(stories_engine, services.settings, services=services), services, features


def plain(text: str) -> str:
    """A blind context as an agent would paste it into a prompt: ⏎ back to a line break."""
    return text.replace("⏎", "\n")


def answer(blind: dict, value: bool = True) -> dict:
    return {c["id"]: value for c in blind["contexts"]}


def strings(value) -> list[str]:
    if isinstance(value, dict):
        return [s for v in value.values() for s in strings(v)] + [str(k) for k in value]
    if isinstance(value, list):
        return [s for v in value for s in strings(v)]
    return [str(value)]


def test_a_second_connection_that_reads_the_challenge_id_from_the_ledger_cannot_answer_it(setup):
    """The attack: a stranger's connection lists the ledger, finds the owner's challenge id (public) and answers
    first, with no secret, a wrong one, or anything the ledger holds. Each is refused, saying what to pass, and the
    challenge stays open; the owner then answers it with the secret it was handed, once."""
    server, services, (feature, _) = setup

    async def go():
        async with Client(server) as owner, Client(server) as stranger:
            handed = (await owner.call_tool("score_explanation", {"feature": feature, "explanation": "x",
                                                                  "n": 8})).structured_content
            listing = await stranger.call_tool("ledger", {"tool": "score_explanation"})
            runs = [await stranger.call_tool("ledger", {"run": r["run_id"]})
                    for r in listing.structured_content["runs"]]
            seen = [text_of(r) for r in [listing, *runs]] + [s for r in [listing, *runs]
                                                             for s in strings(r.structured_content)]
            (cid,) = set(re.findall(r"ch_[0-9a-f]{12}", " ".join(seen)))
            tries = [{}, {"submit_secret": secrets.token_urlsafe(16)}]
            tries += [{"submit_secret": s} for s in dict.fromkeys(seen) if 0 < len(s) <= 64 and s != cid][:50]
            refused = [await stranger.call_tool("submit_predictions", {"challenge_id": cid, **extra,
                                                                       "predictions": answer(handed["challenge"])})
                       for extra in tries]
            mine = await owner.call_tool("submit_predictions", {"challenge_id": cid, "submit_secret":
                                                                handed["submit_secret"],
                                                                "predictions": answer(handed["challenge"])})
            return handed, seen, refused, mine

    handed, seen, refused, mine = anyio.run(go)
    assert cid_of(handed) and handed["submit_secret"] not in " ".join(seen)
    assert all(r.is_error for r in refused), [text_of(r) for r in refused if not r.is_error]
    assert "submit_secret" in text_of(refused[0]) and "required" in text_of(refused[0]).lower()
    assert "the submit_secret does not match" in text_of(refused[1]) and "stays open" in text_of(refused[1])
    assert not mine.is_error and mine.structured_content["challenge_id"] == cid_of(handed)


def cid_of(out: dict) -> str:
    return out["challenge"]["challenge_id"]


def test_the_secret_is_stored_only_as_its_hash_and_shown_nowhere_else(setup):
    """The store holds the secret's SHA-256 and never the secret (every byte of its SQLite files read); the card,
    the feature page and search_explanations of the feature do not show it; the challenge survives a new server
    over the same data dir and is answered there with the secret (the two-step flow across a restart)."""
    server, services, (feature, _) = setup
    (issued,) = call_many(server, [("score_explanation", {"feature": feature, "explanation": "quoted speech",
                                                          "n": 8})])
    out = issued.structured_content
    secret = out["submit_secret"]
    assert len(secret) >= 16 and f"submit_secret {secret}" in text_of(issued)  # the agent's text holds it, once
    c = services.scores.challenge(cid_of(out))
    assert c.secret_hash == hashlib.sha256(secret.encode()).hexdigest()
    path = services.scores.path
    stored = b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))
    assert secret.encode() not in stored and c.secret_hash.encode() in stored
    card = gather_card(services, feature)
    page = gather_page(services, feature)
    (found,) = call_many(server, [("search_explanations", {"query": "quoted speech"})])
    shown = [repr(card), repr(page), text_of(found), json.dumps(found.structured_content)]
    assert not any(secret in s for s in shown)
    fresh = build_server(services.engine, services.settings)
    (res,) = call_many(fresh, [("submit_predictions", {"challenge_id": cid_of(out), "submit_secret": secret,
                                                       "predictions": answer(out["challenge"], False)})])
    assert not res.is_error, text_of(res)


def test_looking_up_a_blind_context_makes_the_score_not_blind(setup):
    """The conversation that was handed the set runs get_feature_acts on one context's text and compare_prompts on
    another's, then submits: the score says it is not blind, names those two contexts (looked_up, and the tools in
    the warning) and says what to do. Another conversation's look-up of a third context is not this one's; a set
    answered without look-ups (the other conversation's own, of another feature, handed out after its look-up) is
    blind."""
    server, services, (feature, second) = setup

    async def go():
        async with Client(server) as agent, Client(server) as other:
            handed = (await agent.call_tool("score_explanation", {"feature": feature, "explanation": "x", "n": 12,
                                                                  "seed": 31})).structured_content
            ctx = handed["challenge"]["contexts"]
            await agent.call_tool("get_feature_acts", {"prompt": plain(ctx[1]["text"]), "top_k": 1})
            await agent.call_tool("compare_prompts", {"prompt_a": "Once upon a time, " + plain(ctx[4]["text"]),
                                                      "prompt_b": "She was sad."})
            await other.call_tool("get_feature_acts", {"prompt": plain(ctx[6]["text"]), "top_k": 1})
            own = (await other.call_tool("score_explanation", {"feature": second, "explanation": "x", "n": 12,
                                                               "seed": 32})).structured_content
            scored = await agent.call_tool("submit_predictions", {
                "challenge_id": cid_of(handed), "submit_secret": handed["submit_secret"],
                "predictions": answer(handed["challenge"])})
            clean = await other.call_tool("submit_predictions", {
                "challenge_id": cid_of(own), "submit_secret": own["submit_secret"],
                "predictions": answer(own["challenge"])})
            return ctx, scored, clean

    ctx, scored, clean = anyio.run(go)
    score = scored.structured_content
    assert score["looked_up"] == [ctx[1]["id"], ctx[4]["id"]]
    (warning,) = [w for w in score["warnings"] if w.startswith("not blind")]
    assert f"context(s) {ctx[1]['id']}, {ctx[4]['id']} " in warning and "compare_prompts, get_feature_acts" in warning
    assert "call score_explanation again" in warning and "NOT BLIND" in text_of(scored)
    assert clean.structured_content["looked_up"] is None and "NOT BLIND" not in text_of(clean)


def test_the_cli_two_step_flow_answers_with_the_secret(stories_sae_dir, tmp_path):
    """`sae-mcp call score_explanation` prints the blind set with its submit secret; a second `sae-mcp call
    submit_predictions` process (a new server over the same data dir) answers it with the id and the secret, and
    one without the secret is refused with the message."""
    base = ["--model", str(STORIES_HF), "--sae", str(stories_sae_dir), "--corpus", str(STORIES_CORPUS),
            "--device", "cpu", "--data-dir", str(tmp_path), "--compact"]

    def call(tool: str, args: dict) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "sae_mcp", "call", tool, "--json", json.dumps(args), *base],
                              capture_output=True, text=True, env={**os.environ, **ENV_CLI}, timeout=600)

    first = call("score_explanation", {"feature": 3, "explanation": "x", "n": 8, "seed": 1})
    assert first.returncode == 0, first.stderr[-2000:]
    out = json.loads(first.stdout)
    preds = answer(out["challenge"])
    refused = call("submit_predictions", {"challenge_id": cid_of(out), "predictions": preds})
    assert refused.returncode == 1 and "submit_secret" in refused.stderr
    done = call("submit_predictions", {"challenge_id": cid_of(out), "submit_secret": out["submit_secret"],
                                       "predictions": preds})
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["challenge_id"] == cid_of(out)



OLD_CHALLENGES = """CREATE TABLE challenges (
    id TEXT PRIMARY KEY, sae TEXT NOT NULL, feature INTEGER NOT NULL, explanation TEXT NOT NULL, label_id INTEGER,
    method TEXT NOT NULL, n INTEGER NOT NULL, seed INTEGER NOT NULL, set_key TEXT NOT NULL, created REAL NOT NULL,
    expires REAL NOT NULL, blind TEXT NOT NULL, answers TEXT NOT NULL, auto INTEGER NOT NULL DEFAULT 0,
    submitted REAL, score_id INTEGER)"""


def test_a_challenge_handed_out_before_submit_secrets_cannot_be_answered(setup, tmp_path):
    """A store written before secrets gets the new columns when opened; a challenge of it (no secret hash) is
    refused whatever secret is given, saying to draw a new blind set."""
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute(OLD_CHALLENGES)
        conn.execute("INSERT INTO challenges VALUES ('ch_0123456789ab', 's', 1, 'x', NULL, 'detection', 2, 0, 'k', "
                     "?, ?, '{}', '{\"items\": []}', 0, NULL, NULL)", (time.time(), time.time() + 600))
    old = ScoreStore(path).challenge("ch_0123456789ab")
    assert old is not None and old.secret_hash is None and old.session is None
    server, services, (feature, _) = setup
    out = call_many(server, [("score_explanation", {"feature": feature, "explanation": "x", "n": 8})])[0]
    cid = cid_of(out.structured_content)
    services.scores.conn.execute("UPDATE challenges SET secret_hash = NULL WHERE id = ?", (cid,))
    (res,) = call_many(server, [("submit_predictions", {"challenge_id": cid, "submit_secret":
                                                        out.structured_content["submit_secret"],
                                                        "predictions": answer(out.structured_content["challenge"])})])
    assert res.is_error and "handed out before submit secrets" in text_of(res) and "again" in text_of(res)
