#!/usr/bin/env python3
"""The desktop app, launched for real under Xvfb and driven through tauri-driver
(WebKitWebDriver): the same UI checks as the browser test, inside the app (its
requests go through Tauri commands), plus the app's own life cycle: the localhost
API answers while the app runs, updates through Tauri's updater from a local
update server (a signed newer version found, downloaded and installed; tampered,
unsigned, foreign-key and downgraded ones refused), closing the window keeps the
node running, and a shutdown ends the app. Prints start-up time and idle memory, then
`N passed, N failed`. Run it under `xvfb-run -a dbus-run-session --`."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from webdriver import (Results, Session, api_key, first_run_flow, free_port, http, node_env, rss_mb,
                       target_dir, test_model, ui_checks, wait_for)

HUB_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF"
UPDATE_VERSION = "99.0.0"


def start_update_server(workdir):
    """The local update server, offering UPDATE_VERSION: a small ELF (this
    machine's `true`) as the new "AppImage". Returns the process, its printed
    endpoint/pubkey/control, the payload's bytes, and the file the app's update
    replaces (a copy of `false`, so the binary under test stays as it is)."""
    payload = os.path.join(workdir, "new-version")
    shutil.copy(shutil.which("true"), payload)
    target = os.path.join(workdir, "SwarmLLM.AppImage")
    shutil.copy(shutil.which("false"), target)
    server = subprocess.Popen(
        [os.path.join(target_dir(), "debug", "swarmllm-update-testserver"), "--version", UPDATE_VERSION,
         "--payload", payload], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    info = json.loads(server.stdout.readline())
    with open(payload, "rb") as f:
        return server, info, f.read(), target


def app_pid(binary):
    out = subprocess.run(["pgrep", "-f", "-x", f"{binary}.*"], capture_output=True, text=True)
    pids = [int(p) for p in out.stdout.split()]
    return pids[0] if pids else None


def main():
    out_dir = os.environ.get("E2E_OUT", tempfile.mkdtemp(prefix="swarmllm-e2e-"))
    os.makedirs(out_dir, exist_ok=True)
    # E2E_PROFILE=release measures the release build (what the .deb ships).
    app = os.path.join(target_dir(), os.environ.get("E2E_PROFILE", "debug"), "swarmllm-desktop")
    data = tempfile.mkdtemp(prefix="swarmllm-desktop-")
    port = free_port()
    env = node_env(data)
    env["SWARMLLM_API_PORT"] = str(port)
    env["SWARMLLM_MODEL"] = test_model()
    updates_dir = tempfile.mkdtemp(prefix="swarmllm-updates-")
    update_server, update, new_bytes, update_target = start_update_server(updates_dir)
    # The app trusts the test server's key (an environment variable, never the
    # API) and asks it for updates; an update replaces `update_target`.
    env.update({"SWARMLLM_UPDATE_PUBKEY": update["pubkey"], "SWARMLLM_UPDATE_ENDPOINT": update["endpoint"],
                "SWARMLLM_UPDATE_TARGET": update_target, "SWARMLLM_UPDATE_CHECK_INTERVAL_HOURS": "0"})
    driver_port, native_port = free_port(), free_port()
    driver = subprocess.Popen(
        ["tauri-driver", "--port", str(driver_port), "--native-port", str(native_port)],
        env=env, stdout=subprocess.DEVNULL, stderr=open(os.path.join(out_dir, "tauri-driver.log"), "w"))
    r = Results()
    session = None
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for("tauri-driver", lambda: http("GET", f"http://127.0.0.1:{driver_port}/status")[0] == 200)
        started = time.monotonic()
        session = Session(f"http://127.0.0.1:{driver_port}", {"alwaysMatch": {
            "tauri:options": {"application": app},
        }}, timeout=180, commands_url=f"http://127.0.0.1:{native_port}")
        wait_for("a usable dashboard", lambda: session.js("return document.body.dataset.ready") == "true"
                 and session.js("return document.querySelector('#node-id') !== null"), timeout=120)
        startup = time.monotonic() - started
        key = api_key(data, port)

        def in_app():
            assert session.js("return Boolean(window.__TAURI__ && window.__TAURI__.core)"), "not inside the app"
            status, v = http("GET", f"{base}/api/admin/stats")
            assert status == 200 and v["node_id"], v
        r.check("the app hosts the node and still binds the localhost API", in_app)
        ui_checks(r, session, base, key, out_dir, in_app=True, data_dir=data)

        def updates():
            auth = {"Authorization": f"Bearer {key}"}
            with open(update_target, "rb") as f:
                old_bytes = f.read()

            def serve(mode):
                assert http("POST", update["control"], {"mode": mode})[0] == 200

            # Found from the UI: the version, its notes, and a toast from the
            # WebSocket's update_available.
            session.js("location.hash = '#/settings'")
            wait_for("the settings page", lambda: session.js("return document.querySelector('#update-check') !== null"))
            session.click("#update-check")
            wait_for("the offer", lambda: UPDATE_VERSION in session.text("#update-status"), timeout=30)
            assert "calmer tray" in session.text("#update-notes"), session.text("#update-notes")
            wait_for("the update toast", lambda: f"SwarmLLM {UPDATE_VERSION} is available" in session.text("#toast"),
                     timeout=20)
            session.page_screenshot(os.path.join(out_dir, "app-updates-available.png"))
            status, v = http("GET", f"{base}/api/admin/version")
            assert v["updates"]["supported"] and v["updates"]["available"]["version"] == UPDATE_VERSION, v
            # The CLI drives the app's node the same way.
            cli = os.path.join(target_dir(), "debug", "swarmllm")
            out = subprocess.run([cli, "--data-dir", data, "--api-port", str(port), "update", "check"],
                                 capture_output=True, text=True, timeout=60)
            assert out.returncode == 0 and f"SwarmLLM {UPDATE_VERSION} is available" in out.stdout, out
            # Refused, each with a clear message, and nothing installed.
            for mode, words in [("tampered", "signature"), ("unsigned", "signature"),
                                ("wrong-key", "signature"), ("downgrade", "version")]:
                serve(mode)
                status, v = http("POST", f"{base}/api/admin/update/apply", {}, headers=auth)
                assert status == 422 and v["error"]["code"] == "UPDATE_SIGNATURE_INVALID", (mode, status, v)
                assert words in v["error"]["message"], (mode, v)
                with open(update_target, "rb") as f:
                    assert f.read() == old_bytes, f"{mode}: the file was replaced"
            # The key is needed to install.
            assert http("POST", f"{base}/api/admin/update/apply", {})[0] == 401
            # Installed from the UI: the signed artifact replaces the app's file.
            serve("good")
            session.click("#update-check")
            wait_for("the offer again", lambda: session.js("return !document.querySelector('#update-apply').hidden"))
            session.click("#update-apply")
            wait_for("the install", lambda: "is installed" in session.text("#update-status"), timeout=60)
            with open(update_target, "rb") as f:
                assert f.read() == new_bytes, "the update did not replace the file"
            assert session.js("return !document.querySelector('#update-restart').hidden"), "no restart button"
            status, v = http("GET", f"{base}/api/admin/version")
            assert v["updates"]["applied"] == {"version": UPDATE_VERSION, "restart_required": True}, v
            # Nothing newer than what the server offers: up to date.
            serve("none")
            status, v = http("POST", f"{base}/api/admin/update/check", {})
            assert status == 200 and v["update_available"] is False, v
        r.check("updates: a signed newer version found, downloaded and installed; bad ones refused", updates)

        pid = app_pid(app)
        # Idle: let the UI settle on the dashboard, then read the resident set.
        session.js("location.hash = '#/dashboard'")
        wait_for("the dashboard again", lambda: session.js("return document.body.dataset.page") == "dashboard")
        idle = rss_mb(pid) if pid else 0.0
        web = 0.0
        if pid:
            kids = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
            web = sum(rss_mb(int(k)) for k in kids if os.path.exists(f"/proc/{k}"))
        print(f"start-up to a usable dashboard: {startup:.1f} s; idle memory: app process "
              f"{idle:.0f} MB RSS (node + model + UI process) + WebKit helpers {web:.0f} MB", flush=True)

        def tray_status():
            # The tray's status line and check mark, as the app shows them.
            def shown():
                return session.js_async("const done = arguments[arguments.length - 1];"
                                      " window.__TAURI__.core.invoke('tray_status').then(done, (e) => done({error: String(e)}));")
            first = wait_for("the status line", lambda: shown().get("status"))
            assert "Serving smollm2-135m-instruct.q4_1" in first and "0 peers" in first \
                and "private mode off" in first, first
            # Private mode switched through the API: the tray follows.
            auth = {"Authorization": f"Bearer {key}"}
            assert http("PUT", f"{base}/api/pool/private-mode", {"enabled": True}, headers=auth)[0] == 200
            try:
                wait_for("the tray to say private mode on", lambda: "private mode on" in shown()["status"]
                         and shown()["private_mode_checked"] is True, timeout=20)
            finally:
                http("PUT", f"{base}/api/pool/private-mode", {"enabled": False}, headers=auth)
            wait_for("the tray to say private mode off", lambda: "private mode off" in shown()["status"], timeout=20)
        r.check("the tray shows what the node serves, its peers and private mode", tray_status)

        def close_keeps_node():
            # As the title bar's close button does: a close request, which the app
            # answers by hiding the window to the tray.
            session.js("window.__TAURI__.window.getCurrentWindow().close()")
            wait_for("the window to hide", lambda: session.js("return document.visibilityState") == "hidden",
                     timeout=20)
            assert http("GET", f"{base}/health")[0] == 200
            assert pid is None or os.path.exists(f"/proc/{pid}")
        r.check("closing the window keeps the node running", close_keeps_node)

        def shutdown_quits():
            status, v = http("POST", f"{base}/api/admin/shutdown", {}, headers={"Authorization": f"Bearer {key}"})
            assert status == 200, v
            wait_for("the app to exit", lambda: pid is None or not os.path.exists(f"/proc/{pid}")
                     or open(f"/proc/{pid}/status").read().find("State:\tZ") >= 0, timeout=30)
        r.check("a graceful shutdown ends the app", shutdown_quits)

        def first_run_in_app():
            # A fresh install of the app: no model, no peers, an empty data dir; the
            # catalog is the local Hub test server's.
            data2 = tempfile.mkdtemp(prefix="swarmllm-app-first-run-")
            port2, hub_port = free_port(), free_port()
            hub = subprocess.Popen(
                [os.path.join(target_dir(), "debug", "swarmllm-hub-testserver"), "--hub-port", str(hub_port),
                 "--architecture", "llama", f"{HUB_REPO}={test_model()}"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            env2 = node_env(data2)
            env2.update({"SWARMLLM_API_PORT": str(port2), "HF_ENDPOINT": f"http://127.0.0.1:{hub_port}",
                         "HF_HOME": data2, "HF_TOKEN": ""})
            env2.pop("SWARMLLM_MODEL", None)
            # The web view keeps its local storage (where the UI notes it greeted
            # the user) under the XDG data dir: a fresh one, as on a new machine.
            for var in ("XDG_DATA_HOME", "XDG_CONFIG_HOME", "XDG_CACHE_HOME"):
                env2[var] = os.path.join(data2, var.lower())
            d2, n2 = free_port(), free_port()
            driver2 = subprocess.Popen(["tauri-driver", "--port", str(d2), "--native-port", str(n2)], env=env2,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            fresh = None
            try:
                wait_for("tauri-driver", lambda: http("GET", f"http://127.0.0.1:{d2}/status")[0] == 200)
                wait_for("the Hub test server", lambda: http("GET", f"http://127.0.0.1:{hub_port}/api/models")[0] == 200)
                started = time.monotonic()
                fresh = Session(f"http://127.0.0.1:{d2}", {"alwaysMatch": {"tauri:options": {"application": app}}},
                                timeout=180, commands_url=f"http://127.0.0.1:{n2}")
                first_run_flow(fresh, out_dir, started, HUB_REPO, prefix="app-")
                key2 = api_key(data2, port2)
                http("POST", f"http://127.0.0.1:{port2}/api/admin/shutdown", {},
                     headers={"Authorization": f"Bearer {key2}"})
            finally:
                if fresh:
                    fresh.quit()
                driver2.terminate()
                hub.terminate()
                shutil.rmtree(data2, ignore_errors=True)
        r.check("first run in the app: welcome, the recommended model, chat to the first token", first_run_in_app)
    finally:
        if session:
            session.quit()
        driver.terminate()
        try:
            driver.wait(timeout=20)
        except subprocess.TimeoutExpired:
            driver.kill()
        subprocess.run(["pkill", "-f", app], check=False)
        update_server.terminate()
        shutil.rmtree(data, ignore_errors=True)
        shutil.rmtree(updates_dir, ignore_errors=True)
    print(f"screenshots in {out_dir}")
    return r.summary()


if __name__ == "__main__":
    sys.exit(main())
