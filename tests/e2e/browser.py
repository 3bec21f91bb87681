#!/usr/bin/env python3
"""The web UI as served by the node at http://127.0.0.1:PORT/, driven in Debian's
headless Chromium through chromedriver. Prints `N passed, N failed`."""

import os
import shutil
import subprocess
import sys
import tempfile
import time

from webdriver import (Results, Session, a11y_findings, api_key, free_port, http, node_env,
                       target_dir, test_model, ui_checks, wait_for)


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
        ui_checks(r, session, base, key, out_dir, in_app=False)

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

        def network_page():
            session.js("location.hash = '#/network'")
            wait_for("the network page", lambda: session.js("return document.querySelector('#net-qr svg') !== null"))
            code = session.js("return document.querySelector('#net-code').value")
            assert code.startswith("swarm://"), code
            # The QR picture holds the same code, as another device's app reads it.
            png = session.screenshot("#net-qr", os.path.join(out_dir, "network-qr.png"))
            auth = {"Authorization": f"Bearer {key}"}
            status, v = http("POST", f"{base}/api/admin/network-code/scan", raw=png,
                             headers={**auth, "Content-Type": "image/png"})
            assert status == 200 and v["code"] == code, f"{status} {v}"
            # A pool code's picture is not a network code: a clear refusal.
            status, v = http("POST", f"{base}/api/admin/network-code/scan",
                             raw=open(os.path.join(out_dir, "invite-qr.png"), "rb").read(),
                             headers={**auth, "Content-Type": "image/png"})
            assert status == 422 and v["error"]["code"] == "NOT_A_NETWORK_CODE", f"{status} {v}"
            # The swarm picture shows the model's layers this node holds.
            wait_for("this node in the swarm picture", lambda: session.js(
                "return document.querySelectorAll('.swarm-model[data-model=\"smollm2-135m-instruct.q4_1\"] rect.self').length") > 0)
            # Joining with a malformed code: the node's message, in red.
            session.type("#net-join-code", "swarm://nonsense")
            session.click("#net-join")
            msg = wait_for("the refusal", lambda: session.js(
                "const p = document.querySelector('#net-message'); return p.className === 'error' && p.textContent"))
            assert "code" in msg.lower(), msg
            session.page_screenshot(os.path.join(out_dir, "network.png"))
            session.screenshot("#swarm-map", os.path.join(out_dir, "swarm-map.png"))
        r.check("the network page shows this node's code and QR, the swarm, and refuses a bad code", network_page)

        def devices():
            session.js("location.hash = '#/pool'")
            wait_for("the pool page", lambda: session.js("return document.querySelector('#pool-create') !== null"))
            session.type("#pool-name", "Home")
            session.click("#pool-create")
            wait_for("the owner view", lambda: session.js("return document.querySelector('#members') !== null"))
            state = lambda: http("GET", f"{base}/api/pool/state")[1]

            def said(words, cls="ok"):
                # The page renders again after a change, then says what happened.
                return wait_for(f"'{words}' on the page", lambda: session.js(
                    "const p = document.querySelector('#pool-message');"
                    f" return p !== null && p.className === '{cls}' && p.textContent.includes('{words}')"))
            # Rename this device.
            session.js("document.querySelector('#rename').value = ''")
            session.type("#rename", "Desk PC")
            session.click("#rename-save")
            said("Renamed")
            assert state()["members"][0]["device_name"] == "Desk PC"
            # The credit split: refused past 50 %, saved within.
            session.js("document.querySelector('#split').value = '80'")
            session.click("#split-save")
            said("50", cls="error")
            session.js("document.querySelector('#split').value = '20'")
            session.click("#split-save")
            said("keep 20%")
            assert state()["credit_split_pct"] == 20
            # A contribution level for this device.
            me = state()["members"][0]["node_id"]
            session.js(f"document.querySelector('input[data-level=\"{me}\"]').value = '60'")
            session.click(f"button[data-set-level='{me}']")
            said("set to 60%")
            assert state()["members"][0]["contribution"] == 60
            # Invite by a malformed node id: the node's message.
            session.type("#invite-node", "not-a-node")
            session.click("#invite-send")
            said("node", cls="error")
            # Pin the model's shard 1 on this device, then unpin it.
            session.type("#pin-model", "smollm2-135m-instruct.q4_1")
            session.type("#pin-shards", "1")
            session.click("#pin-add")
            pins = lambda: http("GET", f"{base}/api/pool/pins")[1]["pins"]
            said("Pinned")
            assert pins() == [{"model_id": "smollm2-135m-instruct.q4_1", "target_node_id": me, "shard_indices": [1]}], pins()
            assert "Desk PC" in session.text("#pins"), session.text("#pins")
            session.page_screenshot(os.path.join(out_dir, "devices.png"))
            session.click("button[data-unpin='0']")
            said("Unpinned")
            assert pins() == [], pins()
            # LAN devices count as the pool's in private mode.
            wait_for("the private-mode switches", lambda: session.js("return document.querySelector('#pm-lan') !== null"))
            session.click("#pm-lan")
            said("Private mode saved")
            assert http("GET", f"{base}/api/pool/private-mode")[1]["allow_lan"] is True
            session.js("document.querySelector('#pool-message').textContent = ''")
            session.click("#pm-lan")
            said("Private mode saved")
            assert http("GET", f"{base}/api/pool/private-mode")[1]["allow_lan"] is False
            session.click("#leave")
            wait_for("out of the pool", lambda: state()["in_pool"] is False)
        r.check("my devices: rename, credit split, contribution, invite, pins, private-mode switches", devices)

        def settings_form():
            session.js("location.hash = '#/settings'")
            wait_for("the settings form", lambda: session.js("return document.querySelector('#set-context_size') !== null"))
            before = http("GET", f"{base}/api/admin/config")[1]["context_size"]
            hint = session.text("#hint-context_size")
            assert "default 4096" in hint and "restart" in hint, hint
            # Out of range: the node's message at the field, nothing saved.
            session.js("document.querySelector('#set-context_size').value = '10'")
            session.click("button[data-save-group='0']")
            msg = wait_for("the node's message at the field", lambda: session.text("#err-context_size"))
            assert "at least 64" in msg, msg
            assert http("GET", f"{base}/api/admin/config")[1]["context_size"] == before
            # In range: saved, with the restart it needs said.
            session.js("document.querySelector('#set-context_size').value = '2048'")
            session.click("button[data-save-group='0']")
            note = wait_for("saved", lambda: "Saved" in session.text("#group-note-0") and session.text("#group-note-0"))
            assert "context_size" in note and "restart" in note, note
            # Saved for the next start; the running node keeps its context.
            with open(os.path.join(data, "config.toml")) as f:
                assert "context_size = 2048" in f.read()
            assert http("GET", f"{base}/api/admin/config")[1]["context_size"] == before
            # A switch that applies at once.
            session.click("#set-auto_prune")
            session.click("button[data-save-group='2']")
            wait_for("applied", lambda: session.text("#group-note-2") == "Saved and applied.")
            assert http("GET", f"{base}/api/admin/config")[1]["auto_prune"] is False
            session.page_screenshot(os.path.join(out_dir, "settings.png"))
            status, _ = http("PUT", f"{base}/api/admin/config", {"context_size": before, "auto_prune": True},
                             headers={"Authorization": f"Bearer {key}"})
            assert status == 200
        r.check("settings: grouped fields with defaults and ranges, the node's messages at the field", settings_form)

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
                wait_for("the welcome page", lambda: session.js("return document.body.dataset.page") == "welcome")
                wait_for("a recommendation", lambda: session.js(
                    "return document.querySelector('button[data-rec=\"0\"]') !== null"), timeout=60)
                assert HUB_REPO in session.text("#recs"), session.text("#recs")
                session.page_screenshot(os.path.join(out_dir, "welcome.png"))
                session.click("button[data-rec='0']")
                wait_for("the model ready", lambda: "is ready" in session.text("#rec-status"), timeout=240)
                session.click("#welcome-done")
                wait_for("the chat with the model", lambda: session.js(
                    "return document.querySelector('#chat-model')?.value") == "smollm2-135m-instruct.q4_1")
                session.type("#chat-input", "Say hello.")
                session.click("#chat-send")
                wait_for("the first streamed token", lambda: len(session.js(
                    "return document.querySelector('#chat-output')?.textContent || ''")) > 0, timeout=120)
                print(f"fresh install to the first streamed token of the recommended model: "
                      f"{time.monotonic() - started:.1f} s (start, catalog, 98 MB download from the "
                      f"local Hub server, load, prompt)")
                wait_for("the end of the reply", lambda: session.js(
                    "return document.querySelector('#chat-output').dataset.done") == "true", timeout=120)
                session.page_screenshot(os.path.join(out_dir, "first-run-chat.png"))
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
                findings = {}
                for page in ("dashboard", "network", "models", "chat", "pool", "credits", "settings"):
                    session.js(f"location.hash = '#/{page}'")
                    wait_for(f"the {page} page", lambda: session.js("return document.body.dataset.page") == page
                             and session.js("return document.querySelector('main h1') !== null"))
                    # Rendered, not an error page.
                    assert not session.js("return document.querySelector('#page-error')"), session.text("main")
                    found = a11y_findings(session)
                    if found:
                        findings[page] = found
                session.page_screenshot(os.path.join(out_dir, "settings-dark.png"))
                assert not findings, "\n".join(f"{p}: {f}" for p, fs in findings.items() for f in fs)
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
