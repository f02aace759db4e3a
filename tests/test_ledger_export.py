"""A recorded session leaves something a person can check: a script that redoes every run with plain
transformer-lens + sae-lens and asserts the recorded numbers (run here in a subprocess that cannot import sae_mcp),
the same as a notebook (valid nbformat, executed with nbclient), a markdown report, and a replay that finds no
difference on the unchanged setup and reports the differences after swapping in another SAE."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

from sae_mcp.ledger.export import cells, write_ipynb
from sae_mcp.ledger.export.session import load_session
from sae_mcp.ledger.store import LedgerStore
from sae_mcp.server.tools import tool_map

from helpers.models import STORIES_HOOK, make_sae_folder
from helpers.servers import CLI_ENV, cli, volatile
from helpers.session import WITHOUT_SAE_MCP, record_session

ALLOWED_IMPORTS = {"torch", "sae_lens", "transformer_lens", "transformers", "pandas", "json", "hashlib", "pathlib",
                   "datasets"}


@pytest.fixture(scope="module")
def session(stories_engine, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("export_data")
    record_session(stories_engine, data_dir)
    store = LedgerStore.for_data_dir(data_dir)
    (recorded,) = store.sessions()
    return dict(data_dir=data_dir, store=store, data=load_session(store, recorded.id, tool_map()))


def test_the_exported_script_redoes_every_run_without_sae_mcp(session, tmp_path):
    path = tmp_path / "session.py"
    rc, out = cli("ledger", "export", "--data-dir", str(session["data_dir"]), "--session", session["data"].id,
                  "--format", "py", "--out", str(path))
    assert rc == 0 and "29 runs, 2 labels" in out
    source = path.read_text()
    imported = {(n.module or "").split(".")[0] for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name.split(".")[0] for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Import)
                 for a in n.names}
    assert imported <= ALLOWED_IMPORTS, imported - ALLOWED_IMPORTS
    for needle in ("run_with_cache_with_saes", "model.hooks(fwd_hooks", "torch.autograd.grad", "brute_force(",
                   "get_pretrained_state_dict", "load_and_process_state_dict", "SAE.load_from_disk"):
        assert needle in source, needle
    done = subprocess.run([sys.executable, "-c", WITHOUT_SAE_MCP, str(path)], capture_output=True, text=True,
                          env=CLI_ENV, cwd=tmp_path, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    redone = [line for line in done.stdout.splitlines() if "reproduced" in line]
    tools = ["get_feature_acts", "compare_prompts", "compare_prompts (sets)", "next_token", "next_token",
             "project_to_vocab", "project_to_vocab", "top_examples", "ablate_and_test", "attribute (gradient)",
             "attribute (integrated_gradients)", "steer_generate", "steer_generate", "patch_features",
             "patch_features", "trace_circuit", "trace_circuit"]
    assert [line.split(" ", 1)[1].split(" reproduced")[0] for line in redone] == tools
    assert "2 of 2 texts identical" in redone[11] or "3 of 3" in redone[11]  # greedy: asserted exactly
    assert done.stdout.strip().endswith("every redone run matched the ledger (17 runs)")


def test_the_exported_notebook_is_valid_and_executes(session, tmp_path):
    nbformat = pytest.importorskip("nbformat", reason="nbformat is not installed (pip install -e '.[test]')")
    nbclient = pytest.importorskip("nbclient", reason="nbclient is not installed (pip install -e '.[test]')")
    pytest.importorskip("ipykernel", reason="ipykernel is not installed: no kernel to run the notebook")
    path = tmp_path / "session.ipynb"
    write_ipynb(cells(session["data"]), path)
    nb = nbformat.read(str(path), as_version=4)
    nbformat.validate(nb)
    markdown = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    assert "*Lily's name*" in markdown and "Cites runs:" in markdown and "an uncited hunch" in markdown
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the kernel inherits it
    client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {
        "path": str(tmp_path)}})
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError:
        raise
    except Exception as exc:  # no kernel can start here (sandbox, missing kernelspec): say so
        pytest.skip(f"a Jupyter kernel could not run here: {type(exc).__name__}: {exc}")
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert printed.count("reproduced") == 17 and "every redone run matched the ledger (17 runs)" in printed


def test_the_markdown_report_has_the_question_the_findings_the_setup_and_every_run(session, tmp_path):
    path = tmp_path / "report.md"
    rc, _ = cli("ledger", "export", "--data-dir", str(session["data_dir"]), "--session", session["data"].id[:5],
                "--format", "md", "--out", str(path))
    text = path.read_text()
    assert rc == 0 and "**Question**: 'Once upon a time, there was a little girl named Lily'" in text
    appendix = text.split("## Appendix: every run\n", 1)[1]
    for run in session["data"].runs:
        assert f'<a id="{run.id}"></a>\n### `{run.id}` ' in appendix
    assert "causal effect of the ablation" in appendix and " (failed)\n" in appendix
    assert text.index("## Findings") < text.index("## Setup") < text.index("## Appendix: every run")
    assert "weights sha256" in text and "sae-lens" in text


def test_the_report_lists_each_label_with_the_runs_it_cites(session, tmp_path):
    path = tmp_path / "labels.md"
    assert cli("ledger", "export", "--data-dir", str(session["data_dir"]), "--format", "md", "--out", str(path))[0] == 0
    text = path.read_text()  # the latest session by default
    findings = text.split("## Findings\n", 1)[1].split("## Setup", 1)[0]
    cited = session["data"].labels[0].evidence_runs
    assert "### Feature 7 (`" in findings and "- Label *Lily's name* ([`" in findings
    assert "  - Not scored blind\n  - Evidence: ablation moves" in findings
    assert f"  - Cites [`{cited[0]}`](#{cited[0]}) ablate_and_test: ablated vs baseline" in findings
    assert f"  - Cites [`{cited[1]}`](#{cited[1]}) top_examples: max " in findings
    assert "- Scored, not recorded as a label: *a word ending*\n  - Score: detection balanced accuracy" in findings
    assert "an uncited hunch" in findings and "no such evidence" not in findings  # the refused label: not a finding
    assert "no run 'r00000000' in the ledger" in text.split("## Appendix: every run", 1)[1]


def test_replay_finds_no_difference_unchanged_and_reports_a_swapped_sae(session, tmp_path):
    sid = session["data"].id
    base = ["ledger", "replay", "--data-dir", str(session["data_dir"]), "--session", sid, "--device", "cpu"]
    rc, out = cli(*base)
    assert rc == 0, out
    assert "29 same, 0 differ, 0 skipped" in out and "changed since the recording" not in out
    other = make_sae_folder(tmp_path / "other_sae", 64, 256, STORIES_HOOK, seed=3)
    rc, out = cli(*base, "--sae", str(other))
    assert rc == 1
    assert f"changed since the recording: SAE {STORIES_HOOK} weights_id" in out
    lines = {line.split()[1]: line for line in out.splitlines() if line.startswith("r") and len(line.split()) > 2}
    assert "differs: " in lines["get_feature_acts"] and "differs: " in lines["top_examples"]
    assert lines["next_token"].endswith("same")  # the plain model's prediction does not involve the SAE
    assert "project_to_vocab" in lines and "differ" in out.splitlines()[-1]


def test_a_cut_copy_of_a_long_result_is_checked_on_what_it_kept(tmp_path):
    """The ledger keeps a cut copy of a result over its size limit (each long list's first 32 items, then a
    left_out marker). The exported check must not read the cut as 'nothing else fired': 40 features fire here,
    the copy keeps the largest 32 of top_k 50, and the cell passes; a feature left out that is larger than the last
    one kept still fails it."""
    import importlib

    import torch

    from sae_mcp.ledger.records import Run
    from sae_mcp.server.tools.get_feature_acts import cell as feature_acts

    acts = torch.zeros(3, 64)  # [seq, d_sae]
    acts[2, :40] = torch.linspace(4.0, 0.1, 40)  # 40 features fire at position 2, in descending order
    kept = [{"feature": f, "activation": round(float(acts[2, f]), 6)} for f in range(32)] + [{"left_out": 8}]
    run = Run(id="rcut", session="s", env="e", time=0.0, tool="get_feature_acts", given={}, wall_s=0.0, ok=True,
              resolved={"sae": "k", "prompt": "a b", "prepend_bos": True, "top_k": 50}, truncated=True,
              result={"tokens": ["<s>", "a", "b"], "positions": [{"position": 2, "l0": 40, "top": kept}]})
    preamble = importlib.import_module("sae_mcp.ledger.export.preamble")  # the package exports a function of that name
    env = {"torch": torch, "ATOL": 1e-3, "RTOL": 1e-3, "sae_acts": lambda key, prompt, prepend_bos: acts}
    exec(preamble.CHECKS.split("def hook_of")[0], env)  # close, check_rank, kl
    exec("def check_top" + preamble.CHECKS.split("def check_top")[1].split("\ndef ")[0], env)
    exec(feature_acts(run), env)  # passes: nothing left out exceeds the 32nd kept value
    acts[2, 50] = 3.0  # a left-out feature larger than the last kept one: the check must still catch it
    with pytest.raises(AssertionError, match="outside the recorded top"):
        exec(feature_acts(run), env)


def test_replay_reads_last_digits_moved_as_close_and_a_real_change_as_differs():
    """Another thread count or device moves the last digits of a float (measured: 0.795124 -> 0.795123, and a
    Cohen's d of two-prompt sets -16.976 -> -16.97): replay says 'close', not 'differs'; a moved number beyond the
    tolerance, or any other field, still differs; a field the recorded result lacks counts only when not null."""
    from mcp.types import CallToolResult

    from sae_mcp.ledger.export.replay import FLOAT_RTOL, compare
    from sae_mcp.ledger.recording import digest_of
    from sae_mcp.ledger.records import Run

    recorded = {"tokens": ["<s>", "a"], "diffs": [{"feature": 3, "effect_size": -16.976, "exact": 0.795124}]}
    run = Run(id="r1", session="s", env="e", time=0.0, tool="compare_prompts", given={}, resolved={}, wall_s=0.0,
              ok=True, result=recorded, digest=digest_of(volatile("compare_prompts"), recorded))

    def now(**change):
        diff = {**recorded["diffs"][0], **change}
        return CallToolResult(content=[], structured_content={**recorded, "diffs": [diff]})

    assert compare(run, now(), volatile("compare_prompts")).status == "same"
    assert compare(run, now(effect_size=-16.97, exact=0.795123), volatile("compare_prompts")).status == "close"
    moved = compare(run, now(exact=0.795124 * (1 + 3 * FLOAT_RTOL)), volatile("compare_prompts"))
    assert moved.status == "differs" and "diffs[0].exact" in moved.detail
    assert compare(run, now(feature=4), volatile("compare_prompts")).status == "differs"
    # a field a later version added: null says nothing for this call (same); a value is a difference
    assert compare(run, now(added=None), volatile("compare_prompts")).status == "same"
    added = compare(run, now(added=2), volatile("compare_prompts"))
    assert added.status == "differs" and "diffs[0].added: new" in added.detail
