"""What the agent reads: each result's text content is compact and carries the numbers of its structured content
(which stays whole), checked number by number against the structured content."""

from __future__ import annotations

import json
import re

from sae_mcp.server.text import compact, compact_json, fmt

from mcp_client import call_many, text_of

PROMPT = "the cat sat on the mat and the dog"


def test_compact_drops_nulls_and_empties_and_keeps_four_significant_digits():
    data = {"a": None, "b": [], "c": {}, "d": "", "e": 0, "f": False, "g": [1.234567, None, {"h": None}],
            "i": 123456.7, "j": 0.000123456}
    assert compact(data) == {"e": 0, "f": False, "g": [1.235, None, {}], "i": 123500.0, "j": 0.0001235}
    assert compact_json({"x": [1.0, 2.5]}) == '{"x":[1.0,2.5]}'
    assert (fmt(3.74159), fmt(0.000123456), fmt(12.0)) == ("3.742", "0.0001235", "12")


def test_get_feature_acts_text_lists_every_position_feature_and_trace(tiny_server):
    (res,) = call_many(tiny_server, [("get_feature_acts", {"prompt": PROMPT, "top_k": 3, "features": [2, 7]})])
    out, text = res.structured_content, text_of(res)
    lines = text.splitlines()
    for p in out["positions"]:
        (line,) = [ln for ln in lines if ln.startswith(f"{p['position']} {p['token']!r} L0={p['l0']}:")]
        assert re.findall(r"(\d+)=([-\d.e]+)", line.split(":", 1)[1]) == [
            (str(a["feature"]), fmt(a["activation"])) for a in p["top"]]
    for f, trace in out["features"].items():
        assert f"feature {f} at the positions above: " + " ".join(fmt(a) for a in trace) in text
    assert len(text) < len(json.dumps(out, separators=(",", ":")))


def test_ablate_and_test_text_says_each_conditions_answer_numbers_once(tiny_server):
    (res,) = call_many(tiny_server, [("ablate_and_test", {"prompt": PROMPT, "answer": " mat", "counterfactual": " park",
                                                          "features": [3, 7], "controls": True, "n_controls": 5})])
    out, text = res.structured_content, text_of(res)
    head = text.split("\n")[0]
    assert f"metric {out['metric']};" in head and "answer rank (0-based)" in head  # the metric named, once
    for name in ("baseline", "reconstruction_only", "ablated", "ablated_without_error_term"):
        t = out[name]
        (line,) = [ln for ln in text.splitlines() if ln.startswith(f"{name}:")]
        assert line.startswith(f"{name}: metric {fmt(t['metric'])} ({t['metric_change']:+.4g}), P "
                               f"{fmt(t['answer_probability'])}")
        assert f"logit {fmt(t['answer_logit'])}" in line and f"rank {t['answer_rank']};" in line
        assert f"KL {fmt(t['kl_from_baseline'])}" in line
    for stat in out["controls"]["stats"]:
        assert f"{stat['metric']}: {fmt(stat['target'])} vs {fmt(stat['control_mean'])}" in text
    assert out["summary"] not in text  # it repeats the rows above (kept in the structured content)


def test_ablation_with_no_control_drawn_says_why_once(tiny_server):
    args = {"prompt": PROMPT, "answer": " mat", "features": list(range(8)), "position": -1, "controls": True,
            "n_controls": 16}  # 8 x 16 controls: more than the SAE's 128 features
    (res,) = call_many(tiny_server, [("ablate_and_test", args)])
    c, text = res.structured_content["controls"], text_of(res)
    assert c["runs"] == [] and c.get("caution") is None  # no "exceeding all of so few controls" when there are none
    (line,) = [ln for ln in text.splitlines() if ln.startswith("controls")]
    assert line.startswith("controls: none drawn (target(s) ") and "do not fire at the ablated positions" in line
    assert "pick targets that fire there" in line
    assert "control features" not in text and "|target|" not in text


def test_every_tool_answers_in_less_text_than_its_structured_content(tiny_server):
    results = call_many(tiny_server, [
        ("model_info", {}),
        ("next_token", {"prompt": PROMPT, "answer": " mat"}),
        ("compare_prompts", {"prompt_a": "the cat sat", "prompt_b": "the dog sat"}),
        ("compare_prompts", {"prompts_a": ["the cat sat", "a cat sat"], "prompts_b": ["the dog sat", "a dog sat"]}),
        ("project_to_vocab", {"feature": 3}),
        ("feature_stats", {"top": 5}),
        ("token_set_enrichment", {"top": 3}),
        ("label_feature", {"feature": 3, "label": "cats", "evidence": "fires on cat"}),
        ("search_explanations", {"query": "cats"}),
    ])
    for res in results:
        assert not res.is_error, text_of(res)
        text = text_of(res)
        assert not re.search(r"\bnull\b", text) and not re.search(r'\n\s+"', text)  # no nulls, no indented JSON
        assert len(text) <= len(json.dumps(res.structured_content, separators=(",", ":")))


def test_attribute_text_gives_each_top_entry_its_attribution_and_exact_contribution(tiny_server):
    (res,) = call_many(tiny_server, [("attribute", {"prompt": PROMPT, "answer": " mat", "counterfactual": " park",
                                                    "top_k": 6})])
    out, text = res.structured_content, text_of(res)
    assert f"= {fmt(out['metric_value'])} (gradient x activation, first order)" in text
    assert len(out["per_token"]) == 1 and "top (position token feature)" in text  # one SAE: named once
    assert "(exact contribution); contribution = metric - metric with it zeroed: > 0 raises the metric" in text
    assert text.count("contribution = metric - metric with it zeroed") == 1  # the sign convention, said once
    rows = text.splitlines()
    for t in out["top"]:
        assert (f"{t['position']} {t['token']!r} {t['feature']}: {fmt(t['activation'])}, "
                f"{fmt(t['attribution'])} ({fmt(t['exact_contribution'])})") in rows
    key = next(iter(out["per_token"]))
    assert f"error share {fmt(out['error_share'][key])}" in text


def test_steer_generate_text_gives_every_dose_seed_text_and_control_statistic(tiny_server):
    (res,) = call_many(tiny_server, [("steer_generate", {
        "prompt": PROMPT, "features": [{"feature": 5, "strength": 4.0}], "calibration": "absolute",
        "max_new_tokens": 8, "strengths": [0.5, 2.0], "seeds": [0, 1], "controls": True, "n_controls": 3,
    })])
    out, text = res.structured_content, text_of(res)
    for run in out["steered"]:
        assert f"dose {fmt(run['scale'])} " in text and f"KL next token {fmt(run['kl_next_token'])}" in text
        for c in run["continuations"]:
            assert repr(c["text"]) in text
    for c in out["unsteered"]:
        assert repr(c["text"]) in text
    for run in out["steered"]:  # plain numbers, not a Python list of strings
        assert f"(coefficients {', '.join(fmt(c) for c in run['coefficients'])})" in text
    assert "coefficients ['" not in text
    for block in out["controls"]:
        for stat in block["stats"]:
            assert f"{stat['metric']}: {fmt(stat['target'])} vs {fmt(stat['control_mean'])}" in text
            # "exceeds" is by magnitude: a target of -0.002 beside controls near -0.004 does not "exceed" them
            assert f"|target| > all: {'yes' if stat['exceeds_all_controls'] else 'no'}" in text


def test_attribute_text_says_an_integrated_gradients_miss_once(tiny_server):
    results = call_many(tiny_server, [("attribute", {"prompt": PROMPT, "answer": " mat", "counterfactual": " park",
                                                     "method": "integrated_gradients", "steps": s}) for s in (1, 32)])
    missed = 0
    for res in results:
        ig, text = res.structured_content["integrated_gradients"], text_of(res)
        assert ig["steps"] in (1, 32)
        warned = [w for w in res.structured_content.get("warnings", []) if w.startswith("integrated gradients with")]
        missed += bool(warned)
        # the sums and endpoint differences are said once: in the warning when one misses, else on their own line
        assert ("path sums vs endpoint differences" in text) != bool(warned)
        assert text.count("path sums vs endpoint differences") + text.count("but the metric moves") == 1
        assert "first order" not in text  # integrated gradients is labelled as itself
    assert missed  # one step misses the endpoint difference on this model


def test_top_examples_text_shows_every_example_band_and_count(stories_server):
    (res,) = call_many(stories_server, [("top_examples", {"feature": 5, "k": 6, "context": 3, "intervals": 3,
                                                          "max_scan_tokens": 6000})])
    out, text = res.structured_content, text_of(res)
    assert f"max {fmt(out['max_activation'])}, density {fmt(out['density'])}" in text
    examples = out["examples"] + [e for band in out.get("intervals") or [] for e in band["examples"]]
    assert examples
    for e in examples:
        shown = "".join(t if i != e["position"] else f"«{t}»" for i, t in enumerate(e["tokens"])).replace("\n", "⏎")
        count = f" (x{e['count']})" if e.get("count") else ""
        assert f"{fmt(e['activation'])} doc {e['document']} @{e['offset']}{count}: {shown}" in text
    for band in out.get("intervals") or []:
        assert f"band [{fmt(band['lower'])}, {fmt(band['upper'])})" in text and f"{band['tokens']} tokens" in text


def test_ablation_text_says_only_the_first_token_of_a_longer_answer_or_counterfactual_is_scored(tiny_server):
    multi, single = call_many(tiny_server, [
        ("ablate_and_test", {"prompt": PROMPT, "answer": " mat on", "counterfactual": " park and", "features": [1]}),
        ("ablate_and_test", {"prompt": PROMPT, "answer": " mat", "counterfactual": " park", "features": [1]}),
    ])
    head = text_of(multi).splitlines()[0]
    out = multi.structured_content
    assert f"answer tokens {out['answer']['tokens']}, only the first scored" in head
    assert f"counterfactual tokens {out['counterfactual']['tokens']}, only the first scored" in head
    assert len(out["answer"]["tokens"]) == len(out["counterfactual"]["tokens"]) == 2
    assert "only the first scored" not in text_of(single)
