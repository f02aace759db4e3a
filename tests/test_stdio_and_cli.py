"""The real protocol: `sae-mcp serve` as a subprocess over stdio, `sae-mcp call`, `doctor`, and fast offline failure."""

from __future__ import annotations

import json
import subprocess
import sys

import anyio
import pytest
from mcp import Client, StdioServerParameters

from helpers.models import STORIES_HF
from helpers.servers import CLI_ENV, free_port

CLI = [sys.executable, "-m", "sae_mcp"]


def test_serve_answers_every_prompt_tool_over_stdio(stories_sae_dir, tmp_path):
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "sae_mcp", "serve", "--model", str(STORIES_HF), "--sae", f"res2={stories_sae_dir}",
              "--device", "cpu", "--data-dir", str(tmp_path)],
        env=CLI_ENV,
    )

    async def session():
        async with Client(params, read_timeout_seconds=300) as client:
            names = {t.name for t in (await client.list_tools()).tools}
            info = await client.call_tool("model_info", {})
            acts = await client.call_tool("get_feature_acts", {"prompt": "Once upon a time", "sae": "res2", "top_k": 3})
            bad = await client.call_tool("project_to_vocab", {"feature": 99999})
            nxt = await client.call_tool(
                "next_token", {"prompt": "Once upon a time, there was a little girl named", "answer": " Lily"}
            )
            proj = await client.call_tool("project_to_vocab", {"feature": 1, "top_k": 3})
            cmp = await client.call_tool("compare_prompts", {"prompt_a": "She was happy.", "prompt_b": "She was sad."})
            return names, info, acts, bad, nxt, proj, cmp

    names, info, acts, bad, nxt, proj, cmp = anyio.run(session)
    assert {"model_info", "get_feature_acts", "compare_prompts", "next_token", "project_to_vocab"} <= names
    assert info.structured_content["saes"][0]["key"] == "res2"
    assert acts.structured_content["tokens"] == ["<s>", " Once", " upon", " a", " time"]
    assert bad.is_error and "less than or equal to 1023" in bad.content[0].text
    assert nxt.structured_content["answer"]["rank"] == 0  # the server kept working after the error
    assert len(proj.structured_content["top_positive"]) == 3
    assert cmp.structured_content["mode"] == "pair"


def test_call_prints_the_structured_result_as_json_on_stdout(stories_sae_dir):
    out = subprocess.run(
        CLI + ["call", "next_token", "--json", json.dumps({"prompt": "Once upon a time", "top_k": 2}),
               "--model", str(STORIES_HF), "--sae", str(stories_sae_dir), "--device", "cpu", "--compact"],
        capture_output=True, text=True, env=CLI_ENV, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)  # stdout holds nothing but the JSON
    assert len(result["top"]) == 2 and result["tokens"][0] == "<s>"


def test_call_with_bad_arguments_exits_nonzero_with_the_message(stories_sae_dir):
    out = subprocess.run(
        CLI + ["call", "project_to_vocab", "--json", '{"feature": 100000}', "--model", str(STORIES_HF),
               "--sae", str(stories_sae_dir), "--device", "cpu"],
        capture_output=True, text=True, env=CLI_ENV, timeout=300,
    )
    assert out.returncode == 1 and out.stdout == ""
    assert "feature" in out.stderr and "less than or equal to 1023" in out.stderr


def test_default_serve_offline_without_cache_fails_fast_with_what_to_do(tmp_path):
    out = subprocess.run(CLI + ["serve", "--device", "cpu", "--data-dir", str(tmp_path)],
                         capture_output=True, text=True, env=CLI_ENV, timeout=120, stdin=subprocess.DEVNULL)
    if out.returncode == 0:
        pytest.skip("gpt2-small and its SAE are cached here, so serve would start")
    assert out.returncode == 2
    # one message names both missing pieces and what to do about each
    assert "not in the Hugging Face cache" in out.stderr
    assert (
        "--model /path" in out.stderr and "--sae /path" in out.stderr and "huggingface-cli download gpt2" in out.stderr
    )
    assert out.stdout == ""


def test_doctor_reports_versions_device_and_cache_state(tmp_path):
    out = subprocess.run(
        CLI + ["doctor", "--data-dir", str(tmp_path)], capture_output=True, text=True, env=CLI_ENV, timeout=120
    )
    assert out.returncode == 0, out.stderr
    needles = ("torch", "sae-lens", "transformer-lens", "mcp", "device (auto)", "gpt2-small", "blocks.7.hook_resid_pre")
    for needle in needles:
        assert needle in out.stdout


def test_serve_over_http_answers_mcp_and_serves_the_card_page_that_results_link_to(stories_sae_dir, tmp_path):
    import time

    import requests

    port = free_port()
    proc = subprocess.Popen(
        CLI + ["serve", "--transport", "http", "--port", str(port), "--model", str(STORIES_HF),
               "--sae", f"res2={stories_sae_dir}", "--device", "cpu", "--data-dir", str(tmp_path)],
        env=CLI_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 240
        page = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                page = requests.get(f"http://127.0.0.1:{port}/features/res2/3", timeout=30)
                break
            except requests.ConnectionError:
                time.sleep(0.5)
        assert page is not None, proc.stderr.read().decode()[-2000:] if proc.poll() is not None else "no answer"
        assert page.status_code == 200 and "res2" in page.text

        async def session():
            async with Client(f"http://127.0.0.1:{port}/mcp", read_timeout_seconds=120) as client:
                return (await client.call_tool("get_feature_acts", {"prompt": "Once upon a time", "top_k": 2}),
                        await client.call_tool("project_to_vocab", {"feature": 3, "top_k": 2}))

        acts, lens = anyio.run(session)
        assert acts.structured_content["tokens"][0] == "<s>" and "page" not in acts.structured_content
        # a result naming one feature links to the page that shows it, on this server
        assert lens.structured_content["page"] == f"http://127.0.0.1:{port}/features/res2/3"
        assert requests.get(lens.structured_content["page"], timeout=30).status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)
