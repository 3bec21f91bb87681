#!/usr/bin/env python3
"""The web UI as served by the node at http://127.0.0.1:PORT/, driven in Debian's
headless Chromium through chromedriver. Prints `N passed, N failed`."""

import os
import shutil
import subprocess
import sys
import tempfile

from webdriver import (Results, Session, api_key, free_port, http, node_env, target_dir,
                       test_model, ui_checks, wait_for)


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
