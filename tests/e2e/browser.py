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


def main():
    out_dir = os.environ.get("E2E_OUT", tempfile.mkdtemp(prefix="swarmllm-e2e-"))
    os.makedirs(out_dir, exist_ok=True)
    data = tempfile.mkdtemp(prefix="swarmllm-browser-")
    port = free_port()
    node = subprocess.Popen(
        [os.path.join(target_dir(), "debug", "swarmllm"), "--api-port", str(port), "serve",
         "--model", test_model()],
        env=node_env(data), stdout=subprocess.DEVNULL,
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

        def no_key_no_writes():
            status, _ = http("POST", f"{base}/api/pool/create", {"name": "x"},
                             headers={"Origin": base})
            assert status == 401, status
        r.check("the API still refuses writes without the key", no_key_no_writes)
    finally:
        if session:
            session.quit()
        driver.terminate()
        node.terminate()
        node.wait(timeout=30)
        shutil.rmtree(profile, ignore_errors=True)
        shutil.rmtree(data, ignore_errors=True)
    print(f"screenshots in {out_dir}")
    return r.summary()


if __name__ == "__main__":
    sys.exit(main())
