#!/usr/bin/env python3
"""The web UI as served by the node at http://127.0.0.1:PORT/, driven in Debian's
headless Chromium through chromedriver. Prints `N passed, N failed`."""

import os
import shutil
import subprocess
import sys
import tempfile
import time

from webdriver import (Results, Session, api_key, assert_accessible, first_run_flow, free_port,
                       http, node_env, target_dir, test_model, ui_checks, wait_for)


HUB_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF"


def main():
    out_dir = os.environ.get("E2E_OUT", tempfile.mkdtemp(prefix="swarmllm-e2e-"))
    os.makedirs(out_dir, exist_ok=True)
    data = tempfile.mkdtemp(prefix="swarmllm-browser-")
    port = free_port()
    # A local stand-in for the Hugging Face Hub serving the test model, for the catalog.
    hub_port = free_port()
    hub = subprocess.Popen(
        [os.path.join(target_dir(), "debug", "swarmllm-hub-testserver"), "--hub-port",
         str(hub_port), "--architecture", "llama", f"{HUB_REPO}={test_model()}"],
        stdout=subprocess.DEVNULL, stderr=open(os.path.join(out_dir, "hub.log"), "w"))
    env = node_env(data)
    env.update({"HF_ENDPOINT": f"http://127.0.0.1:{hub_port}", "HF_HOME": data, "HF_TOKEN": ""})
    node = subprocess.Popen(
        [os.path.join(target_dir(), "debug", "swarmllm"), "--api-port", str(port), "serve",
         "--model", test_model()],
        env=env, stdout=subprocess.DEVNULL,
        stderr=open(os.path.join(out_dir, "browser-node.log"), "w"))
    driver_port = free_port()
    driver = subprocess.Popen(["chromedriver", f"--port={driver_port}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    profile = tempfile.mkdtemp(prefix="swarmllm-chromium-")
    r = Results()
    session = None
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for("the node", lambda: http("GET", f"{base}/health/live")[0] == 200, timeout=90)
        wait_for("chromedriver", lambda: http("GET", f"http://127.0.0.1:{driver_port}/status")[0] == 200)
        key = api_key(data, port)
        session = Session(f"http://127.0.0.1:{driver_port}", {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                         "--no-first-run", "--disable-background-networking",
                         "--disable-component-update", "--disable-sync",
                         "--window-size=1200,900", f"--user-data-dir={profile}"],
            },
        }})
        # The key travels in the fragment (never sent to the server) and is kept
        # in the page's localStorage.
        session.go(f"{base}/#key={key}")
        ui_checks(r, session, base, key, out_dir, in_app=False, data_dir=data)

        def catalog():
            session.js("location.hash = '#/models'")
            wait_for("the models page", lambda: session.js("return document.querySelector('#hf-query') !== null"))
            session.type("#hf-query", "smollm2")
            session.click("#hf-search")
            wait_for("a catalog result", lambda: session.js(
                f"return document.querySelector('.hf-repo[data-repo=\"{HUB_REPO}\"]') !== null"))
            badge = session.text(".hf-repo .badge")
            assert badge == "fits", badge
            session.page_screenshot(os.path.join(out_dir, "catalog.png"))
            session.click("button[data-hf='share']")
            # Alone in its swarm, a node's fair share is every shard: a live progress
            # bar, then done.
            wait_for("the Hub download in the list", lambda: "huggingface" in session.text("#downloads"))
            wait_for("the download to finish", lambda: http("GET", f"{base}/api/admin/models/smollm2-135m-instruct.q4_1/status")[1].get("held_shards") == [0, 1, 2], timeout=120)
            wait_for("done in the list", lambda: "done" in session.text("#downloads"))
            session.page_screenshot(os.path.join(out_dir, "catalog-downloaded.png"))
            # The model list follows: the new model with its three shards on disk.
            wait_for("the model in the list", lambda: session.js(
                "return document.querySelectorAll('.model[data-model=\"smollm2-135m-instruct.q4_1\"] button[data-act]').length") == 3)
            # The network page's picture of the swarm shows this node's layers of it.
            session.js("location.hash = '#/network'")
            wait_for("this node in the swarm picture", lambda: session.js(
                "return document.querySelectorAll('.swarm-model[data-model=\"smollm2-135m-instruct.q4_1\"] rect.self').length") > 0)
            session.screenshot("#swarm-map", os.path.join(out_dir, "swarm-map.png"))
            session.js("location.hash = '#/models'")
            wait_for("the models page", lambda: session.js("return document.querySelector('#hf-query') !== null"))
            toast = session.js("const t = document.querySelector('#toast'); return t.className")
            assert toast != "error", session.text("#toast")
            session.page_screenshot(os.path.join(out_dir, "catalog-downloaded.png"))
        r.check("the catalog finds, sizes and downloads a Hub model", catalog)

        def auto_manage():
            # The downloaded model is the user's choice: Pinned, auto-manage off.
            sel = '.model[data-model="smollm2-135m-instruct.q4_1"]'
            assert session.text(f"{sel} .trust") == "Pinned", session.text(f"{sel} .trust")
            session.click(f"{sel} input[data-auto]")
            wait_for("auto-manage on", lambda: http("GET", f"{base}/api/admin/models/smollm2-135m-instruct.q4_1/auto-manage")[1].get("enabled") is True)
            session.click(f"{sel} input[data-auto]")
            wait_for("auto-manage off", lambda: http("GET", f"{base}/api/admin/models/smollm2-135m-instruct.q4_1/auto-manage")[1].get("enabled") is False)
            session.page_screenshot(os.path.join(out_dir, "auto-manage.png"))
        r.check("a model's trust level shows and its auto-manage switch works", auto_manage)

        def schedule():
            session.js("location.hash = '#/settings'")
            wait_for("the schedule form", lambda: session.js("return document.querySelector('#schedule-mon') !== null"))
            # A range the node refuses: its message shows, nothing is saved.
            session.click("#schedule-enabled")
            session.type("#schedule-tue", "18-9")
            session.click("#schedule-save")
            wait_for("the node's refusal", lambda: "tue" in session.text("#schedule-status"))
            assert session.js("return document.querySelector('#schedule-status').className") == "error"
            assert http("GET", f"{base}/api/admin/schedule")[1]["enabled"] is False
            # Monday to Friday 9-17 (no hours on Tuesday): saved as the API's shape.
            session.js("document.querySelector('#schedule-tue').value = ''")
            for d in ["mon", "wed", "thu", "fri"]:
                session.type(f"#schedule-{d}", "9-17")
            session.type("#schedule-sat", "10-12, 20-24")
            session.click("#schedule-save")
            wait_for("saved", lambda: session.text("#schedule-status").startswith("Saved"))
            saved = http("GET", f"{base}/api/admin/schedule")[1]
            assert saved["enabled"] is True, saved
            assert saved["weekdays"].get("mon") == [{"start": 9, "end": 17}], saved
            assert saved["weekdays"].get("sat") == [{"start": 10, "end": 12}, {"start": 20, "end": 24}], saved
            assert "tue" not in saved["weekdays"] and "sun" not in saved["weekdays"], saved
            session.page_screenshot(os.path.join(out_dir, "schedule.png"))
            # Switched off again through the page (the node contributes at all hours).
            session.click("#schedule-enabled")
            session.click("#schedule-save")
            wait_for("off", lambda: http("GET", f"{base}/api/admin/schedule")[1]["enabled"] is False)
        r.check("the contribution schedule is set and refused from Settings", schedule)

        def client_keys():
            session.js("location.hash = '#/settings'")
            wait_for("the client keys section", lambda: session.js("return document.querySelector('#client-key-create') !== null"))
            session.type("#client-key-name", "notes app")
            session.click("#client-key-create")
            wait_for("the new key shown", lambda: session.js("return document.querySelector('#client-key-value').value").startswith("swl-client-"))
            new_key = session.js("return document.querySelector('#client-key-value').value")
            wait_for("the key listed", lambda: "notes app" in session.text("#client-keys"))
            assert new_key not in session.text("#client-keys")
            chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
            auth = {"Authorization": f"Bearer {new_key}"}
            status, v = http("POST", f"{base}/v1/chat/completions", chat, auth)
            assert status == 200, v
            assert http("PUT", f"{base}/api/admin/config", {}, auth)[0] == 401
            session.page_screenshot(os.path.join(out_dir, "client-keys.png"))
            session.click("#client-keys button[data-revoke]")
            wait_for("the key gone from the list", lambda: "None yet" in session.text("#client-keys"))
            assert http("POST", f"{base}/v1/chat/completions", chat, auth)[0] == 401
        r.check("a client key is made in Settings, runs inference only, and is revoked there", client_keys)

        def responses_tab():
            auth = {"Authorization": f"Bearer {key}"}
            status, made = http("POST", f"{base}/v1/responses", {"input": "Say hi.", "max_output_tokens": 4}, auth)
            assert status == 200, made
            session.js("location.hash = '#/dashboard'")
            wait_for("the response listed", lambda: session.js(
                f"return document.querySelector('#responses tr[data-response=\"{made['id']}\"]') !== null"))
            session.js("const s = document.querySelector('#responses-status'); s.value = 'failed'; s.onchange()")
            wait_for("the filter applied", lambda: "None yet" in session.text("#responses"))
        r.check("the dashboard lists the Responses API's stored responses by status", responses_tab)

        def first_run():
            # A fresh install: a node with no model, no peers and an empty data dir.
            started = time.monotonic()
            data2 = tempfile.mkdtemp(prefix="swarmllm-first-run-")
            port2 = free_port()
            env2 = node_env(data2)
            env2.update({"HF_ENDPOINT": f"http://127.0.0.1:{hub_port}", "HF_HOME": data2, "HF_TOKEN": ""})
            fresh = subprocess.Popen(
                [os.path.join(target_dir(), "debug", "swarmllm"), "--api-port", str(port2), "serve"],
                env=env2, stdout=subprocess.DEVNULL,
                stderr=open(os.path.join(out_dir, "first-run-node.log"), "w"))
            try:
                base2 = f"http://127.0.0.1:{port2}"
                wait_for("the fresh node", lambda: http("GET", f"{base2}/health/live")[0] == 200, timeout=90)
                session.go(f"{base2}/#key={api_key(data2, port2)}")
                first_run_flow(session, out_dir, started, HUB_REPO)
                # Once greeted, the app opens on the dashboard.
                session.go(f"{base2}/")
                wait_for("the dashboard", lambda: session.js("return document.body.dataset.page") == "dashboard")
            finally:
                fresh.terminate()
                fresh.wait(timeout=30)
                shutil.rmtree(data2, ignore_errors=True)
        r.check("first run: welcome, the recommended model downloaded, chat to the first token", first_run)

        def dark_theme_accessible():
            # The same pages in the dark theme (Chromium emulates the OS setting).
            session.go(f"{base}/#/dashboard")
            wait_for("the node's UI", lambda: session.js("return document.body.dataset.ready") == "true")
            session.cmd("POST", "/goog/cdp/execute", {"cmd": "Emulation.setEmulatedMedia", "params": {
                "features": [{"name": "prefers-color-scheme", "value": "dark"}]}})
            try:
                assert_accessible(session, ("dashboard", "network", "models", "chat", "pool", "credits", "settings"))
                session.page_screenshot(os.path.join(out_dir, "settings-dark.png"))
            finally:
                session.cmd("POST", "/goog/cdp/execute", {"cmd": "Emulation.setEmulatedMedia", "params": {"features": []}})
        r.check("the dark theme passes the same accessibility checks", dark_theme_accessible)

        def no_key_no_writes():
            status, _ = http("POST", f"{base}/api/pool/create", {"name": "x"},
                             headers={"Origin": base})
            assert status == 401, status
        r.check("the API still refuses writes without the key", no_key_no_writes)
    finally:
        if session:
            session.quit()
        driver.terminate()
        hub.terminate()
        node.terminate()
        node.wait(timeout=30)
        shutil.rmtree(profile, ignore_errors=True)
        shutil.rmtree(data, ignore_errors=True)
    print(f"screenshots in {out_dir}")
    return r.summary()


if __name__ == "__main__":
    sys.exit(main())
